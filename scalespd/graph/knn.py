"""From per-node top-k lists to a symmetric sparse k-NN graph and its connected components."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


def knn_graph(
    topk_idx: np.ndarray, topk_val: np.ndarray, n: int, mutual: bool = True
) -> sp.csr_matrix:
    """Symmetric (n, n) float64 CSR weight matrix from top-k lists.

    topk_idx: (n, k) neighbour ids (-1 = none); topk_val: (n, k) weights > 0 (correlations
    above the threshold, so the ReLU clamp is already applied). mutual: keep (i, j) only if each
    is in the other's list; otherwise keep the union. Both directions of a pair carry the same
    weight by construction (one tile computes both), so min/max only decide presence."""
    valid = topk_idx >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], topk_idx.shape)[valid]
    A = sp.csr_matrix(
        (topk_val[valid].astype(np.float64), (rows, topk_idx[valid])), shape=(n, n)
    )
    W = A.minimum(A.T) if mutual else A.maximum(A.T)
    W = sp.csr_matrix(W)
    W.eliminate_zeros()
    W.sort_indices()
    return W


def components(W: sp.csr_matrix) -> tuple[int, np.ndarray]:
    """(number of connected components, (n,) int64 label per node); isolated nodes get their
    own label. Labels are numbered in order of each component's smallest node id."""
    n_comp, labels = connected_components(W, directed=False, return_labels=True)
    # Renumber explicitly by smallest member so labels do not depend on scipy's traversal.
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(n_comp, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_comp)
    return int(n_comp), rank[labels]
