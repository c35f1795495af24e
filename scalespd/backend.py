"""Array and k-means backend: NumPy/SciPy/scikit-learn on CPU, CuPy (+ cuML when installed) on GPU.

GPU packages are imported lazily and only when a GPU path is asked for, so the CPU install never
needs them. Functions here are plain functions (no Ray), so GPU kernels can be tested on a bare
GPU machine.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any, Literal

import numpy as np

from scalespd.errors import ConfigError

Device = Literal["cpu", "cuda"]

log = logging.getLogger(__name__)


def _unusable(package: str, err: BaseException) -> None:
    """Say once, in the log, why an installed GPU package cannot be used (a missing package is
    the normal CPU install and stays quiet)."""
    if isinstance(err, ModuleNotFoundError) and err.name == package:
        log.debug("%s is not installed; GPU paths are off", package)
    else:
        log.warning("%s is installed but cannot be used (%s: %s); using the CPU", package,
                    type(err).__name__, err)


@functools.cache
def cupy_gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception as err:  # ImportError, CUDARuntimeError, missing driver, ...
        _unusable("cupy", err)
        return False


def torch_gpu_available() -> bool:
    """True when torch sees a CUDA device (what the SPD model's forward passes run on)."""
    import torch  # noqa: PLC0415

    return bool(torch.cuda.is_available())


def resolve_device(device: str, library: Literal["cupy", "torch"] = "cupy",
                   field: str = "device") -> Device:
    """Map a config's "auto" | "cpu" | "cuda" to the device that will actually be used by
    `library`: CuPy for array work (graph, spectral), torch for model forwards (profiles).

    "cuda" when that library sees no GPU is an error (naming the config `field`) rather than a
    silent CPU fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return "cpu"
    available = cupy_gpu_available() if library == "cupy" else torch_gpu_available()
    if device == "cuda" and not available:
        hint = ("install the 'gpu' extra on a GPU machine" if library == "cupy"
                else "torch was installed without CUDA or sees no GPU")
        name = {"cupy": "CuPy", "torch": "torch"}[library]
        raise ConfigError(f"{field}: 'cuda' was requested but {name} cannot see a CUDA GPU "
                          f"({hint}); or use {field}: auto / cpu")
    return "cuda" if available else "cpu"


def array_module(device: Device) -> ModuleType:
    """numpy on CPU, cupy on CUDA."""
    if device == "cuda":
        import cupy  # noqa: PLC0415

        return cupy
    return np


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy/CuPy/torch array to host NumPy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # cupy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


@functools.cache
def cuml_available() -> bool:
    """True when cuML imports (optional: CuPy k-means stands in without it)."""
    try:
        import cuml  # noqa: F401, PLC0415

        return True
    except Exception as err:
        _unusable("cuml", err)
        return False


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------


def kmeans(
    X: Any,
    n_clusters: int,
    *,
    n_init: int = 10,
    seed: int = 0,
    device: Device = "cpu",
    max_iter: int = 300,
) -> np.ndarray:
    """Cluster the rows of X (n, d) into `n_clusters` groups; best of `n_init` seeded runs.

    CPU: scikit-learn's KMeans. CUDA: cuML's KMeans when it is installed, else `kmeans_xp` on
    CuPy. Returns host labels (n,) int64."""
    if n_clusters <= 1 or X.shape[0] <= 1:
        return np.zeros(X.shape[0], dtype=np.int64)
    if device == "cuda":
        if cuml_available():
            from cuml.cluster import KMeans as CuKMeans  # noqa: PLC0415

            km = CuKMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed,
                          max_iter=max_iter, output_type="numpy")
            return np.asarray(to_numpy(km.fit_predict(X)), dtype=np.int64)
        cp = array_module("cuda")
        labels, _ = kmeans_xp(cp.asarray(X, dtype=cp.float64), n_clusters, n_init=n_init,
                              seed=seed, xp=cp, max_iter=max_iter)
        return to_numpy(labels).astype(np.int64)
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] < _SMALL_KMEANS_ROWS:
        # Most components are tiny; scikit-learn's per-call overhead (input validation, thread
        # pools: ~5-20 ms) would dominate thousands of them, the batched NumPy version ~1 ms.
        return kmeans_xp(X, n_clusters, n_init=n_init, seed=seed, xp=np, max_iter=max_iter)[0]
    from sklearn.cluster import KMeans  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed, max_iter=max_iter)
    # scikit-learn's OpenMP Lloyd loop spins badly when cores are shared (measured 40x slower
    # than one thread for 4,000 x 12 on a busy 2-core machine); one thread below 50k rows.
    with threadpool_limits(limits=1 if X.shape[0] < 50_000 else None):
        return km.fit_predict(X).astype(np.int64)


# Below this many rows the CPU k-means uses `kmeans_xp` on NumPy, above it scikit-learn.
_SMALL_KMEANS_ROWS = 2000


def kmeans_xp(
    X: Any,
    n_clusters: int,
    *,
    n_init: int = 10,
    seed: int = 0,
    xp: ModuleType = np,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> tuple[Any, float]:
    """Array-module-generic k-means: k-means++ seeding and Lloyd iterations for all `n_init`
    restarts at once (batched, so small problems cost one vectorised pass instead of n_init
    Python loops). Used on CuPy when cuML is absent and on NumPy for small CPU problems.

    X: (n, d) float array of module xp. Random choices come from a host NumPy generator seeded
    with `seed`, so CPU and GPU runs seed identically. Stops when no restart's centres move more
    than tol × the mean per-feature variance (scikit-learn's rule). Returns (labels (n,) xp
    int64, inertia) of the restart with the lowest inertia (the first one on ties)."""
    n = X.shape[0]
    k = min(n_clusters, n)
    rng = np.random.default_rng(seed)
    sq = (X * X).sum(axis=1)  # (n,)
    tol_abs = tol * float(X.var(axis=0).mean())
    C = _kmeanspp_batched(X, sq, k, n_init, rng, xp)  # (I, k, d)
    ar = xp.arange(k)
    prev = None
    for _ in range(max_iter):
        labels = _sq_dists(X, sq, C, xp).argmin(axis=2)  # (I, n)
        if prev is not None and bool((labels == prev).all()):
            break  # no assignment changed: every restart has converged
        prev = labels
        onehot = (labels[:, :, None] == ar[None, None, :]).astype(X.dtype)  # (I, n, k)
        counts = onehot.sum(axis=1)  # (R, k)
        # One GEMM for all restarts: (R·k, n) @ (n, d); a broadcast batched matmul would take
        # NumPy's slow non-BLAS path.
        R = onehot.shape[0]
        sums = (onehot.transpose(0, 2, 1).reshape(R * k, n) @ X).reshape(R, k, X.shape[1])
        # An emptied cluster keeps its old centre rather than becoming NaN.
        new = xp.where(counts[:, :, None] > 0, sums / xp.maximum(counts, 1)[:, :, None], C)
        shift = float(((new - C) ** 2).sum(axis=(1, 2)).max())
        C = new
        if shift <= tol_abs:
            break
    d2 = _sq_dists(X, sq, C, xp)
    labels = d2.argmin(axis=2)
    inertia = to_numpy(xp.maximum(d2.min(axis=2), 0).sum(axis=1)).astype(np.float64)  # (I,)
    best = int(np.argmin(inertia))
    return labels[best].astype(xp.int64), float(inertia[best])


def _sq_dists(X: Any, sq: Any, C: Any, xp: ModuleType) -> Any:
    """Squared distances (R, n, k) between rows of X (n, d) and centres C (R, k, d) of R
    restarts."""
    R, k, d = C.shape
    cross = (X @ C.reshape(R * k, d).T).reshape(X.shape[0], R, k).transpose(1, 0, 2)  # (R, n, k)
    return sq[None, :, None] - 2.0 * cross + (C * C).sum(axis=2)[:, None, :]


def _kmeanspp_batched(
    X: Any, sq: Any, k: int, n_init: int, rng: np.random.Generator, xp: ModuleType
) -> Any:
    """k-means++ seeding for n_init restarts at once: each next centre is drawn with probability
    ∝ squared distance to the nearest centre chosen so far. Returns centres (n_init, k, d)."""
    n = X.shape[0]
    idx = np.empty((n_init, k), dtype=np.int64)
    idx[:, 0] = rng.integers(n, size=n_init)
    closest = xp.maximum(sq[None, :] - 2.0 * X[xp.asarray(idx[:, 0])] @ X.T
                         + sq[xp.asarray(idx[:, 0])][:, None], 0)  # (I, n)
    for j in range(1, k):
        p = to_numpy(closest).astype(np.float64)
        cum = np.cumsum(p, axis=1)
        total = cum[:, -1]
        u = rng.random(n_init) * total
        pick = (cum <= u[:, None]).sum(axis=1)  # row-wise searchsorted(side="right")
        # Where every point already coincides with a centre, any point will do.
        pick = np.where(total > 0, np.minimum(pick, n - 1), rng.integers(n, size=n_init))
        idx[:, j] = pick
        xi = X[xp.asarray(pick)]  # (I, d)
        d_new = xp.maximum(sq[None, :] - 2.0 * xi @ X.T + sq[xp.asarray(pick)][:, None], 0)
        closest = xp.minimum(closest, d_new)
    return X[xp.asarray(idx.ravel())].reshape(n_init, k, X.shape[1]).copy()
