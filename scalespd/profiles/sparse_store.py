"""The sparse layout of ci.zarr: one CSR row block per harvest block (no torch here).

    profiles/ci.zarr                 zarr v3 group; attribute `scalespd_profiles` as for the
                                     dense array, plus storage "csr", shape, dtype, zero_below
    profiles/ci.zarr/rows/<b>        group of harvest block b (7 digits), rows [start, stop):
        indptr   (stop - start + 1,) int64    row r's entries are [indptr[r], indptr[r+1])
        indices  (nnz,) int32                 global column ids, ascending within a row
        values   (nnz,) float16/32            the CI values, all >= zero_below (> 0)

On a local disk a block's group is built under a temporary name and renamed into place; an
object store (no rename) gets it written in place. Only then is the block's completion record
written (profiles/blocks/): a block without a record is rewritten whole by a re-run, a block with
one is never touched. Values are those of the dense layout with
everything below `zero_below` set to 0, so both layouts hold the same matrix.

`SparseProfiles` reads it back: `csr_rows(r0, r1)` gives any row range as a scipy CSR matrix
(the graph stage's sparse row-source protocol) and `X[rows, cols]` /
`get_orthogonal_selection` give dense blocks, so code written for a dense zarr array reads it
unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from upath import UPath
from zarr.codecs import ZstdCodec

from scalespd import storage

ROWS_GROUP = "rows"
STORAGE = "csr"
# Entries per chunk of indices / values: 4 MiB of int32, so a read of a few rows decodes little
# and a block of millions of entries is a handful of files.
ENTRY_CHUNK = 1 << 20


def block_name(b: int) -> str:
    return f"{b:07d}"


@dataclass(frozen=True)
class CSRBlock:
    """Rows [start, start + n_rows) of the profile matrix in CSR form, all N columns.

    indptr: (n_rows + 1,) int64 from 0; indices: (nnz,) int32 ascending within each row;
    values: (nnz,) float16/32, every one > 0."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.indptr.shape[0]) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.values.nbytes)

    def to_scipy(self, n_cols: int) -> sp.csr_matrix:
        return sp.csr_matrix((self.values, self.indices, self.indptr),
                             shape=(self.n_rows, n_cols))

    @classmethod
    def from_dense(cls, vals: np.ndarray, floor: float = 0.0) -> CSRBlock:
        """The entries >= floor (floor 0: the non-zero entries) of a C-order (rows, N) array of
        values >= 0, in row-major order, so indices ascend within each row."""
        n_rows, n_cols = vals.shape
        # A boolean mask first: np.nonzero scans a bool array several times faster than floats.
        nz = np.flatnonzero(vals >= floor if floor > 0 else vals != 0)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        if n_cols:
            np.cumsum(np.bincount(nz // n_cols, minlength=n_rows), out=indptr[1:])
        return cls(indptr, (nz % max(n_cols, 1)).astype(np.int32), vals.reshape(-1)[nz])

    @classmethod
    def concat(cls, parts: list[CSRBlock]) -> CSRBlock:
        """The rows of `parts`, one after the other."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
        indptr = np.concatenate([parts[0].indptr[:1]]
                                + [p.indptr[1:] + o for p, o in zip(parts, offsets, strict=True)])
        return cls(indptr, np.concatenate([p.indices for p in parts]),
                   np.concatenate([p.values for p in parts]))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def create_group(store: Any, attributes: dict[str, Any]) -> None:
    """A new, empty sparse ci.zarr in the zarr store `store` (`storage.zarr_store` of a folder
    that must not hold one yet: the caller checks, and builds it under a temporary name where
    it can)."""
    root = zarr.create_group(store=store, zarr_format=3, attributes=attributes)
    root.create_group(ROWS_GROUP)


def _write_block_group(where: UPath, start: int, block: CSRBlock, dtype: np.dtype,
                       level: int) -> None:
    group = zarr.create_group(store=storage.zarr_store(where), zarr_format=3, attributes={
        "start": int(start), "stop": int(start + block.n_rows), "nnz": block.nnz})
    arrays: list[tuple[str, np.ndarray, np.dtype]] = [
        ("indptr", block.indptr, np.dtype(np.int64)),
        ("indices", block.indices, np.dtype(np.int32)),
        ("values", block.values, np.dtype(dtype))]
    for name, data, dt in arrays:
        arr = group.create_array(
            name, shape=data.shape, dtype=dt, fill_value=0,
            chunks=(max(1, min(ENTRY_CHUNK, data.shape[0])),),
            compressors=ZstdCodec(level=level))
        if data.size:
            arr[:] = np.asarray(data, dtype=dt)


def write_block(path: storage.PathLike, b: int, start: int, block: CSRBlock, dtype: np.dtype,
                level: int) -> None:
    """Write block b (rows [start, start + block.n_rows)) into the sparse ci.zarr at `path`,
    replacing an unfinished earlier attempt of the same block. On a local disk the block's group
    appears in one rename, so a reader (or a re-run) never sees it half-written; on an object
    store it is written in place (any earlier attempt removed first), and the completion record
    the caller writes afterwards is what marks it done."""
    rows_dir = storage.as_path(path) / ROWS_GROUP
    final = rows_dir / block_name(b)
    if not storage.has_rename(final):
        # An earlier attempt without a completion record: never read, removed whole (a longer
        # one would leave chunks beyond the new arrays' ends).
        storage.rmtree(storage.as_path(final))
        try:
            _write_block_group(final, start, block, dtype, level)
        except BaseException:
            # Best effort: a re-run rewrites the block anyway (it has no record).
            with contextlib.suppress(Exception):
                storage.rmtree(final)
            raise
        return
    tmp = rows_dir / f".{block_name(b)}.{os.getpid()}.tmp"
    storage.rmtree(tmp)
    try:
        _write_block_group(tmp, start, block, dtype, level)
        if final.exists():  # an earlier attempt without a completion record: never read
            storage.rmtree(final, missing_ok=False)
        storage.rename_dir(tmp, final)
    except BaseException:
        storage.rmtree(tmp)
        raise


def remove_temporaries(path: storage.PathLike) -> list[UPath]:
    """Remove block groups a killed harvest left half-built; returns what was removed."""
    rows_dir = storage.as_path(path) / ROWS_GROUP
    gone = [p for p in rows_dir.glob(".*.tmp")] if rows_dir.is_dir() else []
    for p in gone:
        storage.rmtree(p)
    return gone


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class SparseProfiles:
    """A sparse ci.zarr opened read-only: (M, N) with the reads the pipeline uses.

    shape, dtype, attrs (the group's attributes), chunks ((block_rows, min(N, 1024)): row reads
    aligned to blocks are cheapest), `csr_rows(r0, r1)`, `X[rows]`, `X[rows, cols]` and
    `get_orthogonal_selection((rows, cols))` with a step-1 row slice (dense results). There is no
    `__array__`: nothing densifies the whole matrix by accident."""

    def __init__(self, path: storage.PathLike) -> None:
        self.path = storage.as_path(path)
        group = zarr.open_group(store=storage.zarr_store(self.path, read_only=True), mode="r")
        self.attrs = dict(group.attrs)
        from scalespd.profiles.store import ATTR_KEY  # noqa: PLC0415  (store imports this)

        meta = self.attrs.get(ATTR_KEY)
        if not isinstance(meta, dict) or meta.get("storage") != STORAGE:
            raise ValueError(f"{storage.url(self.path)} is a zarr group but not a sparse "
                             f"scalespd profiles store (attribute {ATTR_KEY}.storage is not "
                             f"{STORAGE!r})")
        self.shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        self.dtype = np.dtype(meta["dtype"])
        self.block_rows = int(meta["block_rows"])
        self.ndim = 2
        self._blocks: dict[int, tuple[np.ndarray, zarr.Array, zarr.Array]] = {}

    @property
    def chunks(self) -> tuple[int, int]:
        return min(self.block_rows, self.shape[0]), min(1024, self.shape[1])

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.shape[0] / self.block_rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_blocks": {}}  # reopened where it is unpickled

    def _block(self, b: int) -> tuple[np.ndarray, zarr.Array, zarr.Array]:
        if b not in self._blocks:
            where = self.path / ROWS_GROUP / block_name(b)
            if not storage.as_path(where / "zarr.json").is_file():
                raise FileNotFoundError(f"{storage.url(where)}: row block {b} of "
                                        f"{storage.url(self.path)} was never written (an "
                                        "unfinished harvest)")
            g = zarr.open_group(store=storage.zarr_store(where, read_only=True), mode="r")
            idx, val, ptr = g["indices"], g["values"], g["indptr"]
            assert all(isinstance(a, zarr.Array) for a in (idx, val, ptr))
            indptr = np.asarray(ptr[:], dtype=np.int64)  # type: ignore[index]
            start, stop = b * self.block_rows, min((b + 1) * self.block_rows, self.shape[0])
            if indptr.shape[0] != stop - start + 1:
                raise ValueError(f"{storage.url(where)}/indptr has {indptr.shape[0]} entries; rows "
                                 f"[{start}, {stop}) need {stop - start + 1}")
            self._blocks[b] = (indptr, idx, val)  # type: ignore[assignment]
        return self._blocks[b]

    @property
    def _sparse_dtype(self) -> np.dtype:
        # scipy.sparse has no float16: such values are widened (exactly) to float32.
        return np.dtype(np.float32) if self.dtype == np.float16 else self.dtype

    def csr_rows(self, r0: int, r1: int) -> sp.csr_matrix:
        """Rows r0..r1-1 as a (r1 - r0, N) CSR matrix, sorted indices; reads only those rows'
        entries (float16 values come as float32, which scipy.sparse can hold)."""
        m, n = self.shape
        if not 0 <= r0 <= r1 <= m:
            raise IndexError(f"rows [{r0}, {r1}) out of range for {m} rows")
        pieces = []
        for b in range(r0 // self.block_rows, math.ceil(r1 / self.block_rows)):
            start = b * self.block_rows
            lo, hi = max(r0, start) - start, min(r1, start + self.block_rows) - start
            indptr, idx, val = self._block(b)
            p0, p1 = int(indptr[lo]), int(indptr[hi])
            pieces.append(sp.csr_matrix(
                (np.asarray(val[p0:p1], dtype=self._sparse_dtype), np.asarray(idx[p0:p1]),
                 indptr[lo:hi + 1] - p0), shape=(hi - lo, n)))
        if not pieces:
            return sp.csr_matrix((0, n), dtype=self._sparse_dtype)
        out = pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
        out.has_sorted_indices = True
        return out

    def _rows(self, rows: Any) -> tuple[int, int]:
        if isinstance(rows, (int, np.integer)):
            raise IndexError("index rows with a slice (X[r0:r1]), not an integer")
        if not isinstance(rows, slice):
            raise IndexError(f"sparse profiles take a row slice, got {type(rows).__name__}")
        r0, r1, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("sparse profiles support row slices with step 1 only")
        return r0, max(r0, r1)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        block = self.csr_rows(*self._rows(rows))
        if not (isinstance(cols, slice) and cols == slice(None)):
            block = block[:, cols]
        return block.toarray().astype(self.dtype, copy=False)

    def get_orthogonal_selection(self, selection: tuple[Any, Any]) -> np.ndarray:
        rows, cols = selection
        return self[rows, np.asarray(cols)]


def is_sparse_store(path: storage.PathLike) -> bool:
    """Whether `path` holds a zarr group (the sparse layout) rather than an array."""
    meta = storage.as_path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("node_type") == "group"
    except (OSError, ValueError):
        return False
