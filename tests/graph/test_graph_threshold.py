"""The noise-aware edge threshold: valid for null data, heavy-tail aware, and it separates
planted mechanisms that the paper's settings merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from graph_reference import brute_corr
from sklearn.metrics import adjusted_rand_score
from synthetic_graph import planted_profiles

from scalespd.config import GraphConfig
from scalespd.graph import build_graph
from scalespd.graph.stats import column_stats
from scalespd.graph.threshold import (
    PairThreshold,
    bennett_bound,
    edge_threshold,
    filter_pairs,
    gaussian_bound,
)


def _max_null_corr(X: np.ndarray) -> float:
    C = brute_corr(X)
    return float(C[np.triu_indices(C.shape[0], 1)].max())


def _max_abs_z(X: np.ndarray) -> np.ndarray:
    st = column_stats(X, np.arange(X.shape[1]), 4096, 4096)
    return st.max_abs_z[~st.zero_var]


def test_gaussian_bound_is_the_normal_quantile() -> None:
    # z_{1 - 1e-8} = 5.612; the t-based value differs from z/sqrt(M) by O(1/M).
    assert gaussian_bound(1e6, 10_000, 0.01) == pytest.approx(5.612 / math.sqrt(10_000), rel=0.01)
    assert gaussian_bound(0, 100, 0.01) == 0.0


def test_bennett_bounds_dense_null_data() -> None:
    """Independent Gaussian columns: the bound is above the observed maximum and not far above
    the Gaussian bound (Chernoff-type slack only)."""
    X = np.random.default_rng(0).standard_normal((2000, 600)).astype(np.float32)
    n_pairs = 600 * 599 / 2
    b = bennett_bound(_max_abs_z(X), 2000, 0.01)
    g = gaussian_bound(n_pairs, 2000, 0.01)
    assert _max_null_corr(X) < g <= b < 1.6 * g


def test_bennett_covers_heavy_tails_of_sparse_null_data() -> None:
    """Independent sparse spiky columns (every mechanism of size 1): chance correlations exceed
    the Gaussian bound, but not the Bennett bound."""
    X, _ = planted_profiles(n_mechanisms=800, sizes=(1, 1), n_rows=2000, p_range=(0.003, 0.01),
                            seed=4)
    n = X.shape[1]
    observed = _max_null_corr(X)
    g = gaussian_bound(n * (n - 1) / 2, 2000, 0.01)
    b = bennett_bound(_max_abs_z(X), 2000, 0.01)
    assert g < observed < b


def test_single_spike_columns_are_never_linked() -> None:
    """Columns that fire on one row each coincide by chance with certainty at this N and M:
    the threshold is 1 and no edge survives."""
    m, n = 200, 400
    X = np.zeros((m, n), dtype=np.float32)
    X[np.random.default_rng(1).integers(0, m, n), np.arange(n)] = 1.0
    res = build_graph(X, GraphConfig(k=5))
    assert res.threshold == 1.0
    assert res.graph.nnz == 0
    assert res.summary["n_components"] == n


def test_fixed_threshold_is_used_as_given() -> None:
    X = np.random.default_rng(2).standard_normal((100, 20)).astype(np.float32)
    value, info, _ = edge_threshold(0.25, _max_abs_z(X), X, np.arange(20), 100, 64, alpha=0.01,
                                 null_model="bennett", perm_cols=10, seed=0)
    assert value == 0.25 and info["method"] == "fixed"


def test_auto_threshold_record_and_gaussian_option() -> None:
    X, _ = planted_profiles(n_mechanisms=60, n_rows=1500, seed=5)
    cols = np.arange(X.shape[1])
    z = _max_abs_z(X)
    kw = dict(alpha=0.01, perm_cols=200, seed=0)
    tb, ib, _ = edge_threshold("auto", z, X, cols, 1500, 512, null_model="bennett", **kw)
    tg, ig, _ = edge_threshold("auto", z, X, cols, 1500, 512, null_model="gaussian", **kw)
    assert ib["method"] == "auto" and ib["permutation_cols"] == 200
    assert tb == max(ib["bennett_bound"], ib["permutation_max"])
    assert tg == max(ig["gaussian_bound"], ig["permutation_max"])
    assert 0 < ib["permutation_max"] < tb and tg <= tb


def test_planted_mechanisms_separate_with_auto_and_merge_with_paper_settings() -> None:
    """Issue 4's planted case: 300 mechanisms of sizes 1-9, M = 3000. With the data-derived
    threshold every edge lies inside a mechanism and the connected components are exactly the
    mechanisms; with the paper's settings (threshold 0) they merge into a giant component."""
    X, truth = planted_profiles(n_mechanisms=300, sizes=(1, 9), n_rows=3000, seed=0)
    auto = build_graph(X, GraphConfig(k=10, tile_cols=512))
    coo = auto.graph.tocoo()
    assert coo.nnz > 0 and np.all(truth[coo.row] == truth[coo.col])
    assert adjusted_rand_score(truth, auto.labels) == 1.0
    assert auto.summary["n_components"] == 300

    paper = build_graph(X, GraphConfig(k=10, edge_threshold=0.0, neighbours="mutual",
                                       tile_cols=512))
    coo = paper.graph.tocoo()
    assert np.mean(truth[coo.row] != truth[coo.col]) > 0.1
    assert paper.summary["largest_components"][0] > 0.5 * X.shape[1]
    assert adjusted_rand_score(truth, paper.labels) < 0.05


def test_binned_bennett_sum_is_conservative() -> None:
    """The histogram of max|z| rounds each column up, so the binned threshold is at least the
    one from the exact sum over all pairs (and close to it); equal max|z| values work too."""
    from scipy.optimize import brentq

    from scalespd.graph.threshold import _h

    rng = np.random.default_rng(0)
    d = np.exp(rng.uniform(0, 3, size=300))
    m, alpha = 2000, 0.01
    beta = np.outer(d, d)[np.triu_indices(d.size, 1)]

    def excess(t: float) -> float:
        return float(np.sum(np.exp(-(m / beta**2) * _h(beta * t)))) - alpha

    exact = brentq(excess, 1e-6, 1.0)
    binned = bennett_bound(d, m, alpha)
    assert exact <= binned <= exact * 1.05
    assert 0 < bennett_bound(np.full(50, 3.0), m, alpha) < 1


# ------------------------------------------------------------------------------------------
# Per-pair thresholds (power-law firing rates)
# ------------------------------------------------------------------------------------------


def test_pair_threshold_grows_with_beta_and_is_vacuous_for_single_row_pairs() -> None:
    M = 20_000
    pt = PairThreshold(1.0, float(M), M, level=1e-8)
    beta = np.geomspace(1.0, M, 50)
    t = pt(beta)
    assert np.all(np.diff(t) >= 0) and t[0] < 0.1
    # Gaussian-like pair (beta ~ (2 ln M)^2): close to the normal quantile at that level.
    assert pt(np.array([4.0]))[0] == pytest.approx(5.73 / math.sqrt(M), rel=0.35)
    # Two columns that each fire on one row: chance makes them perfectly correlated with
    # probability 1/M > level, so no correlation is significant.
    assert pt(np.array([float(M)]))[0] == 1.0
    # Two columns firing on the same 20 of M rows: significant although far rarer than dense.
    assert pt(np.array([M / 20]))[0] < 0.99


def test_filter_pairs_keeps_survivors_in_order() -> None:
    pt = PairThreshold(1.0, 1e4, 10_000, level=1e-6)
    vals = np.zeros((4, 4), dtype=np.float32)
    idx = np.full((4, 4), -1)
    vals[0], idx[0] = [0.9, 0.5, 0.2, 0.05], [1, 2, 3, 0]
    vals[1, 0], idx[1, 0] = 0.3, 0
    z = np.array([100.0, 2.0, 100.0, 2.0])  # columns 0, 2 rare; 1, 3 dense
    v, i = filter_pairs(vals, idx, z, pt, k=2)
    # Row 0 (rare): 0.9 with dense 1 (beta 200) survives, 0.5 with rare 2 (beta 1e4) does not,
    # 0.2 with dense 3 survives; truncated to k = 2.
    t_rare, t_mid = pt(np.array([1e4]))[0], pt(np.array([200.0]))[0]
    assert t_rare > 0.5 and t_mid < 0.2
    assert i.tolist() == [[1, 3], [0, -1], [-1, -1], [-1, -1]]
    assert v[0].tolist() == pytest.approx([0.9, 0.2])
    assert v[1].tolist() == pytest.approx([0.3, 0.0])


def test_vacuous_single_threshold_falls_back_to_per_pair_thresholds() -> None:
    """Many columns that fire on one row each make the single union bound 1 (no edges at all);
    the per-pair fallback still finds the planted dense pairs and none of the chance pairs."""
    rng = np.random.default_rng(0)
    M, n_rare, n_pairs = 4000, 400, 10
    X = np.zeros((M, n_rare + 2 * n_pairs), dtype=np.float32)
    X[rng.integers(0, M, n_rare), np.arange(n_rare)] = 1.0  # single-row columns, some share
    for p in range(n_pairs):  # planted pairs firing together on ~5% of rows
        on = rng.random(M) < 0.05
        X[on, n_rare + 2 * p] = rng.random(on.sum())
        X[on, n_rare + 2 * p + 1] = rng.random(on.sum())
    z = _max_abs_z(X)
    assert bennett_bound(z, M, 0.01) == 1.0
    res = build_graph(X, GraphConfig(k=3, null_model="bennett"))
    info = res.summary["threshold_info"]
    assert info["pairwise"] and info["fallback"] and res.threshold < 0.2
    W = res.graph.tocoo()
    edges = {(int(a), int(b)) for a, b in zip(W.row, W.col, strict=True) if a < b}
    assert edges == {(n_rare + 2 * p, n_rare + 2 * p + 1) for p in range(n_pairs)}
    # Single-row columns that happen to coincide (correlation 1) are no edge.
    coinciding = [(a, b) for a in range(n_rare) for b in range(a + 1, n_rare)
                  if np.array_equal(X[:, a], X[:, b])]
    assert coinciding and not edges & set(coinciding)
