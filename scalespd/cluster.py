"""`python -m scalespd.cluster PROFILES --out DIR`: cluster profiles a user already has.

PROFILES is an (M, N) matrix — rows are inputs, columns subcomponents — as a `.npy` file, a zarr
array, or a scalespd profiles directory (holding `ci.zarr`). The command runs the alive filter
(max over rows > tau, streamed over row chunks), the correlation k-NN graph
(`scalespd.graph.build_graph`), spectral clustering (`scalespd.spectral`) and a summary, and
writes into DIR:

    clusters.csv     one row per column: component,name,layer,module,alive,connected_component,
                     cluster (−1 for dead / excluded columns)
    summary.json     counts (n_components, n_alive, n_edges, n_connected_components, n_clusters,
                     cluster_sizes, layer_span_counts, ...), parameters, timings
    components.csv   per-column statistics (max, mean, std, frac_active, alive) and metadata
    spectra.json     per-component eigenvalues and chosen K
    graph/           the k-NN graph (scalespd.graph.GraphResult.save)

Everything is written into a temporary sibling directory that is renamed to DIR only when all
of it is complete, so an interrupted or failed run never leaves a DIR that looks finished.
Bad input (missing file, not 2-D, NaN/inf, a metadata CSV with the wrong number of rows or
missing columns) stops with a message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from scalespd.config import GraphConfig, ProfilesConfig, SpectralConfig

log = logging.getLogger("scalespd.cluster")

META_COLUMNS = ["name", "layer", "module"]
# Rows per block of the alive-filter pass are chosen so a float64 block stays near this size.
_BLOCK_BYTES = 128 << 20
# With --executor auto, Ray is used from this many alive columns on (or when a cluster is set).
_RAY_MIN_ALIVE = 5000


class InputError(ValueError):
    """Bad user input; the message names the file or flag and what was expected."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def open_matrix(path: Path) -> Any:
    """The (M, N) profile matrix at `path`: .npy (memory-mapped), a zarr array, or a profiles
    directory holding ci.zarr. Never read whole."""
    if not path.exists():
        raise InputError(f"PROFILES {path} does not exist")
    if path.suffix == ".npy":
        try:
            X = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise InputError(f"PROFILES {path} is not a readable .npy array ({err})") from None
    else:
        import zarr  # noqa: PLC0415

        target = path / "ci.zarr" if (path / "ci.zarr").exists() else path
        try:
            X = zarr.open_array(str(target), mode="r")
        except Exception as err:  # zarr raises several types for "not an array here"
            raise InputError(
                f"PROFILES {path} is neither a .npy file nor a zarr array ({err})"
            ) from None
    if len(X.shape) != 2:
        raise InputError(
            f"PROFILES {path} must be a 2-D array (M rows = inputs, N columns = subcomponents); "
            f"got shape {tuple(X.shape)}"
        )
    if np.dtype(X.dtype).kind not in "fiu":
        raise InputError(f"PROFILES {path} must hold numbers; got dtype {X.dtype}")
    M, N = (int(s) for s in X.shape)
    if M < 2 or N < 1:
        raise InputError(f"PROFILES {path} needs at least 2 rows and 1 column; got shape {(M, N)}")
    return X


def read_metadata(path: Path | None, n_cols: int) -> pd.DataFrame:
    """component,name,layer,module(,module_type) for each of the n_cols columns: from the CSV
    at `path` (needs name, layer, module; one row per column, in column order) or generic."""
    if path is None:
        return pd.DataFrame({"component": np.arange(n_cols), "name": [f"col:{i}" for i in
                             range(n_cols)], "layer": 0, "module": "", "module_type": ""})
    if not path.is_file():
        raise InputError(f"--components {path} does not exist")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"--components {path} is not a readable CSV ({err})") from None
    missing = [c for c in META_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"--components {path} lacks column(s) {missing}; it needs "
                         f"{META_COLUMNS} with one row per profile column")
    if len(df) != n_cols:
        raise InputError(f"--components {path} has {len(df)} rows but PROFILES has {n_cols} "
                         "columns (one metadata row per column expected)")
    if "component" in df.columns and not np.array_equal(df["component"].to_numpy(),
                                                         np.arange(n_cols)):
        raise InputError(f"--components {path}: column 'component' must be 0..{n_cols - 1} "
                         "in order (the column index)")
    layer = pd.to_numeric(df["layer"], errors="coerce")
    if layer.isna().any() or (layer != layer.round()).any():
        bad = int(np.flatnonzero((layer.isna() | (layer != layer.round())).to_numpy())[0])
        raise InputError(f"--components {path}: 'layer' must be an integer in every row "
                         f"(row {bad} holds {df['layer'].iloc[bad]!r})")
    out = pd.DataFrame({"component": np.arange(n_cols), "name": df["name"].astype(str),
                        "layer": layer.astype(np.int64), "module": df["module"].astype(str)})
    out["module_type"] = df["module_type"].astype(str) if "module_type" in df.columns else ""
    return out


def column_stats(X: Any, tau: float, source: str) -> pd.DataFrame:
    """max, mean, std, frac_active (> tau), alive (max > tau) per column, streaming over row
    blocks in float64; NaN or inf anywhere is an error naming the first offending cell."""
    from scalespd.profiles import ColumnStats  # noqa: PLC0415

    M, N = (int(s) for s in X.shape)
    chunk = int(getattr(X, "chunks", (M,))[0] or M)
    rows = max(1, _BLOCK_BYTES // (8 * N))
    rows = max(chunk, rows // chunk * chunk)  # whole zarr chunks per read
    total = ColumnStats.empty(N, tau)
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        block = np.asarray(X[r0:r1], dtype=np.float64)
        bad = ~np.isfinite(block)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise InputError(f"PROFILES {source} holds NaN or inf (first at row {r0 + i}, column "
                             f"{j}: {block[i, j]}); profiles must be finite")
        total = total.merge(ColumnStats.of(block, tau))
    return pd.DataFrame({"max": total.max, "mean": total.mean, "std": total.std,
                         "frac_active": total.frac_active, "alive": total.max > tau})


# --------------------------------------------------------------------------------------------
# Output directory handling
# --------------------------------------------------------------------------------------------


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Check DIR is writable and new (or --overwrite); return the temporary directory to fill."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"--out {out} already exists and is not empty; pass --overwrite to "
                         "replace it or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory into place (replacing an old DIR last)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    g, s, pr = GraphConfig(), SpectralConfig(), ProfilesConfig()
    p = argparse.ArgumentParser(
        prog="python -m scalespd.cluster",
        description="Cluster subcomponent activation profiles (M inputs x N subcomponents) into "
                    "mechanisms: alive filter -> correlation k-NN graph -> spectral clustering.",
    )
    p.add_argument("profiles", type=Path,
                   help="(M, N) matrix: .npy file, zarr array, or a profiles dir with ci.zarr")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--components", type=Path,
                   help="CSV with name,layer,module (optional module_type) per column")
    p.add_argument("--tau", type=float, default=pr.tau, help="alive if max > tau (%(default)s)")
    p.add_argument("--k", type=int, default=g.k, help="neighbours per node (%(default)s)")
    p.add_argument("--edge-threshold", default=str(g.edge_threshold),
                   help="'auto' (chance level from the data) or a correlation; 0 = the paper's "
                        "plain ReLU clamp (%(default)s)")
    p.add_argument("--k-max", type=int, default=s.k_max, help="K_max (%(default)s)")
    p.add_argument("--mode", choices=["per_component", "largest_component"], default=s.mode)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--always-on", type=float, default=None, metavar="FRACTION",
                   help="group columns active on more than this fraction of rows separately")
    p.add_argument("--no-recursive-split", action="store_true",
                   help="do not re-split components whose eigengap picks K_max")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                   help="Ray tasks or this process (auto: Ray from %d alive columns or when "
                        "RAY_ADDRESS is set)" % _RAY_MIN_ALIVE)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _configs(args: argparse.Namespace) -> tuple[GraphConfig, SpectralConfig]:
    thr: Any = args.edge_threshold
    if thr != "auto":
        try:
            thr = float(thr)
        except ValueError:
            raise InputError(f"--edge-threshold must be 'auto' or a number, got {thr!r}") from None
    if not 0.0 <= args.tau < 1.0:
        raise InputError(f"--tau must be in [0, 1), got {args.tau}")
    try:
        g = GraphConfig(k=args.k, edge_threshold=thr, device=args.device)
        s = SpectralConfig(k_max=args.k_max, mode=args.mode, seed=args.seed,
                           always_on_fraction=args.always_on, device=args.device,
                           recursive_split=not args.no_recursive_split)
    except ValidationError as err:
        e = err.errors()[0]
        flag = "--" + str(e["loc"][0]).replace("_", "-")
        raise InputError(f"{flag}: {e['msg']}") from None
    return g, s


def run_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """The whole command; returns the summary. Raises InputError on bad input."""
    from scalespd.backend import resolve_device  # noqa: PLC0415
    from scalespd.graph import build_graph  # noqa: PLC0415
    from scalespd.spectral.clustering import (  # noqa: PLC0415
        cluster_alive,
        cluster_summary,
        clusters_table,
    )
    from scalespd.spectral.stage import write_outputs  # noqa: PLC0415

    t0 = time.perf_counter()
    gcfg, scfg = _configs(args)
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:
        raise InputError(f"--device: {err}") from None
    X = open_matrix(args.profiles)
    M, N = (int(s) for s in X.shape)
    meta = read_metadata(args.components, N)
    out = Path(args.out)
    tmp = prepare_out(out, args.overwrite)
    try:
        timings: dict[str, float] = {}
        stats = column_stats(X, args.tau, str(args.profiles))
        table = pd.concat([meta, stats], axis=1)
        alive = np.flatnonzero(table["alive"].to_numpy())
        timings["alive_filter_s"] = time.perf_counter() - t0
        if alive.size == 0:
            raise InputError(f"no column of PROFILES {args.profiles} exceeds --tau {args.tau} "
                             f"(largest value {float(stats['max'].max()):.4g}); lower --tau")
        log.info("%d of %d columns alive (max > %g), M = %d", alive.size, N, args.tau, M)

        use_ray = args.executor == "ray" or (args.executor == "auto" and (
            alive.size >= _RAY_MIN_ALIVE or bool(os.environ.get("RAY_ADDRESS"))))
        if use_ray:
            from scalespd.raytools import ensure_ray  # noqa: PLC0415

            ensure_ray()

        t1 = time.perf_counter()
        graph = build_graph(X, gcfg, columns=alive, device=device, use_ray=use_ray)
        graph.save(tmp / "graph")
        timings["graph_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        frac = table["frac_active"].to_numpy()[alive]
        result = cluster_alive(graph, scfg, frac_active=frac, profiles=X, use_ray=use_ray,
                               device=device, progress=args.verbose)
        clusters = clusters_table(table, graph.columns, graph.labels, result.labels)
        timings["spectral_s"] = time.perf_counter() - t2

        csum = cluster_summary(clusters)
        table.to_csv(tmp / "components.csv", index=False)
        write_outputs(tmp, clusters, result, {"k_max": scfg.k_max, "seed": scfg.seed,
                                              "device": device})
        timings["total_s"] = time.perf_counter() - t0
        summary = {
            "n_components": N,
            "n_rows": M,
            "n_alive": int(alive.size),
            "n_zero_var": int(graph.zero_var.sum()),
            "n_edges": int(graph.graph.nnz // 2),
            "n_connected_components": int(graph.labels.max()) + 1 if graph.labels.size else 0,
            "n_isolated": int((np.bincount(graph.labels) == 1).sum()),
            **csum,
            "n_always_on": result.info["n_always_on"],
            "edge_threshold": float(graph.threshold),
            "params": {"tau": args.tau, "k": gcfg.k, "edge_threshold": gcfg.edge_threshold,
                       "k_max": scfg.k_max, "mode": scfg.mode, "seed": scfg.seed,
                       "always_on_fraction": scfg.always_on_fraction,
                       "recursive_split": scfg.recursive_split, "device": device,
                       "executor": "ray" if use_ray else "local"},
            "inputs": {"profiles": str(args.profiles), "shape": [M, N], "dtype": str(X.dtype),
                       "components": None if args.components is None else str(args.components)},
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        publish(tmp, out)
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        summary = run_cluster(args)
    except (InputError, ValueError) as err:
        if args.verbose:
            log.exception("failed")
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = summary["cluster_sizes"]
    print(f"{summary['n_alive']} of {summary['n_components']} columns alive, "
          f"{summary['n_edges']} edges, {summary['n_connected_components']} connected components,"
          f" {summary['n_clusters']} clusters ({summary['n_singletons']} singletons; largest "
          f"{sizes[:5]}) in {summary['timings']['total_s']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
