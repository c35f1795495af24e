"""Harvest the (M, N) causal-importance matrix into chunked zarr, block by block.

For each row block b (rows [b*block_rows, ...)): generate its inputs from (seed, b), run the CI
functions, write all N columns of those rows into ci.zarr (and the row metadata into
inputs.zarr), then write the block's completion record (row range + partial column stats)
atomically. Blocks run in this process ("local") or as tasks on Ray actors that each load the
model once ("ray"). Re-running computes only the blocks without a record; the final statistics
are merged from the records in block order, so a resumed harvest is bit-identical to an
uninterrupted one. Memory is bounded by one block (block_rows x N) per worker, never by M x N.

A write that fails (a full disk, permissions) ends the harvest with the OSError naming the file
or array it was writing (in a Ray actor too); the blocks finished before it keep their records,
and a re-run once the disk has space completes the others.

The output folder may be a local path or an fsspec URL (`scalespd.storage`). Ray actors get it
as a URL string; a folder only this process can see (memory://) keeps the harvest in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
import zarr
from tqdm.auto import tqdm
from upath import UPath

from scalespd import storage
from scalespd.backend import resolve_device
from scalespd.config import ProfilesConfig, RayConfig
from scalespd.errors import naming_file
from scalespd.executor import AUTO_MIN_PROFILES_VALUES, Executor, choose
from scalespd.profiles.reader import (
    BLOCKS_DIR,
    CI_FILE,
    COMPONENT_COLUMNS,
    COMPONENTS_FILE,
    INPUTS_FILE,
    SUMMARY_FILE,
)
from scalespd.profiles.sources import RowSource
from scalespd.profiles.sparse_store import STORAGE as CSR_STORAGE
from scalespd.profiles.sparse_store import CSRBlock, is_sparse_store
from scalespd.profiles.sparse_store import remove_temporaries as remove_csr_temporaries
from scalespd.profiles.stats import ColumnStats, atomic_write_npz, load_npz, merge_all
from scalespd.profiles.store import (
    FORMAT_VERSION,
    BlockLayout,
    ChunkWriter,
    ProfilesError,
    SparseTarget,
    block_record_path,
    check_ci,
    check_inputs,
    create_or_open,
    create_or_open_inputs,
    finished_blocks,
    is_temporary_of,
    open_ci_for_writing,
)

log = logging.getLogger(__name__)



@runtime_checkable
class CIModel(Protocol):
    """What the harvest needs from a decomposition (scalespd.train.ComponentModel has it)."""

    module_paths: list[str]
    C: dict[str, int]
    module_info: list[Any]  # ModuleInfo(path, layer, module_type), same order as module_paths

    def causal_importances(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{path: (B, C[path]) values in [0, 1]} for inputs x (B, ...)."""
        ...


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


def module_table(model: CIModel) -> list[dict[str, Any]]:
    """One entry per decomposed module in global column order, with its column offset.

    Column j of ci.zarr is subcomponent c = j - offset of the module whose range holds j; its
    name is `<path>:<c>`. (Names are derived, not stored per column, so the array metadata stays
    small for N in the millions.)"""
    paths = list(model.module_paths)
    info = list(model.module_info)
    if [i[0] for i in info] != paths:
        raise ProfilesError(
            f"model.module_info paths {[i[0] for i in info]} do not match model.module_paths "
            f"{paths} (same modules, same order expected)"
        )
    missing = [p for p in paths if p not in model.C]
    if missing:
        raise ProfilesError(f"model.C has no entry for modules {missing}")
    table, offset = [], 0
    for path, layer, module_type in (tuple(i)[:3] for i in info):
        c = int(model.C[path])
        if c <= 0:
            raise ProfilesError(f"model.C[{path!r}] = {c}; expected a positive count")
        table.append({"module": path, "layer": int(layer), "module_type": str(module_type),
                      "C": c, "offset": offset})
        offset += c
    return table


def column_frame(modules: list[dict[str, Any]]) -> pd.DataFrame:
    """component, name, layer, module, module_type for every column, (N rows)."""
    parts = []
    for m in modules:
        c = np.arange(m["C"])
        parts.append(pd.DataFrame({
            "component": m["offset"] + c,
            "name": [f"{m['module']}:{i}" for i in c],
            "layer": m["layer"],
            "module": m["module"],
            "module_type": m["module_type"],
        }))
    return pd.concat(parts, ignore_index=True)


def model_fingerprint(model: Any) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    if not isinstance(model, torch.nn.Module):
        return "unknown"
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# One block (shared by the local path and the Ray actors)
# --------------------------------------------------------------------------------------------


@dataclass
class BlockResult:
    block: int
    start: int
    stop: int
    seconds: float
    seconds_compute: float  # inputs + CI forward + statistics
    seconds_write: float  # zarr writes (compression included) + completion record
    nbytes: int  # uncompressed bytes of CI written
    peak_rss: int  # bytes, of the process that ran the block
    pid: int  # process that ran the block


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process. VmHWM belongs to this process image alone;
    ru_maxrss (the fallback off Linux) also counts what a parent had before fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def batch_buffer_rows(batch_rows: int, rows_per_input: int, block_rows: int) -> int:
    """Rows of one forward batch: whole inputs, about `batch_rows` rows, at most a block."""
    return min(block_rows, max(1, batch_rows // rows_per_input) * rows_per_input)


def compute_block_ci(
    model: CIModel, x: torch.Tensor, modules: list[dict[str, Any]], batch_rows: int,
    device: str, dtype: np.dtype, tau: float, rows_per_input: int = 1,
    out: np.ndarray | None = None, zero_below: float = 0.0, sparse: bool = False,
) -> tuple[np.ndarray | CSRBlock, ColumnStats]:
    """CI of inputs x (B, ...) -> (the R x N values of `dtype`, stats of exactly those stored
    values), R = B * rows_per_input: a toy input is one row, a language-model sequence (B, T)
    gives T rows (its token positions, in order). Values below `zero_below` become 0.

    The forward runs in batches of about `batch_rows` rows on `device`; stats come from the
    values as stored (after the cast), so they agree with numpy on the saved array.
    Dense (`sparse` False): the values are an (R, N) array, a view of the first R rows of `out`
    (a buffer of at least R rows, reused across blocks: a fresh block-sized array costs a page
    fault per 4 KiB on first touch). Sparse: a CSRBlock; `out` then needs only one batch's rows
    (`batch_buffer_rows`), since each batch is reduced to its non-zero entries at once."""
    n_cols = sum(m["C"] for m in modules)
    n_rows = x.shape[0] * rows_per_input
    batch_inputs = max(1, batch_rows // rows_per_input)
    need = batch_buffer_rows(batch_rows, rows_per_input, n_rows) if sparse else n_rows
    if out is None:
        out = np.empty((need, n_cols), dtype=dtype)
    elif out.shape[0] < need or out.shape[1:] != (n_cols,) or out.dtype != dtype:
        raise ValueError(f"buffer {out.shape} {out.dtype} cannot hold ({need}, {n_cols}) "
                         f"{np.dtype(dtype)}")
    stats = ColumnStats.empty(n_cols, tau)
    parts: list[CSRBlock] = []
    tdtype = getattr(torch, np.dtype(dtype).name)
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch_inputs):
            xb = x[s : s + batch_inputs].to(device)
            n = xb.shape[0] * rows_per_input
            rows = out[:n] if sparse else out[s * rows_per_input : s * rows_per_input + n]
            ci = model.causal_importances(xb)
            pieces = []
            for m in modules:
                g = ci.get(m["module"])
                if g is None:
                    raise ProfilesError(f"causal_importances returned no values for module "
                                        f"{m['module']!r} (got {sorted(ci)})")
                want = (xb.shape[0], m["C"]) if rows_per_input == 1 else (*xb.shape, m["C"])
                if tuple(g.shape) != want:
                    raise ProfilesError(
                        f"causal_importances[{m['module']!r}] has shape {tuple(g.shape)}, "
                        f"expected {want} (inputs, C)"
                    )
                pieces.append(g.reshape(n, m["C"]).to(tdtype))  # cast on the device
            # One copy of the batch into the host buffer, whole rows at once: torch.cat writes
            # contiguous rows on all torch's threads (a copy per module into column slices of
            # the buffer was strided and took as long as a cheap model's forward).
            host = torch.from_numpy(rows)
            if all(p.device.type == "cpu" for p in pieces):
                torch.cat(pieces, dim=1, out=host)
            else:
                host.copy_(torch.cat(pieces, dim=1))
            # Range check on the contiguous host copy (fast; NaN propagates into min/max).
            if not (rows.min() >= 0 and rows.max() <= 1):
                _raise_out_of_range(rows, modules)
            if sparse:  # the floor is applied where the entries are picked
                parts.append(CSRBlock.from_dense(rows, zero_below))
            else:
                if zero_below > 0:
                    host.masked_fill_(host < zero_below, 0)  # in place, on torch's threads
                stats = stats.merge(ColumnStats.of(rows, tau))
    if sparse:
        block = CSRBlock.concat(parts) if parts else CSRBlock.from_dense(out[:0])
        return block, ColumnStats.of_csr(block.indices, block.values, n_rows, n_cols, tau)
    return out[:n_rows], stats


def _raise_out_of_range(rows: np.ndarray, modules: list[dict[str, Any]]) -> None:
    bad = ~((rows >= 0) & (rows <= 1))  # also catches NaN
    i, j = (int(v) for v in np.argwhere(bad)[0])
    m = next(m for m in modules if m["offset"] <= j < m["offset"] + m["C"])
    raise ProfilesError(f"causal importance of {m['module']}:{j - m['offset']} is outside "
                        f"[0, 1] (or NaN) on row {i} of a batch: {float(rows[i, j])}")


def rows_per_input(source: RowSource) -> int:
    """Profile rows per model input: 1, or a language-model source's sequence length."""
    return int(getattr(source, "rows_per_input", 1))


@dataclass
class ComputedBlock:
    """A block's values and stats, computed but not yet written."""

    block: int
    start: int
    stop: int
    x: torch.Tensor  # the block's inputs (for the row metadata)
    vals: np.ndarray | CSRBlock  # (stop - start, N), dense or sparse (profiles.storage)
    stats: ColumnStats
    seconds_compute: float


def compute_block(
    b: int, model: CIModel, source: RowSource, layout: BlockLayout, modules: list[dict[str, Any]],
    cfg: ProfilesConfig, device: str, out: np.ndarray | None = None,
) -> ComputedBlock:
    """Inputs of block b from (seed, b), then its CI values and stats (into `out` if given)."""
    t0 = time.perf_counter()
    start, stop = layout.block_range(b)
    x = source.block_inputs(b, start, stop)
    per_input = rows_per_input(source)
    if x.shape[0] * per_input != stop - start:
        raise ProfilesError(f"row source gave {x.shape[0]} inputs of {per_input} row(s) for "
                            f"block {b}, expected {stop - start} rows ([{start}, {stop}))")
    vals, stats = compute_block_ci(model, x, modules, cfg.batch_rows, device,
                                   np.dtype(cfg.dtype), cfg.tau, per_input, out, cfg.zero_below,
                                   cfg.storage == "sparse")
    return ComputedBlock(b, start, stop, x, vals, stats, time.perf_counter() - t0)


def write_block(
    c: ComputedBlock, source: RowSource, ci: zarr.Array | SparseTarget, inputs: zarr.Group | None,
    blocks_dir: UPath, chunks: ChunkWriter | None = None,
) -> BlockResult:
    """Write the block's rows (all N columns: whole chunks of a dense array, through `chunks`
    (the same bytes, faster) or else zarr; or the block's CSR group of a sparse store), then,
    and only then, its completion record."""
    t0 = time.perf_counter()
    # zarr's OSErrors name no file: name the array being written.
    with naming_file(storage.url(blocks_dir.parent / CI_FILE)):
        if isinstance(c.vals, CSRBlock):
            if not isinstance(ci, SparseTarget):
                raise TypeError("a sparse block needs a sparse ci.zarr")
            ci.write(c.block, c.start, c.vals)
        elif chunks is not None:
            chunks.write(c.start, c.vals)
        else:
            assert isinstance(ci, zarr.Array)
            ci[c.start : c.stop, :] = c.vals
    if inputs is not None:
        for name, v in source.row_metadata(c.block, c.start, c.stop, c.x).items():
            arr = inputs[name]
            # create_or_open_inputs created (or checked) one array per row field.
            assert isinstance(arr, zarr.Array)
            with naming_file(storage.url(blocks_dir.parent / INPUTS_FILE / name)):
                arr[c.start : c.stop] = v
    record = block_record_path(blocks_dir, c.block)
    with naming_file(storage.url(record)):
        atomic_write_npz(record, {
            "block": np.asarray(c.block), "start": np.asarray(c.start),
            "stop": np.asarray(c.stop), **c.stats.to_arrays(),
        })
    t_write = time.perf_counter() - t0
    return BlockResult(c.block, c.start, c.stop, c.seconds_compute + t_write, c.seconds_compute,
                       t_write, c.vals.nbytes, _peak_rss_bytes(), os.getpid())


def run_block(
    b: int, model: CIModel, source: RowSource, layout: BlockLayout, modules: list[dict[str, Any]],
    ci: zarr.Array | SparseTarget, inputs: zarr.Group | None, blocks_dir: UPath,
    cfg: ProfilesConfig, device: str, chunks: ChunkWriter | None = None,
    out: np.ndarray | None = None,
) -> BlockResult:
    """Compute block b (into `out` if given) and write it."""
    return write_block(compute_block(b, model, source, layout, modules, cfg, device, out),
                       source, ci, inputs, blocks_dir, chunks)


def _run_local(
    todo: list[int], model: CIModel, source: RowSource, layout: BlockLayout,
    modules: list[dict[str, Any]], ci: zarr.Array | SparseTarget, inputs: zarr.Group | None,
    blocks_dir: UPath, cfg: ProfilesConfig, device: str,
) -> Iterator[BlockResult]:
    """Blocks in this process; block b is written (compressed) by a background thread while
    block b+1 is computed, so at most two blocks are in memory: two block buffers take turns
    (the one just written is filled by the block after next). Results come in block order; a
    failed write raises here, when its result is taken."""
    chunks = ChunkWriter.for_array(ci)  # used by the writer thread only
    free: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="profiles-writer") as pool:
        pending: tuple[Future[BlockResult], np.ndarray] | None = None
        for b in todo:
            buf = free.pop() if free else _block_buffer(layout, cfg, rows_per_input(source))
            c = compute_block(b, model, source, layout, modules, cfg, device, buf)
            if pending is not None:
                result = pending[0].result()
                free.append(pending[1])
                yield result
            pending = (pool.submit(write_block, c, source, ci, inputs, blocks_dir, chunks), buf)
        if pending is not None:
            yield pending[0].result()


def open_target(path: UPath, cfg: ProfilesConfig) -> zarr.Array | SparseTarget:
    """The existing ci.zarr a harvest worker writes into."""
    if cfg.storage == "sparse":
        return SparseTarget(path, cfg.dtype, cfg.compression_level)
    return open_ci_for_writing(path)


def _block_buffer(layout: BlockLayout, cfg: ProfilesConfig, per_input: int) -> np.ndarray:
    """The host buffer a block's forward fills: the whole block (dense), or one batch (sparse:
    each batch is reduced to its non-zero entries before the next)."""
    rows = (batch_buffer_rows(cfg.batch_rows, per_input, layout.block_rows)
            if cfg.storage == "sparse" else layout.block_rows)
    return np.empty((rows, layout.n_cols), dtype=np.dtype(cfg.dtype))


# --------------------------------------------------------------------------------------------
# Ray actor: loads the model once, runs many blocks
# --------------------------------------------------------------------------------------------


class _HarvestWorker:
    def __init__(
        self, model: CIModel, source: RowSource, layout: BlockLayout, modules: list[dict],
        out_dir: str, cfg: ProfilesConfig, device: str, threads: int,
    ) -> None:
        if device == "cpu":
            # Several actors share the cores: without this each would start one thread per core.
            torch.set_num_threads(threads)
        if isinstance(model, torch.nn.Module):
            model = model.to(device)
        self.model, self.source, self.layout, self.modules = model, source, layout, modules
        # A URL string (storage.url): the actor reopens the folder on its filesystem.
        self.out_dir, self.cfg, self.device = storage.as_path(out_dir), cfg, device
        self.ci = open_target(self.out_dir / CI_FILE, cfg)
        fields = source.row_fields()
        self.inputs = (zarr.open_group(store=storage.zarr_store(self.out_dir / INPUTS_FILE),
                                       mode="r+") if fields else None)
        self.chunks = ChunkWriter.for_array(self.ci)
        # One block at a time per actor: reused.
        self.buf = _block_buffer(layout, cfg, rows_per_input(source))

    def run(self, b: int) -> BlockResult:
        return run_block(b, self.model, self.source, self.layout, self.modules, self.ci,
                         self.inputs, self.out_dir / BLOCKS_DIR, self.cfg, self.device,
                         self.chunks, self.buf)


def _run_on_ray(
    todo: list[int], model: CIModel, source: RowSource, layout: BlockLayout, modules: list[dict],
    out_dir: UPath, cfg: ProfilesConfig, device: str, ray_cfg: RayConfig | None,
) -> Iterator[BlockResult]:
    """Yield BlockResults as Ray actors finish blocks (at most one block in flight per actor)."""
    import ray  # noqa: PLC0415

    from scalespd.raytools import cluster_cpus, cluster_gpus, ensure_ray  # noqa: PLC0415

    ensure_ray(ray_cfg)
    if device == "cuda":
        gpus = cluster_gpus()
        if gpus == 0:
            raise ProfilesError("profiles.device is cuda but the Ray cluster has no GPUs")
        per_task = ray_cfg.gpus_per_task if ray_cfg else 1.0
        n_actors = min(cfg.max_concurrency or int(gpus / per_task), len(todo))
        opts: dict[str, Any] = {"num_gpus": min(per_task, gpus / n_actors), "num_cpus": 1}
        threads = 1
    else:
        cpus = cluster_cpus()
        n_actors = min(cfg.max_concurrency or cpus, len(todo))
        opts = {"num_cpus": 1}
        threads = max(1, cpus // n_actors)
    # A worker process that dies (a crash, the OOM killer, a lost node) is restarted and its
    # block run again: a block is written whole or rewritten (its completion record comes last).
    opts.update(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    remote_cls = ray.remote(_HarvestWorker)
    model_ref = ray.put(model.to("cpu") if isinstance(model, torch.nn.Module) else model)
    actors = [
        remote_cls.options(**opts).remote(model_ref, source, layout, modules,
                                          storage.url(out_dir), cfg, device, threads)
        for _ in range(n_actors)
    ]
    log.info("profiles: %d blocks on %d Ray actors (%s, %d torch threads each)",
             len(todo), n_actors, device, threads)
    try:
        yield from _schedule(actors, todo)
    except ray.exceptions.RayTaskError as err:
        # An actor's failed write arrives wrapped; the OSError itself (errno, file name) is
        # what the caller reports as a storage problem, so raise that.
        cause = getattr(err, "cause", None)
        if isinstance(cause, OSError) and cause.errno is not None:
            raise cause from err
        raise
    finally:
        for a in actors:
            # ray types ActorClass.remote() as `ActorHandle[T] | type[T]`; these are handles.
            ray.kill(a)  # type: ignore[arg-type]


def _schedule(actors: list[Any], todo: list[int]) -> Iterator[BlockResult]:
    """One block in flight per actor, results as they finish. When a block fails, no new block
    starts and the blocks already in flight are waited for (their records are valid) before the
    error is raised: once the harvest has returned, no actor writes into the output any more,
    so what a re-run sees is what is on disk."""
    import ray  # noqa: PLC0415

    queue = list(reversed(todo))
    running: dict[Any, Any] = {}  # ObjectRef -> actor

    def submit(actor: Any) -> None:
        if queue:
            running[actor.run.remote(queue.pop())] = actor

    for a in actors:
        submit(a)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor = running.pop(ref)
        try:
            result = ray.get(ref)
        except Exception:
            queue.clear()
            if running:
                ray.wait(list(running), num_returns=len(running), timeout=_DRAIN_TIMEOUT_S)
            raise
        submit(actor)
        yield result


# How often a harvest actor's process may die and be restarted (its block retried) in one run.
ACTOR_RESTARTS = 3

# How long a failed harvest waits for the other actors' blocks in flight before it stops them.
_DRAIN_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------------
# The harvest
# --------------------------------------------------------------------------------------------


@dataclass
class HarvestResult:
    out_dir: UPath
    shape: tuple[int, int]
    n_blocks: int
    n_computed: int  # blocks computed in this call (the rest came from the completion record)
    n_alive: int
    seconds: float
    executor: str
    device: str
    stats: ColumnStats = field(repr=False)
    block_results: list[BlockResult] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        computed_rows = sum(r.stop - r.start for r in self.block_results)
        return {
            "shape": list(self.shape),
            "n_blocks": self.n_blocks,
            "n_computed": self.n_computed,
            "n_alive": self.n_alive,
            "executor": self.executor,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(computed_rows / self.seconds, 1) if self.seconds > 0 else None,
        }


def _resolve_executor(executor: Executor, todo: list[int], layout: BlockLayout,
                      cfg: ProfilesConfig, ray_cfg: RayConfig | None = None,
                      out_dir: storage.PathLike | None = None) -> str:
    """The policy of scalespd/executor.py; the work is the CI values still to compute, and
    max_concurrency 1 leaves one block at a time, nothing to share. `out_dir`: where the
    output goes (a folder only this process sees keeps the work here)."""
    rows = sum(b - a for a, b in map(layout.block_range, todo))
    pieces = len(todo) if cfg.max_concurrency != 1 else 1
    return choose("profiles", executor, work=rows * layout.n_cols,
                  minimum=AUTO_MIN_PROFILES_VALUES, pieces=pieces, ray_cfg=ray_cfg,
                  data=out_dir)


def harvest(
    model: CIModel,
    source: RowSource,
    out_dir: storage.PathLike,
    cfg: ProfilesConfig,
    *,
    ray_cfg: RayConfig | None = None,
    model_hash: str | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
) -> HarvestResult:
    """Write out_dir/ci.zarr (M, N), inputs.zarr, blocks/, components.csv, harvest.json.

    out_dir: a local path or an fsspec URL (string, Path or UPath). model: anything with the
    `CIModel` attributes (an nn.Module is moved to the device and, for Ray, shipped once per
    actor). source: the M input rows (see `sources`). Resumes from the completion record;
    `on_block` is called in this process after each finished block (tests use it to interrupt
    a harvest)."""
    t0 = time.perf_counter()
    out_dir = storage.as_path(out_dir)
    modules = module_table(model)
    n_cols = sum(m["C"] for m in modules)
    layout = BlockLayout.make(source.n_rows, n_cols, cfg.chunk_rows, cfg.chunk_cols,
                              cfg.block_rows, np.dtype(cfg.dtype).itemsize)
    device = resolve_device(cfg.device, "torch", field="profiles.device")
    attrs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "rows": "inputs (one row per input; token positions for language models)",
        "column_order": "module order, then subcomponent index; name = <module>:<c>",
        "modules": modules,
        "input_set": source.describe(),
        "block_rows": layout.block_rows,
        "model_hash": model_hash or model_fingerprint(model),
        "storage": CSR_STORAGE if cfg.storage == "sparse" else "dense",
        "zero_below": cfg.zero_below,
    }
    if cfg.storage == "sparse":  # a group has no shape or dtype of its own
        attrs |= {"shape": [layout.n_rows, n_cols], "dtype": str(np.dtype(cfg.dtype))}
    blocks_dir = out_dir / BLOCKS_DIR
    fields = source.row_fields()
    # Check everything that already exists before creating or writing anything.
    check_ci(out_dir / CI_FILE, layout, cfg.dtype, attrs, cfg.storage)
    check_inputs(out_dir / INPUTS_FILE, layout, fields, attrs["input_set"])
    done = finished_blocks(blocks_dir, layout)
    if done and not (out_dir / CI_FILE).exists():
        raise ProfilesError(f"{storage.url(blocks_dir)} lists finished blocks but "
                            f"{storage.url(out_dir / CI_FILE)} is missing; delete "
                            f"{storage.url(blocks_dir)} to start over")
    # Records written with another tau would merge wrong frac_active values.
    for b in sorted(done):
        rec_tau = float(load_npz(block_record_path(blocks_dir, b))["tau"])
        if rec_tau != cfg.tau:
            raise ProfilesError(
                f"{storage.url(block_record_path(blocks_dir, b))} was computed with "
                f"tau={rec_tau}, this harvest uses tau={cfg.tau}; use the same tau or start over"
            )
    with naming_file(storage.url(out_dir)):
        storage.makedirs(out_dir)
    _remove_temporaries(out_dir)
    with naming_file(storage.url(out_dir / CI_FILE)):
        ci = create_or_open(out_dir / CI_FILE, layout, cfg.dtype, attrs, cfg.compression_level,
                            cfg.storage)
    with naming_file(storage.url(out_dir / INPUTS_FILE)):
        inputs = create_or_open_inputs(out_dir / INPUTS_FILE, layout, fields,
                                       attrs["input_set"])
    with naming_file(storage.url(blocks_dir)):
        storage.makedirs(blocks_dir)

    todo = [b for b in range(layout.n_blocks) if b not in done]
    setting = cfg.executor or (ray_cfg.executor if ray_cfg else "auto")
    # Ray actors are other processes: a folder only this process sees (memory://) keeps the
    # harvest here (executor.choose decides so from `data`).
    executor = (_resolve_executor(setting, todo, layout, cfg, ray_cfg, out_dir) if todo
                else "none")
    log.info("profiles: (%d, %d) %s, %d blocks of %d rows, %d done, %d to do (%s)",
             layout.n_rows, n_cols, cfg.dtype, layout.n_blocks, layout.block_rows, len(done),
             len(todo), executor)
    if isinstance(model, torch.nn.Module) and executor == "local":
        model = model.to(device)

    if executor == "ray":
        results_iter = _run_on_ray(todo, model, source, layout, modules, out_dir, cfg, device,
                                   ray_cfg)
    else:
        results_iter = _run_local(todo, model, source, layout, modules, ci, inputs, blocks_dir,
                                  cfg, device)
    results: list[BlockResult] = []
    tty = sys.stderr.isatty()
    with tqdm(total=len(todo), desc="profiles blocks", unit="block", disable=not tty) as bar:
        for r in results_iter:
            results.append(r)
            bar.update(1)
            if not tty:
                log.info("profiles: block %d/%d rows [%d, %d) in %.2f s", len(done) + len(results),
                         layout.n_blocks, r.start, r.stop, r.seconds)
            if on_block is not None:
                on_block(r)

    if executor == "ray":
        _remove_temporaries(out_dir)  # what an actor that died and was restarted left half-done
    stats = load_merged_stats(blocks_dir, layout, cfg.tau)
    table = write_components(out_dir / COMPONENTS_FILE, modules, stats, cfg.tau)
    res = HarvestResult(out_dir, (layout.n_rows, n_cols), layout.n_blocks, len(results),
                        int(table["alive"].sum()), time.perf_counter() - t0, executor, device,
                        stats, results)
    storage.write_text_atomic(
        out_dir / SUMMARY_FILE,
        json.dumps({**res.summary(), "tau": cfg.tau, "dtype": cfg.dtype}, indent=2))
    return res


def _remove_temporaries(out_dir: UPath) -> None:
    """Temporary files and stores of a harvest that was killed while writing them: partial by
    construction and never read, so they only take space (the real outputs are untouched)."""
    names = [(out_dir, CI_FILE), (out_dir, INPUTS_FILE), (out_dir, SUMMARY_FILE),
             (out_dir, COMPONENTS_FILE)]
    for folder, target in names:
        for p in folder.glob(f".{target}.*"):
            if is_temporary_of(p.name, target) or p.name == f".{target}.tmp":
                log.info("profiles: removing %s, left by an interrupted harvest", storage.url(p))
                storage.remove(p)
    blocks = out_dir / BLOCKS_DIR
    for p in blocks.glob(".block_*.npz.*.tmp") if blocks.is_dir() else []:
        p.unlink()
    if is_sparse_store(out_dir / CI_FILE):
        for p in remove_csr_temporaries(out_dir / CI_FILE):
            log.info("profiles: removed %s, left by an interrupted harvest", storage.url(p))
    elif storage.is_local(out_dir) and (out_dir / CI_FILE).is_dir():
        # The dense layout's direct chunk writes (`ChunkWriter`): a chunk file cut short.
        for partial in storage.local_path(out_dir / CI_FILE).rglob(".*.partial"):
            partial.unlink(missing_ok=True)


def load_merged_stats(blocks_dir: storage.PathLike, layout: BlockLayout,
                      tau: float) -> ColumnStats:
    """Merge every block's record, in block order; all blocks must be finished."""
    blocks_dir = storage.as_path(blocks_dir)  # records may come from other processes (Ray actors)
    missing = [b for b in range(layout.n_blocks) if not block_record_path(blocks_dir, b).exists()]
    if missing:
        raise ProfilesError(f"{storage.url(blocks_dir)}: blocks {missing[:10]} are not finished")
    parts = [ColumnStats.from_arrays(load_npz(block_record_path(blocks_dir, b)))
             for b in range(layout.n_blocks)]
    return merge_all(parts, layout.n_cols, tau)


def write_components(
    path: storage.PathLike, modules: list[dict[str, Any]], stats: ColumnStats, tau: float
) -> pd.DataFrame:
    """The per-component table (DESIGN §4), alive = max > tau."""
    df = column_frame(modules)
    df["max"] = stats.max
    df["mean"] = stats.mean
    df["std"] = stats.std
    df["frac_active"] = stats.frac_active
    df["alive"] = stats.max > tau
    df = df[COMPONENT_COLUMNS]
    storage.write_text_atomic(storage.as_path(path), df.to_csv(index=False, float_format="%.17g"))
    return df
