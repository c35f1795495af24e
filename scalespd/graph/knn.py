"""From per-node top-k lists to a symmetric sparse k-NN graph and its connected components."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


def knn_graph(
    topk_idx: np.ndarray,
    topk_val: np.ndarray,
    n: int,
    neighbours: str,
    relative_strength: float,
) -> sp.csr_matrix:
    """Symmetric (n, n) float64 CSR weight matrix from top-k lists.

    topk_idx: (n, k) neighbour ids, best first (-1 = none); topk_val: (n, k) weights > 0
    (correlations above the threshold, so the ReLU clamp is already applied). neighbours:
    "mutual" keeps (i, j) only if each is in the other's list; "union" keeps either's;
    "relative" keeps a pair of the union when its weight is at least relative_strength times
    the strongest weight (first list entry) of both i and j — see GraphConfig.neighbours and
    GraphConfig.relative_strength (the defaults live there only). Both
    directions of a pair carry the same weight by construction (one tile computes both), so
    min/max only decide presence."""
    if neighbours not in ("relative", "mutual", "union"):
        raise ValueError(f"neighbours must be relative, mutual or union, got {neighbours!r}")
    valid = topk_idx >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], topk_idx.shape)[valid]
    cols = topk_idx[valid]
    vals = topk_val[valid].astype(np.float64)
    if neighbours == "relative":
        strongest = strongest_weight(topk_idx, topk_val)
        # float32 weights: compare in the same precision the lists were ranked in.
        bar = relative_strength * np.maximum(strongest[rows], strongest[cols])
        keep = vals >= bar * (1 - 1e-6)
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    A = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    W = A.minimum(A.T) if neighbours == "mutual" else A.maximum(A.T)
    W = sp.csr_matrix(W)
    W.eliminate_zeros()
    W.sort_indices()
    return W


def strongest_weight(topk_idx: np.ndarray, topk_val: np.ndarray) -> np.ndarray:
    """(n,) each node's strongest candidate correlation (0 for a node without candidates)."""
    if topk_idx.shape[1] == 0:
        return np.zeros(topk_idx.shape[0])
    return np.where(topk_idx[:, 0] >= 0, topk_val[:, 0], 0.0).astype(np.float64)


def components(W: sp.csr_matrix) -> tuple[int, np.ndarray]:
    """(number of connected components, (n,) int64 label per node); isolated nodes get their
    own label. Labels are numbered in order of each component's smallest node id."""
    n_comp, labels = connected_components(W, directed=False, return_labels=True)
    # Renumber explicitly by smallest member so labels do not depend on scipy's traversal.
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(n_comp, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_comp)
    return int(n_comp), rank[labels]
