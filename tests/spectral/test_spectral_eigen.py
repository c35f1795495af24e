"""Eigensolvers of L v = λ D v, the eigengap rule and the k-means backends."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from synthetic_spectral import planted_graph

from scalespd.backend import cupy_gpu_available, kmeans, kmeans_xp
from scalespd.spectral.core import eigengap_k
from scalespd.spectral.eigen import (
    adjacency_la_eigenpairs,
    degrees,
    dense_eigenpairs,
    fix_signs,
    gpu_eigenpairs,
    smallest_eigenpairs,
    sparse_eigenpairs,
)

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not cupy_gpu_available(), reason="no CUDA GPU visible to CuPy")


def _graph(n_blocks: int = 6, size: int = 25, seed: int = 0) -> sp.csr_matrix:
    W, _, _ = planted_graph([[size] * n_blocks], degree=6, seed=seed)
    return W


def _residual(W: sp.csr_matrix, lam: np.ndarray, V: np.ndarray) -> float:
    """max |(D − W) V − D V Λ|."""
    d = degrees(W)
    return float(np.abs((sp.diags(d) - W) @ V - (d[:, None] * V) * lam[None, :]).max())


def _same_subspace(V1: np.ndarray, V2: np.ndarray, d: np.ndarray) -> float:
    """Largest principal-angle sine between two D-orthonormal bases (0 = same span)."""
    Q1, _ = np.linalg.qr(np.sqrt(d)[:, None] * V1)
    Q2, _ = np.linalg.qr(np.sqrt(d)[:, None] * V2)
    s = np.linalg.svd(Q1.T @ Q2, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


def test_dense_solver_solves_the_generalized_problem():
    W = _graph()
    lam, V = dense_eigenpairs(W, 8)
    d = degrees(W)
    assert abs(lam[0]) < 1e-10  # connected graph: λ_1 = 0 with a constant eigenvector
    assert np.all(np.diff(lam) >= 0)
    assert _residual(W, lam, V) < 1e-9
    np.testing.assert_allclose(V.T @ (d[:, None] * V), np.eye(8), atol=1e-9)
    assert np.ptp(V[:, 0]) < 1e-9


@pytest.mark.parametrize("solver", ["sparse", "lobpcg", "adjacency_la"])
def test_iterative_solvers_match_dense(solver, monkeypatch):
    W = _graph(n_blocks=8, size=30, seed=1)  # 240 nodes, 8 near-zero eigenvalues
    ref_lam, ref_V = dense_eigenpairs(W, 9)
    if solver == "sparse":
        lam, V, used = sparse_eigenpairs(W, 9, seed=3)
        assert used == "sparse"
    elif solver == "lobpcg":
        # The fallback when ARPACK does not converge.
        from scipy.sparse.linalg import ArpackNoConvergence

        import scalespd.spectral.eigen as eigen_mod

        def no_convergence(*args, **kwargs):
            raise ArpackNoConvergence("forced", np.zeros(0), np.zeros((0, 0)))

        monkeypatch.setattr(eigen_mod, "eigsh", no_convergence)
        lam, V, used = sparse_eigenpairs(W, 9, seed=3)
        assert used == "lobpcg"
    else:
        lam, V = adjacency_la_eigenpairs(W, 9, seed=3)
    np.testing.assert_allclose(lam, ref_lam, atol=1e-7)
    assert _residual(W, lam, V) < 1e-5
    # The 8 cluster eigenvectors span the same subspace (individual vectors may rotate only
    # inside degenerate eigenspaces, which these random blocks do not have).
    assert _same_subspace(V[:, :8], ref_V[:, :8], degrees(W)) < 1e-5


def test_dispatch_picks_solver_by_size():
    W = _graph(n_blocks=4, size=30)
    assert smallest_eigenpairs(W, 5, dense_max_nodes=200)[2] == "dense"
    assert smallest_eigenpairs(W, 5, dense_max_nodes=50)[2] == "sparse"
    # Asking for (almost) every eigenpair falls back to dense even for a "large" graph.
    W3 = _graph(n_blocks=1, size=4)
    assert smallest_eigenpairs(W3, 4, dense_max_nodes=1)[2] == "dense"
    with pytest.raises(ValueError, match="n_eig"):
        smallest_eigenpairs(W3, 5)


def test_zero_degree_node_is_rejected():
    W = sp.csr_matrix(np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="zero degree"):
        dense_eigenpairs(W, 2)


def test_sign_fix_is_deterministic():
    rng = np.random.default_rng(0)
    V = rng.normal(size=(20, 4))
    F = fix_signs(V)
    np.testing.assert_array_equal(fix_signs(-V), F)
    np.testing.assert_array_equal(fix_signs(V * np.array([1, -1, -1, 1])), F)
    assert np.all(F[np.argmax(np.abs(F), axis=0), np.arange(4)] > 0)


def test_solvers_agree_after_sign_fix():
    W = _graph(n_blocks=5, size=30, seed=2)
    _, V1 = dense_eigenpairs(W, 6)
    _, V2, _ = sparse_eigenpairs(W, 6, seed=9)
    # Non-degenerate eigenvectors are unique up to sign; the sign fix makes them identical.
    np.testing.assert_allclose(V1[:, 1:], V2[:, 1:], atol=1e-6)


@pytest.mark.parametrize(
    ("lam", "k_max", "expected"),
    [
        ([0.0, 0.9, 1.0, 1.1], 3, 1),  # λ2 − λ1 is the biggest gap: one cluster
        ([0.0, 0.0, 0.0, 0.8, 0.9], 4, 3),  # three (near) disconnected parts
        ([0.0, 0.01, 0.02, 0.03, 0.5, 0.55], 5, 4),
        ([0.0, 0.25, 0.5, 0.75, 1.0, 1.25], 5, 1),  # equal gaps: ties → smallest K
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.9], 3, 1),  # true K = 5 > K_max = 3: gaps 0,0,0 → K=1
        ([0.0, 0.0, 0.05, 0.06, 0.9], 2, 2),  # only λ1..λ3 count with K_max = 2
        ([0.0, 1.0], 12, 1),  # two nodes' worth of eigenvalues caps K_max at 1
    ],
)
def test_eigengap_indexing(lam, k_max, expected):
    assert eigengap_k(np.array(lam), k_max) == expected


def test_kmeans_xp_matches_sklearn_and_is_seeded():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=6.0, size=(7, 5))
    truth = rng.integers(0, 7, size=600)
    X = centers[truth] + rng.normal(size=(600, 5))
    ours, inertia = kmeans_xp(X, 7, n_init=10, seed=3)
    ref = KMeans(7, n_init=10, random_state=0).fit(X)
    assert adjusted_rand_score(truth, ours) > 0.99
    assert adjusted_rand_score(ref.labels_, ours) > 0.99
    assert inertia <= ref.inertia_ * 1.001
    np.testing.assert_array_equal(kmeans_xp(X, 7, n_init=10, seed=3)[0], ours)
    # The public entry point: NumPy below the size cut, scikit-learn above; both recover truth.
    assert adjusted_rand_score(truth, kmeans(X, 7, seed=1)) > 0.99
    big = np.repeat(X, 5, axis=0) + rng.normal(scale=0.01, size=(3000, 5))
    assert adjusted_rand_score(np.repeat(truth, 5), kmeans(big, 7, seed=1)) > 0.99
    assert np.all(kmeans(X, 1, seed=0) == 0)


def test_kmeans_xp_handles_duplicate_points():
    X = np.zeros((10, 3))
    X[5:] = 1.0
    labels, inertia = kmeans_xp(X, 4, n_init=3, seed=0)
    assert inertia == pytest.approx(0.0, abs=1e-12)
    assert len(set(labels[:5].tolist())) == 1 and len(set(labels[5:].tolist())) == 1


@gpu
@needs_gpu
def test_gpu_eigenpairs_match_cpu():
    W = _graph(n_blocks=8, size=30, seed=1)
    ref_lam, ref_V = dense_eigenpairs(W, 9)
    for dense_max in (10_000, 10):  # dense cupy.linalg.eigh, then Lanczos 'LA'
        lam, V, used = gpu_eigenpairs(W, 9, seed=0, dense_max_nodes=dense_max)
        assert used == ("gpu_dense" if dense_max > 1000 else "gpu_sparse")
        np.testing.assert_allclose(lam, ref_lam, atol=1e-6)
        assert _same_subspace(V[:, :8], ref_V[:, :8], degrees(W)) < 1e-4


@gpu
@needs_gpu
def test_gpu_kmeans_matches_cpu():
    import cupy as cp

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=6.0, size=(5, 4))
    truth = rng.integers(0, 5, size=400)
    X = centers[truth] + rng.normal(size=(400, 4))
    cpu, _ = kmeans_xp(X, 5, seed=2)
    g, _ = kmeans_xp(cp.asarray(X), 5, seed=2, xp=cp)
    np.testing.assert_array_equal(cp.asnumpy(g), cpu)  # same seeding, same data → same result
    assert adjusted_rand_score(truth, kmeans(X, 5, seed=2, device="cuda")) > 0.99
