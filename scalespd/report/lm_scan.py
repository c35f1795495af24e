"""One streaming pass over ci.zarr for the language-model sections: per token, how strongly each
cluster and each alive subcomponent responds, and the rows where each cluster is strongest.

The (M, N) profiles are read by row blocks and only their alive columns; nothing of size M x n
is held beyond one block. Per-token results are sparse (V x K) matrices: a cluster responds to
a small part of the vocabulary, so memory follows what occurs, not V x K.

Cluster activation of a row = the *max* of its members' CI on that row: a cluster is "active"
when any member is (> tau), the way a mechanism that spans layers fires; a mean would shrink
with cluster size and hide a large cluster that fires through a few members per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scalespd import storage
from scalespd.report.inputs import ReportInputError

# Bytes of CI one block of rows may hold (float32, alive columns only); the block's masks and
# the clusters' column copy take about as much again.
BLOCK_BYTES = 64 * 2**20
MAX_BLOCK_ROWS = 2**20


class SparseSum:
    """Sum of many sparse (V, K) matrices. Summing each block into one running total costs
    O(total nnz) per block; collecting blocks and merging only when they outgrow the total keeps
    the whole sum O(final nnz * log(blocks))."""

    def __init__(self, shape: tuple[int, int], dtype: type, merge_nnz: int = 2**20) -> None:
        self.total = sp.csr_matrix(shape, dtype=dtype)
        self.pending: list[sp.csr_matrix] = []
        self.pending_nnz = 0
        self.merge_nnz = merge_nnz

    def add(self, m: sp.csr_matrix) -> None:
        self.pending.append(m)
        self.pending_nnz += m.nnz
        if self.pending_nnz > max(self.total.nnz, self.merge_nnz):
            self._merge()

    def _merge(self) -> None:
        for m in self.pending:
            self.total = self.total + m.astype(self.total.dtype)
        self.pending, self.pending_nnz = [], 0

    def result(self) -> sp.csc_matrix:
        """The sum as CSC with sorted indices (column access: one cluster or subcomponent)."""
        self._merge()
        out = self.total.tocsc()
        out.sort_indices()
        return out


@dataclass
class TokenScan:
    """Result of `scan_profiles`. V = distinct tokens in the profile rows, K = clusters scanned,
    n = alive subcomponents, t = top rows kept per cluster.

    cluster_sum: (V, K) CSC float64: sum of cluster activation over the rows of each token.
    cluster_active: (V, K) CSC int32: rows of each token where the cluster activation > tau.
    component_active: (V, n) CSC int32: rows of each token where the subcomponent's CI > tau.
    top_rows, top_values: (t, K) the rows with the largest cluster activation, descending (ties:
        earlier row first among those the block selection kept); value -inf, row -1 where fewer
        than t rows exist.
    """

    cluster_sum: sp.csc_matrix
    cluster_active: sp.csc_matrix
    component_active: sp.csc_matrix
    top_rows: np.ndarray
    top_values: np.ndarray


def cluster_layout(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Columns (alive-node indices) of K clusters laid side by side, and where each starts:
    the (perm, starts) that `np.maximum.reduceat(X[:, perm], starts, axis=1)` needs."""
    if not groups:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sizes = np.array([len(g) for g in groups])
    return np.concatenate(groups).astype(np.int64), np.concatenate([[0], np.cumsum(sizes)[:-1]])


def merge_top(values: np.ndarray, rows: np.ndarray, block: np.ndarray, first_row: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Keep the t largest values per column of the running (t, K) top and a (b, K) block whose
    row 0 is profile row first_row. Returns the new (t, K) values and rows, descending."""
    t = values.shape[0]
    b = block.shape[0]
    if b > t:  # argpartition is O(b K); a full sort per block would be O(b K log b)
        idx = np.argpartition(-block, t - 1, axis=0)[:t]
    else:
        idx = np.broadcast_to(np.arange(b)[:, None], block.shape)
    all_v = np.concatenate([values, np.take_along_axis(block, idx, axis=0)])
    all_r = np.concatenate([rows, idx + first_row])
    # Placeholders (row -1, value -inf) sort last; among equal values the earlier row wins.
    order = np.lexsort((np.where(all_r < 0, np.iinfo(np.int64).max, all_r), -all_v),
                       axis=0)[:t]
    return np.take_along_axis(all_v, order, axis=0), np.take_along_axis(all_r, order, axis=0)


def per_token(tokens: np.ndarray, mask: np.ndarray, n_vocab: int,
              values: np.ndarray | None = None) -> sp.csr_matrix:
    """(V, K) sums over a block's rows of each token: of `values` (b, K) where mask (b, K) is
    set, or (values None) int32 counts of the set entries. tokens: (b,) token indices.
    Built from the set entries only (COO -> CSR adds up duplicates), never a dense (b, K) copy."""
    r, c = np.nonzero(mask)
    data = np.ones(len(r), dtype=np.int32) if values is None else values[r, c].astype(np.float64)
    return sp.csr_matrix((data, (tokens[r], c)), shape=(n_vocab, mask.shape[1]))


def scan_profiles(
    profiles_path: storage.PathLike,
    alive_ids: np.ndarray,
    groups: list[np.ndarray],
    tok_idx: np.ndarray,
    n_vocab: int,
    tau: float,
    n_top: int,
    block_rows: int | None = None,
) -> TokenScan:
    """Read the alive columns of ci.zarr block by block and accumulate per-token statistics.

    alive_ids: (n,) global columns of the alive subcomponents (ascending).
    groups: K arrays of alive-node indices (positions in alive_ids), one per cluster.
    tok_idx: (M,) index into the V distinct tokens of each profile row.
    block_rows: rows per block (None: as many whole zarr chunks as fit BLOCK_BYTES)."""
    from scalespd.profiles.reader import open_ci  # noqa: PLC0415

    profiles_path = storage.as_path(profiles_path)
    arr = open_ci(profiles_path)
    M = int(arr.shape[0])
    if arr.ndim != 2 or M != len(tok_idx):
        raise ReportInputError(f"{storage.url(profiles_path)}: shape {arr.shape}, but "
                               f"inputs.zarr has {len(tok_idx)} rows; re-run the profiles "
                               "stage")
    cols = np.asarray(alive_ids, dtype=np.int64)
    n = len(cols)
    perm, starts = cluster_layout(groups)
    K = len(groups)
    if block_rows is None:
        chunk = int(arr.chunks[0])
        fit = min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * max(n, 1)))
        block_rows = max(chunk, fit // chunk * chunk)
    sums = SparseSum((n_vocab, K), np.float64)
    # int32 counts: a count is at most M rows; (V, n) can hold tens of millions of entries.
    active = SparseSum((n_vocab, K), np.int32)
    comp = SparseSum((n_vocab, n), np.int32)
    top_v = np.full((n_top, K), -np.inf)
    top_r = np.full((n_top, K), -1, dtype=np.int64)
    for r0 in range(0, M, block_rows):
        r1 = min(M, r0 + block_rows)
        X = np.asarray(arr.get_orthogonal_selection((slice(r0, r1), cols)), dtype=np.float32)
        tok = tok_idx[r0:r1]
        comp.add(per_token(tok, X > tau, n_vocab))
        if K == 0:
            continue
        A = np.maximum.reduceat(X[:, perm], starts, axis=1)  # (b, K) cluster activation
        sums.add(per_token(tok, A > 0, n_vocab, A))
        active.add(per_token(tok, A > tau, n_vocab))
        top_v, top_r = merge_top(top_v, top_r, A, r0)
    return TokenScan(sums.result(), active.result(), comp.result(), top_r, top_v)


def column_entries(m: sp.csc_matrix, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, values) of column j of a CSC matrix with sorted indices."""
    lo, hi = m.indptr[j], m.indptr[j + 1]
    return m.indices[lo:hi], m.data[lo:hi]


def column_diversity(counts: sp.csc_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of a (V, n) count matrix: total count, distinct rows (tokens) with a count,
    and the entropy in bits of the count distribution over tokens. Each (n,)."""
    n = counts.shape[1]
    col = np.repeat(np.arange(n), np.diff(counts.indptr))
    data = counts.data.astype(np.float64)
    keep = data > 0
    col, data = col[keep], data[keep]
    total = np.bincount(col, weights=data, minlength=n)
    distinct = np.bincount(col, minlength=n)
    p = data / total[col]
    entropy = -np.bincount(col, weights=p * np.log2(p), minlength=n)
    return total.astype(np.int64), distinct.astype(np.int64), np.abs(entropy)
