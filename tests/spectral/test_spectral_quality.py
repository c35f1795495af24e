"""Cluster quality without ground truth (scalespd.spectral.quality): coherence against a brute-
force np.corrcoef, separation from the top-k lists, stability under row halves and seeds on
planted and on pure-noise profiles, and the row-subset view the half graphs are built from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from synthetic_spectral import planted_profiles

from scalespd.config import GraphConfig, SpectralConfig
from scalespd.graph import build_graph
from scalespd.spectral.clustering import cluster_alive
from scalespd.spectral.quality import (
    RowSample,
    best_jaccard,
    cluster_coherence,
    cluster_quality,
    nearest_outside,
    random_halves,
)


def _brute_coherence(X: np.ndarray, members: np.ndarray) -> float:
    """Mean off-diagonal np.corrcoef of the member columns (constant ones dropped)."""
    x = X[:, members].astype(np.float64)
    x = x[:, x.std(axis=0) > 0]
    c = np.corrcoef(x.T)
    s = c.shape[0]
    return float((c.sum() - np.trace(c)) / (s * (s - 1)))


@pytest.fixture(scope="module")
def planted() -> dict:
    """Clearly separated planted mechanisms, their graph and clustering."""
    X, truth = planted_profiles([6, 4, 8, 3, 5, 7, 2, 5], 1600, n_constant=1, seed=3)
    gcfg = GraphConfig(k=5, device="cpu")
    scfg = SpectralConfig(device="cpu", quality_resamples=1, quality_seeds=2)
    graph = build_graph(X, gcfg)
    labels = cluster_alive(graph, scfg, executor="local").labels
    q = cluster_quality(X, graph, labels, gcfg, scfg)
    return {"X": X, "truth": truth, "graph": graph, "labels": labels, "q": q}


def test_coherence_equals_brute_force_in_every_read_mode() -> None:
    X, _ = planted_profiles([6, 4, 8, 3, 5], 900, n_constant=2, seed=1)
    n = X.shape[1]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 9, size=n)  # mixed clusters: coherence far from 1 and from 0
    labels[rng.random(n) < 0.1] = -1
    const = np.flatnonzero(X.std(axis=0) == 0)
    labels[const] = 0  # constant members are left out of their cluster's pairs
    labels = np.unique(labels, return_inverse=True)[1] - (labels.min() < 0)
    cols = np.arange(n)
    rows = 700
    want = {c: _brute_coherence(X[:rows], np.flatnonzero(labels == c))
            for c in range(labels.max() + 1) if (labels == c).sum() > 1}
    # One read of the whole sample; batches of a few clusters; one cluster streamed by rows.
    for budget in (1 << 30, 8 * rows * 12, 8 * 50 * 3):
        coh, n_scored = cluster_coherence(X, cols, labels, rows, budget=budget)
        for c, w in want.items():
            assert coh[c] == pytest.approx(w, abs=1e-9), (budget, c)
        assert n_scored[0] == (labels == 0).sum() - const.size
    sizes = np.bincount(labels[labels >= 0])
    assert np.isnan(coh[sizes == 1]).all()


def test_coherence_reads_a_zarr_store_like_an_array(tmp_path) -> None:
    X, truth = planted_profiles([5, 3, 4], 600, seed=2)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(128, 5),
                          dtype="float32")
    z[:] = X
    labels = np.unique(truth, return_inverse=True)[1]
    a, _ = cluster_coherence(X, np.arange(X.shape[1]), labels, 500)
    b, _ = cluster_coherence(z, np.arange(X.shape[1]), labels, 500)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_nearest_outside_from_the_topk_lists() -> None:
    # Nodes 0, 1 in cluster 0; 2 in cluster 1; 3 unclustered; lists padded with -1.
    g = SimpleNamespace(topk_idx=np.array([[1, 2], [3, -1], [0, 1], [1, -1]]),
                        topk_val=np.array([[0.9, 0.4], [0.6, 0.0], [0.4, 0.3], [0.6, 0.0]],
                                          dtype=np.float32))
    got = nearest_outside(g, np.array([0, 0, 1, -1]))  # type: ignore[arg-type]
    np.testing.assert_allclose(got, [0.6, 0.4])
    # An outsider's list naming a member counts too: node 2 lists member 1 at 0.7.
    g.topk_val[2, 1] = 0.7
    got = nearest_outside(g, np.array([0, 0, 1, -1]))  # type: ignore[arg-type]
    np.testing.assert_allclose(got, [0.7, 0.7])
    # No member lists an outsider: 0.
    g2 = SimpleNamespace(topk_idx=np.array([[1], [0], [-1]]), topk_val=np.ones((3, 1)))
    assert nearest_outside(g2, np.array([0, 0, 1])).tolist() == [0.0, 0.0]  # type: ignore


def test_best_jaccard() -> None:
    full = np.array([0, 0, 0, 1, 1, 2, -1])
    half = np.array([5, 5, 3, 3, 3, -1, 4])
    # c0 {0,1,2}: best {0,1} → 2/3; c1 {3,4}: {2,3,4} → 2/3; c2 {5}: unlabelled in the half → 0.
    np.testing.assert_allclose(best_jaccard(full, half), [2 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(best_jaccard(full, full), [1.0, 1.0, 1.0])


def test_planted_clusters_are_coherent_separated_and_stable(planted) -> None:
    X, labels, q = planted["X"], planted["labels"], planted["q"]
    recs = q["clusters"]
    assert q["n_clusters_scored"] == len(recs) == 8
    assert [r["size"] for r in recs] == sorted((r["size"] for r in recs), reverse=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # the constant column: NaN row
        full = np.corrcoef(X.T.astype(np.float64))
    for r in recs:
        members = np.flatnonzero(labels == r["cluster"])
        assert r["coherence"] == pytest.approx(_brute_coherence(X, members), abs=1e-9)
        assert r["margin"] == pytest.approx(r["coherence"] - r["nearest"])
        assert r["margin"] > 0.5
        # The top-k maximum never exceeds the true strongest outside correlation.
        outside = np.setdiff1d(np.flatnonzero(X.std(axis=0) > 0), members)
        assert r["nearest"] <= full[np.ix_(members, outside)].max() + 1e-5
        assert 0.0 <= r["stability"] <= 1.0
    assert q["resample"]["ari_mean"] > 0.9 and q["resample"]["ari_min"] > 0.9
    assert q["median_stability"] > 0.9
    assert q["seeds"]["ari_mean"] == 1.0 and q["seeds"]["ari_min"] == 1.0
    assert q["seeds"]["n_pairs"] == 3  # 3 clusterings (main + 2 seeds)
    assert [h["n_rows"] for h in q["resample"]["halves"]] == [800, 800]


def test_nearest_is_exact_when_the_strongest_outside_link_is_listed() -> None:
    # No edge threshold and k above the small mechanisms' sizes: lists reach outsiders.
    X, _ = planted_profiles([2, 3, 2, 4, 3], 600, noise=0.2, seed=6)
    gcfg = GraphConfig(k=6, edge_threshold=0.0, neighbours="union", device="cpu")
    scfg = SpectralConfig(device="cpu", quality_resamples=0, quality_seeds=0)
    graph = build_graph(X, gcfg)
    labels = cluster_alive(graph, scfg, executor="local").labels
    q = cluster_quality(X, graph, labels, gcfg, scfg)
    full = np.corrcoef(X.T.astype(np.float64))
    n_exact = 0
    for r in q["clusters"]:
        members = np.flatnonzero(labels == r["cluster"])
        outside = np.setdiff1d(np.arange(X.shape[1]), members)
        block = full[np.ix_(members, outside)]
        i, j = np.unravel_index(np.argmax(block), block.shape)
        assert r["nearest"] <= block[i, j] + 1e-5
        if outside[j] in graph.topk_idx[members[i]] or members[i] in graph.topk_idx[outside[j]]:
            assert r["nearest"] == pytest.approx(block[i, j], abs=1e-5)
            n_exact += 1
    assert n_exact > 0


def test_pure_noise_is_unstable_under_resampling() -> None:
    rng = np.random.default_rng(0)
    M, n = 800, 60
    X = ((rng.random((M, n)) < 0.1) * rng.random((M, n))).astype(np.float32)
    # A fixed threshold low enough that chance correlations make edges (the data-derived one
    # rightly leaves pure noise without any).
    gcfg = GraphConfig(k=5, edge_threshold=0.1, device="cpu")
    scfg = SpectralConfig(device="cpu", quality_resamples=2, quality_seeds=0)
    graph = build_graph(X, gcfg)
    labels = cluster_alive(graph, scfg, executor="local").labels
    assert labels.max() + 1 < n  # chance edges did make clusters
    q = cluster_quality(X, graph, labels, gcfg, scfg)
    assert q["resample"]["ari_mean"] < 0.5
    assert q["median_coherence"] < 0.3
    assert q["seeds"] is None
    for r in q["clusters"]:
        assert 0.0 <= r["stability"] <= 1.0


def test_quality_off_switches() -> None:
    X, _ = planted_profiles([4, 3], 300, seed=4)
    gcfg = GraphConfig(k=3, device="cpu")
    scfg = SpectralConfig(device="cpu", quality_resamples=0, quality_seeds=0, quality_rows=100)
    graph = build_graph(X, gcfg)
    labels = cluster_alive(graph, scfg, executor="local").labels
    q = cluster_quality(X, graph, labels, gcfg, scfg)
    assert q["resample"] is None and q["seeds"] is None and q["n_rows_sample"] == 100
    assert all(r["stability"] is None for r in q["clusters"])


def test_row_sample_reads_and_builds_like_a_copy(tmp_path) -> None:
    X, _ = planted_profiles([5, 4, 6], 500, seed=5)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(64, 4),
                          dtype="float32")
    z[:] = X
    a, b = random_halves(X.shape[0], np.random.default_rng(0))
    assert a.size + b.size == X.shape[0] and np.intersect1d(a, b).size == 0
    cols = np.array([7, 1, 3])
    for src in (X, z):
        v = RowSample(src, a)
        assert v.shape == (a.size, X.shape[1])
        np.testing.assert_array_equal(v[10:60, 2:9], X[a[10:60], 2:9])
        np.testing.assert_array_equal(v.get_orthogonal_selection((slice(5, 200), cols)),
                                      X[a[5:200]][:, cols])
        np.testing.assert_array_equal(v[0:0, 1:3], X[:0, 1:3])
    for path in ("dense", "sparse"):  # both pass-2 paths read the view in row blocks
        gcfg = GraphConfig(k=4, device="cpu", row_chunk=64, tile_cols=8, correlation=path)
        got, want = build_graph(RowSample(z, a), gcfg), build_graph(X[a], gcfg)
        assert got.summary["correlation"]["path"] == path
        np.testing.assert_array_equal(got.topk_idx, want.topk_idx)
        np.testing.assert_allclose(got.topk_val, want.topk_val, atol=1e-6)
