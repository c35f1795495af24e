"""Brute-force references for the graph tests: np.corrcoef over all columns, then sort.

Shared by the tests in tests/graph/ (imported by module name; pytest puts this folder on
sys.path)."""

from __future__ import annotations

import numpy as np

TOL = 1e-5


def brute_corr(X: np.ndarray) -> np.ndarray:
    """(n, n) float64 Pearson correlation; rows/cols of constant columns are NaN-free -inf."""
    X = np.asarray(X, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.corrcoef(X.T)
    C[~np.isfinite(C)] = -np.inf
    return C


def brute_topk(C: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of C (self excluded, candidates > threshold), order (value desc, index
    asc): (n, k) values (-inf pad) and ids (-1 pad)."""
    n = C.shape[0]
    C = C.copy()
    np.fill_diagonal(C, -np.inf)
    C[C <= threshold] = -np.inf
    cols = np.broadcast_to(np.arange(n), C.shape)
    order = np.lexsort((cols, -C), axis=1)[:, :k]
    vals = np.full((n, k), -np.inf)
    idx = np.full((n, k), -1, dtype=np.int64)
    vals[:, : order.shape[1]] = np.take_along_axis(C, order, axis=1)
    idx[:, : order.shape[1]] = order
    idx[~np.isfinite(vals)] = -1
    return vals, idx


def ambiguous_rows(C: np.ndarray, k: int, threshold: float, tol: float = TOL) -> np.ndarray:
    """(n,) bool: rows whose k-th and (k+1)-th candidate, or whose weakest candidate and the
    threshold, are within tol — where float32 and float64 may legitimately pick differently."""
    n = C.shape[0]
    C = C.copy()
    np.fill_diagonal(C, -np.inf)
    srt = -np.sort(-C, axis=1)
    amb = np.zeros(n, dtype=bool)
    if k < n:
        kth, nxt = srt[:, k - 1], srt[:, k]
        with np.errstate(invalid="ignore"):
            close = kth - nxt < tol
        amb |= np.isfinite(kth) & np.isfinite(nxt) & close & (nxt > threshold - tol)
    # A value within tol of the threshold matters only if it could make the top k.
    near = (np.abs(C - threshold) < tol).any(axis=1)
    amb |= near & ((C > threshold + tol).sum(axis=1) < k)
    return amb


def mutual_edges(idx: np.ndarray, mutual: bool = True) -> set[tuple[int, int]]:
    """Undirected edges (i < j) of the mutual (or union) k-NN graph of top-k id lists."""
    directed = {(i, int(j)) for i, row in enumerate(idx) for j in row if j >= 0}
    if mutual:
        return {(min(i, j), max(i, j)) for i, j in directed if (j, i) in directed}
    return {(min(i, j), max(i, j)) for i, j in directed}


def reference_edges(C: np.ndarray, idx: np.ndarray, neighbours: str,
                    strength: float | None = None) -> set[tuple[int, int]]:
    """Undirected edges (i < j) of the k-NN graph of top-k id lists `idx` over the correlation
    matrix C, for GraphConfig.neighbours = mutual | union | relative (a pair of the union whose
    correlation reaches `strength` times the strongest listed correlation of both nodes)."""
    if neighbours != "relative":
        return mutual_edges(idx, neighbours == "mutual")
    if strength is None:
        from scalespd.config import GraphConfig  # noqa: PLC0415

        strength = GraphConfig().relative_strength
    best = np.array([C[i, row[0]] if row[0] >= 0 else 0.0 for i, row in enumerate(idx)])
    return {(i, j) for i, j in mutual_edges(idx, False)
            if C[i, j] >= strength * max(best[i], best[j]) - 1e-6}


def assert_topk_matches(
    C: np.ndarray, k: int, threshold: float, idx: np.ndarray, val: np.ndarray,
    tol: float = TOL,
) -> np.ndarray:
    """Assert that (idx, val) from the tiled code equal the brute-force top-k of C.

    Rows flagged by `ambiguous_rows` are exempt from the id check — which neighbour wins a
    float32 near-tie at the k-th place is not defined. Every listed neighbour must carry its true
    correlation.
    Returns the ambiguous-row mask."""
    ref_v, ref_i = brute_topk(C, k, threshold)
    amb = ambiguous_rows(C, k, threshold, tol)
    assert idx.shape == ref_i.shape and val.shape == ref_i.shape
    # Padding: same number of neighbours per row (unless ambiguous at the threshold).
    cnt, ref_cnt = (idx >= 0).sum(1), (ref_i >= 0).sum(1)
    bad = np.flatnonzero((cnt != ref_cnt) & ~amb)
    assert bad.size == 0, (
        f"rows {bad[:5]} have {cnt[bad[:5]]} neighbours, expected {ref_cnt[bad[:5]]}"
    )
    ok = ~amb
    # Same neighbour sets; the order inside a list is checked through the values (near-equal
    # values may come in either order).
    np.testing.assert_array_equal(np.sort(idx[ok], axis=1), np.sort(ref_i[ok], axis=1))
    filled = np.where(idx >= 0, val, -np.inf)
    assert np.all(filled[:, 1:] <= filled[:, :-1]), "lists must be sorted best first"
    m = ok[:, None] & (ref_i >= 0)
    np.testing.assert_allclose(val[m], ref_v[m], atol=tol, rtol=0)
    rows, slots = np.nonzero(idx >= 0)
    true = C[rows, idx[rows, slots]]
    np.testing.assert_allclose(val[rows, slots], true, atol=tol, rtol=0)
    assert np.all(val[idx < 0] == 0) or np.all(~np.isfinite(val[idx < 0]))
    return amb
