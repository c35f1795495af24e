"""On-disk layout of the profiles stage and its safety checks.

    profiles/ci.zarr          (M, N) zarr v3, float16/32, zstd, chunks (chunk_rows, chunk_cols)
                              (profiles.storage dense), or a group of CSR row blocks (sparse,
                              the default; layout in `sparse_store`)
    profiles/inputs.zarr      zarr v3 group, one (M, ...) array per row field of the source
    profiles/blocks/          completion record: block_<b>.npz per finished row block (its row
                              range and partial column stats), written after the block's data
    profiles/components.csv   per-component table (DESIGN §4)
    profiles/harvest.json     summary, written last: its presence means the harvest is complete

Rows are split into blocks of `block_rows` rows, a whole number of row-chunks, and every block
writes all N columns of its rows: each chunk of ci.zarr (and of inputs.zarr) belongs to exactly
one block, so concurrent writers never share a chunk.

The profiles folder may be a local path or an fsspec URL (`scalespd.storage`). Nothing here
overwrites or deletes existing data: an existing array that does not match what this harvest
would write is an error naming the file and every difference. On a local disk a new array (or
group) appears in one rename, so a write that fails half way (a full disk) never leaves metadata
a re-run could not read; on an object store each metadata document is one object, written
whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from upath import UPath
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

from scalespd import storage
from scalespd.errors import StageInputError
from scalespd.profiles.sparse_store import ROWS_GROUP, CSRBlock, is_sparse_store
from scalespd.profiles.sparse_store import create_group as create_csr_group
from scalespd.profiles.sparse_store import write_block as write_csr_block
from scalespd.profiles.stats import load_npz
from scalespd.storage import as_path

FORMAT_VERSION = 1
ATTR_KEY = "scalespd_profiles"
# A chunk above this many bytes makes every read and write of it that large (and zstd
# buffers a few times that); chunks this big are a config mistake, not a choice.
MAX_CHUNK_BYTES = 1 << 30
# Every chunk is one file (or object); more than this many is a config mistake.
MAX_CHUNKS = 10_000_000


class ProfilesError(StageInputError):
    """Bad profiles input or an existing output this harvest must not touch (a user error: one
    `error:` line, exit 2)."""


@dataclass(frozen=True)
class BlockLayout:
    """How M rows split into chunks and writer blocks. Chunk sizes are clipped to the shape."""

    n_rows: int
    n_cols: int
    chunk_rows: int
    chunk_cols: int
    block_rows: int

    @classmethod
    def make(
        cls, n_rows: int, n_cols: int, chunk_rows: int, chunk_cols: int, block_rows: int,
        itemsize: int,
    ) -> BlockLayout:
        if n_rows <= 0 or n_cols <= 0:
            raise ProfilesError(f"profiles shape must be positive, got ({n_rows}, {n_cols})")
        if block_rows % chunk_rows:
            raise ProfilesError(
                f"profiles.block_rows ({block_rows}) must be a multiple of profiles.chunk_rows "
                f"({chunk_rows}) so that each writer owns whole chunks"
            )
        cr, cc = min(chunk_rows, n_rows), min(chunk_cols, n_cols)
        # A block shorter than the array still holds whole chunks: clip it to a multiple of cr.
        br = min(block_rows, math.ceil(n_rows / cr) * cr)
        chunk_bytes = cr * cc * itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise ProfilesError(
                f"profiles chunk ({cr} x {cc}) is {chunk_bytes / 2**20:.0f} MiB; keep "
                f"chunk_rows * chunk_cols * itemsize <= {MAX_CHUNK_BYTES >> 20} MiB"
            )
        n_chunks = math.ceil(n_rows / cr) * math.ceil(n_cols / cc)
        if n_chunks > MAX_CHUNKS:
            raise ProfilesError(
                f"profiles chunks ({cr} x {cc}) split the ({n_rows}, {n_cols}) array into "
                f"{n_chunks} chunks (> {MAX_CHUNKS}); raise profiles.chunk_rows/chunk_cols"
            )
        return cls(n_rows, n_cols, cr, cc, br)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.block_rows)

    def block_range(self, b: int) -> tuple[int, int]:
        """Rows [start, stop) of block b."""
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} out of range 0..{self.n_blocks - 1}")
        start = b * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)

    def chunks_of_block(self, b: int) -> list[tuple[int, int]]:
        """Chunk grid indices (row chunk, column chunk) that block b writes."""
        start, stop = self.block_range(b)
        rows = range(start // self.chunk_rows, math.ceil(stop / self.chunk_rows))
        cols = range(math.ceil(self.n_cols / self.chunk_cols))
        return [(r, c) for r in rows for c in cols]


# --------------------------------------------------------------------------------------------
# ci.zarr
# --------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """What `x` looks like after a JSON round trip (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(x))


def _describe_existing(arr: zarr.Array) -> dict[str, Any]:
    return {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "attributes": arr.attrs.get(ATTR_KEY),
    }


def _differences(path: UPath, have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    diffs = []
    for key, w in want.items():
        h = have.get(key)
        if key == "attributes" and isinstance(h, dict) and isinstance(w, dict):
            for k in sorted(set(h) | set(w)):
                if h.get(k) != w.get(k):
                    diffs.append(f"attribute {ATTR_KEY}.{k}: existing {_short(h.get(k))}, "
                                 f"this harvest {_short(w.get(k))}")
        elif h != w:
            diffs.append(f"{key}: existing {_short(h)}, this harvest {_short(w)}")
    return diffs


def _short(x: Any, limit: int = 200) -> str:
    s = json.dumps(x, sort_keys=True)
    return s if len(s) <= limit else s[:limit] + "..."


def _open_existing(path: UPath) -> zarr.Array:
    try:
        node = zarr.open(store=storage.zarr_store(path, read_only=True), mode="r")
    except Exception as err:  # not a zarr store at all, unreadable metadata, ...
        raise ProfilesError(f"{storage.url(path)} exists but is not a readable zarr array "
                            f"({err}); move it away or choose another run directory") from None
    if not isinstance(node, zarr.Array):
        raise ProfilesError(f"{storage.url(path)} exists but is a zarr group, not an array")
    return node


def _ci_want(layout: BlockLayout, dtype: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        "shape": [layout.n_rows, layout.n_cols],
        "dtype": str(np.dtype(dtype)),
        "chunks": [layout.chunk_rows, layout.chunk_cols],
        "attributes": _jsonable(attributes),
    }


def check_ci(path: storage.PathLike, layout: BlockLayout, dtype: str,
             attributes: dict[str, Any], storage: str = "dense") -> None:
    """If `path` exists it must be the store this harvest would create (dense: the array's
    shape, dtype, chunks, attributes; sparse: the group's attributes); otherwise a
    ProfilesError names the file and every difference."""
    path = as_path(path)
    if not path.exists():
        return
    if storage == "sparse":
        _check_sparse(path, attributes)
        return
    if is_sparse_store(path):
        raise ProfilesError(f"{_url(path)} holds sparse profiles (profiles.storage: sparse) "
                            "and this harvest writes dense ones; refusing to overwrite it (set "
                            "profiles.storage: sparse to resume it, or use another run directory)")
    arr = _open_existing(path)
    diffs = _differences(path, _describe_existing(arr), _ci_want(layout, dtype, attributes))
    if diffs:
        raise ProfilesError(
            f"{_url(path)} already holds a different profiles array; refusing to overwrite it "
            f"(delete it or use another run directory to start over):\n  " + "\n  ".join(diffs)
        )


def _check_sparse(path: UPath, attributes: dict[str, Any]) -> None:
    if not is_sparse_store(path):
        raise ProfilesError(f"{_url(path)} exists but is not a sparse profiles store (a dense "
                            "array, or not zarr at all); refusing to overwrite it (set "
                            "profiles.storage: dense to resume a dense harvest, or use another "
                            "run directory)")
    try:
        have = zarr.open_group(store=storage.zarr_store(path, read_only=True),
                               mode="r").attrs.get(ATTR_KEY)
    except Exception as err:  # unreadable metadata
        raise ProfilesError(f"{_url(path)} exists but is not a readable zarr group ({err}); "
                            "move it away or choose another run directory") from None
    diffs = _differences(path, {"attributes": have}, {"attributes": _jsonable(attributes)})
    if diffs:
        raise ProfilesError(
            f"{_url(path)} already holds different sparse profiles; refusing to overwrite them "
            f"(delete them or use another run directory to start over):\n  " + "\n  ".join(diffs)
        )


@dataclass(frozen=True)
class SparseTarget:
    """The sparse ci.zarr a harvest writes block groups into (see `sparse_store`)."""

    path: UPath
    dtype: str
    level: int

    def write(self, b: int, start: int, block: CSRBlock) -> None:
        write_csr_block(self.path, b, start, block, np.dtype(self.dtype), self.level)


def temporary_name(path: UPath) -> UPath:
    """Where `path` is built before it is renamed into place (this process's own name)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary_of(name: str, target: str) -> bool:
    """Whether `name` is a `temporary_name` of `target` (of any process)."""
    pid = name.removeprefix(f".{target}.").removesuffix(".tmp")
    return name.startswith(f".{target}.") and name.endswith(".tmp") and pid.isdigit()


def _create_atomically(path: UPath, create: Callable[[Any], None]) -> None:
    """Build a new zarr store (`create` gets its zarr store) under a temporary name next to
    `path`, then rename it into place: `path` is complete or absent. Without this a full disk
    left a cut zarr.json that every re-run refused as "not a readable zarr array".

    Without renames (an object store) the store is created in place: each metadata document is
    one object, whole or absent, and what a cut creation may lack (the sparse store's rows
    group, inputs.zarr's arrays) is added when it is re-opened."""
    if not storage.has_rename(path):
        create(storage.zarr_store(path))
        return
    tmp = temporary_name(path)
    storage.rmtree(tmp)
    try:
        create(storage.zarr_store(tmp))
        storage.rename_dir(tmp, path)
    except BaseException:
        storage.rmtree(tmp)
        raise


def _url(path: storage.PathLike) -> str:
    return storage.url(path)


def create_or_open(
    path: storage.PathLike, layout: BlockLayout, dtype: str, attributes: dict[str, Any],
    level: int, storage: str = "dense",
) -> zarr.Array | SparseTarget:
    """Create the (M, N) array (dense) or the block group store (sparse), or re-open an existing
    one after `check_ci`. Never overwrites."""
    path = as_path(path)
    if storage == "sparse":
        if path.exists():
            check_ci(path, layout, dtype, attributes, storage)
            _ensure_rows_group(path)
        else:
            _create_atomically(path, lambda store: create_csr_group(
                store, {ATTR_KEY: _jsonable(attributes)}))
        return SparseTarget(path, dtype, level)
    if path.exists():
        check_ci(path, layout, dtype, attributes)
        return open_ci_for_writing(path)

    def create(store: Any) -> None:
        zarr.create_array(
            store=store,
            shape=(layout.n_rows, layout.n_cols),
            chunks=(layout.chunk_rows, layout.chunk_cols),
            dtype=dtype,
            compressors=ZstdCodec(level=level),
            fill_value=0,
            attributes={ATTR_KEY: _jsonable(attributes)},
            zarr_format=3,
            overwrite=False,
        )

    _create_atomically(path, create)
    return open_ci_for_writing(path)


def open_ci_for_writing(path: storage.PathLike) -> zarr.Array:
    """The existing dense ci.zarr at `path`, opened for writing."""
    return zarr.open_array(store=storage.zarr_store(path), mode="r+")


def _ensure_rows_group(path: UPath) -> None:
    """The rows group of a sparse store whose creation in place (no rename: an object store)
    was cut short after its root document."""
    if not storage.has_rename(path) and not (path / ROWS_GROUP / "zarr.json").exists():
        zarr.open_group(store=storage.zarr_store(path), mode="r+").create_group(ROWS_GROUP)


def _inputs_want(
    layout: BlockLayout, dtype: str, shape: tuple[int, ...]
) -> tuple[tuple[int, ...], str, tuple[int, ...]]:
    return (layout.n_rows, *shape), str(np.dtype(dtype)), (layout.chunk_rows, *shape)


def check_inputs(
    path: storage.PathLike, layout: BlockLayout, fields: dict[str, tuple[str, tuple[int, ...]]],
    describe: dict[str, Any],
) -> None:
    """If inputs.zarr exists, it must describe the same input set and its field arrays must have
    the shape/dtype/chunks this harvest writes."""
    path = as_path(path)
    if not path.exists():
        return
    where = storage.url(path)
    try:
        group = zarr.open_group(store=storage.zarr_store(path, read_only=True), mode="r")
    except Exception as err:
        raise ProfilesError(f"{where} exists but is not a readable zarr group ({err})") from None
    want_attr = _jsonable({"input_set": describe})
    if _jsonable(group.attrs.get(ATTR_KEY)) != want_attr:
        raise ProfilesError(
            f"{where} describes another input set; refusing to overwrite it: existing "
            f"{_short(group.attrs.get(ATTR_KEY))}, this harvest {_short(want_attr)}"
        )
    for name, (dtype, shape) in fields.items():
        if name in group:
            a = group[name]
            if not isinstance(a, zarr.Array):
                raise ProfilesError(f"{where}/{name} is a zarr group, not an array; refusing to "
                                    "overwrite it")
            have = (tuple(a.shape), str(a.dtype), tuple(a.chunks))
            if have != _inputs_want(layout, dtype, shape):
                raise ProfilesError(
                    f"{where}/{name} has (shape, dtype, chunks) {have}, this harvest needs "
                    f"{_inputs_want(layout, dtype, shape)}; refusing to overwrite it"
                )


def create_or_open_inputs(
    path: storage.PathLike, layout: BlockLayout, fields: dict[str, tuple[str, tuple[int, ...]]],
    describe: dict[str, Any],
) -> zarr.Group | None:
    """inputs.zarr: one (M, *shape) array per row field, row-chunked like ci.zarr so that block b
    owns the same rows there. None when the source has no row fields."""
    if not fields:
        return None
    path = as_path(path)
    check_inputs(path, layout, fields, describe)

    def add_arrays(group: zarr.Group) -> None:
        for name, (dtype, shape) in fields.items():
            if name not in group:
                full, _, chunks = _inputs_want(layout, dtype, shape)
                group.create_array(name, shape=full, chunks=chunks, dtype=dtype,
                                   compressors=ZstdCodec(level=3), fill_value=0)

    if not path.exists():
        _create_atomically(path, lambda store: add_arrays(zarr.create_group(
            store, zarr_format=3, attributes={ATTR_KEY: _jsonable({"input_set": describe})})))
    group = zarr.open_group(store=storage.zarr_store(path), mode="r+")
    # A group written before its arrays were (by an older scalespd, or created in place on an
    # object store by a harvest that was cut short).
    add_arrays(group)
    return group


# --------------------------------------------------------------------------------------------
# Completion record
# --------------------------------------------------------------------------------------------


def block_record_path(blocks_dir: storage.PathLike, b: int) -> UPath:
    return as_path(blocks_dir) / f"block_{b:07d}.npz"


def finished_blocks(blocks_dir: storage.PathLike, layout: BlockLayout) -> set[int]:
    """Blocks with a completion record; a record that does not fit the layout is an error."""
    blocks_dir = as_path(blocks_dir)  # records may come from other processes (Ray actors)
    done: set[int] = set()
    if not blocks_dir.exists():
        return done
    for p in sorted(blocks_dir.glob("block_*.npz")):
        try:
            b = int(p.stem.split("_")[1])
            rec = load_npz(p)
            start, stop, n_cols = int(rec["start"]), int(rec["stop"]), int(rec["mean"].shape[0])
        except Exception as err:
            raise ProfilesError(f"completion record {_url(p)} is unreadable ({err}); delete it to "
                                f"recompute that block") from None
        fits = b < layout.n_blocks and (start, stop) == layout.block_range(b)
        if not fits or n_cols != layout.n_cols:
            raise ProfilesError(
                f"completion record {_url(p)} (rows [{start}, {stop}), {n_cols} columns) does not "
                f"fit this harvest's layout ({layout.n_blocks} blocks of {layout.block_rows} rows, "
                f"{layout.n_cols} columns)"
            )
        done.add(b)
    return done


# --------------------------------------------------------------------------------------------
# Writing whole chunks of ci.zarr
# --------------------------------------------------------------------------------------------


class ChunkWriter:
    """Writes row blocks of a local zarr v3 array chunk by chunk: each chunk is copied into one
    reused buffer, zstd-encoded and written to its file, giving the exact bytes zarr writes.

    Why not `arr[a:b] = vals`: on a 16384 x 2000 float32 block zarr spent ~3x the zstd time
    around it (a fresh contiguous copy per chunk, an all-fill-value scan, asyncio hand-offs), and
    on 2 cores that competed with the next block's forward. `for_array` returns None for any
    array whose chunk bytes this could not reproduce (another store, codec chain, fill value or
    byte order); callers then write through zarr. That includes every array not in a local
    folder: on an object store zarr's own region writes put each chunk as one object, whole or
    not at all, concurrently."""

    def __init__(self, arr: zarr.Array, root: Path, encode: Callable[[np.ndarray], Any]) -> None:
        self.arr, self.root, self.encode = arr, root, encode
        self.chunk_rows, self.chunk_cols = (int(c) for c in arr.chunks)
        self.n_rows, self.n_cols = (int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self._buf: np.ndarray | None = None  # one chunk, reused (no page faults per chunk)

    @classmethod
    def for_array(cls, arr: zarr.Array | SparseTarget) -> ChunkWriter | None:
        if not isinstance(arr, zarr.Array):  # a sparse store: written block group by group
            return None
        meta = arr.metadata
        # A zarr v3 array has a codec list; v2 metadata has none (and is not used here).
        codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
        dtype = np.dtype(arr.dtype)
        fill = np.asarray(arr.fill_value, dtype=dtype)
        store = arr.store
        usable = (
            isinstance(store, LocalStore)
            and meta.zarr_format == 3
            and arr.ndim == 2
            and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian in (Endian.little, None)
            and sys.byteorder == "little"
            and dtype.kind == "f"
            and dtype.isnative
            and isinstance(codecs[1], ZstdCodec)
            and not codecs[1].checksum
            # zarr drops a chunk whose bits all equal the fill value; with fill +0.0 that is
            # "all bits zero", which `write` tests the same way.
            and not fill.view(f"u{dtype.itemsize}").any()
            and not arr.config.write_empty_chunks
            and arr.config.order == "C"
        )
        if not usable or not isinstance(store, LocalStore):
            return None
        level = int(codecs[1].level)
        return cls(arr, Path(store.root) / arr.path, Zstd(level=level).encode)

    def write(self, start: int, vals: np.ndarray) -> None:
        """Rows [start, start + len(vals)) of all columns; start is on a chunk boundary and the
        rows end on one or at the last row (each chunk is written whole)."""
        stop = start + vals.shape[0]
        if start % self.chunk_rows or (stop % self.chunk_rows and stop != self.n_rows):
            raise ValueError(f"rows [{start}, {stop}) are not whole chunks of "
                             f"{self.chunk_rows} rows")
        if vals.shape[1] != self.n_cols or vals.dtype != self.dtype:
            raise ValueError(f"expected ({stop - start}, {self.n_cols}) {self.dtype} rows, got "
                             f"{vals.shape} {vals.dtype}")
        if self._buf is None:
            self._buf = np.empty((self.chunk_rows, self.chunk_cols), dtype=self.dtype)
        buf, cr, cc = self._buf, self.chunk_rows, self.chunk_cols
        for r0 in range(start, stop, cr):
            part = vals[r0 - start : r0 - start + cr]
            for c0 in range(0, self.n_cols, cc):
                src = part[:, c0 : c0 + cc]
                if src.shape != buf.shape:
                    buf.fill(0)  # an edge chunk: zarr pads it with the fill value (0)
                buf[: src.shape[0], : src.shape[1]] = src
                key = self.arr.metadata.encode_chunk_key((r0 // cr, c0 // cc))
                path = self.root / key
                if not buf.view(f"u{self.dtype.itemsize}").any():
                    path.unlink(missing_ok=True)  # as zarr: an all-fill chunk is not stored
                else:
                    _write_file_atomically(path, self.encode(buf))


def _write_file_atomically(path: Path, data: Any) -> None:
    """`path` holds all of `data` or what it held before (temporary file + rename), like zarr's
    local store; a failed write (a full disk) removes the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
