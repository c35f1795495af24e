"""From planted profile matrices through the real graph stage to clusters: truth recovery with
the default settings, the paper's settings on many small mechanisms, the largest-component mode
and the always-on groups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from synthetic_spectral import planted_profiles

from scalespd.config import GraphConfig, SpectralConfig
from scalespd.graph import build_graph
from scalespd.spectral.assign import mean_correlation_to_clusters
from scalespd.spectral.clustering import cluster_alive, order_by_keys

TAU = 0.1


def _run(X: np.ndarray, gcfg: GraphConfig, scfg: SpectralConfig, **kw):
    alive = np.flatnonzero(X.max(axis=0) > TAU)
    graph = build_graph(X, gcfg, columns=alive)
    return alive, graph, cluster_alive(graph, scfg, executor="local", **kw)


def test_assorted_blocks_with_noise_dead_and_constant_columns():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 12, size=50)
    X, truth = planted_profiles(sizes, 2000, n_dead=40, n_constant=4, noise=0.05, seed=0)
    alive, graph, res = _run(X, GraphConfig(), SpectralConfig())
    assert np.all(truth[alive] >= 0) and alive.size == sizes.sum() + 4  # dead ones filtered
    assert graph.zero_var.sum() == 4
    assert adjusted_rand_score(truth[alive], res.labels) >= 0.95
    # Constant columns are isolated, hence singleton clusters.
    const = res.labels[graph.zero_var]
    assert np.all(np.bincount(res.labels)[const] == 1)


def test_large_mechanisms_defaults_vs_mutual_knn():
    """Mechanisms of 10–40 members (bigger than k). The defaults (data-derived threshold, so a
    union k-NN graph) keep each one connected and match the truth; forcing the paper's mutual
    k-NN breaks them into fragments and isolated nodes."""
    rng = np.random.default_rng(1)
    sizes = np.concatenate([rng.integers(1, 10, size=30), rng.integers(10, 41, size=8)])
    X, truth = planted_profiles(sizes, 3000, n_dead=20, n_constant=2, seed=1)
    alive, graph, res = _run(X, GraphConfig(), SpectralConfig())
    assert graph.summary["neighbours"] == "relative"
    assert adjusted_rand_score(truth[alive], res.labels) >= 0.95
    alive_m, _, res_m = _run(X, GraphConfig(neighbours="mutual"), SpectralConfig())
    assert adjusted_rand_score(truth[alive_m], res_m.labels) < 0.9


def test_hundreds_of_small_mechanisms_defaults_vs_paper_settings():
    """300 mechanisms of 1–9 members, M = 3000. Defaults (data-derived edge threshold) recover
    them; the paper's settings alone (threshold 0, k = 10) join them through chance
    correlations into a giant component that K_max cannot split."""
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 10, size=300)
    X, truth = planted_profiles(sizes, 3000, n_dead=30, n_constant=3, seed=2)
    alive, graph, res = _run(X, GraphConfig(), SpectralConfig())
    assert adjusted_rand_score(truth[alive], res.labels) >= 0.95
    assert graph.threshold > 0
    paper = GraphConfig(edge_threshold=0.0, k=10, neighbours="mutual")
    alive_p, graph_p, res_p = _run(X, paper, SpectralConfig(always_on_fraction=None))
    assert np.bincount(graph_p.labels).max() > alive_p.size // 2  # a giant component
    assert adjusted_rand_score(truth[alive_p], res_p.labels) < 0.5


def test_mean_correlation_matches_brute_force():
    rng = np.random.default_rng(3)
    X = rng.random((503, 40)).astype(np.float32)
    X[:, 10:20] += X[:, :1] * 2  # some real correlation structure
    mean, std = X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64)
    members = np.array([3, 5, 11, 12, 17, 30, 31])
    mlab = np.array([0, 1, 1, 0, 2, 2, 1])
    query = np.array([0, 1, 2, 15, 39, 22])
    got = mean_correlation_to_clusters(
        X, members, mlab, mean[members], std[members], query, mean[query], std[query],
        row_chunk=100, col_block=3,  # neither divides its dimension
    )
    C = np.corrcoef(X.T.astype(np.float64))
    want = np.stack([C[np.ix_(query, members[mlab == c])].mean(axis=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_largest_component_mode_assigns_by_mean_correlation():
    # One big mechanism group (a component of several blocks after union k-NN) plus small ones.
    X, truth = planted_profiles([9, 8, 7, 2, 1, 3], 1500, n_constant=1, seed=4)
    # Make the first three mechanisms co-fire weakly so they form one component.
    first = np.flatnonzero(truth <= 2)
    X[:, first] = np.clip(X[:, first] + 0.3 * X[:, first[:1]], 0, 1)
    scfg = SpectralConfig(mode="largest_component")
    alive, graph, res = _run(X, GraphConfig(neighbours="union"), scfg, profiles=X)
    sizes = np.bincount(graph.labels)
    big = np.flatnonzero(graph.labels == np.argmax(sizes))
    assert big.size > 9
    rest = np.setdiff1d(np.arange(alive.size), big)
    # Zero-variance columns cannot be compared: excluded.
    assert np.all(res.labels[graph.zero_var] == -1)
    # Everyone else gets the cluster with the highest brute-force mean correlation.
    C = np.corrcoef(X[:, alive].T.astype(np.float64))
    for i in rest[~graph.zero_var[rest]]:
        clusters = np.unique(res.labels[big])
        means = [C[i, big[res.labels[big] == c]].mean() for c in clusters]
        assert res.labels[i] == clusters[int(np.argmax(means))]
    assert res.info["n_assigned"] == int((~graph.zero_var[rest]).sum())


def test_largest_component_mode_needs_profiles():
    X, _ = planted_profiles([5, 4, 1], 800, seed=5)
    with pytest.raises(ValueError, match="needs the profile matrix"):
        _run(X, GraphConfig(), SpectralConfig(mode="largest_component"))


def _with_always_on(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature mechanisms plus two sets of 3 always-on columns (active on every row, like an
    identity pathway; each set shares a factor) that also track one feature mechanism each a
    little — enough to be pulled into its cluster. Returned with frac_active per column."""
    rng = np.random.default_rng(seed)
    X, truth = planted_profiles([6, 5, 5, 4, 3], 1500, seed=seed)
    sets = [rng.uniform(0.5, 0.8, size=(1500, 1)) + 0.2 * X[:, [np.flatnonzero(truth == b)[0]]]
            for b in (0, 1)]  # set b tracks feature mechanism b a little
    on = np.concatenate([f + rng.normal(0, 0.03, size=(1500, 3)) for f in sets], axis=1)
    on = np.clip(on, 0, 1).astype(np.float32)
    X = np.concatenate([X, on], axis=1)
    truth = np.concatenate([truth, [98, 98, 98, 99, 99, 99]])
    return X, truth, (X > TAU).mean(axis=0)


@pytest.mark.parametrize("grouping", ["single", "connected"])
def test_always_on_columns_form_their_own_group(grouping):
    X, truth, frac = _with_always_on(6)
    alive = np.flatnonzero(X.max(axis=0) > TAU)
    graph = build_graph(X, GraphConfig(), columns=alive)
    cfg = SpectralConfig(always_on_fraction=0.9, always_on_max_corr=1.0,
                         always_on_grouping=grouping)
    res = cluster_alive(graph, cfg, frac_active=frac[alive], executor="local")
    on = frac[alive] > 0.9
    assert res.always_on.tolist() == on.tolist() and on.sum() == 6
    groups = res.labels[on]
    if grouping == "single":
        assert np.unique(groups).size == 1
    else:
        # One cluster per connected set of always-on nodes in the k-NN graph: the two sets.
        assert adjusted_rand_score(truth[alive][on], groups) == 1.0
        assert np.unique(groups).size == 2
    # Always-on nodes share no cluster with feature nodes, which are recovered.
    assert not set(groups.tolist()) & set(res.labels[~on].tolist())
    assert adjusted_rand_score(truth[alive][~on], res.labels[~on]) >= 0.95
    # Without the option and the containment test, on a union k-NN graph, they are pulled into
    # a feature cluster (the paper's failure mode); the default relative edges alone already
    # keep them apart.
    no_group = SpectralConfig(always_on_fraction=None)
    union = build_graph(X, GraphConfig(neighbours="union"), columns=alive)
    off = cluster_alive(union, no_group.model_copy(update={"edge_mass_ratio": None}),
                        executor="local").labels
    assert set(off[on].tolist()) & set(off[~on].tolist())
    rel = cluster_alive(graph, no_group, executor="local").labels
    assert not set(rel[on].tolist()) & set(rel[~on].tolist())
    with pytest.raises(ValueError, match="frac_active"):
        cluster_alive(graph, cfg, frac_active=frac[:3], executor="local")


def test_order_by_keys_keeps_minus_one():
    labels = np.array([5, -1, 5, 2, 7, 2])
    keys = np.array([10, 11, 3, 12, 0, 20])
    np.testing.assert_array_equal(order_by_keys(labels, keys), [1, -1, 1, 2, 0, 2])


def test_unpartnered_frequent_columns_are_joined_into_one_cluster():
    """Three columns active on ~90% of rows, independent of each other and of everything else
    (the TMS identity's profile): the default joins them into one cluster; the paper's setting
    leaves them as singletons. A frequent column that has a partner (a copy of it) is not
    always-on and stays with its partner."""
    rng = np.random.default_rng(4)
    X, truth = planted_profiles([5, 4, 3], 2000, seed=4)
    lone = np.clip(rng.uniform(0.3, 1.0, size=(2000, 3)) * (rng.random((2000, 3)) < 0.9), 0, 1)
    pair_base = rng.uniform(0.3, 1.0, size=2000) * (rng.random(2000) < 0.8)
    pair = np.stack([pair_base, np.clip(pair_base + rng.normal(0, 0.02, 2000), 0, 1)], axis=1)
    X = np.concatenate([X, lone, pair], axis=1).astype(np.float32)
    n0 = truth.size
    frac = (X > TAU).mean(axis=0)
    graph = build_graph(X, GraphConfig())
    res = cluster_alive(graph, SpectralConfig(), frac_active=frac, executor="local")
    assert res.always_on[n0:n0 + 3].all() and not res.always_on[n0 + 3:].any()
    assert np.unique(res.labels[n0:n0 + 3]).size == 1
    assert res.labels[n0 + 3] == res.labels[n0 + 4]
    assert not set(res.labels[n0:]) & set(res.labels[:n0])
    assert adjusted_rand_score(truth, res.labels[:n0]) == 1.0
    paper = cluster_alive(graph, SpectralConfig(always_on_fraction=None), frac_active=frac,
                          executor="local")
    assert np.unique(paper.labels[n0:n0 + 3]).size == 3
