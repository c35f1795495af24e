"""Clustering a whole graph: split it into connected pieces, pack them into Ray tasks, assemble.

Pieces are the connected components of the graph (intersected with the caller's component
labels, so a label group that is not connected is split rather than handed to the Laplacian
solver). They are sorted by size; a piece whose estimated cost reaches `cfg.min_task_seconds`
gets a task of its own, the small ones are packed together until a task carries at least that
much work (Ray's per-task overhead is ~1 ms; tasks of < 10 ms gain nothing).

Results never depend on the packing or on the number of workers: each piece's randomness is
seeded from its smallest global node id (see `core.piece_seed`), and global cluster ids are
assigned afterwards, in order of each cluster's smallest node index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from scalespd.config import RayConfig, SpectralConfig
from scalespd.executor import AUTO_MIN_SPECTRAL_SECONDS, Executor, choose
from scalespd.spectral.core import PieceResult, canonical_labels, cluster_piece
from scalespd.spectral.eigen import Graph

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]

# Cost model (seconds), measured on a 2-core EPYC: dense subset eigh ≈ 5e-11·n³, a sparse
# shift-invert solve ≈ 2e-6·nnz·(K_max+1), plus ~2.5 ms of k-means per solved piece.
_DENSE_COEF = 5e-11
_SPARSE_COEF = 2e-6
_PIECE_OVERHEAD = 2.5e-3


@dataclass
class ClusteringResult:
    """labels (n,): global cluster id per node; spectra: one record per solved piece (size ≥ 3)
    and its recursive splits; n_pieces counts every connected piece (isolated nodes included),
    n_tasks the solver tasks, executor where they ran ("local" or "ray"); timings in
    seconds."""

    labels: np.ndarray
    spectra: list[dict[str, Any]] = field(default_factory=list)
    n_pieces: int = 0
    n_tasks: int = 0
    executor: str = "local"
    timings: dict[str, float] = field(default_factory=dict)


def graph_pieces(W: sp.csr_matrix, labels: np.ndarray | None = None) -> list[np.ndarray]:
    """Connected pieces of W (intersected with `labels` groups when given): a list of sorted
    node-index arrays, largest first, ties by smallest node. Explicit zero weights are no edges."""
    n = W.shape[0]
    W = W.copy()
    W.eliminate_zeros()
    _, cc = connected_components(W, directed=False)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        # Pieces = distinct (label, connected component) pairs.
        _, cc = np.unique(np.stack([labels, cc], axis=1), axis=0, return_inverse=True)
        cc = cc.ravel()
    order = np.argsort(cc, kind="stable")
    bounds = np.flatnonzero(np.diff(cc[order])) + 1
    pieces = np.split(order, bounds) if n else []
    pieces.sort(key=lambda p: (-p.size, int(p[0])))
    return pieces


def estimate_seconds(n: int, nnz: int, cfg: SpectralConfig) -> float:
    """Rough cost of clustering one piece of n nodes and nnz stored weights."""
    if n <= 2:
        return 1e-5
    if n <= cfg.dense_max_nodes:
        return _PIECE_OVERHEAD + _DENSE_COEF * n**3
    return _PIECE_OVERHEAD + _SPARSE_COEF * nnz * (cfg.k_max + 1)


def pack_pieces(costs: list[float], min_seconds: float) -> list[list[int]]:
    """Group piece indices (given in size order) into tasks of ≥ min_seconds estimated work: a
    piece at or above it alone, consecutive smaller ones together (the last group may be
    lighter)."""
    tasks: list[list[int]] = []
    batch: list[int] = []
    acc = 0.0
    for i, c in enumerate(costs):
        if c >= min_seconds:
            tasks.append([i])
            continue
        batch.append(i)
        acc += c
        if acc >= min_seconds:
            tasks.append(batch)
            batch, acc = [], 0.0
    if batch:
        tasks.append(batch)
    return tasks


def solve_batch(
    subgraphs: list[Graph], keys: list[np.ndarray], cfg: SpectralConfig, device: Device
) -> list[PieceResult]:
    """Cluster each piece of a batch (the body of one Ray task; also called without Ray)."""
    return [cluster_piece(W, k, cfg, device=device) for W, k in zip(subgraphs, keys, strict=True)]


_remote_solve = None


def _ray_solve():
    global _remote_solve
    if _remote_solve is None:
        import ray  # noqa: PLC0415

        _remote_solve = ray.remote(solve_batch)
    return _remote_solve


def cluster_graph_detailed(
    W: sp.csr_matrix,
    labels: np.ndarray | None,
    cfg: SpectralConfig,
    *,
    node_keys: np.ndarray | None = None,
    executor: Executor = "auto",
    ray_cfg: RayConfig | None = None,
    device: Device = "cpu",
    progress: bool = False,
    num_cpus_per_task: float = 1.0,
) -> ClusteringResult:
    """Spectral clustering of every connected piece of W (n×n symmetric CSR, weights ≥ 0).

    labels (n,): connected-component labels from the graph stage (or None to compute them).
    node_keys (n,): global ids of the nodes (default 0..n−1); they seed each piece and must be
    distinct. executor: where the tasks run (scalespd/executor.py: "auto" uses Ray for more than
    one task of at least AUTO_MIN_SPECTRAL_SECONDS estimated work, or on a configured cluster;
    Ray is started with `ray_cfg` then). device: "cuda" lets pieces ≥ cfg.gpu_min_nodes run on
    the GPU (each such task reserves ray_cfg.gpus_per_task GPUs).
    num_cpus_per_task: Ray CPUs each task reserves (fewer concurrent workers when larger)."""
    t0 = time.perf_counter()
    W = sp.csr_matrix(W)
    n = W.shape[0]
    if W.shape != (n, n):
        raise ValueError(f"W must be square, got shape {W.shape}")
    keys = np.arange(n, dtype=np.int64) if node_keys is None else np.asarray(node_keys, np.int64)
    if keys.shape != (n,) or np.unique(keys).size != n:
        raise ValueError(f"node_keys must be {n} distinct ids")
    pieces = graph_pieces(W, labels)
    # Pieces of 1–2 nodes are one cluster each and need no task; the rest are solved (sorted by
    # size, largest first, as graph_pieces returns them).
    solve = [p for p in pieces if p.size > 2]
    subgraphs = _subgraphs(W, solve, cfg.dense_max_nodes)
    # A dense subgraph (small piece) counts as no sparse work.
    costs = [estimate_seconds(p.size, int(getattr(g, "nnz", 0)), cfg) for p, g in
             zip(solve, subgraphs, strict=True)]
    tasks = pack_pieces(costs, cfg.min_task_seconds)
    t_prep = time.perf_counter()

    results: list[PieceResult | None] = [None] * len(solve)
    where = choose("spectral", executor, work=sum(costs), minimum=AUTO_MIN_SPECTRAL_SECONDS,
                   pieces=len(tasks), ray_cfg=ray_cfg) if tasks else "local"
    if where == "ray":
        from scalespd.raytools import ensure_ray  # noqa: PLC0415

        ensure_ray(ray_cfg)
        gpus = ray_cfg.gpus_per_task if ray_cfg else 1.0
        remote = _ray_solve()
        refs = []
        for t in tasks:
            big_gpu = device == "cuda" and solve[t[0]].size >= cfg.gpu_min_nodes
            opts: dict[str, Any] = {"num_cpus": num_cpus_per_task}
            if big_gpu:
                opts["num_gpus"] = gpus
            refs.append(remote.options(**opts).remote(
                [subgraphs[i] for i in t], [keys[solve[i]] for i in t], cfg,
                device if big_gpu else "cpu"))
        import ray  # noqa: PLC0415

        for t, ref in _progress(zip(tasks, refs, strict=True), len(tasks), progress):
            for i, res in zip(t, ray.get(ref), strict=True):
                results[i] = res
    else:
        for t in _progress(tasks, len(tasks), progress):
            batch = solve_batch([subgraphs[i] for i in t], [keys[solve[i]] for i in t], cfg,
                                device)
            for i, res in zip(t, batch, strict=True):
                results[i] = res
    t_solve = time.perf_counter()

    # Provisional ids: trivial pieces first (one id each), then the solved pieces' clusters;
    # the final ids come from canonical_labels (order of smallest node).
    raw = np.full(n, -1, dtype=np.int64)
    trivial = [p for p in pieces if p.size <= 2]
    if trivial:
        raw[np.concatenate(trivial)] = np.repeat(np.arange(len(trivial)), [p.size for p in trivial])
    offset = len(trivial)
    spectra: list[dict[str, Any]] = []
    for p, res in zip(solve, results, strict=True):
        assert res is not None
        raw[p] = res.labels + offset
        offset += int(res.labels.max()) + 1
        spectra.extend(r for r in res.records if r["size"] > 2)
    out = canonical_labels(raw) if n else raw
    spectra.sort(key=lambda r: (r["key"], r["depth"]))
    return ClusteringResult(
        labels=out, spectra=spectra, n_pieces=len(pieces), n_tasks=len(tasks), executor=where,
        timings={"prepare": t_prep - t0, "solve": t_solve - t_prep,
                 "assemble": time.perf_counter() - t_solve},
    )


def cluster_graph(
    W: sp.csr_matrix, labels: np.ndarray | None, cfg: SpectralConfig, **kwargs: Any
) -> np.ndarray:
    """Cluster id per node (n,), ids ordered by each cluster's smallest node index. See
    `cluster_graph_detailed` for the keyword arguments."""
    return cluster_graph_detailed(W, labels, cfg, **kwargs).labels


def _subgraphs(W: sp.csr_matrix, pieces: list[np.ndarray], dense_max: int) -> list[Graph]:
    """Induced subgraph of each piece (positive weights only): a dense (n, n) array up to
    `dense_max` nodes (cheap to build, ship and solve), CSR above. W is permuted once so that
    every piece is a contiguous diagonal block: O(nnz + n) overall, not O(n) per piece."""
    if not pieces:
        return []
    order = np.concatenate(pieces)
    P = W[order][:, order].tocsr()
    P.eliminate_zeros()
    bounds = np.concatenate([[0], np.cumsum([p.size for p in pieces])])
    out: list[Graph] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - a > dense_max:
            out.append(P[a:b, a:b].tocsr())
            continue
        lo, hi = P.indptr[a], P.indptr[b]
        rows = np.repeat(np.arange(b - a), np.diff(P.indptr[a:b + 1]))
        cols = P.indices[lo:hi] - a
        keep = (cols >= 0) & (cols < b - a)  # edges leaving the piece (split label groups)
        D = np.zeros((b - a, b - a))
        D[rows[keep], cols[keep]] = P.data[lo:hi][keep]
        out.append(D)
    return out


def _progress(it: Any, total: int, enabled: bool) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(it, total=total, desc="spectral tasks", unit="task")
