"""Pass 2, sparse: the exact top-k of s_ij = max(0, ρ_ij) from co-activation products.

Why it is exact. For non-negative profiles, ρ_ij = (G_ij / M - μ_i μ_j) / (σ_i σ_j) with
G_ij = Σ_m x_mi x_mj. If columns i and j are never non-zero on the same row, G_ij = 0 and
ρ_ij = -μ_i μ_j / (σ_i σ_j) < 0 (a non-constant non-negative column has μ > 0). Candidates need
ρ > threshold ≥ 0, so every candidate is a co-active pair, and the sums over the non-zero entries
give every candidate's exact correlation.

How. `sparse_plan` orders the columns densest first and cuts them into tiles; a pass over the
row blocks (`sparse_io.SparseBlocks`, CSC float32) accumulates each tile's Gram block in float64
(`_accumulate`), then turns it into correlations and picks each node's top k in the total order
of the dense path (larger value first, then smaller node id; `topk.topk_rows` / `merge_topk`).
Each unordered pair is computed once and that number serves both of its nodes, as in the dense
path. Correlations are formed and compared in float64; the spgemm sums are float32 within one
row block (non-negative terms) and float64 across blocks, the spmm operand is centred before its
float32 product (as the dense path z-scores), so the values carry at most the dense path's
float32 error (~1e-6). The lists therefore equal the dense path's and brute force's, exact ties
included (identical columns give identical numbers here too), except where two candidates — or
a candidate and the edge threshold — differ by less than that rounding: there no two float
implementations agree, and which one wins is not defined.

Memory: one row block, one pass's accumulators (`acc_entries` float64) and the (n, k) lists;
never an n × n array. Passes are independent (`group_topk`) and their lists merge in any order;
an interrupted run resumes from a checkpoint of the merged lists and finished passes.

Devices: the products run with scipy.sparse on NumPy, or with cupyx.scipy.sparse on CuPy when
`device` is "cuda" (row blocks are read on the host and copied); the selection runs on the host.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from scalespd.backend import Device, array_module, to_numpy
from scalespd.graph.sparse_io import SparseBlocks
from scalespd.graph.sparse_plan import SparsePlan, Tile
from scalespd.graph.topk import merge_topk, topk_rows
from scalespd.progress import bar

log = logging.getLogger(__name__)

# Values per selection slab: a slab of a tile is sorted at once (argpartition's int64 scratch).
_SLAB_ENTRIES = 1 << 21


def sparse_module(device: Device) -> ModuleType:
    """scipy.sparse on CPU, cupyx.scipy.sparse on CUDA (imported only then)."""
    if device == "cuda":
        import cupyx.scipy.sparse as csp  # noqa: PLC0415

        return csp
    return sp


def empty_lists(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) float64 values (-inf) and int64 ids (-1): lists with no neighbours yet."""
    return np.full((n, k), -np.inf), np.full((n, k), -1, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Gram blocks
# --------------------------------------------------------------------------------------------


class _RowMajorPartners:
    """The partners of spmm tiles as row-major (CSR) slices of one row block.

    An spmm tile starting at local column s needs B[:, s:] in CSR form. The block is converted
    once; cutting the CSR matrix by columns costs a pass over its entries (~2.6 ns each), about
    15% of what a 64-wide product spends per entry (~18 ns), so a cut is reused by the
    following tiles until the columns it holds before their start carry more than `_WASTE` of
    its entries (their products are computed and dropped)."""

    _WASTE = 0.15

    def __init__(self, B: Any) -> None:
        self.rows_all = B.tocsr()  # (r, w)
        self.col_nnz = np.concatenate([[0], np.cumsum(to_numpy(xp_diff(B.indptr)))])
        self.start = 0
        self.rows: Any = self.rows_all

    def since(self, s: int) -> tuple[Any, int]:
        """(a CSR matrix of columns c.. of the block with c <= s, c)."""
        held = self.col_nnz[-1] - self.col_nnz[self.start]
        wasted = self.col_nnz[s] - self.col_nnz[self.start]
        if self.start > s or wasted > self._WASTE * held:
            self.start = s
            self.rows = self.rows_all[:, s:]
        return self.rows, self.start


def xp_diff(a: Any) -> Any:
    """a[1:] - a[:-1] for a NumPy or CuPy vector."""
    return a[1:] - a[:-1]


def _accumulate(tile: Tile, offset: int, B: Any, partners: _RowMajorPartners | None,
                mean32: Any, acc: Any, ysum: Any) -> None:
    """Add one row block's share of the tile's Gram block to `acc`.

    B: (r, n - offset) CSC float32 block of positions offset.. (xsp matrix); partners: its
    row-major column slices (spmm tiles only). acc: (n - start, width) float64, rows = partner
    positions start.., columns = tile positions. spgemm adds Σ x_q x_p; spmm adds
    Σ x_q (x_p - mean_p) and, into ysum (width,), Σ (x_p - mean_p). mean32: (n,) float32 means
    by position."""
    s, e = tile.start - offset, tile.stop - offset
    if tile.kernel == "spmm":
        assert partners is not None
        # Centred so the float32 sums stay small (they cancel catastrophically otherwise for
        # always-on columns with mean >> std), as the dense path z-scores before its GEMM.
        y = B[:, s:e].toarray(order="C")
        y -= mean32[tile.start:tile.stop]
        # Row-major partners: the product walks the rows of the block in order, reading each
        # row of y once and scattering into acc, which a narrow tile keeps in cache.
        rows, c = partners.since(s)
        acc += (rows.T @ y)[s - c:]
        ysum += y.sum(axis=0, dtype=np.float64)
    else:
        partners_t = B[:, s:].T  # (n - start, r) CSR: partner q's non-zero rows
        _add_product(acc, partners_t @ B[:, s:e].tocsr())


def _add_product(acc: Any, prod: Any) -> None:
    """acc += prod for a sparse product `prod` of acc's shape. A well-filled product is added
    as a dense array (~2 ns per value of acc); a thin one entry by entry (~10 ns per entry):
    a product of canonical matrices holds each (q, p) at most once, so the fancy in-place add
    drops nothing."""
    if prod.nnz * 8 >= acc.size:
        acc += prod.toarray()
        return
    coo = prod.tocoo()
    flat = acc.reshape(-1)  # a view: acc is C-contiguous
    flat[coo.row.astype(np.int64) * acc.shape[1] + coo.col] += coo.data


def _to_correlation(tile: Tile, acc: Any, ysum: Any, mean: Any, std: Any, n_rows: int,
                    xp: ModuleType) -> None:
    """Turn the tile's Gram block into correlations in place, row slab by row slab.

    mean, std: (n,) float64 by position. spgemm: ρ = (G - M μ_q μ_p) / (M σ_q σ_p);
    spmm: ρ = (G - μ_q Σ(x_p - μ_p)) / (M σ_q σ_p) (the second term removes the rounding left in
    Σ(x_p - μ_p), which is 0 in exact arithmetic)."""
    s, e = tile.start, tile.stop
    w, t = acc.shape
    mp, sp_ = mean[s:e], std[s:e] * n_rows
    shift = ysum if tile.kernel == "spmm" else mp * n_rows
    step = max(1, _SLAB_ENTRIES // t)
    for a0 in range(0, w, step):
        a1 = min(a0 + step, w)
        rows = acc[a0:a1]
        rows -= mean[s + a0:s + a1, None] * shift[None, :]
        rows /= std[s + a0:s + a1, None] * sp_[None, :]


def _tile_lists(tile: Tile, rho: np.ndarray, ids: np.ndarray, threshold: float, k: int
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Top-k candidates a tile contributes, from its (n - start, width) correlations.

    ids: (n - start,) local node ids of positions start... Each unordered pair enters once: in
    the tile's own square only partner q > column p is kept, and that one number serves both
    nodes. Returns ((n - start, k) lists of the partners, (width, k) lists of the tile columns),
    values float64, ids int64."""
    w, t = rho.shape
    for r in range(t):  # the square: keep q > p only (also drops the diagonal)
        rho[r, r:] = -np.inf
    rho[rho <= threshold] = -np.inf  # the candidate rule of the dense path: ρ > threshold
    tile_ids = ids[:t]
    step = max(1, _SLAB_ENTRIES // t)
    part_v, part_i = [], []
    for a0 in range(0, w, step):
        blk = rho[a0:a0 + step]
        v, i = topk_rows(blk, np.broadcast_to(tile_ids, blk.shape), k)
        part_v.append(v)
        part_i.append(i)
    step = max(1, _SLAB_ENTRIES // w)
    own_v, own_i = [], []
    for c0 in range(0, t, step):
        blk = np.ascontiguousarray(rho[:, c0:c0 + step].T)
        v, i = topk_rows(blk, np.broadcast_to(ids, blk.shape), k)
        own_v.append(v)
        own_i.append(i)
    return ((np.concatenate(part_v), np.concatenate(part_i)),
            (np.concatenate(own_v), np.concatenate(own_i)))


# --------------------------------------------------------------------------------------------
# One pass
# --------------------------------------------------------------------------------------------


def group_topk(
    X: Any, columns: np.ndarray, mean: np.ndarray, std: np.ndarray, plan: SparsePlan, g: int,
    threshold: float, k: int, piece_rows: int, device: Device = "cpu",
) -> tuple[int, np.ndarray, np.ndarray]:
    """Pass g of `plan`: (p0, (n - p0, k) float64 values, int64 local ids) — partial top-k
    lists of positions p0.. (p0 = the pass's first tile start).

    X: (M, N_total) any source of `sparse_io`. columns: (n,) global ids of the non-constant
    columns in local order; mean, std: (n,) float64 in local order."""
    xp = array_module(device)
    xsp = sparse_module(device)
    tiles = plan.group_tiles(g)
    p0 = tiles[0].start
    n = plan.order.size
    pos_mean = mean[plan.order]
    pos_std = std[plan.order]
    mean32 = xp.asarray(pos_mean.astype(np.float32))
    accs = [xp.zeros((n - t.start, t.width)) for t in tiles]
    ysums = [xp.zeros(t.width) for t in tiles]
    blocks = SparseBlocks(X, columns[plan.order[p0:]], plan.block_rows, piece_rows)
    any_spmm = any(t.kernel == "spmm" for t in tiles)
    for _, _, B in blocks:
        Bd = B if xsp is sp else xsp.csc_matrix(B)
        partners = _RowMajorPartners(Bd) if any_spmm else None
        for tile, acc, ysum in zip(tiles, accs, ysums, strict=True):
            _accumulate(tile, p0, Bd, partners, mean32, acc, ysum)
        del Bd, partners
    vals, ids = empty_lists(n - p0, k)
    dev_mean, dev_std = xp.asarray(pos_mean), xp.asarray(pos_std)
    for tile, acc, ysum in zip(tiles, accs, ysums, strict=True):
        _to_correlation(tile, acc, ysum, dev_mean, dev_std, blocks.n_rows, xp)
        rho = to_numpy(acc)
        (pv, pi), (ov, oi) = _tile_lists(tile, rho, plan.order[tile.start:], threshold, k)
        a = tile.start - p0
        vals[a:], ids[a:] = merge_topk(vals[a:], ids[a:], pv, pi, k)
        b = a + tile.width
        vals[a:b], ids[a:b] = merge_topk(vals[a:b], ids[a:b], ov, oi, k)
    return p0, vals, ids


# --------------------------------------------------------------------------------------------
# All passes, resumable
# --------------------------------------------------------------------------------------------


def plan_key(columns: np.ndarray, mean: np.ndarray, std: np.ndarray, plan: SparsePlan,
             threshold: float, k: int) -> str:
    """Identity of the inputs of a sparse pass 2, for its checkpoint."""
    h = hashlib.sha256(b"sparse")
    for arr in (columns, mean, std, plan.order):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(repr((plan.tiles, plan.groups, plan.block_rows, float(threshold), k)).encode())
    return h.hexdigest()


def sparse_topk(
    X: Any, columns: np.ndarray, mean: np.ndarray, std: np.ndarray, plan: SparsePlan,
    threshold: float, k: int, piece_rows: int, device: Device = "cpu",
    checkpoint: Any | None = None, ray_source: Any | None = None, gpus_per_task: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) float64 values and int64 local ids of the top-k lists of the n non-constant
    columns `columns` (local order), best first (-inf / -1 padding), from every pass of `plan`.

    checkpoint: an object like `scalespd.graph.build._Checkpoint` (vals / idx by position,
    done per pass, block_done(g)) or None. ray_source: None (passes run here, one after
    another), or how Ray tasks reach X — a `SourceSpec` they open, or X itself (an in-memory
    matrix, put in the object store once): then every pass is one Ray task (passes are
    independent, and top-k lists in total order merge in any order, so the result is the same),
    reserving `gpus_per_task` GPUs on CUDA."""
    n = columns.size
    ck = checkpoint if checkpoint is not None else _Lists(n, k, len(plan.groups))
    todo = [g for g in range(len(plan.groups)) if not ck.done[g]]
    if ray_source is not None:
        results = _ray_groups(ray_source, columns, mean, std, plan, todo, threshold, k,
                              piece_rows, device, gpus_per_task)
    else:
        results = ((g, *group_topk(X, columns, mean, std, plan, g, threshold, k, piece_rows,
                                   device)) for g in todo)
    for g, p0, v, i in bar(results, len(todo), "graph sparse passes", "pass"):
        ck.vals[p0:], ck.idx[p0:] = merge_topk(ck.vals[p0:], ck.idx[p0:], v, i, k)
        ck.block_done(g)
        log.debug("graph: sparse pass %d/%d merged", g + 1, len(plan.groups))
    # Back from positions to local order.
    vals, idx = empty_lists(n, k)
    vals[plan.order], idx[plan.order] = ck.vals, ck.idx
    return vals, idx


def _ray_group_task(
    source: Any, columns: np.ndarray, mean: np.ndarray, std: np.ndarray, plan: SparsePlan,
    g: int, threshold: float, k: int, piece_rows: int, device: Device,
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Pass g in a Ray worker: X from its SourceSpec (opened here) or the object store."""
    X = source.open() if callable(getattr(source, "open", None)) else source
    return (g, *group_topk(X, columns, mean, std, plan, g, threshold, k, piece_rows, device))


def _ray_groups(
    source: Any, columns: np.ndarray, mean: np.ndarray, std: np.ndarray, plan: SparsePlan,
    todo: list[int], threshold: float, k: int, piece_rows: int, device: Device,
    gpus_per_task: float = 1.0,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Passes `todo` as Ray tasks (one each: one CPU, or `gpus_per_task` GPUs on CUDA); yields
    their lists as they finish. The (n,) vectors and the plan are put in the object store once."""
    import ray  # noqa: PLC0415

    task = ray.remote(_ray_group_task).options(
        num_cpus=1, num_gpus=gpus_per_task if device == "cuda" else 0)
    shared = [ray.put(x) for x in (source, columns, mean, std, plan)]
    # One list of arguments: Ray's typed `.remote` overloads stop at 9 parameters.
    args: list[list[Any]] = [[*shared, g, threshold, k, piece_rows, device] for g in todo]
    pending = [task.remote(*a) for a in args]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


class _Lists:
    """The merged lists without a checkpoint file."""

    def __init__(self, n: int, k: int, n_groups: int) -> None:
        self.vals, self.idx = empty_lists(n, k)
        self.done = np.zeros(n_groups, dtype=bool)

    def block_done(self, g: int) -> None:
        self.done[g] = True
