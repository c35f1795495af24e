"""Small language-model-like profile matrices for the sparse-path tests (tests/graph/).

Columns fire rarely (log-uniform rates), mechanisms of several columns fire together, a few hub
columns fire often and an always-on column never rests; optional edge cases (all-zero rows and
columns, constant columns, an exact duplicate column) are planted at known places.
"""

from __future__ import annotations

import numpy as np


def lm_like_profiles(
    n_rows: int = 3000,
    n_cols: int = 160,
    rates: tuple[float, float] = (0.002, 0.08),
    n_mechanisms: int = 12,
    n_hubs: int = 3,
    edge_cases: bool = True,
    constant_column: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """(M, N) float32 non-negative profiles, mostly exact zeros.

    Column c fires on each row with its own rate (log-uniform in `rates`) at U(0.05, 1).
    Mechanism f (3–8 columns) fires on 2–6% of rows, each member at w·U(0.5, 1), w ~ U(0.5, 1).
    Hubs (the last n_hubs columns before the edge cases) fire on 30–60% of rows; column 1 is
    always on (0.5 + 0.5·U). With edge_cases: rows 5..9 are zero (all zero unless
    constant_column), column 0 is all zero, column 3 duplicates column 4 (exact ties), and with
    constant_column column 2 is constant 0.7."""
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.uniform(np.log(rates[0]), np.log(rates[1]), n_cols))
    rate[n_cols - n_hubs:] = rng.uniform(0.3, 0.6, n_hubs)
    X = (rng.random((n_rows, n_cols)) < rate) * rng.uniform(0.05, 1.0, (n_rows, n_cols))
    for _ in range(n_mechanisms):
        members = rng.choice(np.arange(5, n_cols - n_hubs), size=rng.integers(3, 9),
                             replace=False)
        on = rng.random(n_rows) < rng.uniform(0.02, 0.06)
        amp = rng.uniform(0.5, 1.0, on.sum())
        X[np.ix_(on, members)] = amp[:, None] * rng.uniform(0.5, 1.0, members.size)
    X[:, 1] = 0.5 + 0.5 * rng.random(n_rows)
    if edge_cases:
        X[5:10] = 0.0
        X[:, 0] = 0.0
        X[:, 3] = X[:, 4]
        if constant_column:
            X[:, 2] = 0.7
    return X.astype(np.float32)
