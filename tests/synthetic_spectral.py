"""Planted-partition graphs and profile matrices with known mechanisms, for the tests and
bench/spectral_bench.py.

`planted_graph` builds a sparse weighted graph whose connected components are made of blocks
(the true clusters) joined by a few weak edges. `planted_profiles` builds an (M, N) matrix of
causal-importance-like values in [0, 1] where each mechanism's member columns fire together on
a random subset of inputs, plus dead columns (max below tau) and constant columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def _block_edges(n: int, degree: float, rng: np.random.Generator) -> np.ndarray:
    """Edges (E, 2) of a connected random graph on n nodes with average degree ≈ `degree`: the
    union of ⌊degree/2⌋ random Hamiltonian cycles (so degree 4 gives a random ≤4-regular graph,
    the shape of a mutual 4-NN graph inside a mechanism) plus random chords for the rest."""
    if n == 1:
        return np.empty((0, 2), dtype=np.int64)
    if n == 2:
        return np.array([[0, 1]])
    n_cycles = max(1, int(degree // 2))
    edges = []
    for _ in range(n_cycles):
        perm = rng.permutation(n)
        edges.append(np.stack([perm, np.roll(perm, -1)], axis=1))
    n_extra = int(round(max(0.0, degree - 2 * n_cycles) * n / 2))
    if n_extra:
        edges.append(rng.integers(0, n, size=(n_extra, 2)))
    e = np.concatenate(edges)
    e = e[e[:, 0] != e[:, 1]]
    return np.unique(np.sort(e, axis=1), axis=0)


def planted_graph(
    components: Sequence[Sequence[int]],
    *,
    degree: float = 4.0,
    weight_in: tuple[float, float] = (0.5, 1.0),
    weight_between: tuple[float, float] = (0.02, 0.1),
    bridges: int = 1,
    seed: int = 0,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """A symmetric weighted graph with planted clusters.

    components: for each connected component, its block (true cluster) sizes. Blocks are random
    connected graphs of average degree ≈ `degree` with weights ~ U(weight_in); consecutive blocks
    of a component are joined by `bridges` weak edges ~ U(weight_between). Nodes are shuffled so
    that blocks are not contiguous. Returns W (n×n CSR float64), truth (n,) block id, component
    (n,) component id."""
    rng = np.random.default_rng(seed)
    rows, cols, vals, truth, comp = [], [], [], [], []
    offset, block_id = 0, 0
    for c, sizes in enumerate(components):
        starts = []
        for size in sizes:
            e = _block_edges(size, degree, rng) + offset
            rows.append(e[:, 0]); cols.append(e[:, 1])  # noqa: E702
            vals.append(rng.uniform(*weight_in, size=len(e)))
            starts.append(offset)
            truth.extend([block_id] * size)
            comp.extend([c] * size)
            offset += size
            block_id += 1
        for b in range(1, len(sizes)):
            a0, a1 = starts[b - 1], starts[b - 1] + sizes[b - 1]
            b0, b1 = starts[b], starts[b] + sizes[b]
            for _ in range(bridges):
                rows.append(np.array([rng.integers(a0, a1)]))
                cols.append(np.array([rng.integers(b0, b1)]))
                vals.append(rng.uniform(*weight_between, size=1))
    n = offset
    r = np.concatenate(rows) if rows else np.empty(0, np.int64)
    cc = np.concatenate(cols) if cols else np.empty(0, np.int64)
    v = np.concatenate(vals) if vals else np.empty(0)
    W = sp.coo_matrix((v, (r, cc)), shape=(n, n)).tocsr()
    W = W.maximum(W.T).tocsr()  # symmetric; duplicate random edges keep one weight
    perm = rng.permutation(n)
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n)
    Wp = W[perm][:, perm].tocsr()
    Wp.sort_indices()
    return Wp, np.asarray(truth)[perm], np.asarray(comp)[perm]


def planted_profiles(
    block_sizes: Sequence[int],
    n_rows: int,
    *,
    n_dead: int = 0,
    n_constant: int = 0,
    active_prob: tuple[float, float] = (0.03, 0.15),
    noise: float = 0.05,
    member_dropout: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An (M, N) float32 matrix of CI-like values in [0, 1] with planted mechanisms.

    Mechanism b is active on each input with probability p_b ~ U(active_prob), at a strength
    ~ U(0.5, 1). Each member column copies that strength times its own gain ~ U(0.7, 1.0), misses
    a fraction `member_dropout` of the active inputs, and adds |N(0, noise²)| background noise.
    Dead columns stay below 0.05; constant columns hold 0.5 everywhere (alive, zero variance).
    Columns are shuffled. Returns X (M, N) and truth (N,): mechanism id, −1 for dead columns,
    and a distinct id of its own for every constant column."""
    rng = np.random.default_rng(seed)
    M = n_rows
    cols, truth = [], []
    for b, size in enumerate(block_sizes):
        p = rng.uniform(*active_prob)
        active = rng.random(M) < p
        strength = np.where(active, rng.uniform(0.5, 1.0, size=M), 0.0)
        for _ in range(size):
            keep = rng.random(M) >= member_dropout
            gain = rng.uniform(0.7, 1.0)
            col = strength * gain * keep + np.abs(rng.normal(0.0, noise, size=M))
            cols.append(np.clip(col, 0.0, 1.0))
            truth.append(b)
    n_blocks = len(block_sizes)
    for _ in range(n_dead):
        cols.append(rng.uniform(0.0, 0.04, size=M) * (rng.random(M) < 0.3))
        truth.append(-1)
    for i in range(n_constant):
        cols.append(np.full(M, 0.5))
        truth.append(n_blocks + i)
    X = np.stack(cols, axis=1).astype(np.float32)
    perm = rng.permutation(X.shape[1])
    return X[:, perm], np.asarray(truth, dtype=np.int64)[perm]


def power_law_sizes(
    n_components: int, total_nodes: int, largest: int, *, smallest: int = 2, seed: int = 0
) -> np.ndarray:
    """Component sizes in [smallest, largest] from a discrete power law whose exponent is tuned
    to the wanted mean, then nudged to sum to exactly `total_nodes`; the largest is forced to
    `largest`. Returns (n_components,) sizes, descending."""
    rng = np.random.default_rng(seed)
    s = np.arange(smallest, largest + 1, dtype=np.float64)
    target_mean = (total_nodes - largest) / max(n_components - 1, 1)
    lo, hi = 0.0, 6.0
    for _ in range(60):  # bisection on the exponent for the wanted mean
        alpha = (lo + hi) / 2
        p = s ** -alpha
        p /= p.sum()
        if (p * s).sum() > target_mean:
            lo = alpha
        else:
            hi = alpha
    sizes = rng.choice(s.astype(np.int64), size=n_components - 1, p=p)
    # Nudge random entries by ±1 (within bounds) until the total is exactly total_nodes.
    diff = total_nodes - largest - int(sizes.sum())
    while diff:
        i = int(rng.integers(sizes.size))
        step = 1 if diff > 0 else -1
        if smallest <= sizes[i] + step <= largest:
            sizes[i] += step
            diff -= step
    return np.sort(np.concatenate([[largest], sizes]))[::-1]


def split_into_blocks(
    size: int, rng: np.random.Generator, max_block: int = 16, min_block: int = 2
) -> list[int]:
    """Cut a component of `size` nodes into blocks of min_block..max_block nodes (the remainder
    joins the last block)."""
    blocks: list[int] = []
    left = size
    while left > 0:
        b = int(rng.integers(min_block, max_block + 1))
        if left - b < min_block:
            b = left
        blocks.append(b)
        left -= b
    return blocks
