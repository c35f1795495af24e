"""Spectral clustering of planted graphs: truth recovery, eigengap K, recursion, agreement with
scikit-learn, and results that do not depend on task packing or the number of Ray workers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score
from synthetic_spectral import planted_graph

from scalespd.config import SpectralConfig
from scalespd.spectral import cluster_graph, cluster_graph_detailed, cluster_piece
from scalespd.spectral.core import canonical_labels, piece_seed
from scalespd.spectral.tasks import estimate_seconds, graph_pieces, pack_pieces


def _assorted(seed: int, n_components: int = 60) -> list[list[int]]:
    """Components of 1–8 blocks of 3–25 nodes, plus isolated nodes and pairs."""
    rng = np.random.default_rng(seed)
    comps = [list(rng.integers(3, 26, size=rng.integers(1, 9))) for _ in range(n_components)]
    return comps + [[1]] * 15 + [[2]] * 10


def test_planted_graph_recovered_with_defaults():
    W, truth, comp = planted_graph(_assorted(0), degree=7, seed=0)
    res = cluster_graph_detailed(W, comp, SpectralConfig(), executor="local")
    assert adjusted_rand_score(truth, res.labels) >= 0.95
    # Every component with at most K_max blocks gets exactly its number of blocks as K.
    by_key = {r["key"]: r for r in res.spectra if r["depth"] == 0}
    for c in np.unique(comp):
        nodes = np.flatnonzero(comp == c)
        n_blocks = np.unique(truth[nodes]).size
        if nodes.size > 2:
            assert by_key[int(nodes.min())]["k"] == n_blocks


@pytest.mark.parametrize("n_blocks", [2, 4, 7, 11])
def test_eigengap_finds_true_k(n_blocks):
    rng = np.random.default_rng(n_blocks)
    W, truth, _ = planted_graph([list(rng.integers(6, 30, size=n_blocks))], degree=7,
                                seed=n_blocks)
    res = cluster_piece(W, np.arange(W.shape[0]), SpectralConfig())
    assert res.records[0]["k"] == n_blocks
    assert adjusted_rand_score(truth, res.labels) >= 0.99


def _two_level_graph(seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """12 blocks in 6 pairs: blocks of a pair share moderate bridges, pairs are chained by one
    very weak edge each. Its spectrum: 6 tiny eigenvalues, 6 small ones, then the bulk — the
    eigengap with K_max = 6 picks K_max itself."""
    W, truth, comp = planted_graph([[15, 15]] * 6, degree=6, bridges=3,
                                   weight_between=(0.2, 0.3), seed=seed)
    W = W.tolil()
    for c in range(5):
        a, b = np.flatnonzero(comp == c)[0], np.flatnonzero(comp == c + 1)[0]
        W[a, b] = W[b, a] = 1e-3
    return W.tocsr(), truth


def test_recursive_split_when_k_hits_k_max():
    W, truth = _two_level_graph(5)
    keys = np.arange(W.shape[0])
    cfg = SpectralConfig(k_max=6, eigengap_lookahead=0)  # the paper's rule alone
    flat = cluster_piece(W, keys, cfg.model_copy(update={"recursive_split": False}))
    assert flat.records[0]["k"] == 6 and flat.labels.max() + 1 == 6
    deep = cluster_piece(W, keys, cfg)
    assert deep.records[0]["split"]
    assert max(r["depth"] for r in deep.records) == 1
    assert adjusted_rand_score(truth, deep.labels) >= 0.95
    assert deep.labels.max() + 1 == 12
    # max_depth bounds the recursion (max_depth 1: pieces at depth 1 are not split again).
    capped = cluster_piece(W, keys, cfg.model_copy(update={"max_depth": 1}))
    assert max(r["depth"] for r in capped.records) <= 1


def test_recursive_split_many_blocks_with_lookahead():
    rng = np.random.default_rng(5)
    W, truth, _ = planted_graph([list(rng.integers(8, 20, size=14))], degree=7, seed=5)
    res = cluster_piece(W, np.arange(W.shape[0]), SpectralConfig(k_max=6))
    assert res.records[0]["k_lookahead"] == 14 and res.records[0]["k"] == 6
    assert adjusted_rand_score(truth, res.labels) >= 0.95


def test_lookahead_detects_more_than_k_max_clusters():
    """20 blocks, K_max = 12: with only K_max + 1 eigenvalues the gaps are all noise-sized; the
    look-ahead sees the real gap at 20, clusters with K_max and splits again."""
    scores = {}
    for lookahead in (0, 12):
        cfg = SpectralConfig(eigengap_lookahead=lookahead)
        aris = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            W, truth, _ = planted_graph([list(rng.integers(8, 30, size=20))], degree=8,
                                        seed=seed)
            res = cluster_piece(W, np.arange(W.shape[0]), cfg)
            aris.append(adjusted_rand_score(truth, res.labels))
            if lookahead:
                assert res.records[0]["k_lookahead"] == 20
                assert res.records[0]["k"] == 12 and res.records[0]["split"]
        scores[lookahead] = min(aris)
    assert scores[12] >= 0.99
    assert scores[12] > scores[0]


def test_agrees_with_sklearn_spectral_clustering():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        K = int(rng.integers(3, 8))
        # Noisier than the other cases: several bridges of moderate weight between blocks.
        W, truth, _ = planted_graph([list(rng.integers(15, 40, size=K))], degree=6,
                                    bridges=4, weight_between=(0.1, 0.4), seed=seed)
        ours = cluster_piece(W, np.arange(W.shape[0]), SpectralConfig(), n_clusters=K).labels
        ref = SpectralClustering(n_clusters=K, affinity="precomputed",
                                 random_state=0).fit_predict(W)
        assert adjusted_rand_score(ref, ours) >= 0.95
        assert adjusted_rand_score(truth, ours) >= 0.95


def test_tiny_components_need_no_solver():
    W = sp.csr_matrix(np.array([[0, 0.7, 0], [0.7, 0, 0], [0, 0, 0]]))
    res = cluster_graph_detailed(W, None, SpectralConfig(), executor="local")
    np.testing.assert_array_equal(res.labels, [0, 0, 1])  # the pair is one cluster
    assert res.spectra == []  # nothing was solved


def test_global_ids_ordered_by_smallest_node():
    W, truth, comp = planted_graph(_assorted(1, 20), seed=1)
    labels = cluster_graph(W, comp, SpectralConfig(), executor="local")
    _, first = np.unique(labels, return_index=True)
    assert np.all(np.diff(first) > 0)  # cluster c's smallest node < cluster c+1's
    np.testing.assert_array_equal(canonical_labels(labels), labels)


def test_graph_pieces_split_disconnected_label_groups_and_drop_zero_weights():
    # Edge 0–1, and an explicitly stored zero weight 2–3, which is no edge.
    W = sp.csr_matrix((np.array([1.0, 1.0, 0.0, 0.0]), (np.array([0, 1, 2, 3]),
                                                        np.array([1, 0, 3, 2]))), shape=(4, 4))
    assert W.nnz == 4
    pieces = graph_pieces(W, np.array([0, 0, 0, 0]))  # one label, but three connected pieces
    assert [p.tolist() for p in pieces] == [[0, 1], [2], [3]]


def test_packing_covers_every_piece_once_with_enough_work():
    costs = [estimate_seconds(n, 4 * n, SpectralConfig()) for n in
             [5000, 900, 300, 80, 40, 20] + [10] * 200 + [3] * 500 + [1] * 1000]
    tasks = pack_pieces(costs, 0.05)
    flat = sorted(i for t in tasks for i in t)
    assert flat == list(range(len(costs)))
    for t in tasks[:-1]:
        assert sum(costs[i] for i in t) >= 0.05
    assert len(tasks) < len(costs) / 20  # thousands of tiny pieces share a few tasks


def test_seeds_depend_on_the_piece_not_the_order():
    assert piece_seed(0, 17, 0) == piece_seed(0, 17, 0)
    assert len({piece_seed(0, 17, 0), piece_seed(1, 17, 0), piece_seed(0, 18, 0),
                piece_seed(0, 17, 1)}) == 4


def test_same_result_whatever_the_packing_and_workers(ray_local):
    # Components with several blocks and noisy bridges, so k-means has real choices to make.
    rng = np.random.default_rng(3)
    comps = [list(rng.integers(5, 30, size=rng.integers(2, 8))) for _ in range(40)]
    W, truth, comp = planted_graph(comps + [[1]] * 5 + [[2]] * 5, bridges=3,
                                   weight_between=(0.05, 0.3), seed=3)
    cfg = SpectralConfig(seed=11)
    ref = cluster_graph_detailed(W, comp, cfg, executor="local")
    assert ref.n_tasks > 1
    variants = {
        "one piece per task": (cfg.model_copy(update={"min_task_seconds": 1e-9}), 1),
        "one task": (cfg.model_copy(update={"min_task_seconds": 1e6}), 1),
        "one worker at a time": (cfg, 2),  # each task takes both CPUs
    }
    for name, (c, cpus) in variants.items():
        res = cluster_graph_detailed(W, comp, c, executor="ray", num_cpus_per_task=cpus)
        np.testing.assert_array_equal(res.labels, ref.labels, err_msg=name)
    assert cluster_graph_detailed(W, comp, cfg.model_copy(update={"min_task_seconds": 1e6}),
                                  executor="ray").n_tasks == 1
    # A different seed is allowed to differ, but the truth is recovered either way.
    assert adjusted_rand_score(truth, ref.labels) >= 0.9


def test_node_keys_seed_pieces_independently_of_position():
    """The same component embedded at a different position of a bigger graph, with the same
    global ids, gets the same clustering."""
    rng = np.random.default_rng(8)
    W1, _, _ = planted_graph([list(rng.integers(5, 20, size=6))], bridges=3,
                             weight_between=(0.1, 0.4), seed=8)
    n1 = W1.shape[0]
    W2, _, _ = planted_graph([[4, 4], [6]], seed=9)
    keys1 = np.arange(100, 100 + n1)
    alone = cluster_graph(W1, None, SpectralConfig(), node_keys=keys1, executor="local")
    both = cluster_graph(sp.block_diag([W2, W1]).tocsr(), None, SpectralConfig(),
                         node_keys=np.concatenate([np.arange(W2.shape[0]), keys1]),
                         executor="local")
    part = both[W2.shape[0]:]
    np.testing.assert_array_equal(canonical_labels(part), canonical_labels(alone))


def test_cluster_qr_recovers_blocks_and_ignores_rotations() -> None:
    """cluster_qr on a noisy block-indicator embedding finds the blocks, and rotating the
    embedding (what a different eigensolver start vector does inside a degenerate eigenspace)
    does not change the partition."""
    from scipy.stats import ortho_group
    from sklearn.metrics import adjusted_rand_score

    from scalespd.spectral.core import cluster_qr

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=300)
    V = np.eye(4)[truth] / np.sqrt(np.bincount(truth, minlength=4))[truth][:, None]
    V += rng.normal(0, 0.01, size=V.shape)
    labels = cluster_qr(V)
    assert adjusted_rand_score(truth, labels) == 1.0
    for seed in range(3):
        R = ortho_group.rvs(4, random_state=seed)
        np.testing.assert_array_equal(canonical_labels(cluster_qr(V @ R)),
                                      canonical_labels(labels))


def test_default_assignment_does_not_depend_on_the_seed() -> None:
    """A component without cluster structure (one random 160-node block) cut into 4: k-means
    results move with the seed, cluster_qr's (the default) do not — on a dense (eigh) and a
    sparse (ARPACK, seeded start vector) solve."""
    from sklearn.metrics import adjusted_rand_score

    W, _, _ = planted_graph([[160]], degree=6.0, seed=3)
    keys = np.arange(W.shape[0])
    for dense_max in (200, 100):
        runs = [cluster_piece(W, keys, SpectralConfig(seed=s, dense_max_nodes=dense_max),
                              n_clusters=4).labels for s in range(5)]
        assert all(np.array_equal(r, runs[0]) for r in runs)
    km = [cluster_piece(W, keys, SpectralConfig(seed=s, assign_labels="kmeans"),
                        n_clusters=4).labels for s in range(5)]
    assert min(adjusted_rand_score(km[0], r) for r in km[1:]) < 0.95
