"""`build_graph`: profiles (M, N_total) -> column stats -> edge threshold -> top-k -> k-NN graph.

The same plain functions run in this process (the default; NumPy or CuPy) or as Ray tasks
(`use_ray=True`, one task per column panel for the statistics and one per row block for the
correlation tiles); both give identical top-k lists because the top-k order is total.

Pass 2 has two exact paths (graph.correlation): the dense tiled GEMM (`topk`) and the sparse
co-activation products (`sparse`; with Ray one task per pass), chosen from the column densities that
pass 1 measures. A sparse input (a scipy sparse matrix or a sparse row source,
`scalespd.graph.sparse_io`) is also read sparse in pass 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from upath import UPath

from scalespd import storage
from scalespd.backend import array_module, resolve_device
from scalespd.config import GraphConfig
from scalespd.graph.knn import components, knn_graph
from scalespd.graph.panels import panel_bounds, validate_columns, validate_matrix
from scalespd.graph.source import SourceSpec, describe, peak_rss_mb, ray_source
from scalespd.graph.sparse import plan_key, sparse_topk
from scalespd.graph.sparse_io import SparseBlocks, as_row_sliceable, is_sparse_rows
from scalespd.graph.sparse_plan import (
    BLOCK_NNZ,
    SparsePlan,
    block_rows_for,
    choose_path,
    make_plan,
)
from scalespd.graph.sparse_stats import sparse_column_stats
from scalespd.graph.stats import (
    Moments,
    ZStats,
    check_rows,
    column_stats,
    panel_moments,
    stats_from_moments,
)
from scalespd.graph.threshold import edge_threshold, filter_pairs
from scalespd.graph.topk import TileSource, empty_topk, merge_topk, row_block_topk
from scalespd.jsonio import write_json_atomic
from scalespd.progress import bar

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


@dataclass
class GraphResult:
    """The correlation k-NN graph of n selected columns.

    columns: (n,) global column ids (local node i is column columns[i]).
    mean, std, min, max: (n,) float64 column statistics (population std).
    zero_var: (n,) bool — constant columns: no neighbours, isolated, counted.
    topk_idx: (n, k) int64 local neighbour ids, best first (-1 = none).
    topk_val: (n, k) float32 correlations of those neighbours (0 where none).
    graph: (n, n) symmetric float64 CSR weight matrix (relative, mutual or union k-NN).
    labels: (n,) int64 connected-component id per node.
    threshold: the edge threshold used (candidates need correlation > threshold).
    summary: JSON-able record (threshold derivation, counts, sizes, timings, config)."""

    columns: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    zero_var: np.ndarray
    topk_idx: np.ndarray
    topk_val: np.ndarray
    graph: sp.csr_matrix
    labels: np.ndarray
    threshold: float
    summary: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: storage.PathLike) -> None:
        """Write stats.npz, topk.npz, graph.npz, labels.npy (each all or nothing), then
        summary.json (last, so its presence marks a complete output). out_dir: a local path or
        a URL."""
        out = storage.as_path(out_dir)
        storage.makedirs(out)
        (out / SUMMARY).unlink(missing_ok=True)
        with storage.atomic_writer(out / "stats.npz") as f:
            np.savez(f, columns=self.columns, mean=self.mean, std=self.std, min=self.min,
                     max=self.max, zero_var=self.zero_var)
        with storage.atomic_writer(out / "topk.npz") as f:
            np.savez(f, idx=self.topk_idx, val=self.topk_val)
        with storage.atomic_writer(out / "graph.npz") as f:
            sp.save_npz(f, self.graph)
        with storage.atomic_writer(out / "labels.npy") as f:
            np.save(f, self.labels)
        write_json_atomic(out / SUMMARY, self.summary)

    @classmethod
    def load(cls, out_dir: storage.PathLike) -> GraphResult:
        out = storage.as_path(out_dir)
        if not (out / SUMMARY).exists():
            raise FileNotFoundError(
                f"{storage.url(out)} holds no complete graph output ({SUMMARY} is missing); "
                "run the graph stage again"
            )
        summary = json.loads((out / SUMMARY).read_text())
        with (
            (out / "stats.npz").open("rb") as fs, np.load(fs) as st,
            (out / "topk.npz").open("rb") as ft, np.load(ft) as tk,
        ):
            stats = {k: st[k] for k in ("columns", "mean", "std", "min", "max", "zero_var")}
            idx, val = tk["idx"], tk["val"]
        with (out / "graph.npz").open("rb") as f:
            graph = sp.csr_matrix(sp.load_npz(f))
        with (out / "labels.npy").open("rb") as f:
            labels = np.load(f)
        return cls(**stats, topk_idx=idx, topk_val=val, graph=graph, labels=labels,
                   threshold=float(summary["threshold"]), summary=summary)


# --------------------------------------------------------------------------------------------
# Ray execution (the same functions as tasks)
# --------------------------------------------------------------------------------------------
# Tasks never receive the profile matrix: each gets a SourceSpec (a path and a header, a few
# hundred bytes) and opens the file or zarr store itself, reading only its own blocks. Putting
# the matrix in Ray's object store would materialise a memory-mapped .npy whole, copy it and
# spill it to disk (issue 16). Every task also reports its worker's peak RSS.


def _ray_panel_task(
    spec: SourceSpec, cols: np.ndarray, n_rows: int, row_chunk: int
) -> tuple[Moments, float]:
    """Pass 1 for one panel: (panel_moments of X[:, cols], this worker's peak RSS in MiB)."""
    return panel_moments(spec.open(), cols, n_rows, row_chunk), peak_rss_mb()


def _ray_block_task(
    spec: SourceSpec, columns: np.ndarray, mean: np.ndarray, scale: np.ndarray,
    geometry: tuple[int, int, int], a: int, k: int, threshold: float, device: str,
) -> tuple[int, np.ndarray, np.ndarray, float]:
    """Pass 2 for row block a: (a, values, ids, this worker's peak RSS in MiB)."""
    n_rows, tile_cols, row_chunk = geometry
    src = TileSource(spec.open(), columns, mean, scale, n_rows, tile_cols, row_chunk)
    v, i = row_block_topk(src, a, k, threshold, array_module(device))  # type: ignore[arg-type]
    return a, v, i, peak_rss_mb()


def _ray_stats(spec: SourceSpec, n_rows: int, columns: np.ndarray, cfg: GraphConfig,
               peaks: list[float]) -> ZStats:
    """Pass 1 as one Ray task per column panel; worker peak RSS appended to `peaks`."""
    import ray  # noqa: PLC0415

    task = ray.remote(num_cpus=1)(_ray_panel_task)
    refs = [task.remote(spec, columns[p0:p1], n_rows, cfg.row_chunk)
            for p0, p1 in panel_bounds(columns.size, cfg.tile_cols)]
    parts = []
    for moments, peak in ray.get(refs):
        parts.append(moments)
        peaks.append(peak)
    return stats_from_moments(n_rows, parts)


def _ray_blocks(
    src: TileSource, spec: SourceSpec, k: int, threshold: float, device: str, todo: list[int],
    peaks: list[float] | None = None, gpus_per_task: float = 1.0,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Row blocks `todo` of `src` as Ray tasks that read the matrix through `spec` (each
    reserving `gpus_per_task` GPUs on CUDA); yields (a, values, ids) as tasks finish and appends
    each worker's peak RSS to `peaks`."""
    import ray  # noqa: PLC0415

    task = ray.remote(_ray_block_task).options(
        num_cpus=1, num_gpus=gpus_per_task if device == "cuda" else 0)
    # (n,) vectors shared by every task: put once rather than pickled into each.
    shared = [ray.put(x) for x in (src.columns, src.mean, src.scale)]
    geometry = (src.n_rows, src.tile_cols, src.row_chunk)
    # Block a holds len(panels) - a tiles: submit the big ones first to balance the tail.
    # One list of arguments: Ray's typed `.remote` overloads stop at 8 parameters.
    args: list[list[Any]] = [[spec, *shared, geometry, a, k, threshold, device]
                             for a in sorted(todo)]
    pending = [task.remote(*x) for x in args]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        a, v, i, peak = ray.get(done[0])
        if peaks is not None:
            peaks.append(peak)
        yield a, v, i


class _Checkpoint:
    """The merged lists and the finished row blocks, saved now and then so that an interrupted
    pass 2 resumes. `key` identifies the inputs (columns, statistics, threshold, geometry); a
    file with another key is ignored and replaced."""

    def __init__(self, path: UPath | None, key: str, n: int, k: int, n_blocks: int,
                 every_s: float, dtype: type = np.float32) -> None:
        self.path, self.key, self.every_s = path, key, every_s
        vals0, idx0 = empty_topk(n, k)
        self.vals: np.ndarray = vals0.astype(dtype)  # float64 for the sparse path's lists
        self.idx: np.ndarray = idx0
        self.done = np.zeros(n_blocks, dtype=bool)
        self.last = time.monotonic()
        if path is not None and path.exists():
            with path.open("rb") as fh, np.load(fh) as f:
                if str(f["key"]) == key:
                    self.vals, self.idx, self.done = f["vals"], f["idx"], f["done"]
                    log.info("graph: resuming pass 2 from %s (%d of %d row blocks done)",
                             storage.url(path), int(self.done.sum()), n_blocks)

    def block_done(self, a: int) -> None:
        self.done[a] = True
        if self.path is not None and time.monotonic() - self.last >= self.every_s:
            self.save()

    def save(self) -> None:
        assert self.path is not None
        storage.makedirs(self.path.parent)
        # All or nothing: a crash leaves the previous checkpoint intact.
        with storage.atomic_writer(self.path) as f:
            np.savez(f, key=self.key, vals=self.vals, idx=self.idx, done=self.done)
        self.last = time.monotonic()


def _pass2_key(src: TileSource, k: int, threshold: float) -> str:
    h = hashlib.sha256()
    for arr in (src.columns, src.mean, src.scale):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(repr((src.n_rows, src.tile_cols, k, float(threshold))).encode())
    return h.hexdigest()


def pass2_topk(
    src: TileSource, k: int, threshold: float, device: str, spec: SourceSpec | None,
    checkpoint: UPath | None, checkpoint_every_s: float, peaks: list[float],
    gpus_per_task: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: all row blocks merged into (n, k) top-k values and ids, as Ray tasks reading the
    matrix through `spec`, or in this process when spec is None; resumable from `checkpoint`.
    `peaks` collects the Ray workers' peak RSS (MiB)."""
    panels = src.panels
    ck = _Checkpoint(checkpoint, _pass2_key(src, k, threshold), src.columns.size, k,
                     len(panels), checkpoint_every_s)
    todo = [a for a in range(len(panels)) if not ck.done[a]]
    if spec is not None:
        results = _ray_blocks(src, spec, k, threshold, device, todo, peaks, gpus_per_task)
    else:
        xp = array_module(device)  # type: ignore[arg-type]
        # A generator, so each block sees the floors (current k-th values) merged so far.
        results = ((a, *row_block_topk(src, a, k, threshold, xp, floor=ck.vals[:, k - 1]))
                   for a in todo)
    for a, v, i in bar(results, len(todo), "graph row blocks", "block"):
        sa = panels[a][0]
        ck.vals[sa:], ck.idx[sa:] = merge_topk(ck.vals[sa:], ck.idx[sa:], v, i, k)
        ck.block_done(a)
        log.debug("graph: row block %d/%d merged", a + 1, len(panels))
    return ck.vals, ck.idx


def _sparse_block_rows(X: Any, n_rows: int, row_chunk: int) -> int:
    """Rows per block for reading a sparse X in pass 1: about BLOCK_NNZ stored entries when its
    size is known (a scipy matrix), else row_chunk."""
    nnz = getattr(X, "nnz", None)
    if not isinstance(nnz, (int, np.integer)):
        return row_chunk
    return block_rows_for(np.array([int(nnz)]), n_rows, row_chunk, BLOCK_NNZ)


def _sparse_pass2(
    X: Any, columns: np.ndarray, stats: ZStats, active: np.ndarray, plan: SparsePlan,
    threshold: float, k: int, row_chunk: int, device: str, checkpoint: UPath | None,
    checkpoint_every_s: float, use_ray: bool = False, gpus_per_task: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The sparse pass 2 over the non-constant columns `columns` (= cols[active]), resumable
    from `checkpoint` like the dense one (its key names the sparse path, so a checkpoint of
    the other path is never mixed in). use_ray: one Ray task per pass; the tasks open X by
    path when it has one (a profiles store, .npy, zarr), else get it from the object store."""
    mean, std = stats.mean[active], stats.std[active]
    key = plan_key(columns, mean, std, plan, threshold, k)
    ck = _Checkpoint(checkpoint, key, columns.size, k, len(plan.groups), checkpoint_every_s,
                     dtype=np.float64)
    source = (describe(X) or X) if use_ray and len(plan.groups) > 1 else None
    return sparse_topk(X, columns, mean, std, plan, threshold, k, row_chunk,
                       device,  # type: ignore[arg-type]
                       checkpoint=ck, ray_source=source, gpus_per_task=gpus_per_task)


# --------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------


def build_graph(
    X: Any,
    cfg: GraphConfig,
    columns: np.ndarray | None = None,
    device: str = "cpu",
    use_ray: bool = False,
    checkpoint: storage.PathLike | None = None,
    checkpoint_every_s: float = 60.0,
    scratch_dir: storage.PathLike | None = None,
    gpus_per_task: float = 1.0,
) -> GraphResult:
    """The correlation k-NN graph of the columns `columns` of X.

    X: (M, N_total) zarr.Array, np.ndarray / np.memmap, scalespd.graph.source.NpyFile or
    RowSubset (read in (row_chunk, tile_cols) blocks, never whole), or a scipy sparse matrix /
    sparse row source (`scalespd.graph.sparse_io`; read in sparse row blocks). columns: (n,)
    global ids of the alive columns (None: all), in node order. device: "cpu" | "cuda" |
    "auto" for the tile math. use_ray: run the dense path's panels and row blocks, or the sparse
    path's passes, as Ray tasks (Ray must already be initialised, e.g. by
    scalespd.raytools.ensure_ray); the tasks open X
    themselves from its file or store (`scalespd.graph.source.describe`) and read only their
    blocks. An X they cannot open by path (an in-memory array) is first written once,
    streaming, to a chunked zarr array in a temporary directory inside `scratch_dir` (the
    system temp directory when None), logged and removed at the end. The sparse path and the
    statistics of a sparse input run in this process. checkpoint: a file where pass 2 saves
    its merged lists every `checkpoint_every_s` seconds and resumes from (when it belongs to
    the same inputs and path); the caller removes it when done. gpus_per_task: what each Ray
    task reserves when the tile math runs on CUDA (ray.gpus_per_task).

    Raises ValueError for a non-2-D or non-numeric X, fewer than 2 rows, an empty / repeated /
    out-of-range column selection, NaN or inf values in the selected columns, and
    graph.correlation "sparse" with negative values. When k is at least the number of
    non-constant columns, every node simply keeps all of its candidates (logged; the lists
    stay (n, k) with -1 padding)."""
    t0 = time.perf_counter()
    n_rows, n_total = validate_matrix(X)
    cols = validate_columns(columns, n_total)
    check_rows(n_rows)
    X = as_row_sliceable(X)
    sparse_input = is_sparse_rows(X)
    dev = resolve_device(device)
    ck_path = None if checkpoint is None else storage.as_path(checkpoint)
    if use_ray:
        import ray  # noqa: PLC0415

        if not ray.is_initialized():
            raise RuntimeError("build_graph(use_ray=True) needs Ray initialised "
                               "(call scalespd.raytools.ensure_ray first)")
    timings: dict[str, float] = {}

    # Ray tasks read X through `spec` (None: everything runs in this process); an X they
    # cannot open by path is converted for the duration of the block — only when a Ray pass
    # needs it (never for a sparse input on the sparse path). `peaks` collects the Ray
    # workers' peak RSS (MiB) as each task reports it.
    peaks: list[float] = []
    spec: SourceSpec | None = None
    with ExitStack() as stack:
        if use_ray and not sparse_input:
            spec = stack.enter_context(ray_source(X, scratch_dir))
        # Pass 1: column statistics (and densities); constant columns are set aside.
        if sparse_input:
            stats = sparse_column_stats(SparseBlocks(
                X, cols, _sparse_block_rows(X, n_rows, cfg.row_chunk), cfg.row_chunk))
        elif spec is not None:
            stats = _ray_stats(spec, n_rows, cols, cfg, peaks)
        else:
            stats = column_stats(X, cols, cfg.tile_cols, cfg.row_chunk)
        timings["stats_s"] = time.perf_counter() - t0
        active = np.flatnonzero(~stats.zero_var)
        n, k = cols.size, cfg.k
        if 1 < active.size <= k:
            # A fact about small inputs (the toys), not a problem: logged, not warned.
            log.info("graph: k = %d is not smaller than the %d non-constant columns; every "
                     "node keeps all of its candidate neighbours", k, active.size)

        # The edge threshold (data-derived unless given).
        t1 = time.perf_counter()
        threshold, tinfo, pair_threshold = edge_threshold(
            cfg.edge_threshold, stats.max_abs_z[active], X, cols[active], n_rows,
            cfg.row_chunk, alpha=cfg.null_alpha, null_model=cfg.null_model,
            perm_cols=cfg.null_perm_cols, seed=cfg.null_seed,
        )
        timings["threshold_s"] = time.perf_counter() - t1
        log.info("graph: %d columns (%d constant), M = %d, edge threshold %.4f (%s)",
                 n, n - active.size, n_rows, threshold, tinfo["method"])

        # Which pass 2: dense tiles or sparse co-activation products.
        plan = None
        if cfg.correlation != "dense" and active.size > 1:
            plan = make_plan(stats.nnz[active], n_rows, acc_entries=4 * cfg.tile_cols ** 2,
                             row_chunk=cfg.row_chunk)
        min_value = float(stats.min[active].min()) if active.size else 0.0
        path, cinfo = choose_path(cfg.correlation, active.size, n_rows, min_value, plan,
                                  cfg.tile_cols, sparse_input)
        if path == "sparse" and plan is not None:
            cinfo["plan"] = plan.summary()
        log.info("graph: pass 2 %s (%s)", path, cinfo["reason"])

        # Pass 2: a running top-k over the non-constant columns. With per-pair thresholds it
        # keeps 2k candidates, so that the ones failing their own pair's threshold leave room.
        t2 = time.perf_counter()
        k_search = 2 * k if pair_threshold is not None else k
        vals, idx = empty_topk(active.size, k_search)
        # A threshold of 1 means chance explains even perfect correlations: no candidates.
        if active.size and threshold < 1.0:
            if path == "sparse" and plan is not None:
                vals, idx = _sparse_pass2(X, cols[active], stats, active, plan, threshold,
                                          k_search, cfg.row_chunk, dev, ck_path,
                                          checkpoint_every_s, use_ray, gpus_per_task)
            else:
                if use_ray and spec is None:
                    spec = stack.enter_context(ray_source(X, scratch_dir))
                src = TileSource(
                    X, cols[active], stats.mean[active].astype(np.float32),
                    (1.0 / (stats.std[active] * math.sqrt(n_rows))).astype(np.float32),
                    n_rows, cfg.tile_cols, cfg.row_chunk,
                )
                vals, idx = pass2_topk(src, k_search, threshold, dev, spec, ck_path,
                                       checkpoint_every_s, peaks, gpus_per_task)
        if pair_threshold is not None:
            before = int((idx >= 0).sum())
            vals, idx = filter_pairs(vals, idx, stats.max_abs_z[active], pair_threshold, k)
            tinfo["pair_candidates_removed"] = before - int((idx >= 0).sum())
        timings["topk_s"] = time.perf_counter() - t2

    # Back to all n nodes: constant columns keep empty lists.
    topk_idx = np.full((n, k), -1, dtype=np.int64)
    topk_val = np.zeros((n, k), dtype=np.float32)
    ok = idx >= 0
    topk_idx[active] = np.where(ok, active[np.where(ok, idx, 0)], -1)
    # float32 rounding can put a correlation a hair above 1.
    topk_val[active] = np.where(ok, np.minimum(vals, 1.0), 0.0)

    t3 = time.perf_counter()
    W = knn_graph(topk_idx, topk_val, n, cfg.neighbours, cfg.relative_strength)
    n_comp, labels = components(W)
    timings["graph_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0

    sizes = np.bincount(labels)
    size_values, size_counts = np.unique(sizes, return_counts=True)
    summary = {
        "n_columns": n,
        "n_rows": n_rows,
        "n_zero_var": int(stats.zero_var.sum()),
        "zero_var_columns": cols[stats.zero_var][:1000].tolist(),
        "k": k,
        "neighbours": cfg.neighbours,
        "threshold": threshold,
        "threshold_info": tinfo,
        "n_edges": int(W.nnz // 2),
        "n_components": n_comp,
        "n_isolated": int((sizes == 1).sum()),
        "largest_components": np.sort(sizes)[::-1][:20].tolist(),
        "component_size_counts": {int(s): int(c) for s, c in
                                  zip(size_values, size_counts, strict=True)},
        "device": dev,
        "ray": use_ray,
        # Which pass 2 ran ("dense" | "sparse"), why, and the sparse plan when it ran.
        "correlation": {"path": path, **cinfo},
        # Where Ray tasks read the matrix from (None in this process), and the largest peak RSS
        # a Ray worker reported (over its life so far; None without Ray tasks).
        "ray_source": None if spec is None else {
            "kind": spec.kind, "path": spec.path, "converted": describe(X) is None},
        "ray_worker_peak_rss_mb": round(max(peaks), 1) if peaks else None,
        "timings": {key: round(v, 4) for key, v in timings.items()},
        "config": cfg.model_dump(mode="json"),
    }
    return GraphResult(
        columns=cols, mean=stats.mean, std=stats.std, min=stats.min, max=stats.max,
        zero_var=stats.zero_var, topk_idx=topk_idx, topk_val=topk_val, graph=W,
        labels=labels, threshold=threshold, summary=summary,
    )
