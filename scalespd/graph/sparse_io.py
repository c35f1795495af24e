"""Reading a profile matrix X (M, N_total) as sparse row blocks, whatever it is stored as.

The sparse correlation path (`scalespd.graph.sparse`) and its statistics pass walk X in row
blocks of the selected columns, each a `scipy.sparse.csc_matrix` (float32, sorted indices): the
column slices a column tile needs are then contiguous. X may be

    a scipy sparse matrix / array      CSR is sliced by rows as it is (other formats are converted
                                       once, see `as_row_sliceable`)
    a sparse row-block source          any object with `shape`, `dtype` and
                                       `csr_rows(r0, r1) -> scipy.sparse.csr_matrix` of all N
                                       columns (how a sparse on-disk store plugs in)
    a dense array                      zarr.Array, np.ndarray, NpyFile, RowSubset: read in
                                       (row piece, column panel) blocks through `read_block`,
                                       each converted on its own, so only one small dense piece
                                       is ever in memory

`dense_rows` and `read_block` (scalespd.graph.panels) give dense blocks of any of them, so the
dense path, the threshold's permutation floor and the spectral assignment read sparse inputs too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.sparse as sp

# A sparse row block whose selected columns hold at least this share of its entries is
# converted whole and sliced; below it only the selected entries are converted (measured on
# 8B-shaped blocks: whole conversion 0.034 s at any share; selection first 0.05 s at 44%,
# 0.014 s at 20%, 0.008 s at 0.3%).
_WHOLE_SHARE = 0.3
# Dense pieces read from a dense X while building one sparse block stay below this size.
_PIECE_BYTES = 32 << 20


def is_sparse_rows(X: Any) -> bool:
    """Whether X offers its rows as sparse matrices (a scipy sparse matrix or a source with
    `csr_rows`), so that reading it dense would be the expensive way."""
    return sp.issparse(X) or callable(getattr(X, "csr_rows", None))


def as_row_sliceable(X: Any) -> Any:
    """X itself, or a scipy sparse X in CSR form (row slices of CSR cost only their own entries;
    a COO or CSC matrix is converted once, a copy of its entries)."""
    if sp.issparse(X) and X.format != "csr":
        return sp.csr_matrix(X)
    return X


def csr_rows(X: Any, r0: int, r1: int) -> sp.csr_matrix:
    """Rows r0..r1-1 of a sparse-rows X (see `is_sparse_rows`) as CSR, all N columns."""
    if sp.issparse(X):
        return sp.csr_matrix(as_row_sliceable(X)[r0:r1])
    return sp.csr_matrix(X.csr_rows(r0, r1))


def dense_rows(X: Any, r0: int, r1: int) -> np.ndarray:
    """X[r0:r1] (all columns) as a dense ndarray, for any kind of X."""
    if is_sparse_rows(X):
        return csr_rows(X, r0, r1).toarray()
    return np.asarray(X[r0:r1])


def sparse_dense_block(X: Any, r0: int, r1: int, cols: np.ndarray) -> np.ndarray:
    """X[r0:r1, cols] of a sparse-rows X as a new dense (r1 - r0, len(cols)) array."""
    return csr_rows(X, r0, r1)[:, cols].toarray()


@dataclass(frozen=True)
class SparseBlocks:
    """Row blocks of X[:, cols] as CSC float32 matrices.

    X: (M, N_total), any kind listed in the module docstring. cols: (w,) global column ids, in
    the order the blocks' columns should have. block_rows: rows per block. piece_rows: rows per
    dense read when X is dense (whole zarr chunks keep reads cheap)."""

    X: Any
    cols: np.ndarray
    block_rows: int
    piece_rows: int

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    def bounds(self) -> list[tuple[int, int]]:
        """[start, stop) row ranges of the blocks."""
        m = self.n_rows
        return [(r, min(r + self.block_rows, m)) for r in range(0, m, self.block_rows)]

    def __iter__(self) -> Iterator[tuple[int, int, sp.csc_matrix]]:
        for r0, r1 in self.bounds():
            yield r0, r1, self.block(r0, r1)

    @cached_property
    def _position(self) -> np.ndarray:
        """(N_total,) int32: each global column's position in `cols`, -1 for the others."""
        pos = np.full(int(self.X.shape[1]), -1, dtype=np.int32)
        pos[self.cols] = np.arange(self.cols.size, dtype=np.int32)
        return pos

    def block(self, r0: int, r1: int) -> sp.csc_matrix:
        """(r1 - r0, w) CSC float32 block with sorted indices; NaN / inf are kept (non-zero)."""
        if is_sparse_rows(self.X):
            rows = csr_rows(self.X, r0, r1)
            pos = self._position[rows.indices]
            keep = np.flatnonzero(pos >= 0)  # ascending entry numbers
            if keep.size >= _WHOLE_SHARE * rows.nnz:
                # Many entries stay (an early pass, over most columns): converting the whole
                # slice to CSC and taking column segments is the cheaper way.
                out = rows.tocsc()[:, self.cols]
            else:
                # A narrow share (the later passes of a wide matrix: 1/300 at 8B scale): keep
                # its entries first, as CSR with the columns renumbered, and convert only those.
                # Row i's kept entries start at the number of kept entries before indptr[i].
                indptr = np.searchsorted(keep, rows.indptr)
                out = sp.csr_matrix((rows.data[keep], pos[keep], indptr),
                                    shape=(r1 - r0, self.cols.size)).tocsc()
        else:
            out = self._from_dense(r0, r1)
        out = sp.csc_matrix(out, dtype=np.float32)
        out.sort_indices()
        return out

    def _from_dense(self, r0: int, r1: int) -> sp.csc_matrix:
        from scalespd.graph.panels import read_block  # noqa: PLC0415  (panels imports this)

        w = self.cols.size
        rows = max(1, min(self.piece_rows, r1 - r0))
        panel = max(1, _PIECE_BYTES // (4 * rows))
        pieces = []
        for q0 in range(r0, r1, rows):
            q1 = min(q0 + rows, r1)
            parts = [sp.csc_matrix(read_block(self.X, q0, q1, self.cols[c0:c0 + panel]))
                     for c0 in range(0, w, panel)]
            pieces.append(sp.hstack(parts, format="csc"))
        return sp.vstack(pieces, format="csc") if len(pieces) > 1 else pieces[0]
