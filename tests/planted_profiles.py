"""Planted CI-like profiles with the structure of real SPD decompositions, for the clustering
default (issue 13): mechanisms of every size, power-law firing rates, dense hubs and an
always-on group, at a row count where chance correlations matter.

`hub_profiles` returns X (M, N) float32 in [0, 1] and the ground truth (N,): one class per
mechanism, one for all hub columns, one for all always-on columns. Used by
tests/spectral/test_default_clustering.py and bench/spectral_bench.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlantedSpec:
    """What `hub_profiles` plants.

    sizes: members per mechanism (1 = a lone subcomponent, e.g. ResidMLP 1L's mlp_in pieces).
    rate_range: each mechanism fires on a fraction of the rows drawn log-uniformly from here
        (a power law in firing rate, as language-model subcomponents have).
    n_hubs: dense columns, each active with a random subset of the mechanisms (a fraction drawn
        from hub_share) at a per-(hub, mechanism) strength — ResidMLP's mlp_out, TMS identity.
    n_always_on: columns active on ~every row, following one shared per-row level (always-on).
    member_dropout: fraction of its mechanism's rows on which a member stays off.
    noise: scale of the |N(0, noise^2)| background every column carries (below tau).
    """

    sizes: tuple[int, ...]
    n_rows: int = 4000
    rate_range: tuple[float, float] = (0.002, 0.1)
    n_hubs: int = 20
    hub_share: tuple[float, float] = (0.3, 0.7)
    n_always_on: int = 4
    member_dropout: float = 0.05
    noise: float = 0.02


def mechanism_sizes(n_mechanisms: int, largest: int, *, alpha: float = 1.6,
                    seed: int = 0) -> tuple[int, ...]:
    """Sizes 1..largest from a discrete power law p(s) ~ s^-alpha, with the largest forced in
    (so every corpus has a mechanism well over k members)."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, largest + 1, dtype=np.float64)
    p = s ** -alpha
    p /= p.sum()
    sizes = rng.choice(np.arange(1, largest + 1), size=n_mechanisms - 1, p=p)
    return tuple(int(x) for x in np.concatenate([[largest], sizes]))


def hub_profiles(spec: PlantedSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (M, N) float32 CI-like profiles and truth (N,) int64 class ids (see the module
    docstring). Columns are shuffled."""
    rng = np.random.default_rng(seed)
    M = spec.n_rows
    n_mech = len(spec.sizes)
    lo, hi = np.log(spec.rate_range[0]), np.log(spec.rate_range[1])
    rates = np.exp(rng.uniform(lo, hi, size=n_mech))
    # Mechanism activity: strength in (0.5, 1] on its rows, 0 elsewhere. (M, n_mech)
    active = rng.random((M, n_mech)) < rates
    strength = np.where(active, rng.uniform(0.5, 1.0, size=(M, n_mech)), 0.0)

    cols: list[np.ndarray] = []
    truth: list[int] = []
    for b, size in enumerate(spec.sizes):
        for _ in range(size):
            keep = rng.random(M) >= spec.member_dropout
            gain = rng.uniform(0.7, 1.0)
            cols.append(strength[:, b] * gain * keep)
            truth.append(b)
    for _ in range(spec.n_hubs):
        share = rng.uniform(*spec.hub_share)
        served = rng.random(n_mech) < share
        # A hub's importance on a mechanism's rows is a per-mechanism level (how much of that
        # feature passes through it), the largest over the mechanisms active on the row.
        level = np.where(served, rng.uniform(0.3, 1.0, size=n_mech), 0.0)
        cols.append(np.max(np.where(strength > 0, level, 0.0), axis=1))
        truth.append(n_mech)
    if spec.n_always_on:
        base = rng.uniform(0.6, 1.0, size=M)
        for _ in range(spec.n_always_on):
            on = rng.random(M) < 0.98
            cols.append(base * rng.uniform(0.8, 1.0) * on)
            truth.append(n_mech + 1)
    X = np.stack(cols, axis=1)
    X = np.clip(X + np.abs(rng.normal(0.0, spec.noise, size=X.shape)), 0.0, 1.0)
    perm = rng.permutation(X.shape[1])
    return X[:, perm].astype(np.float32), np.asarray(truth, dtype=np.int64)[perm]


# The planted sets the clustering default is held to (tests/spectral/test_default_clustering.py)
# and measured on (bench/clustering_default.py): name -> (spec, seed). The rarest mechanisms
# fire on at least ~8 rows: below that a co-activation cannot be told from chance.
PLANTED_SETS: dict[str, tuple[PlantedSpec, int]] = {
    "hubs+always-on": (PlantedSpec(sizes=mechanism_sizes(60, 40, seed=0)), 0),
    "many-small": (PlantedSpec(sizes=mechanism_sizes(150, 12, seed=1), n_rows=3000), 1),
    "lone+hubs": (PlantedSpec(sizes=(1,) * 60 + (2,) * 20, n_hubs=30, n_always_on=0), 2),
    "large": (PlantedSpec(sizes=(60, 45, 30, 25, 20) + (3,) * 10 + (2,) * 10 + (1,) * 10,
                          n_hubs=10, rate_range=(0.005, 0.1)), 3),
    "rare-power-law": (PlantedSpec(sizes=mechanism_sizes(80, 30, seed=4),
                                   rate_range=(0.001, 0.1), n_rows=8000), 4),
}
