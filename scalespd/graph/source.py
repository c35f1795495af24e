"""Where the profile matrix lives, so that Ray tasks read their blocks from there (issue 16).

A Ray task runs in another process. Handing it the matrix itself (`ray.put(X)`) materialises a
memory-mapped `.npy` whole, copies it into the object store and spills it to disk: 13 GB peak
for a 3.8 GB file. Instead a task gets a `SourceSpec` — path, kind, shape, dtype and an optional
row subset, a few hundred bytes pickled — and opens the file or store itself
(`SourceSpec.open`), reading only the (row_chunk, tile_cols) blocks it needs.

    NpyFile      a `.npy` file read block by block through a mapping that lives for one read
    RowSubset    the finished row blocks of an unfinished harvest (--allow-partial)
    SourceSpec   the picklable descriptor; `describe(X)` builds one when X can be reopened
    ray_source   a SourceSpec for any X: an X that cannot be reopened by path (an in-memory
                 ndarray, a zarr array in a non-local store, ...) is written once, streaming,
                 to a chunked zarr in a scratch directory that is removed afterwards

On a multi-node Ray cluster the path must be on a file system every node mounts, or an fsspec
URL every node reaches (s3://, gs://; as a run directory already must be). Paths travel as
strings (`scalespd.storage.url`) and are turned back with `scalespd.storage.as_path`; a
process-local filesystem (memory://) is never described for another process.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from upath import UPath

from scalespd import storage
from scalespd.errors import naming_file
from scalespd.graph.sparse_io import dense_rows

log = logging.getLogger(__name__)

# Chunk shape of a converted in-memory matrix: ~16 MB float32 chunks, whole rows of a tile
# panel, so a (row_chunk, tile_cols) read decodes few chunks.
_CONVERT_CHUNK = (4096, 1024)


# --------------------------------------------------------------------------------------------
# .npy files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NpyFile:
    """A `.npy` array on disk, read-only, read block by block.

    Each read maps the file, copies the selected elements out and unmaps it again. A memory map
    that stays open (np.load(mmap_mode="r")) keeps every page it ever touched in the process's
    resident set: after one pass over a 3 GB file the process *looks* 3 GB big, in every Ray
    worker that read it, and the mapped pages cannot be told apart from real allocations when
    memory is measured. A mapping per read keeps the resident set at one block.

    path: the file (a local path, or an fsspec URL: then each read fetches the byte ranges of the
    rows it needs, or in Fortran order of the columns it needs); shape, dtype, fortran_order,
    offset (byte offset of the data) come from its header (`NpyFile.open`).

    Offers what the graph and spectral code read: shape, dtype, ndim,
    `X[key]` and `get_orthogonal_selection((rows, cols))`, each returning a new ndarray that
    the caller owns. There is deliberately no `__array__`: nothing reads the whole matrix by
    accident."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @classmethod
    def open(cls, path: storage.PathLike) -> NpyFile:
        """The array of the .npy file at `path` (header parsed and checked by np.load; at a URL
        by numpy's header reader).

        Raises what np.load raises for a file that is not a readable .npy array (ValueError,
        OSError, EOFError)."""
        p = storage.as_path(path)
        if not storage.is_local(p):
            return cls._open_remote(p)
        m = np.load(storage.local_path(p), mmap_mode="r", allow_pickle=False)
        try:
            return cls.from_memmap(m)
        finally:
            del m  # unmaps

    @classmethod
    def _open_remote(cls, p: UPath) -> NpyFile:
        """The header of the .npy file at the URL `p` (its data is not read)."""
        fmt = np.lib.format
        with p.open("rb") as f:
            version = fmt.read_magic(f)
            read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                           else fmt.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if dtype.hasobject:
            raise ValueError(f"{storage.url(p)} holds Python objects, not numbers")
        if fortran and len(shape) > 2:
            raise ValueError(f"{storage.url(p)} is a Fortran-order array of more than 2 "
                             "dimensions, which is read only from a local file")
        size = int(np.prod(shape)) * dtype.itemsize
        if p.stat().st_size < offset + size:
            raise EOFError(f"{storage.url(p)} is shorter than its header says ({shape} {dtype})")
        return cls(storage.url(p), tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran),
                   int(offset))

    @classmethod
    def from_memmap(cls, m: np.memmap) -> NpyFile:
        """The file behind `m`, a whole-file memory map as np.load(mmap_mode=...) returns it."""
        fortran = bool(m.flags.f_contiguous and not m.flags.c_contiguous)
        return cls(os.path.abspath(str(m.filename)), tuple(int(s) for s in m.shape),
                   np.dtype(m.dtype), fortran, int(m.offset))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def _remote(self) -> bool:
        return not storage.is_local(self.path)

    def _read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a C-order file at a URL, fetched as one byte range."""
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        n = max(0, r1 - r0)
        if n == 0 or row_bytes == 0:
            return np.empty((n, *self.shape[1:]), dtype=self.dtype)
        p = storage.as_path(self.path)
        start = self.offset + r0 * row_bytes
        with naming_file(self.path):
            data = p.fs.cat_file(p.path, start=start, end=start + n * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:])).copy()

    def _read_columns(self, r0: int, r1: int, cols: np.ndarray) -> np.ndarray:
        """(r1 - r0, cols.size) rows [r0, r1) of the columns `cols` (ascending, distinct) of a
        2-D Fortran-order file at a URL: one byte range per column (per run of consecutive
        columns when all rows are read, as those lie one after another)."""
        M, item = self.shape[0], self.dtype.itemsize
        out = np.empty((r1 - r0, cols.size), dtype=self.dtype, order="F")
        if out.size == 0:
            return out
        whole = r0 == 0 and r1 == M
        runs = (np.split(np.arange(cols.size), np.flatnonzero(np.diff(cols) != 1) + 1) if whole
                else [np.array([i]) for i in range(cols.size)])
        starts = [self.offset + (int(cols[r[0]]) * M + r0) * item for r in runs]
        ends = [s + r.size * (r1 - r0) * item for s, r in zip(starts, runs, strict=True)]
        p = storage.as_path(self.path)
        with naming_file(self.path):
            parts = p.fs.cat_ranges([p.path] * len(runs), starts, ends)
        for r, data in zip(runs, parts, strict=True):
            if isinstance(data, BaseException):
                raise data
            block = np.frombuffer(data, dtype=self.dtype).reshape((r1 - r0, r.size), order="F")
            out[:, r[0]:r[-1] + 1] = block
        # Fortran order, as a read of the local file's map gives it: sums over its rows then
        # round the same way.
        return out

    def _remote_get(self, key: Any) -> np.ndarray:
        """X[key] for a file at a URL: the rows the key selects (and in Fortran order only its
        columns) are fetched, as few byte ranges spanning them, then indexed in memory as
        NumPy would index the whole array."""
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        M = self.shape[0]
        sel: Any
        if isinstance(rows, slice) and rows.step in (None, 1):
            r0, r1, _ = rows.indices(M)
            r1, sel = max(r0, r1), slice(None)
        else:
            ids = np.arange(M)[rows]
            if ids.size == 0:
                empty = np.empty((0, *self.shape[1:]), self.dtype)
                return np.asarray(empty[(slice(None), *rest)])
            r0, r1 = int(ids.min()), int(ids.max()) + 1
            sel = ids - r0
        if not (self.fortran_order and self.ndim == 2):
            return np.asarray(self._read_rows(r0, r1)[(sel, *rest)])
        if len(rest) > 1:
            raise IndexError(f"too many indices for a 2-D array: {key!r}")
        ckey = rest[0] if rest else slice(None)
        wanted = np.arange(self.shape[1])[ckey]
        cols = np.unique(wanted)
        block = self._read_columns(r0, r1, cols)
        # A column slice stays a slice (basic indexing: no pairing with a row index array).
        where: Any = (slice(None, None, -1 if (ckey.step or 1) < 0 else 1)
                      if isinstance(ckey, slice) else np.searchsorted(cols, wanted))
        return np.asarray(block[sel, where])

    def _map(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                         shape=self.shape, order="F" if self.fortran_order else "C")

    @staticmethod
    def _owned(part: np.ndarray, m: np.memmap) -> np.ndarray:
        """`part` (read from the map m) as a plain ndarray that does not reference m."""
        if np.may_share_memory(part, m):  # a view of the map: copy it out
            return np.array(part, subok=False)
        return part.view(np.ndarray)  # fancy indexing already made a copy

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._remote:
            return self._remote_get(key)
        m = self._map()
        try:
            return self._owned(np.asarray(m[key]), m)
        finally:
            del m  # the last reference: the file is unmapped here

    def get_orthogonal_selection(self, selection: tuple[Any, Any]) -> np.ndarray:
        """X[rows][:, cols] (zarr's outer indexing) for a row slice and column ids."""
        rows, cols = selection
        if self._remote:
            return np.asarray(self._remote_get(rows)[:, cols])
        m = self._map()
        try:
            return self._owned(np.asarray(m[rows][:, cols]), m)
        finally:
            del m


# --------------------------------------------------------------------------------------------
# Row subsets (unfinished harvests)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSubset:
    """Read-only (M_sub, N) view of the row ranges `ranges` of X, in order: the finished row
    blocks of an unfinished harvest (--allow-partial).

    X: (M, N) zarr.Array (or NpyFile); ranges: [start, stop) source row ranges, ascending,
    disjoint. Offers what the graph and spectral code read: shape, dtype, chunks, `X[rows]`,
    `X[rows, cols]` with a step-1 row slice, and `get_orthogonal_selection((row slice, cols))`.
    Each read touches only the source rows it needs."""

    X: Any
    ranges: tuple[tuple[int, int], ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(b - a for a, b in self.ranges), int(self.X.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.X.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        # Blocks are whole row chunks of the source, so its chunking still aligns.
        return tuple(getattr(self.X, "chunks", (1, self.X.shape[1])))

    def source_row(self, r: int) -> int:
        """The source row of subset row r."""
        for a, b in self.ranges:
            if r < b - a:
                return a + r
            r -= b - a
        raise IndexError(r)

    def _pieces(self, rows: slice) -> list[slice]:
        """Source row slices covering subset rows `rows` (a step-1 slice)."""
        r0, r1, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("RowSubset supports row slices with step 1 only")
        out, offset = [], 0
        for a, b in self.ranges:
            lo, hi = max(r0, offset), min(r1, offset + b - a)
            if lo < hi:
                out.append(slice(a + lo - offset, a + hi - offset))
            offset += b - a
        return out or [slice(0, 0)]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        parts = [np.asarray(self.X[s, cols]) for s in self._pieces(rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def get_orthogonal_selection(self, selection: tuple[slice, Any]) -> np.ndarray:
        rows, cols = selection
        parts = [np.asarray(self.X.get_orthogonal_selection((s, cols)))
                 for s in self._pieces(rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


class SparseRowSubset(RowSubset):
    """A RowSubset of a sparse row source (`csr_rows`): it offers `csr_rows` too, so the graph
    stage keeps reading it sparse."""

    def csr_rows(self, r0: int, r1: int) -> Any:
        import scipy.sparse as sp  # noqa: PLC0415

        parts = [self.X.csr_rows(s.start, s.stop) for s in self._pieces(slice(r0, r1))]
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def row_subset(X: Any, ranges: tuple[tuple[int, int], ...]) -> RowSubset:
    """The RowSubset of X's `ranges` (a SparseRowSubset when X gives sparse rows)."""
    sparse = callable(getattr(X, "csr_rows", None))
    return (SparseRowSubset if sparse else RowSubset)(X, tuple(ranges))


# --------------------------------------------------------------------------------------------
# The descriptor handed to Ray tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """How another process opens the profile matrix: small and picklable.

    kind: "npy" (a .npy file; offset / fortran_order from its header), "zarr" (a zarr array
    in a local directory or at an fsspec URL) or "csr" (a sparse profiles store,
    `scalespd.profiles.sparse_store`). path: a local path or a URL (`scalespd.storage.url`).
    shape, dtype: of the stored array (M, N). rows: None, or the [start, stop) row ranges of a
    RowSubset, so the opened matrix is (sum of ranges, N)."""

    kind: Literal["npy", "zarr", "csr"]
    path: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0
    fortran_order: bool = False
    rows: tuple[tuple[int, int], ...] | None = None

    def open(self) -> Any:
        """The matrix, read-only, as an object the graph code reads blocks from (NpyFile,
        zarr.Array, or a RowSubset of one). Checks that the store still holds what was
        described, so a file replaced in between is an error rather than wrong results."""
        X: Any
        if self.kind == "npy":
            X = NpyFile(self.path, self.shape, np.dtype(self.dtype), self.fortran_order,
                        self.offset)
        else:
            import zarr  # noqa: PLC0415

            from scalespd.profiles.sparse_store import SparseProfiles  # noqa: PLC0415

            where = storage.as_path(self.path)
            X = (SparseProfiles(where) if self.kind == "csr"
                 else zarr.open_array(store=storage.zarr_store(where, read_only=True), mode="r"))
            if tuple(X.shape) != self.shape or str(X.dtype) != self.dtype:
                raise RuntimeError(
                    f"{self.path} changed while it was being read: shape {tuple(X.shape)} "
                    f"dtype {X.dtype}, expected {self.shape} {self.dtype}")
        return X if self.rows is None else row_subset(X, self.rows)


def _zarr_location(X: Any) -> str | None:
    """Where another process opens zarr array X: its directory when it lives in a local
    directory store, its URL when it lives in an fsspec store that other processes reach
    (s3://, gs://, ...; not memory://), else None."""
    try:
        from zarr.storage import FsspecStore, LocalStore  # noqa: PLC0415
    except ImportError:  # pragma: no cover  (zarr is a dependency)
        return None
    store = getattr(X, "store", None)
    if not hasattr(X, "get_orthogonal_selection"):
        return None
    inner = str(getattr(X, "path", "") or "")
    if isinstance(store, LocalStore):
        return os.path.join(str(store.root), inner)
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol
        protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        where = "/".join(x for x in (str(store.path).strip("/"), inner.strip("/")) if x)
        url = f"{protocol}://{where}"
        if storage.is_local(url) or not storage.shared_across_processes(url):
            return None
        return url
    return None


def describe(X: Any) -> SourceSpec | None:
    """A SourceSpec that reopens X in another process, or None when X cannot be reopened by
    path (an in-memory ndarray, a view of a memory map, a zarr array in memory or remote).

    X: (M, N) NpyFile, whole-file np.memmap (np.load(mmap_mode="r" / "r+")), zarr.Array in a
    LocalStore, or a RowSubset of one of these."""
    if isinstance(X, RowSubset):
        inner = describe(X.X)
        if inner is None or inner.rows is not None:
            return None
        return SourceSpec(inner.kind, inner.path, inner.shape, inner.dtype, inner.offset,
                          inner.fortran_order, tuple((int(a), int(b)) for a, b in X.ranges))
    if isinstance(X, NpyFile):
        if not storage.shared_across_processes(X.path):
            return None
        return SourceSpec("npy", X.path, X.shape, X.dtype.str, X.offset, X.fortran_order)
    from scalespd.profiles.sparse_store import SparseProfiles  # noqa: PLC0415

    if isinstance(X, SparseProfiles):
        if not storage.shared_across_processes(X.path):
            return None
        return SourceSpec("csr", storage.url(X.path), X.shape, str(X.dtype))
    if isinstance(X, np.memmap):
        # Only the map np.load / np.memmap made (its buffer is the mmap itself): a view of it
        # carries the parent's offset and would describe the wrong bytes. A copy-on-write map
        # ("c") may hold changes that are not in the file.
        whole = isinstance(X.base, mmap.mmap) and (X.flags.c_contiguous or X.flags.f_contiguous)
        if not whole or X.mode == "c" or not X.filename:
            return None
        f = NpyFile.from_memmap(X)
        return SourceSpec("npy", f.path, f.shape, f.dtype.str, f.offset, f.fortran_order)
    path = _zarr_location(X)
    if path is not None:
        return SourceSpec("zarr", path, tuple(int(s) for s in X.shape), str(X.dtype))
    return None


def write_zarr(X: Any, path: storage.PathLike, row_block: int = _CONVERT_CHUNK[0]
               ) -> SourceSpec:
    """Copy the (M, N) matrix X to a new chunked zarr array at `path` (a local path or a URL),
    `row_block` rows at a time (only one block of X is in memory at once), and describe it."""
    import zarr  # noqa: PLC0415

    M, N = (int(s) for s in X.shape)
    dtype = np.dtype(X.dtype)
    z = zarr.create_array(storage.zarr_store(path), shape=(M, N), dtype=dtype,
                          chunks=(min(M, _CONVERT_CHUNK[0]), min(N, _CONVERT_CHUNK[1])))
    step = max(1, row_block // _CONVERT_CHUNK[0]) * _CONVERT_CHUNK[0]  # whole chunks per write
    for r0 in range(0, M, step):
        r1 = min(r0 + step, M)
        z[r0:r1] = np.asarray(dense_rows(X, r0, r1), dtype=dtype)
    return SourceSpec("zarr", storage.url(path), (M, N), str(dtype))


@contextmanager
def ray_source(X: Any, scratch_dir: storage.PathLike | None = None) -> Iterator[SourceSpec]:
    """A SourceSpec of X for Ray tasks, valid inside the `with` block.

    When X cannot be reopened by path (`describe` is None) it is written once, streaming, to
    a chunked zarr array in a new temporary directory inside `scratch_dir` (the system's temp
    directory when None or on a filesystem only this process sees, memory://; a URL otherwise),
    said in the log, and deleted when the block ends."""
    spec = describe(X)
    if spec is not None:
        yield spec
        return
    M, N = (int(s) for s in X.shape)
    nbytes = M * N * np.dtype(X.dtype).itemsize
    scratch = None if scratch_dir is None else storage.as_path(scratch_dir)
    if scratch is not None and not storage.shared_across_processes(scratch):
        scratch = None
    if scratch is not None and not storage.is_local(scratch):
        remote = scratch / f".profiles-for-ray-{uuid.uuid4().hex[:12]}"
        try:
            log.info("graph: the (%d, %d) %s profile matrix (%s, %.2f GB) cannot be opened by "
                     "path in Ray workers; writing it once, streaming, to a chunked zarr array "
                     "in %s (removed when done) so that tasks read only their blocks", M, N,
                     np.dtype(X.dtype), type(X).__name__, nbytes / 1e9, storage.url(remote))
            yield write_zarr(X, remote / "profiles.zarr")
        finally:
            storage.rmtree(remote)
        return
    if scratch is not None:
        storage.makedirs(scratch)
    tmp = Path(tempfile.mkdtemp(prefix=".profiles-for-ray-",
                                dir=None if scratch is None else storage.local_path(scratch)))
    try:
        log.info("graph: the (%d, %d) %s profile matrix (%s, %.2f GB) cannot be opened by path "
                 "in Ray workers; writing it once, streaming, to a chunked zarr array in %s "
                 "(removed when done) so that tasks read only their blocks", M, N,
                 np.dtype(X.dtype), type(X).__name__, nbytes / 1e9, tmp)
        spec = write_zarr(X, tmp / "profiles.zarr")
        yield spec
    finally:
        storage.rmtree(tmp)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux: VmHWM via getrusage;
    it counts file pages mapped at the time as well as allocations)."""
    try:
        import resource  # noqa: PLC0415  (not on Windows)
    except ImportError:  # pragma: no cover
        import psutil  # noqa: PLC0415

        info = psutil.Process().memory_info()
        return float(getattr(info, "peak_wset", info.rss)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
