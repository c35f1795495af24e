"""`largest_component` mode: give each node outside the clustered component the cluster whose
members it correlates with most on average (clustering paper §4).

The mean Pearson correlation of column i with the members of cluster c is
    (1 / |c|) Σ_{j∈c} z_iᵀ z_j / M = z_iᵀ (Σ_{j∈c} z_j) / (M |c|),
with z the z-scored columns (population std). So one pass over row chunks suffices: per chunk,
S = Z_members · onehot (rows × K) and acc += Z_queryᵀ S. Memory is one (row_chunk, col_block)
block plus (n_query, K) — never N×N or M×N.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scalespd.graph.panels import read_block


def mean_correlation_to_clusters(
    X: Any,
    member_cols: np.ndarray,
    member_labels: np.ndarray,
    member_mean: np.ndarray,
    member_std: np.ndarray,
    query_cols: np.ndarray,
    query_mean: np.ndarray,
    query_std: np.ndarray,
    *,
    row_chunk: int = 8192,
    col_block: int = 2048,
) -> np.ndarray:
    """Mean correlation of every query column with each cluster's member columns.

    X: (M, N_total) zarr.Array or np.ndarray. member_cols (m,) global column ids with
    member_labels (m,) in 0..K−1 and their population mean/std (m,) (std > 0). query_cols (q,)
    with mean/std (q,) (std > 0). Returns (q, K) float64."""
    n_rows = int(X.shape[0])
    member_labels = np.asarray(member_labels, dtype=np.int64)
    K = int(member_labels.max()) + 1 if member_labels.size else 0
    sizes = np.bincount(member_labels, minlength=K).astype(np.float64)
    acc = np.zeros((query_cols.size, K), dtype=np.float64)
    if not K or not query_cols.size:
        return acc
    for r0 in range(0, n_rows, row_chunk):
        r1 = min(r0 + row_chunk, n_rows)
        # S (rows, K): per-cluster sums of the members' z-scores on these rows.
        S = np.zeros((r1 - r0, K), dtype=np.float64)
        for b0 in range(0, member_cols.size, col_block):
            b1 = min(b0 + col_block, member_cols.size)
            Z = _zscore(X, r0, r1, member_cols[b0:b1], member_mean[b0:b1], member_std[b0:b1])
            onehot = np.zeros((b1 - b0, K))
            onehot[np.arange(b1 - b0), member_labels[b0:b1]] = 1.0
            S += Z @ onehot
        for b0 in range(0, query_cols.size, col_block):
            b1 = min(b0 + col_block, query_cols.size)
            Z = _zscore(X, r0, r1, query_cols[b0:b1], query_mean[b0:b1], query_std[b0:b1])
            acc[b0:b1] += Z.T @ S
    return acc / (n_rows * sizes[None, :])


def _zscore(
    X: Any, r0: int, r1: int, cols: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """z-scored block X[r0:r1, cols] in float64, shape (r1 − r0, len(cols))."""
    block = read_block(X, r0, r1, cols).astype(np.float64)
    return (block - mean[None, :]) / std[None, :]
