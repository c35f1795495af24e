"""Exactness of the tiled correlation top-k and the k-NN graph against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from graph_reference import TOL, assert_topk_matches, brute_corr, brute_topk, reference_edges
from synthetic_graph import block_profiles

from scalespd.config import GraphConfig
from scalespd.graph import build_graph
from scalespd.graph.build import pass2_topk
from scalespd.graph.topk import (
    TileSource,
    empty_topk,
    merge_candidates,
    row_block_topk,
    topk_rows,
)


def _random(m: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The top-k primitives: exact ties broken by index, any merge order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7, 12])
@pytest.mark.parametrize("width", [5, 12, 40])
def test_topk_rows_breaks_exact_ties_by_index(k: int, width: int) -> None:
    rng = np.random.default_rng(k * 100 + width)
    # Values from a tiny set so that ties at the k-th place are everywhere; some non-candidates.
    C = rng.choice(np.array([0.1, 0.2, 0.3, -np.inf], dtype=np.float32), size=(700, width))
    ids = np.broadcast_to(rng.permutation(10 * width)[:width] + 1000, C.shape)
    v, i = topk_rows(C, ids, k)
    ref_v, ref_i = brute_topk_rows(C, ids, k)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(v, ref_v)


def brute_topk_rows(C: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -C), axis=1)[:, :k]
    v = np.full((C.shape[0], k), -np.inf, dtype=np.float32)
    i = np.full((C.shape[0], k), -1)
    v[:, : order.shape[1]] = np.take_along_axis(C, order, axis=1)
    i[:, : order.shape[1]] = np.take_along_axis(ids, order, axis=1)
    i[~np.isfinite(v)] = -1
    return v, i


def test_merge_is_order_independent() -> None:
    """Top-k of a union does not depend on how the candidate lists are split or ordered."""
    rng = np.random.default_rng(3)
    C = rng.choice(np.array([0.5, 0.25, 0.75, -np.inf], dtype=np.float32), size=(50, 60))
    ids = np.broadcast_to(np.arange(60), C.shape)
    k = 6
    ref_v, ref_i = topk_rows(C, ids, k)
    parts = []
    for s in range(0, 60, 15):  # sparse candidate lists of column slices
        rows, cols = np.nonzero(np.isfinite(C[:, s:s + 15]))
        parts.append((rows, cols + s, C[rows, cols + s]))
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        v, i = empty_topk(50, k)
        for o in order:
            v, i = merge_candidates(v, i, *parts[o], k)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(v, ref_v)


def test_known_floors_do_not_change_the_result() -> None:
    """Floors equal to each node's exact final k-th value (the tightest legal bound, where
    ties at the floor must still get in) give the same lists as no floors."""
    X, _ = block_profiles(n_rows=300, n_cols=100, n_blocks=6, seed=2)
    X[:, 50:60] = X[:, 0:10]  # exact duplicates: ties at the floor
    src = TileSource(X, np.arange(100), X.mean(0), (1 / (X.std(0) * np.sqrt(300))).astype(
        np.float32), 300, 32, 300)
    ref_v, ref_i = pass2_topk(src, 4, 0.0, "cpu", None, None, 60.0, [])
    for a, start in ((0, 0), (1, 32), (3, 96)):
        v0, i0 = row_block_topk(src, a, 4, 0.0, np)
        f = ref_v[start:, 3:4]
        v1, i1 = row_block_topk(src, a, 4, 0.0, np, floor=ref_v[:, 3])
        # A block's partial lists may lose only entries below the final k-th value.
        np.testing.assert_array_equal(np.where(v1 >= f, i1, -1), np.where(v0 >= f, i0, -1))
        assert np.all((v1 >= f) | (i1 == -1))


# --------------------------------------------------------------------------------------------
# build_graph against np.corrcoef + sort
# --------------------------------------------------------------------------------------------

CASES = [
    # (name, m, n, tile_cols, row_chunk): N not a multiple of the tile, M not a multiple of the
    # row chunk (accumulated tiles), a single-chunk case and a single-tile case.
    ("accumulated", 1003, 301, 64, 250),
    ("single_chunk", 600, 257, 50, 4096),
    ("single_tile", 400, 90, 128, 128),
]


@pytest.mark.parametrize("name,m,n,tile,chunk", CASES)
@pytest.mark.parametrize("threshold", [0.0, 0.06])
@pytest.mark.parametrize("neighbours", ["relative", "mutual", "union"])
def test_random_matches_brute_force(
    name: str, m: int, n: int, tile: int, chunk: int, threshold: float, neighbours: str
) -> None:
    X = _random(m, n, seed=m + n)
    k = 7
    cfg = GraphConfig(k=k, edge_threshold=threshold, tile_cols=tile, row_chunk=chunk,
                      neighbours=neighbours)
    res = build_graph(X, cfg)
    C = brute_corr(X)
    amb = assert_topk_matches(C, k, threshold, res.topk_idx, res.topk_val)
    assert amb.mean() < 0.02
    _check_graph(res, C, k, threshold, neighbours, amb)


def _check_graph(res, C: np.ndarray, k: int, threshold: float, neighbours: str,
                 amb: np.ndarray) -> None:
    _, ref_i = brute_topk(C, k, threshold)
    W = res.graph
    assert (W != W.T).nnz == 0, "graph must be exactly symmetric"
    coo = W.tocoo()
    got = {(int(i), int(j)) for i, j in zip(coo.row, coo.col, strict=True) if i < j}
    ref = reference_edges(C, ref_i, neighbours)
    touched = set(np.flatnonzero(amb).tolist())
    diff = {e for e in got ^ ref if not (set(e) & touched)}
    if neighbours == "relative":
        # A pair within float32 rounding of the relative bar may fall either way.
        strength = GraphConfig().relative_strength
        best = np.array([C[i, r[0]] if r[0] >= 0 else 0.0 for i, r in enumerate(ref_i)])
        diff = {(i, j) for i, j in diff
                if abs(C[i, j] - strength * max(best[i], best[j])) > TOL}
    assert not diff, f"edges differ from brute force: {sorted(diff)[:5]}"
    assert len(got) == res.summary["n_edges"]
    np.testing.assert_allclose(coo.data, C[coo.row, coo.col], atol=TOL, rtol=0)
    assert np.all(coo.data > threshold)


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_block_structured_matches_brute_force(threshold: float) -> None:
    X, block = block_profiles(n_rows=700, n_cols=230, n_blocks=12, signal=0.8, seed=1)
    k = 5
    cfg = GraphConfig(k=k, edge_threshold=threshold, neighbours="mutual", tile_cols=48,
                      row_chunk=160)
    res = build_graph(X, cfg)
    C = brute_corr(X)
    amb = assert_topk_matches(C, k, threshold, res.topk_idx, res.topk_val)
    _check_graph(res, C, k, threshold, "mutual", amb)
    if threshold > 0:  # blocks correlate ~0.4, chance ~0.15: edges stay inside blocks
        coo = res.graph.tocoo()
        assert coo.nnz > 0 and np.all(block[coo.row] == block[coo.col])


def test_column_subset_in_any_order() -> None:
    """`columns` selects and orders the nodes; the graph is the one of X[:, columns]."""
    X = _random(500, 120, seed=5)
    cols = np.random.default_rng(0).permutation(120)[:77]
    cfg = GraphConfig(k=4, edge_threshold=0.0, tile_cols=20, row_chunk=128)
    res = build_graph(X, cfg, columns=cols)
    np.testing.assert_array_equal(res.columns, cols)
    assert_topk_matches(brute_corr(X[:, cols]), 4, 0.0, res.topk_idx, res.topk_val)


def test_duplicate_columns_give_deterministic_neighbours() -> None:
    """Identical columns tie for everyone; every tiling still matches brute force."""
    base = _random(300, 40, seed=9)
    X = np.concatenate([base, base[:, :10], base[:, :10]], axis=1)
    results = [
        build_graph(X, GraphConfig(k=3, edge_threshold=0.0, tile_cols=t, row_chunk=r))
        for t, r in ((60, 300), (7, 64), (13, 100))
    ]
    C = brute_corr(X)
    for res in results:
        assert_topk_matches(C, 3, 0.0, res.topk_idx, res.topk_val)
    # Column j and its copies 40+j, 50+j are each other's best neighbours (correlation 1).
    for j in range(10):
        assert set(results[0].topk_idx[j, :2]) == {40 + j, 50 + j}
