"""Pass 2: tiled Pearson correlation with a running top-k per column — never an N×N array.

Columns are z-scored per panel and scaled by 1/sqrt(M), so a correlation tile is one GEMM,
C = Z_aᵀ Z_b (accumulated over row chunks when M > row_chunk). Only the upper triangle of tile
pairs (b ≥ a) is computed: tile (a, b) feeds the lists of the rows of a (row-wise) and of the
rows of b (column-wise) from the very same numbers, so both directions of an edge carry the same
weight (on a diagonal tile only its strict upper triangle is used, for both directions).

Selection. A tile is never sorted. Each node carries a lower bound of its final k-th value (the
k-th entry of its list so far, or a cheap bound from a sample of the tile); only tile entries at
or above it (and above the edge threshold) leave the device, as a sparse list that is merged
into the (r, k) lists on the host. Top-k order is total: larger correlation first, then smaller
node id. The top-k of a union of candidate sets is therefore unique, and partial lists may be
merged in any order (Ray tasks finishing in any order give the in-process result).

Memory of one row-block task: the panels (≤ 2·row_chunk·tile_cols float32), the tile and a
boolean mask (tile_cols² · 5 bytes), the surviving candidates, and the lists of the rows it
touches (≤ n·k). The GEMM, the bounds and the masks run on NumPy or CuPy (`xp`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from scalespd.backend import to_numpy
from scalespd.graph.panels import panel_bounds, read_block, row_chunks


@dataclass(frozen=True)
class TileSource:
    """Z-scored column panels of X[:, columns].

    X: (M, N_total) zarr.Array or np.ndarray. columns: (n,) global ids of the (non-constant)
    columns, in local order. mean: (n,) float32. scale: (n,) float32 = 1 / (std · sqrt(M)), so
    that ⟨z_i, z_j⟩ is the Pearson correlation."""

    X: Any
    columns: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    n_rows: int
    tile_cols: int
    row_chunk: int

    @property
    def panels(self) -> list[tuple[int, int]]:
        return panel_bounds(self.columns.size, self.tile_cols)

    def z(self, p: int, r0: int, r1: int, xp: ModuleType) -> Any:
        """(r1 - r0, panel width) float32 z-scored block of panel p, on xp's device."""
        s, e = self.panels[p]
        # read_block returns a copy this method owns (never a view of X), so the in-place
        # z-scoring below cannot write into the caller's matrix.
        x = xp.asarray(read_block(self.X, r0, r1, self.columns[s:e]))
        x -= xp.asarray(self.mean[s:e])
        x *= xp.asarray(self.scale[s:e])
        return x


def _sort_rows(v: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k of each row in total order (value desc, index asc); pads (-inf) get index -1.

    v, i: (r, w) host arrays (w may be < k; the output is padded to width k). The values keep
    their dtype (float32 in the dense path, float64 in the sparse one)."""
    r, w = v.shape
    key_i = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((key_i, -v), axis=1)[:, :k]
    out_v = np.full((r, k), -np.inf, dtype=v.dtype)
    out_i = np.full((r, k), -1, dtype=np.int64)
    out_v[:, : order.shape[1]] = np.take_along_axis(v, order, axis=1)
    out_i[:, : order.shape[1]] = np.take_along_axis(i, order, axis=1)
    out_i[~np.isfinite(out_v)] = -1
    return out_v, out_i


def topk_rows(v: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a candidate matrix in total order, sorted best first.

    v: (r, w) float values (-inf = no candidate); i: (r, w) int64 node ids. argpartition does
    the bulk; rows where the k-th value is shared with a left-out candidate are re-decided by
    index (rare: exact ties)."""
    r, w = v.shape
    if w <= k:
        return _sort_rows(v, i, k)
    part = np.argpartition(v, (w - k - 1, w - k), axis=1)
    top = part[:, w - k:]
    kth = np.take_along_axis(v, part[:, w - k:w - k + 1], axis=1)[:, 0]
    nxt = np.take_along_axis(v, part[:, w - k - 1:w - k], axis=1)[:, 0]
    out_v, out_i = _sort_rows(np.take_along_axis(v, top, axis=1),
                              np.take_along_axis(i, top, axis=1), k)
    tie = np.flatnonzero((nxt == kth) & np.isfinite(kth))
    if tie.size:
        out_v[tie], out_i[tie] = _sort_rows(v[tie], i[tie], k)
    return out_v, out_i


def merge_topk(
    v1: np.ndarray, i1: np.ndarray, v2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the union of two per-row candidate lists (host arrays, (r, k1) and (r, k2))."""
    return topk_rows(np.concatenate([v1, v2], axis=1), np.concatenate([i1, i2], axis=1), k)


def merge_candidates(
    state_v: np.ndarray, state_i: np.ndarray, target: np.ndarray, nbr: np.ndarray,
    val: np.ndarray, k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a sparse candidate list into (r, k) top-k state.

    target: (c,) row of each candidate (0..r-1), sorted ascending; nbr: (c,) int64 node id;
    val: (c,) float32. Candidates are laid out as a padded (r, max per row) matrix and merged
    with the state row by row."""
    r = state_v.shape[0]
    if target.size == 0:
        return state_v, state_i
    counts = np.bincount(target, minlength=r)
    rank = np.arange(target.size) - (np.cumsum(counts) - counts)[target]
    width = int(counts.max())
    pv = np.full((r, width), -np.inf, dtype=np.float32)
    pi = np.full((r, width), -1, dtype=np.int64)
    pv[target, rank] = val
    pi[target, rank] = nbr
    return merge_topk(state_v, state_i, pv, pi, k)


def _above(threshold: float) -> np.float32:
    """Smallest float32 x with x > threshold, so that (C > threshold) == (C >= x) for float32 C."""
    x = np.float32(threshold)
    return x if x > threshold else np.nextafter(x, np.float32(np.inf))


def _group_floor(S: Any, k: int, axis: int, xp: ModuleType) -> Any:
    """A lower bound of the k-th largest value along `axis` of the sample S: the smallest of
    the maxima of k disjoint groups (k distinct values are at least that large). -inf when
    the sample holds fewer than k values."""
    s = S.shape[axis]
    other = S.shape[1 - axis]
    if s < k:
        return xp.full(other, -np.inf, dtype=np.float32)
    g = s // k
    if axis == 1:
        return S[:, : g * k].reshape(other, k, g).max(axis=2).min(axis=1)
    return S[: g * k].reshape(k, g, other).max(axis=1).min(axis=0)


def tile_candidates(
    C: Any, floor_rows: Any, floor_cols: Any, k: int, threshold: float, diagonal: bool,
    xp: ModuleType,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The entries of a correlation tile that can still enter a top-k list, as host arrays.

    C: (r, w) xp float32 tile (rows: panel a, columns: panel b). floor_rows (r,) / floor_cols
    (w,): known lower bounds of each node's final k-th value (-inf if unknown) — an entry below
    them can never be selected, so only a small fraction of the tile leaves the device. The
    bounds are tightened here with a cheap sample of the tile itself. On the diagonal tile
    (a == b) only the strict upper triangle is used, for both directions, so an edge's two
    directions carry the same number and a node is never its own neighbour.

    Returns ((rows, cols, vals) for the rows of a, sorted by row) and ((cols, rows, vals) for
    the rows of b, sorted by col); indices are tile-local."""
    r, w = C.shape
    s = min(w, max(1024, 16 * k))
    lo = _above(threshold)
    # Row sample: the last s columns (upper triangle only on the diagonal tile).
    S = C[:, w - s:]
    if diagonal:
        S = xp.where(xp.arange(w - s, w)[None, :] > xp.arange(r)[:, None], S, -np.inf)
    f_r = xp.maximum(xp.maximum(floor_rows, _group_floor(S, k, 1, xp)), lo)
    # Column sample: the first s rows.
    S = C[:s]
    if diagonal:
        S = xp.where(xp.arange(s)[:, None] < xp.arange(w)[None, :], S, -np.inf)
    f_c = xp.maximum(xp.maximum(floor_cols, _group_floor(S, k, 0, xp)), lo)

    flat = C.ravel()

    def hits(f: Any) -> tuple[np.ndarray, np.ndarray]:
        """Tile-local (row, col) of the entries ≥ f, row-major (upper triangle if diagonal)."""
        rows, cols = np.divmod(to_numpy(xp.flatnonzero(C >= f)), w)
        if diagonal:
            keep = cols > rows
            rows, cols = rows[keep], cols[keep]
        return rows, cols

    # Rows of a: flatnonzero is row-major, so the candidates come grouped by row.
    rows, cols = hits(f_r[:, None])
    for_a = (rows, cols, to_numpy(flat[xp.asarray(rows * w + cols)]))
    # Rows of b (the tile's columns): group by column by sorting packed (col, row) keys.
    rows, cols = hits(f_c[None, :])
    key = np.sort((cols.astype(np.uint64) << np.uint64(32)) | rows.astype(np.uint64))
    cols = (key >> np.uint64(32)).astype(np.int64)
    rows = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
    for_b = (cols, rows, to_numpy(flat[xp.asarray(rows * w + cols)]))
    return for_a, for_b


def correlation_tile(src: TileSource, a: int, b: int, xp: ModuleType, za: Any | None) -> Any:
    """Pearson correlation tile between panels a and b: (width_a, width_b) xp float32.

    za: panel a over all rows when M ≤ row_chunk (kept by the caller across tiles), else None
    (then both panels are streamed over row chunks and the tile is accumulated)."""
    if za is not None:
        zb = za if b == a else src.z(b, 0, src.n_rows, xp)
        return za.T @ zb
    C = None
    for r0, r1 in row_chunks(src.n_rows, src.row_chunk):
        zar = src.z(a, r0, r1, xp)
        zbr = zar if b == a else src.z(b, r0, r1, xp)
        part = zar.T @ zbr
        if C is None:
            C = part
        else:
            C += part
    return C


def row_block_topk(
    src: TileSource, a: int, k: int, threshold: float, xp: ModuleType,
    floor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Partial top-k lists from the tiles (a, b ≥ a), for rows start_a .. n-1.

    Rows of panel a see every column; rows of a later panel b see only the columns of a.
    Candidates are pairs with correlation > threshold (threshold ≥ 0, so this is also the ReLU
    clamp); a column is never its own neighbour. floor: optional (n,) lower bounds of each
    node's final k-th value (e.g. from lists merged so far) — only a speed-up. Returns host
    arrays (n - start_a, k) float32 values and int64 local column ids (-1 = no neighbour)."""
    panels = src.panels
    n = src.columns.size
    sa, ea = panels[a]
    known = np.full(n, -np.inf, dtype=np.float32) if floor is None else floor.astype(np.float32)
    za = src.z(a, 0, src.n_rows, xp) if src.n_rows <= src.row_chunk else None
    state_v, state_i = empty_topk(ea - sa, k)
    later_v: list[np.ndarray] = []
    later_i: list[np.ndarray] = []
    # On the CPU the next tile's GEMM (and panel read) runs in a helper thread while this one's
    # candidates are picked: both release the GIL, so the two overlap.
    with ThreadPoolExecutor(max_workers=1) if xp is np else nullcontext() as pool:
        tiles = _tiles(src, a, xp, za, pool)
        for b in range(a, len(panels)):
            sb, eb = panels[b]
            C = next(tiles)
            f_rows = np.maximum(known[sa:ea], state_v[:, k - 1])
            (ra, ca, va), (cb, rb, vb) = tile_candidates(
                C, xp.asarray(f_rows), xp.asarray(known[sb:eb]), k, threshold, b == a, xp)
            del C
            state_v, state_i = merge_candidates(state_v, state_i, ra, ca + sb, va, k)
            if b == a:  # the lower triangle: row j of a gets neighbour i < j
                state_v, state_i = merge_candidates(state_v, state_i, cb, rb + sa, vb, k)
            else:
                v, i = merge_candidates(*empty_topk(eb - sb, k), cb, rb + sa, vb, k)
                later_v.append(v)
                later_i.append(i)
    return np.concatenate([state_v, *later_v]), np.concatenate([state_i, *later_i])


def _tiles(
    src: TileSource, a: int, xp: ModuleType, za: Any | None, pool: ThreadPoolExecutor | None
) -> Iterator[Any]:
    """The tiles (a, b) for b = a, a+1, ...; with a pool, tile b+1 is computed while tile b is
    being used (at most two tiles alive)."""
    n_panels = len(src.panels)
    if pool is None:
        for b in range(a, n_panels):
            yield correlation_tile(src, a, b, xp, za)
        return
    ahead = pool.submit(correlation_tile, src, a, a, xp, za)
    for b in range(a, n_panels):
        C = ahead.result()
        if b + 1 < n_panels:
            ahead = pool.submit(correlation_tile, src, a, b + 1, xp, za)
        yield C
        del C


def empty_topk(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) running top-k state with no neighbours yet."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
