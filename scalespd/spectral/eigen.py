"""Smallest eigenpairs of the generalized Laplacian problem L v = λ D v (L = D − W) of a graph.

Every solver works on the symmetric normalized Laplacian L_sym = I − D^-1/2 W D^-1/2, which has
the same eigenvalues as the generalized problem; eigenvectors map back by v = D^-1/2 u, so the
returned V is D-orthonormal (Vᵀ D V = I), the Shi–Malik / random-walk embedding the clustering
paper and scikit-learn's SpectralClustering both feed to k-means.

Solvers (one connected component at a time; every node must have positive degree):
- dense: `scipy.linalg.eigh` on L_sym, only the wanted index range (small components);
- sparse: ARPACK `eigsh` in shift-invert mode just below 0 on L_sym, LOBPCG as a fallback;
- GPU: CuPy. `cupyx.scipy.sparse.linalg.eigsh` has no shift-invert (no `sigma`), so it takes
  the *largest* eigenpairs ('LA') of the normalized adjacency A = D^-1/2 W D^-1/2, whose
  eigenvalues are μ = 1 − λ. That mapping is `_from_adjacency_pairs`, shared with a CPU solver
  (`adjacency_la_eigenpairs`) so the GPU logic is tested on machines without a GPU.

Eigenvectors get a deterministic sign (the entry of largest magnitude is made positive), so
results do not depend on the solver's arbitrary sign choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, eigsh, lobpcg

Solver = Literal["dense", "sparse", "lobpcg", "gpu_dense", "gpu_sparse"]

# Shift-invert target just below the spectrum's bottom (λ_1 = 0): the transformed eigenvalues
# 1/(λ − σ) of the wanted pairs are then far apart from the bulk, and L_sym − σI stays positive
# definite (condition number ≈ 2/|σ|).
_SHIFT = -1e-3
# On a GPU, dense eigh is used up to this size (or dense_max_nodes if larger).
GPU_DENSE_MAX_NODES = 4096


Graph: TypeAlias = sp.csr_matrix | np.ndarray  # small pieces travel as dense (n, n) arrays


def degrees(W: Graph) -> np.ndarray:
    """Weighted degrees d_i = Σ_j W_ij, shape (n,), float64."""
    return np.asarray(W.sum(axis=1), dtype=np.float64).ravel()


def normalized_adjacency(W: Graph) -> tuple[Graph, np.ndarray]:
    """A = D^-1/2 W D^-1/2 (n×n, float64; CSR for sparse W, dense for dense W) and D^-1/2 (n,).
    Every degree must be > 0."""
    d = degrees(W)
    if d.size and d.min() <= 0:
        raise ValueError(
            f"graph has {int((d <= 0).sum())} node(s) with zero degree; the Laplacian eigensolver "
            "expects one connected component with positive edge weights"
        )
    dinv = 1.0 / np.sqrt(d)
    if isinstance(W, np.ndarray):
        return W.astype(np.float64) * dinv[:, None] * dinv[None, :], dinv
    Dm = sp.diags(dinv)
    A = (Dm @ W.astype(np.float64) @ Dm).tocsr()
    return A, dinv


def _dense(A: Graph) -> np.ndarray:
    return A if isinstance(A, np.ndarray) else A.toarray()


def fix_signs(V: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest magnitude is positive (first one on ties).
    V: (n, m); returns a new array."""
    if V.size == 0:
        return V.copy()
    idx = np.argmax(np.abs(V), axis=0)
    signs = np.sign(V[idx, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs


def _finish(lam: np.ndarray, U: np.ndarray, dinv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort L_sym pairs ascending, map u → v = D^-1/2 u, fix signs. lam (m,), U (n, m)."""
    order = np.argsort(lam, kind="stable")
    lam = np.asarray(lam, dtype=np.float64)[order]
    V = dinv[:, None] * np.asarray(U, dtype=np.float64)[:, order]
    return lam, fix_signs(V)


def dense_eigenpairs(W: Graph, n_eig: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest `n_eig` eigenpairs, dense LAPACK. Returns λ (n_eig,) ascending and V (n, n_eig)."""
    n = W.shape[0]
    A, dinv = normalized_adjacency(W)
    L = np.eye(n) - _dense(A)
    lam, U = scipy.linalg.eigh(L, subset_by_index=[0, n_eig - 1], check_finite=False)
    return _finish(lam, U, dinv)


def _start_block(n: int, m: int, seed: int) -> np.ndarray:
    """Seeded random start vectors (n, m), so iterative solvers are reproducible."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, m))


def sparse_eigenpairs(
    W: sp.csr_matrix, n_eig: int, seed: int = 0, tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray, Solver]:
    """Smallest `n_eig` eigenpairs by ARPACK shift-invert on L_sym (LOBPCG if ARPACK fails).
    Returns λ (n_eig,), V (n, n_eig) and the solver that produced them."""
    n = W.shape[0]
    A, dinv = normalized_adjacency(W)
    L = (sp.identity(n, format="csc") - A).tocsc()
    try:
        lam, U = eigsh(L, k=n_eig, sigma=_SHIFT, which="LM", tol=tol,
                       v0=_start_block(n, 1, seed)[:, 0])
        return (*_finish(lam, U, dinv), "sparse")
    except (ArpackNoConvergence, RuntimeError):
        lam, V = _lobpcg_from_parts(L, dinv, n_eig, seed)
        return lam, V, "lobpcg"


def _lobpcg_from_parts(
    L: sp.spmatrix, dinv: np.ndarray, n_eig: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    n = L.shape[0]
    # A few extra block vectors speed up convergence of the last wanted pair.
    m = min(n - 1, n_eig + max(2, n_eig // 2))
    X = _start_block(n, m, seed)
    lam, U = lobpcg(L, X, largest=False, tol=1e-8, maxiter=2000)
    order = np.argsort(lam)[:n_eig]
    return _finish(lam[order], U[:, order], dinv)


def _from_adjacency_pairs(
    mu: np.ndarray, U: np.ndarray, dinv: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenpairs (μ, U) of A = D^-1/2 W D^-1/2 → smallest pairs of L v = λ D v.
    λ = 1 − μ; v = D^-1/2 u. mu (m,), U (n, m), dinv (n,) — host NumPy arrays."""
    return _finish(1.0 - np.asarray(mu, dtype=np.float64), U, dinv)


def adjacency_la_eigenpairs(
    W: sp.csr_matrix, n_eig: int, seed: int = 0,
    eigsh_la: Callable[..., tuple[Any, Any]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest `n_eig` pairs via the largest ('LA') pairs of the normalized adjacency — the
    formulation the GPU uses. `eigsh_la(A, k, v0)` defaults to SciPy's ARPACK."""
    A, dinv = normalized_adjacency(W)
    v0 = _start_block(A.shape[0], 1, seed)[:, 0]
    if eigsh_la is None:
        mu, U = eigsh(A, k=n_eig, which="LA", v0=v0, tol=1e-10)
    else:
        mu, U = eigsh_la(A, n_eig, v0)
    return _from_adjacency_pairs(np.asarray(mu), np.asarray(U), dinv)


def gpu_eigenpairs(
    W: sp.csr_matrix, n_eig: int, seed: int = 0, dense_max_nodes: int = 4096
) -> tuple[np.ndarray, np.ndarray, Solver]:
    """Smallest `n_eig` eigenpairs on a CUDA GPU with CuPy: dense `cupy.linalg.eigh` on L_sym up
    to `dense_max_nodes` (one syevd call beats many small Lanczos kernels there), thick-restart
    Lanczos ('LA' on the normalized adjacency) above.
    Returns host arrays λ (n_eig,), V (n, n_eig) and the solver used."""
    import cupy as cp  # noqa: PLC0415
    import cupyx.scipy.sparse as csp  # noqa: PLC0415
    from cupyx.scipy.sparse.linalg import eigsh as cp_eigsh  # noqa: PLC0415

    n = W.shape[0]
    if n <= dense_max_nodes:
        A, dinv = normalized_adjacency(W)
        L = cp.eye(n) - cp.asarray(_dense(A))
        lam, U = cp.linalg.eigh(L)
        return (*_finish(cp.asnumpy(lam[:n_eig]), cp.asnumpy(U[:, :n_eig]), dinv), "gpu_dense")

    def _cupy_la(A: sp.csr_matrix, k: int, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, U = cp_eigsh(csp.csr_matrix(A), k=k, which="LA", v0=cp.asarray(v0))
        return cp.asnumpy(mu), cp.asnumpy(U)

    lam, V = adjacency_la_eigenpairs(W, n_eig, seed, eigsh_la=_cupy_la)
    return lam, V, "gpu_sparse"


def smallest_eigenpairs(
    W: Graph,
    n_eig: int,
    *,
    dense_max_nodes: int = 2000,
    seed: int = 0,
    device: Literal["cpu", "cuda"] = "cpu",
) -> tuple[np.ndarray, np.ndarray, Solver]:
    """The smallest `n_eig` eigenpairs of L v = λ D v for one connected graph W (n×n symmetric
    CSR or dense array, positive weights, n ≥ n_eig). Returns λ (n_eig,) ascending, V (n, n_eig)
    D-orthonormal with fixed signs, and the name of the solver used."""
    n = W.shape[0]
    if not 1 <= n_eig <= n:
        raise ValueError(f"n_eig must be in [1, {n}] for a graph of {n} nodes, got {n_eig}")
    gpu_dense_max = max(dense_max_nodes, GPU_DENSE_MAX_NODES)
    if device == "cuda":
        if isinstance(W, np.ndarray) and n > gpu_dense_max:
            W = sp.csr_matrix(W)
        return gpu_eigenpairs(W, n_eig, seed, gpu_dense_max)
    # ARPACK needs n_eig < n - 1 (and is pointless for tiny graphs): dense there too.
    if n <= dense_max_nodes or n_eig >= n - 1:
        return (*dense_eigenpairs(W, n_eig), "dense")
    return sparse_eigenpairs(sp.csr_matrix(W), n_eig, seed)
