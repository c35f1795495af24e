"""Reading column panels of a profile matrix X (M, N_total), in row chunks.

Both passes of the graph stage walk X the same way: a *panel* is a block of at most
`tile_cols` selected columns, read `row_chunk` rows at a time. X is a zarr.Array or a
scalespd.graph.source.NpyFile (read from disk, never whole; RowSubset of either), an
in-memory np.ndarray, or a sparse matrix / sparse row source (scalespd.graph.sparse_io);
either way only one (row_chunk, tile_cols) block per panel is resident at once. Ray tasks open
X themselves from a scalespd.graph.source.SourceSpec.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from scalespd.graph.sparse_io import is_sparse_rows, sparse_dense_block

# Read the contiguous column span instead of a point selection when the panel's columns fill at
# least this fraction of it: a slice decodes each zarr chunk once, a point selection is slower.
_SPAN_FILL = 0.5


def validate_matrix(X: Any) -> tuple[int, int]:
    """Shape (M, N_total) of a 2-D zarr.Array / np.ndarray; a clear error otherwise."""
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"profiles must be a 2-D array (M rows, N columns); got shape {shape!r}"
        )
    dtype = np.dtype(getattr(X, "dtype", np.float32))
    if dtype.kind not in "fiu":
        raise ValueError(f"profiles must be numeric; got dtype {dtype}")
    return int(shape[0]), int(shape[1])


def validate_columns(columns: np.ndarray | None, n_total: int) -> np.ndarray:
    """The selected global column ids as int64 (all columns when None).

    Any order is allowed (it defines the local node order); ids must be unique and in range."""
    if columns is None:
        return np.arange(n_total, dtype=np.int64)
    cols = np.asarray(columns)
    if cols.ndim != 1:
        raise ValueError(f"columns must be 1-D; got shape {cols.shape}")
    if cols.size and cols.dtype.kind not in "iu":
        raise ValueError(f"columns must be integer column ids; got dtype {cols.dtype}")
    cols = cols.astype(np.int64)
    if cols.size == 0:
        raise ValueError(
            "no alive columns to build a graph from (the alive set is empty; "
            "lower profiles.tau or check the profiles)"
        )
    if cols.min() < 0 or cols.max() >= n_total:
        raise ValueError(
            f"columns must lie in [0, {n_total}) (the profile matrix has {n_total} columns); "
            f"got ids from {cols.min()} to {cols.max()}"
        )
    if np.unique(cols).size != cols.size:
        raise ValueError("columns must not repeat a column id")
    return cols


def read_block(X: Any, r0: int, r1: int, cols: np.ndarray) -> np.ndarray:
    """X[r0:r1, cols] as a new, writable float32 array of shape (r1 - r0, len(cols)) that the
    caller owns; `cols` in any order.

    Callers z-score the block in place, so it must never be a view of X: a plain slice of a
    float32 C-order NumPy array (or memory map) is one, and writing to it would change the
    caller's matrix or fail on a read-only memory map / Ray object-store array. Only this one
    block is copied, never X. A sparse X (`scalespd.graph.sparse_io`) gives the block dense."""
    if is_sparse_rows(X):
        return np.ascontiguousarray(sparse_dense_block(X, r0, r1, cols), dtype=np.float32)
    order = np.argsort(cols, kind="stable")
    srt = cols[order]
    lo, hi = int(srt[0]), int(srt[-1]) + 1
    if srt.size >= _SPAN_FILL * (hi - lo):
        block = np.asarray(X[r0:r1, lo:hi])
        if srt.size != hi - lo:
            block = block[:, srt - lo]
    elif isinstance(X, np.ndarray):
        block = X[r0:r1][:, srt]
    else:  # zarr: orthogonal (outer) selection reads only the chunks it needs
        block = np.asarray(X.get_orthogonal_selection((slice(r0, r1), srt)))
    if not np.array_equal(order, np.arange(order.size)):
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        block = block[:, inv]
    out = np.ascontiguousarray(block, dtype=np.float32)
    # A zarr read is already a fresh array; a NumPy slice may alias X (may_share_memory only
    # compares bounds, so a false positive merely costs one block copy).
    if not out.flags.writeable or (isinstance(X, np.ndarray) and np.may_share_memory(out, X)):
        out = out.copy()
    return out


def panel_bounds(n: int, tile_cols: int) -> list[tuple[int, int]]:
    """[start, stop) local column ranges of the panels covering n columns."""
    return [(p, min(p + tile_cols, n)) for p in range(0, n, tile_cols)]


def row_chunks(m: int, row_chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of at most row_chunk rows covering m rows."""
    for r in range(0, m, row_chunk):
        yield r, min(r + row_chunk, m)
