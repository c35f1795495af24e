"""Pass 2: tiled Pearson correlation with a running top-k per column — never an N×N array.

Columns are z-scored per panel and scaled by 1/sqrt(M), so a correlation tile is one GEMM,
C = Z_aᵀ Z_b (accumulated over row chunks when M > row_chunk). Only the upper triangle of tile
pairs (b ≥ a) is computed: tile (a, b) feeds the top-k of the rows of a (C) and of the rows of b
(Cᵀ, the very same numbers), so the two directions of an edge always carry the same weight.

Top-k order is total: larger correlation first, then smaller column index. The top-k of a union
of candidate sets is therefore unique, and partial top-k lists may be merged in any order (Ray
tasks finishing in any order give the same result as the in-process loop).

Memory of one row-block task: the panels (≤ 2·row_chunk·tile_cols float32), the tile and its
scratch (a few tile_cols² float32), and the top-k lists of the rows it touches (≤ n·k).
The GEMM and the per-tile selection run on NumPy or CuPy (`xp`); the small top-k merges run on
the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from scalespd.backend import to_numpy
from scalespd.graph.panels import panel_bounds, read_block, row_chunks

# Rows per argpartition call: bounds the int64 scratch at _SLAB_ROWS × tile_cols × 8 bytes.
_SLAB_ROWS = 512


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
        x = xp.asarray(read_block(self.X, r0, r1, self.columns[s:e]))
        x -= xp.asarray(self.mean[s:e])
        x *= xp.asarray(self.scale[s:e])
        return x


def _sort_rows(v: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k of each row in total order (value desc, index asc); pads (-inf) get index -1.

    v, i: (r, w) host arrays (w may be < k; the output is padded to width k)."""
    r, w = v.shape
    key_i = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((key_i, -v), axis=1)[:, :k]
    out_v = np.full((r, k), -np.inf, dtype=np.float32)
    out_i = np.full((r, k), -1, dtype=np.int64)
    out_v[:, : order.shape[1]] = np.take_along_axis(v, order, axis=1)
    out_i[:, : order.shape[1]] = np.take_along_axis(i, order, axis=1)
    out_i[~np.isfinite(out_v)] = -1
    return out_v, out_i


def merge_topk(
    v1: np.ndarray, i1: np.ndarray, v2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the union of two per-row candidate lists (host arrays, (r, k1) and (r, k2))."""
    return _sort_rows(np.concatenate([v1, v2], axis=1), np.concatenate([i1, i2], axis=1), k)


def select_topk(C: Any, col0: int, k: int, xp: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a tile, as host arrays ((r, k) float32 values, (r, k) int64 ids).

    C: (r, w) xp float32 tile, -inf where a pair is not a candidate; column c of C is node
    col0 + c. Exact ties at the k-th place are resolved by index on the host (rare rows)."""
    r, w = C.shape
    out_v = np.full((r, k), -np.inf, dtype=np.float32)
    out_i = np.full((r, k), -1, dtype=np.int64)
    if w <= k:  # every column is a candidate
        v = to_numpy(C)
        return _sort_rows(v, np.broadcast_to(np.arange(col0, col0 + w), v.shape), k)
    for s0 in range(0, r, _SLAB_ROWS):
        slab = C[s0:s0 + _SLAB_ROWS]
        # Partition so that position w-k holds the k-th largest and w-k-1 the (k+1)-th.
        part = xp.argpartition(slab, (w - k - 1, w - k), axis=1)
        top = part[:, w - k:]
        v = xp.take_along_axis(slab, top, axis=1)
        kth = v[:, 0]
        nxt = xp.take_along_axis(slab, part[:, w - k - 1:w - k], axis=1)[:, 0]
        tie = to_numpy((nxt == kth) & xp.isfinite(kth))
        v_h, i_h = _sort_rows(to_numpy(v), to_numpy(top) + col0, k)
        if tie.any():  # the k-th value is shared with a left-out column: decide by index
            rows = np.flatnonzero(tie)
            full = to_numpy(slab[xp.asarray(rows)])
            v_h[rows], i_h[rows] = _sort_rows(
                full, np.broadcast_to(np.arange(col0, col0 + w), full.shape), k
            )
        out_v[s0:s0 + _SLAB_ROWS], out_i[s0:s0 + _SLAB_ROWS] = v_h, i_h
    return out_v, out_i


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
    src: TileSource, a: int, k: int, threshold: float, xp: ModuleType
) -> tuple[np.ndarray, np.ndarray]:
    """Partial top-k lists from the tiles (a, b ≥ a), for rows start_a .. n-1.

    Rows of panel a see every column; rows of a later panel b see only the columns of a.
    Candidates are pairs with correlation > threshold (threshold ≥ 0, so this is also the ReLU
    clamp); a column is never its own neighbour. Returns host arrays (n - start_a, k) float32
    values and int64 local column ids (-1 = no neighbour)."""
    panels = src.panels
    sa, ea = panels[a]
    za = src.z(a, 0, src.n_rows, xp) if src.n_rows <= src.row_chunk else None
    state_v = np.full((ea - sa, k), -np.inf, dtype=np.float32)
    state_i = np.full((ea - sa, k), -1, dtype=np.int64)
    later_v: list[np.ndarray] = []
    later_i: list[np.ndarray] = []
    for b in range(a, len(panels)):
        sb, _ = panels[b]
        C = correlation_tile(src, a, b, xp, za)
        if b == a:
            # BLAS may round C[i, j] and C[j, i] differently; make the diagonal tile exactly
            # symmetric so both directions of an edge carry one weight.
            C = (C + C.T) * 0.5
            xp.fill_diagonal(C, -np.inf)
        C[C <= threshold] = -np.inf
        v, i = select_topk(C, sb, k, xp)
        state_v, state_i = merge_topk(state_v, state_i, v, i, k)
        if b > a:
            v, i = select_topk(xp.ascontiguousarray(C.T), sa, k, xp)
            later_v.append(v)
            later_i.append(i)
        del C
    return np.concatenate([state_v, *later_v]), np.concatenate([state_i, *later_i])


def empty_topk(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) running top-k state with no neighbours yet."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def tiled_topk(
    src: TileSource, k: int, threshold: float, xp: ModuleType
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row over all tile pairs, in this process: (n, k) values and ids."""
    n = src.columns.size
    vals, idx = empty_topk(n, k)
    for a, (sa, _) in enumerate(src.panels):
        v, i = row_block_topk(src, a, k, threshold, xp)
        vals[sa:], idx[sa:] = merge_topk(vals[sa:], idx[sa:], v, i, k)
    return vals, idx
