"""The noise-aware edge threshold: drop correlations that chance alone explains at this M and N.

Why. With the paper's settings alone (top-k of max(0, ρ), mutual k-NN), every node whose true
mechanism has fewer than k other members fills its list with chance correlations. Among
n(n-1)/2 pairs the largest chance correlations are far above 0, mutual chance edges appear,
and unrelated mechanisms merge into giant components that spectral clustering cannot split
(issue 4: 300 planted mechanisms, M = 3000 -> ARI ≈ 0). A pair is only an edge candidate if its
correlation exceeds what the most extreme of all null pairs would plausibly reach.

The null. Two columns are unrelated if their rows could be shuffled independently: the
row-permutation null keeps each column's marginal distribution, which matters because causal
importance profiles are sparse and spiky, and sparse columns have heavy-tailed chance
correlations (two columns that fire on 10 of 3000 rows each co-fire on 3 rows by chance far
more often than a Gaussian model says).

The bound ("bennett", default). Under the permutation null, ρ_ij = Σ_m z_i(m) z_j(π(m)) / M
with z scored to mean 0 and mean square 1. Hoeffding (1963) showed that moment-generating-
function bounds for sampling with replacement also hold without replacement, so Bennett's
inequality applies to this sum of M terms with variance σ² = 1/M and each term at most
β_ij / M, where β_ij = max|z_i| · max|z_j|:

    P(ρ_ij ≥ t) ≤ exp(-(M / β_ij²) · h(β_ij · t)),    h(u) = (1 + u) ln(1 + u) - u.

For dense, Gaussian-like columns (β ≈ 2 ln M) this is a Chernoff-type bound slightly above the
Gaussian tail; for a column that fires on s of M rows, max|z| ≈ sqrt(M/s) and the bound becomes
Poisson-like, as the co-firing counts are. A union bound over all pairs gives the threshold:
the smallest t with Σ_{i<j} P(ρ_ij ≥ t) ≤ α (null_alpha), i.e. with probability ≥ 1 - α no
null pair reaches the threshold. The sum over pairs is computed on a geometric histogram of
max|z| (rounded up, which only makes the bound more conservative), so it costs O(bins²), not
O(n²).

"gaussian" instead uses the exact null of ρ for normal data (t-distribution with M - 2 degrees of
freedom) at the per-pair level α / n_pairs, ≈ z_{1-α/n_pairs} / sqrt(M): tighter on dense data,
but it under-states the tail of sparse profiles.

Per-pair thresholds ("bennett_pairwise"). The union bound above uses one t for every pair, so
the rarest columns set it: with power-law firing rates (language models), pairs of columns that
each fire on a handful of rows can reach any t < 1 by chance, the bound becomes 1 and no edge is
left. Splitting α evenly instead (level α / n_pairs per pair, the same family-wise guarantee by
the union bound) gives each pair its own threshold t(β_ij), the smallest t with
exp(-(M/β_ij²) h(β_ij t)) ≤ α / n_pairs: near the Gaussian level for two dense columns, higher
for rare ones, and 1 (never an edge) for pairs that chance alone can make perfectly correlated.
t(β) increases with β; it is tabulated on a geometric grid of β and read at the grid point
above (conservative). "bennett" falls back to it when the single threshold is vacuous (1).

The empirical floor. The largest correlation among `null_perm_cols` random columns whose rows
were shuffled independently is a draw from the same null over a smaller family, so it is
normally below the bound; "auto" takes max(bound, floor) so that a model error can only make
the threshold more cautious. Both numbers are recorded in the graph summary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sps

from scalespd.graph.panels import read_block, row_chunks

# Memory cap for the shuffled columns of the empirical floor: M × s float32 (and its z copy).
_PERM_BYTES = 128 << 20
_BINS = 256


def _h(u: np.ndarray) -> np.ndarray:
    return (1.0 + u) * np.log1p(u) - u


def gaussian_bound(n_pairs: float, n_rows: int, alpha: float) -> float:
    """(1 - α)-quantile bound of the largest of n_pairs null correlations of normal data."""
    if n_pairs < 1 or n_rows < 3:
        return 0.0
    t = float(sps.t.isf(alpha / n_pairs, df=n_rows - 2))
    return t / math.sqrt(n_rows - 2 + t * t)


def bennett_bound(max_abs_z: np.ndarray, n_rows: int, alpha: float) -> float:
    """Smallest t with Σ_{i<j} exp(-(M/β_ij²) h(β_ij t)) ≤ α, β_ij = max|z_i|·max|z_j|.

    max_abs_z: (n,) largest |z| of each non-constant column (≥ 1). Returns 1.0 when even a
    perfect correlation is within chance (e.g. many columns that fire on a single row)."""
    d = np.asarray(max_abs_z, dtype=np.float64)
    if d.size < 2:
        return 0.0
    lo, hi = float(d.min()), float(d.max())
    edges = np.geomspace(lo, hi * (1 + 1e-12), _BINS + 1) if hi > lo else np.array([lo, hi])
    counts = np.histogram(d, bins=edges)[0].astype(np.float64)
    keep = counts > 0
    counts, upper = counts[keep], edges[1:][keep]
    pairs = np.outer(counts, counts)
    np.fill_diagonal(pairs, counts * (counts - 1) / 2)
    iu = np.triu_indices(counts.size)
    pairs, beta = pairs[iu], np.outer(upper, upper)[iu]
    keep = pairs > 0
    pairs, beta = pairs[keep], beta[keep]

    def excess(t: float) -> float:
        return float(np.sum(pairs * np.exp(-(n_rows / beta**2) * _h(beta * t)))) - alpha

    if excess(1.0) > 0:
        return 1.0
    lo_t, hi_t = 0.0, 1.0
    for _ in range(60):  # bisection to ~1e-18: the tail sum decreases in t
        mid = 0.5 * (lo_t + hi_t)
        if excess(mid) > 0:
            lo_t = mid
        else:
            hi_t = mid
    return hi_t


_TABLE = 512


class PairThreshold:
    """t(β): the per-pair threshold of "bennett_pairwise" (module docstring) at per-pair level
    `level`, for M = n_rows, tabulated for β in [beta_min, beta_max]."""

    def __init__(self, beta_min: float, beta_max: float, n_rows: int, level: float) -> None:
        self.level, self.n_rows = level, n_rows
        lo, hi = max(beta_min, 1e-12), max(beta_max, beta_min, 1e-12) * (1 + 1e-9)
        self.grid = np.geomspace(lo, hi, _TABLE) if hi > lo else np.array([lo, hi])
        self.table = self._solve(self.grid)

    def _solve(self, beta: np.ndarray) -> np.ndarray:
        """Bisection on all β at once; 1.0 where even t = 1 is within chance."""
        log_level = math.log(self.level)

        def excess(t: np.ndarray) -> np.ndarray:  # log P(ρ ≥ t) - log level, decreasing in t
            return -(self.n_rows / beta**2) * _h(beta * t) - log_level

        lo, hi = np.zeros_like(beta), np.ones_like(beta)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            up = excess(mid) > 0
            lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
        return np.where(excess(np.ones_like(beta)) > 0, 1.0, hi)

    @property
    def minimum(self) -> float:
        """The smallest per-pair threshold (the densest pair): every edge is above it."""
        return float(self.table[0])

    def __call__(self, beta: np.ndarray) -> np.ndarray:
        """t(β) for any array of β_ij (read at the grid point at or above β)."""
        pos = np.searchsorted(self.grid, beta, side="left")
        return self.table[np.minimum(pos, self.grid.size - 1)]


def filter_pairs(vals: np.ndarray, idx: np.ndarray, max_abs_z: np.ndarray, pt: PairThreshold,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k lists with every candidate that fails its own pair's threshold removed.

    vals, idx: (n, k') candidate correlations and local neighbour ids, best first (-1 = none),
    over columns with (n,) largest |z| max_abs_z; returns (n, k) lists, best first, the
    survivors in their order. Searching k' > k candidates leaves room for the ones removed."""
    ok = idx >= 0
    beta = max_abs_z[:, None] * max_abs_z[np.where(ok, idx, 0)]
    t = pt(beta)
    keep = ok & (vals > t) & (t < 1.0)  # t = 1: never (float32 rounding can exceed 1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # survivors first, order kept
    kept = np.take_along_axis(keep, order, axis=1)
    out_v = np.where(kept, np.take_along_axis(vals, order, axis=1), 0).astype(vals.dtype)
    out_i = np.where(kept, np.take_along_axis(idx, order, axis=1), -1)
    return out_v, out_i


def pairwise_threshold(max_abs_z: np.ndarray, n_rows: int, alpha: float) -> PairThreshold:
    """The per-pair thresholds of the n non-constant columns with (n,) largest |z| max_abs_z."""
    d = np.asarray(max_abs_z, dtype=np.float64)
    n_pairs = max(d.size * (d.size - 1) / 2, 1.0)
    lo = float(d.min()) ** 2 if d.size else 1.0
    hi = float(d.max()) ** 2 if d.size else 1.0
    return PairThreshold(lo, hi, n_rows, alpha / n_pairs)


def permutation_max(
    X: Any, columns: np.ndarray, n_rows: int, row_chunk: int, n_cols: int, seed: int
) -> tuple[float, int]:
    """Largest correlation among n_cols random columns (of `columns`, global ids of non-constant
    columns of X (M, N_total)) after shuffling each column's rows independently.

    Returns (max correlation, number of columns used); (0.0, s) when s < 2."""
    budget = max(2, _PERM_BYTES // (4 * n_rows))
    s = int(min(n_cols, columns.size, budget))
    if s < 2:
        return 0.0, s
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(columns.size, size=s, replace=False))
    data = np.empty((n_rows, s), dtype=np.float32)
    for r0, r1 in row_chunks(n_rows, row_chunk):
        data[r0:r1] = read_block(X, r0, r1, columns[pick])
    rng.permuted(data, axis=0, out=data)  # each column shuffled on its own
    mean = data.mean(axis=0, dtype=np.float64)
    std = data.std(axis=0, dtype=np.float64)
    data -= mean.astype(np.float32)
    data *= (1.0 / (std * math.sqrt(n_rows))).astype(np.float32)
    gram = data.T @ data
    return float(gram[np.triu_indices(s, 1)].max()), s


def edge_threshold(
    setting: float | str,
    max_abs_z: np.ndarray,
    X: Any,
    columns: np.ndarray,
    n_rows: int,
    row_chunk: int,
    *,
    alpha: float,
    null_model: str,
    perm_cols: int,
    seed: int,
) -> tuple[float, dict[str, Any], PairThreshold | None]:
    """The threshold to use, how it was derived (a JSON-able record for the summary) and, for
    per-pair thresholds, the PairThreshold every candidate edge must also pass (the returned
    threshold is then its minimum: the candidate floor).

    setting: a number (used as is; 0 is the paper's plain ReLU clamp) or "auto".
    max_abs_z, columns: (n,) over the non-constant columns only."""
    n = int(columns.size)
    n_pairs = n * (n - 1) / 2
    gauss = gaussian_bound(n_pairs, n_rows, alpha)
    info: dict[str, Any] = {
        "setting": setting,
        "n_columns": n,
        "n_pairs": n_pairs,
        "n_rows": n_rows,
        "null_alpha": alpha,
        "gaussian_bound": gauss,
    }
    if setting != "auto":
        value = float(setting)
        info.update(method="fixed", value=value)
        return value, info, None
    bennett = bennett_bound(max_abs_z, n_rows, alpha)
    pairwise = null_model == "bennett_pairwise" or (null_model == "bennett" and bennett >= 1.0)
    perm, used = (0.0, 0)
    if perm_cols > 0:
        perm, used = permutation_max(X, columns, n_rows, row_chunk, perm_cols, seed)
    info.update(method="auto", null_model=null_model, bennett_bound=bennett,
                permutation_max=perm, permutation_cols=used)
    if pairwise:
        # The permutation floor is a maximum over all sampled pairs, rare ones included, so it
        # is no floor for dense pairs here; it stays in the record for comparison.
        pt = pairwise_threshold(max_abs_z, n_rows, alpha)
        value = pt.minimum
        info.update(pairwise=True, pair_level=pt.level, pair_threshold_min=value,
                    pair_threshold_max=float(pt.table[-1]),
                    fallback=null_model == "bennett", value=value)
        return value, info, pt
    bound = bennett if null_model == "bennett" else gauss
    value = min(1.0, max(bound, perm, 0.0))
    info.update(pairwise=False, value=value)
    return value, info, None
