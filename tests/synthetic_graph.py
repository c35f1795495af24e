"""Profile matrices with planted mechanisms, for the graph tests and bench/graph_bench.py.

They mimic causal-importance profiles: values in [0, 1], mostly exact zeros (hard clamp),
sparse mechanisms whose subcomponents fire together, dense low-level noise and occasional
spurious firing (which gives unrelated columns heavy-tailed chance correlations).
"""

from __future__ import annotations

import numpy as np


def planted_profiles(
    n_mechanisms: int = 300,
    sizes: tuple[int, int] = (1, 9),
    n_rows: int = 3000,
    p_range: tuple[float, float] = (0.01, 0.05),
    noise: float = 0.03,
    spurious: float = 0.002,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A (M, N) float32 profile matrix and the (N,) planted mechanism id of each column.

    Mechanism f (size uniform in `sizes`) is active on each row with probability p_f (uniform in
    `p_range`) at an amplitude U(0.5, 1); each of its columns is w · amplitude (w ~ U(0.6, 1))
    plus N(0, noise²) noise, clamped to [0, 1], and fires spuriously at U(0.3, 1) on a fraction
    `spurious` of rows. Columns are shuffled so that mechanisms straddle tiles."""
    rng = np.random.default_rng(seed)
    size = rng.integers(sizes[0], sizes[1] + 1, size=n_mechanisms)
    truth = np.repeat(np.arange(n_mechanisms), size)
    n = truth.size
    p = rng.uniform(*p_range, size=n_mechanisms)
    amp = (rng.random((n_rows, n_mechanisms)) < p) * rng.uniform(0.5, 1.0, (n_rows, n_mechanisms))
    w = rng.uniform(0.6, 1.0, size=n)
    X = amp[:, truth] * w + noise * rng.standard_normal((n_rows, n))
    fire = rng.random((n_rows, n)) < spurious
    X[fire] = rng.uniform(0.3, 1.0, size=int(fire.sum()))
    np.clip(X, 0.0, 1.0, out=X)
    order = rng.permutation(n)
    return np.ascontiguousarray(X[:, order], dtype=np.float32), truth[order]


def block_profiles(
    n_rows: int, n_cols: int, n_blocks: int, signal: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Dense Gaussian columns sharing one latent factor per block: (M, N) float32 and (N,)
    block ids. Within-block correlation ≈ signal² / (1 + signal²)."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, n_blocks, size=n_cols)
    latent = rng.standard_normal((n_rows, n_blocks))
    X = signal * latent[:, block] + rng.standard_normal((n_rows, n_cols))
    return X.astype(np.float32), block
