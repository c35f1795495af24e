"""Pass 1 from sparse row blocks: the same column statistics as `scalespd.graph.stats`, in
time proportional to the non-zero entries instead of M·N.

Each (r, w) CSC block gives, per column, its exact two-pass moments over the block's r rows — the
zeros enter in closed form: with s = Σ v over the column's non-zero values v, the block mean is
m = s / r and M2 = Σ (v - m)² + (r - nnz)·m² — and the blocks are merged with Chan et al.'s
update (`scalespd.profiles.stats.ColumnStats.merge`), as the dense pass merges its slabs. The
results agree with the dense pass to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scalespd.graph.sparse_io import SparseBlocks
from scalespd.graph.stats import ZStats, check_rows, stats_from_moments
from scalespd.profiles.stats import ColumnStats


def entry_columns(B: sp.csc_matrix) -> np.ndarray:
    """(nnz,) int64 column of each stored entry of the CSC matrix B, in storage order."""
    return np.repeat(np.arange(B.shape[1], dtype=np.int64), np.diff(B.indptr))


def _segment_extreme(B: sp.csc_matrix, op: np.ufunc, empty: float) -> np.ndarray:
    """(w,) op (np.maximum / np.minimum) over each column's stored values; `empty` where a
    column stores none. reduceat over the starts of the non-empty columns only: consecutive
    non-empty starts bound exactly one column's segment."""
    nnz = np.diff(B.indptr)
    out = np.full(B.shape[1], empty)
    full = np.flatnonzero(nnz > 0)
    if full.size:
        out[full] = op.reduceat(B.data[: B.indptr[-1]], B.indptr[full]).astype(np.float64)
    return out


def check_finite(B: sp.csc_matrix, r0: int, cols: np.ndarray) -> None:
    """Raise ValueError naming the global columns and the rows of NaN / inf values in the block
    B (rows r0.., columns `cols`), in the words of the dense pass."""
    bad = ~np.isfinite(B.data)
    if not bad.any():
        return
    where = entry_columns(B)[bad]
    rows = B.indices[bad] + r0
    names = cols[np.unique(where)]
    raise ValueError(
        f"profiles contain NaN or inf values (in column(s) {names[:10].tolist()}"
        f"{' ...' if names.size > 10 else ''}, rows {int(rows.min())}..{int(rows.max())});"
        " correlations of such columns are undefined: fix or drop them first"
    )


def block_moments(B: sp.csc_matrix, tau: float = 0.0
                  ) -> tuple[ColumnStats, np.ndarray, np.ndarray]:
    """Statistics of the (r, w) block B (finite values; zeros implicit): (ColumnStats over its
    r rows — n_active counts values > tau —, (w,) float64 min, (w,) int64 stored entries)."""
    r, w = B.shape
    nnz = np.diff(B.indptr).astype(np.int64)
    col = entry_columns(B)
    v = B.data.astype(np.float64)
    mean = np.bincount(col, weights=v, minlength=w) / r
    dev = v - mean[col]
    m2 = np.bincount(col, weights=dev * dev, minlength=w) + (r - nnz) * mean * mean
    # A column with fewer stored entries than rows also holds zeros.
    has_zero = nnz < r
    hi = _segment_extreme(B, np.maximum, -np.inf)
    lo = _segment_extreme(B, np.minimum, np.inf)
    hi = np.where(has_zero, np.maximum(hi, 0.0), hi)
    lo = np.where(has_zero, np.minimum(lo, 0.0), lo)
    active = np.bincount(col, weights=v > tau, minlength=w).astype(np.int64)
    if 0.0 > tau:
        active += r - nnz
    return ColumnStats(n=r, mean=mean, m2=m2, max=hi, n_active=active, tau=tau), lo, nnz


def sparse_column_stats(blocks: SparseBlocks) -> ZStats:
    """ZStats of X[:, blocks.cols] from its sparse row blocks, in block order.

    Raises ValueError naming the columns and rows of NaN or inf values."""
    n_rows = blocks.n_rows
    check_rows(n_rows)
    w = blocks.cols.size
    acc = ColumnStats.empty(w, tau=0.0)
    lo = np.full(w, np.inf)
    nnz = np.zeros(w, dtype=np.int64)
    for r0, _, B in blocks:
        check_finite(B, r0, blocks.cols)
        part, part_lo, part_nnz = block_moments(B)
        acc = acc.merge(part)
        np.minimum(lo, part_lo, out=lo)
        nnz += part_nnz
    return stats_from_moments(n_rows, [(acc.mean, acc.m2, lo, acc.max, nnz)])
