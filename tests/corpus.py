"""The regression corpus of real SPD profiles (issue 13): the alive columns of each toy
reproduction run, row-subsampled, stored as float16 + zstd with their one-hot ground truth, so
that tests re-cluster real decompositions in seconds without re-running SPD.

One file per run, tests/data/corpus/<name>.npz (written by bench/build_corpus.py), holding:
- profiles: uint8, the zstd-compressed C-order float16 bytes of the (M_sub, n) alive profiles
  (M_sub: at most 10,000 rows, a seeded random subsample kept in order);
- shape: (2,) int64 = (M_sub, n); n_rows_total: the run's M; row_seed: the subsample's seed;
- columns: (n,) global column ids; names (n,) str; layers (n,) int64;
- frac_active: (n,) fraction of all M rows with CI > tau (what the spectral stage reads);
- labels: (n,) `scalespd.report.groundtruth.FeatureAssignment.labels` (feature id, DENSE,
  INACTIVE or TIE); n_features; feature_layers (layers every mechanism must cover);
- tau, name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CORPUS_DIR = Path(__file__).parent / "data" / "corpus"


@dataclass(frozen=True)
class CorpusEntry:
    """One decoded corpus file. X: (M_sub, n) float32 profiles of the n alive columns."""

    name: str
    X: np.ndarray
    columns: np.ndarray
    names: list[str]
    layers: np.ndarray
    frac_active: np.ndarray
    labels: np.ndarray
    n_features: int
    feature_layers: set[int]
    tau: float
    n_rows_total: int


def encode_profiles(X: np.ndarray, level: int = 19) -> np.ndarray:
    """(M, n) array -> uint8 zstd bytes of its float16 C-order values."""
    from numcodecs import Zstd

    raw = np.ascontiguousarray(X, dtype=np.float16).tobytes()
    return np.frombuffer(Zstd(level=level).encode(raw), dtype=np.uint8)


def decode_profiles(blob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of encode_profiles: (M, n) float32."""
    from numcodecs import Zstd

    raw = Zstd().decode(np.asarray(blob, dtype=np.uint8).tobytes())
    return np.frombuffer(raw, dtype=np.float16).reshape(shape).astype(np.float32)


def load_entry(path: Path) -> CorpusEntry:
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(s) for s in z["shape"])
        return CorpusEntry(
            name=str(z["name"]),
            X=decode_profiles(z["profiles"], (shape[0], shape[1])),
            columns=z["columns"].astype(np.int64),
            names=[str(s) for s in z["names"]],
            layers=z["layers"].astype(np.int64),
            frac_active=z["frac_active"].astype(np.float64),
            labels=z["labels"].astype(np.int64),
            n_features=int(z["n_features"]),
            feature_layers={int(x) for x in z["feature_layers"]},
            tau=float(z["tau"]),
            n_rows_total=int(z["n_rows_total"]),
        )


def corpus_names() -> list[str]:
    return sorted(p.stem for p in CORPUS_DIR.glob("*.npz"))


def load(name: str) -> CorpusEntry:
    return load_entry(CORPUS_DIR / f"{name}.npz")
