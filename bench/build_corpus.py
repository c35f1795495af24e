"""Build the clustering regression corpus (tests/data/corpus/<name>.npz, see tests/corpus.py)
from finished toy reproduction runs:

    python bench/build_corpus.py runs/repro/tms_5-2 runs/repro/resid_mlp1 ... [--max-rows 10000]

Takes each run's alive profile columns (a seeded random subsample of at most --max-rows rows,
kept in their original order), its components table and the evaluate stage's one-hot CI, and
stores them with the ground-truth feature assignment the report scores against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from corpus import CORPUS_DIR, encode_profiles, load_entry  # noqa: E402

from scalespd.config import parse_config, read_yaml  # noqa: E402
from scalespd.report.inputs import load_run  # noqa: E402
from scalespd.report.stage import _assign, _expected_structure  # noqa: E402


def build(run_dir: Path, max_rows: int, seed: int) -> Path:
    from scalespd.profiles.reader import open_ci

    # The corpus needs the target, profiles and report settings only; a run made before a
    # graph / spectral field was renamed still builds.
    data = read_yaml((run_dir / "config.yaml").read_text())
    data.pop("graph", None)
    data.pop("spectral", None)
    cfg = parse_config(data, str(run_dir / "config.yaml"))
    art = load_run(run_dir)
    if art.onehot is None:
        raise SystemExit(f"{run_dir}: no one-hot CI (not a toy run?)")
    alive = art.alive
    ids = np.asarray(art.alive_ids, dtype=np.int64)
    assignment = _assign(cfg, art.onehot[:, ids], art)
    feature_layers, _ = _expected_structure(cfg, art)
    ci = open_ci(run_dir / "profiles" / "ci.zarr")  # dense or sparse layout
    M = int(ci.shape[0])
    rows = np.arange(M)
    if M > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(M, size=max_rows, replace=False))
    X = np.asarray(ci.get_orthogonal_selection((slice(0, M), ids)), dtype=np.float32)[rows]
    out = CORPUS_DIR / f"{cfg.name}.npz"
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(
        out, name=cfg.name, profiles=encode_profiles(X),
        shape=np.asarray(X.shape, dtype=np.int64), n_rows_total=M, row_seed=seed,
        columns=ids, names=np.asarray(alive["name"].astype(str).tolist()),
        layers=alive["layer"].to_numpy(np.int64),
        frac_active=alive["frac_active"].to_numpy(np.float64),
        labels=assignment.labels.astype(np.int64), n_features=assignment.n_features,
        feature_layers=np.asarray(sorted(feature_layers or []), dtype=np.int64),
        tau=cfg.profiles.tau,
    )
    e = load_entry(out)
    print(f"{out}: {e.X.shape}, {out.stat().st_size / 1e6:.2f} MB, "
          f"{(e.labels >= 0).sum()} feature-serving, {(e.labels == -1).sum()} dense")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--max-rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for r in args.runs:
        build(r, args.max_rows, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
