"""Reading the earlier stages' outputs for the report.

Everything is indexed by the n *alive* subcomponents, in ascending global column order (the
order of `components.csv` rows with alive = True). The graph's own node order (its `columns`) is
mapped onto that order here, so the rest of the report never has to think about it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from upath import UPath

from scalespd import storage
from scalespd.errors import StageInputError
from scalespd.profiles.reader import as_bool, read_components
from scalespd.spectral.clustering import CLUSTER_COLUMNS

if TYPE_CHECKING:
    from scalespd.report.lm_inputs import LMInputs


class ReportInputError(StageInputError):
    """An earlier stage's output is missing or not in the expected format."""


@dataclass
class RunArtifacts:
    """What the report reads. n = number of alive subcomponents, N = all subcomponents.

    components: (N rows) profiles/components.csv.
    alive_ids: (n,) global column ids of the alive subcomponents, ascending.
    clusters: (n,) cluster id per alive node (-1: excluded).
    connected: (n,) connected-component id per alive node.
    graph: (n, n) symmetric CSR weights in alive_ids order, or None if no graph was saved.
    spectra: per connected component that was solved: component, size, eigenvalues, k.
    profiles_path: the (M, N) ci.zarr, or None.
    manifest: run_dir/manifest.json (empty if absent).
    """

    components: pd.DataFrame
    alive_ids: np.ndarray
    clusters: np.ndarray
    connected: np.ndarray
    graph: sp.csr_matrix | None
    spectra: list[dict[str, Any]]
    profiles_path: UPath | None
    manifest: dict[str, Any] = field(default_factory=dict)
    graph_threshold: float | None = None
    graph_summary: dict[str, Any] = field(default_factory=dict)
    spectral_info: dict[str, Any] = field(default_factory=dict)
    # The "report both" clustering of the spectral stage (spectral/clusters_alternative.csv):
    # {"label", "always_on_fraction", "n_always_on", "clusters": (n,) in alive_ids order}.
    alternative: dict[str, Any] | None = None
    # Written by the evaluate stage for toy targets: (F, N) CI on one-hot inputs in components
    # order, and the target's ground truth (`scalespd.targets.ground_truth`).
    onehot: np.ndarray | None = None
    truth: dict[str, Any] | None = None
    # Language-model targets: token / sequence / position per profile row, token texts,
    # ablation results, decomposition metrics (`scalespd.report.lm_inputs`); None for toys.
    lm: LMInputs | None = None
    # The spectral stage's cluster quality without ground truth (spectral/quality.json,
    # `scalespd.spectral.quality`); None when absent (a run directory from before it existed).
    quality: dict[str, Any] | None = None

    @property
    def alive(self) -> pd.DataFrame:
        """The components.csv rows of the alive nodes, in node order."""
        return self.components.loc[self.alive_ids]


def _read_csv(path: UPath, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ReportInputError(f"{storage.url(path)} is missing (run the stage that writes it "
                               "first)")
    with path.open("rb") as f:
        df = pd.read_csv(f)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReportInputError(f"{storage.url(path)}: missing columns {missing}; expected "
                               f"{list(required)}")
    return df


def read_clusters(spectral_dir: UPath, components: pd.DataFrame,
                  name: str = "clusters.csv") -> pd.DataFrame:
    """clusters.csv (or another table of the same columns) indexed by global component id,
    checked against components.csv."""
    path = spectral_dir / name
    df = _read_csv(path, CLUSTER_COLUMNS)
    df["alive"] = as_bool(df["alive"])
    df = df.set_index("component", drop=False).sort_index()
    if not df.index.equals(components.index):
        raise ReportInputError(
            f"{storage.url(path)}: has {len(df)} rows for components "
            f"{df.index.min()}..{df.index.max()}; expected one row per component of "
            f"profiles/components.csv ({len(components)})"
        )
    if (df["name"].astype(str).to_numpy() != components["name"].astype(str).to_numpy()).any():
        raise ReportInputError(f"{storage.url(path)}: component names differ from "
                               "profiles/components.csv")
    return df


def read_alternative(spectral_dir: UPath, components: pd.DataFrame, alive_ids: np.ndarray
                     ) -> dict[str, Any] | None:
    """The spectral stage's second clustering (other always-on setting) in alive_ids order with
    its description from spectra.json, or None when the stage wrote none."""
    path = spectral_dir / "clusters_alternative.csv"
    if not path.is_file():
        return None
    table = read_clusters(spectral_dir, components, path.name)
    raw = json.loads((spectral_dir / "spectra.json").read_text())
    meta = raw.get("alternative") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        raise ReportInputError(f"{storage.url(spectral_dir / 'spectra.json')}: no "
                               f"'alternative' record for {path.name}; re-run the spectral "
                               "stage")
    return {**meta, "clusters": table.loc[alive_ids, "cluster"].to_numpy(dtype=np.int64)}


def read_quality(spectral_dir: UPath) -> dict[str, Any] | None:
    """spectral/quality.json (`scalespd.spectral.quality`), or None when it is absent."""
    path = spectral_dir / "quality.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("clusters"), list):
        raise ReportInputError(f"{storage.url(path)}: not a cluster-quality document (no "
                               "'clusters' list); re-run the spectral stage")
    return raw


def read_evaluation(evaluate_dir: UPath, components: pd.DataFrame) -> dict[str, Any]:
    """{"onehot": (F, N) float32, "truth": dict} from the evaluate stage (toys), or Nones when
    it wrote no one-hot CI."""
    path = evaluate_dir / "onehot_ci.npy"
    if not path.is_file():
        return {"onehot": None, "truth": None}
    with path.open("rb") as f:
        onehot = np.load(f, allow_pickle=False)
    if onehot.ndim != 2 or onehot.shape[1] != len(components):
        raise ReportInputError(f"{storage.url(path)}: shape {onehot.shape}, expected "
                               f"(F, {len(components)}) (one column per component); re-run "
                               "the evaluate stage")
    truth = json.loads((evaluate_dir / "ground_truth.json").read_text())
    return {"onehot": onehot, "truth": truth}


def read_spectral_info(spectral_dir: UPath) -> dict[str, Any]:
    """The clustering info of spectra.json (n_always_on, n_pieces, timings, ...), or {}."""
    path = spectral_dir / "spectra.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return dict(raw.get("info", {})) if isinstance(raw, dict) else {}


def read_spectra(spectral_dir: UPath) -> list[dict[str, Any]]:
    """Per-component spectra, normalised to dicts with component, size, eigenvalues, k.

    Accepts a list of records or a mapping component-id -> record; `k`, `K` or `chosen_k` for the
    chosen number of clusters. Missing file -> []."""
    path = spectral_dir / "spectra.json"
    if not path.is_file():
        return []
    raw = json.loads(path.read_text())
    for key in ("pieces", "components"):  # the spectral stage's document: {"info", "pieces"}
        if isinstance(raw, dict) and key in raw:
            raw = raw[key]
            break
    items: list[tuple[Any, Any]] = list(raw.items() if isinstance(raw, dict) else enumerate(raw))
    out = []
    for key, rec in items:
        if not isinstance(rec, dict) or "eigenvalues" not in rec:
            raise ReportInputError(f"{storage.url(path)}: entry {key!r} has no 'eigenvalues'")
        k = next((rec[f] for f in ("k", "K", "chosen_k", "n_clusters") if f in rec), None)
        out.append({
            "component": rec.get("component", rec.get("connected_component",
                                                      rec.get("key", key))),
            "depth": int(rec.get("depth", 0)),
            "size": rec.get("size", rec.get("n_nodes")),
            "eigenvalues": [float(v) for v in rec["eigenvalues"]],
            "k": None if k is None else int(k),
        })
    return out


def _load_graph(graph_dir: UPath, alive_ids: np.ndarray) -> tuple[sp.csr_matrix | None,
                                                                 float | None, dict[str, Any]]:
    """The saved k-NN graph re-indexed to alive_ids order, its edge threshold and its
    summary.json (None, None, {} if the graph stage left no directory)."""
    if not graph_dir.exists():
        return None, None, {}
    from scalespd.graph import GraphResult  # noqa: PLC0415

    g = GraphResult.load(graph_dir)
    cols = np.asarray(g.columns)
    pos = np.searchsorted(alive_ids, cols)
    if (pos >= len(alive_ids)).any() or not np.array_equal(alive_ids[np.minimum(
            pos, len(alive_ids) - 1)], cols):
        raise ReportInputError(
            f"{storage.url(graph_dir)}: graph columns are not a subset of the alive components "
            f"of profiles/components.csv"
        )
    W = sp.csr_matrix(g.graph).tocoo()
    n = len(alive_ids)
    W = sp.csr_matrix((W.data, (pos[W.row], pos[W.col])), shape=(n, n))
    thr = getattr(g, "threshold", None)
    return W, None if thr is None else float(thr), dict(getattr(g, "summary", {}) or {})


def load_run(run_dir: storage.PathLike) -> RunArtifacts:
    """Read profiles/components.csv, spectral/clusters.csv + spectra.json (+ quality.json),
    graph/, manifest.json, evaluate/ and, for language models, the token inputs from a run
    directory."""
    from scalespd.report.lm_inputs import read_lm_inputs  # noqa: PLC0415  (it imports this)

    run_dir = storage.as_path(run_dir)
    components = read_components(run_dir / "profiles")
    clusters = read_clusters(run_dir / "spectral", components)
    alive_ids = components.index[components["alive"].to_numpy()].to_numpy()
    if not np.array_equal(clusters["alive"].to_numpy(), components["alive"].to_numpy()):
        raise ReportInputError(
            f"{storage.url(run_dir / 'spectral' / 'clusters.csv')}: 'alive' differs from "
            "profiles/components.csv"
        )
    graph, thr, gsummary = _load_graph(run_dir / "graph", alive_ids)
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    zarr_path = run_dir / "profiles" / "ci.zarr"
    return RunArtifacts(
        components=components,
        alive_ids=alive_ids,
        clusters=clusters.loc[alive_ids, "cluster"].to_numpy(dtype=np.int64),
        connected=clusters.loc[alive_ids, "connected_component"].to_numpy(dtype=np.int64),
        graph=graph,
        spectra=read_spectra(run_dir / "spectral"),
        profiles_path=zarr_path if zarr_path.exists() else None,
        manifest=manifest,
        graph_threshold=thr,
        graph_summary=gsummary,
        spectral_info=read_spectral_info(run_dir / "spectral"),
        alternative=read_alternative(run_dir / "spectral", components, alive_ids),
        **read_evaluation(run_dir / "evaluate", components),
        lm=read_lm_inputs(run_dir, manifest),
        quality=read_quality(run_dir / "spectral"),
    )


def read_profile_columns(profiles_path: storage.PathLike, columns: np.ndarray,
                         max_rows: int) -> np.ndarray:
    """(min(M, max_rows), len(columns)) float32 slice of ci.zarr: only the chunks that hold
    these columns in the first rows are read."""
    from scalespd.profiles.reader import open_ci  # noqa: PLC0415

    profiles_path = storage.as_path(profiles_path)
    arr = open_ci(profiles_path)
    if arr.ndim != 2:
        raise ReportInputError(f"{storage.url(profiles_path)}: expected a 2-D (M, N) array, "
                               f"got {arr.shape}")
    rows = min(arr.shape[0], max_rows)
    cols = np.asarray(columns, dtype=np.int64)
    order = np.argsort(cols)  # orthogonal selection wants increasing indices
    out = np.empty((rows, len(cols)), dtype=np.float32)
    if len(cols):
        out[:, order] = arr.get_orthogonal_selection((slice(0, rows), cols[order]))
    return out
