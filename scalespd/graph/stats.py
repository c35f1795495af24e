"""Pass 1: per-column mean, standard deviation, min and max of the selected columns.

Streams X one (row_chunk, tile_cols) block at a time and merges the per-chunk moments with Chan
et al.'s pairwise formula in float64 (`scalespd.profiles.stats.ColumnStats`, the same
accumulator as the harvest's) (the naive sum-of-squares formula cancels catastrophically
when |mean| >> std). A panel's statistics depend on nothing else, so panels can run as
independent (Ray) tasks: `panel_moments` per panel, then `stats_from_moments`. The pass also
counts each column's non-zero values: the densities that choose between the dense and the sparse
correlation path (`scalespd.graph.sparse`), which computes the same statistics from sparse row
blocks (`scalespd.graph.sparse_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scalespd.graph.panels import panel_bounds, read_block, row_chunks
from scalespd.profiles.stats import ColumnStats

# A column is "zero-variance" when its std is at most this fraction of |mean| (or exactly 0):
# float32 profiles cannot resolve relative variation below ~1e-7, so anything smaller is
# rounding noise, and z-scoring it would turn that noise into spurious correlations.
ZERO_VAR_RTOL = 1e-6
# float64 scratch per block while computing moments (rows are processed in slabs this big).
_SCRATCH_BYTES = 32 << 20

# What one panel's pass yields: (mean, M2, min, max) float64 and nnz int64, each (panel width,).
Moments = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ZStats:
    """What z-scoring and the chance threshold need of n selected columns over M rows
    (population std, ddof = 0), derived from the streaming moments of
    `scalespd.profiles.stats.ColumnStats`.

    mean, std, min, max: (n,) float64; zero_var: (n,) bool; nnz: (n,) int64 number of rows
    where the column is non-zero."""

    n_rows: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    zero_var: np.ndarray
    nnz: np.ndarray

    @property
    def max_abs_z(self) -> np.ndarray:
        """(n,) largest |z| = max(|max - mean|, |mean - min|) / std of each column (0 for
        zero-variance columns)."""
        spread = np.maximum(self.max - self.mean, self.mean - self.min)
        out = np.zeros_like(self.std)
        ok = ~self.zero_var
        out[ok] = spread[ok] / self.std[ok]
        return out


def panel_moments(X: Any, cols: np.ndarray, n_rows: int, row_chunk: int) -> Moments:
    """(mean, M2, min, max, nnz), each (len(cols),) (float64; nnz int64), of X[:, cols] over all
    rows.

    Raises ValueError naming the first offending global column ids if a value is NaN or inf."""
    w = cols.size
    acc = ColumnStats.empty(w, tau=0.0)  # only its mean and M2 are used here
    lo = np.full(w, np.inf)
    hi = np.full(w, -np.inf)
    nnz = np.zeros(w, dtype=np.int64)
    slab = max(1, _SCRATCH_BYTES // (8 * w))
    for r0, r1 in row_chunks(n_rows, row_chunk):
        block = read_block(X, r0, r1, cols)  # (r, w) float32
        for s0 in range(0, block.shape[0], slab):
            part = ColumnStats.of(block[s0:s0 + slab], tau=0.0)
            if not np.all(np.isfinite(part.mean)):  # a NaN or inf makes the mean non-finite
                bad = cols[~np.isfinite(part.mean)]
                last = r0 + s0 + part.n - 1
                raise ValueError(
                    f"profiles contain NaN or inf values (in column(s) {bad[:10].tolist()}"
                    f"{' ...' if bad.size > 10 else ''}, rows {r0 + s0}..{last});"
                    " correlations of such columns are undefined: fix or drop them first"
                )
            acc = acc.merge(part)
            np.minimum(lo, block[s0:s0 + slab].min(axis=0), out=lo)
            np.maximum(hi, part.max, out=hi)
            nnz += np.count_nonzero(block[s0:s0 + slab], axis=0)
    return acc.mean, acc.m2, lo, hi, nnz


def stats_from_moments(n_rows: int, parts: list[Moments]) -> ZStats:
    """Assemble ZStats from the per-panel `panel_moments` results, in panel order."""
    mean = np.concatenate([p[0] for p in parts])
    m2 = np.concatenate([p[1] for p in parts])
    std = np.sqrt(np.maximum(m2, 0.0) / n_rows)
    zero_var = (std == 0) | (std <= ZERO_VAR_RTOL * np.abs(mean))
    return ZStats(
        n_rows=n_rows,
        mean=mean,
        std=std,
        min=np.concatenate([p[2] for p in parts]),
        max=np.concatenate([p[3] for p in parts]),
        zero_var=zero_var,
        nnz=np.concatenate([p[4] for p in parts]),
    )


def check_rows(n_rows: int) -> None:
    if n_rows < 2:
        raise ValueError(f"profiles need at least 2 rows to correlate columns; got M = {n_rows}")


def column_stats(X: Any, columns: np.ndarray, tile_cols: int, row_chunk: int) -> ZStats:
    """Statistics of X[:, columns] (X: (M, N_total) zarr.Array or np.ndarray; columns (n,)),
    one panel after another in this process."""
    n_rows = int(X.shape[0])
    check_rows(n_rows)
    parts = [
        panel_moments(X, columns[p0:p1], n_rows, row_chunk)
        for p0, p1 in panel_bounds(columns.size, tile_cols)
    ]
    return stats_from_moments(n_rows, parts)
