"""`ChunkWriter` (the harvest's direct chunk path) writes exactly the files zarr writes, and is
not used where it could not."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from scalespd.profiles import store
from scalespd.profiles.store import ChunkWriter


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _array(path: Path, shape: tuple[int, int], chunks: tuple[int, int], dtype: str,
           open_config: dict | None = None, **kw: object) -> zarr.Array:
    """A new array as the harvest makes it (zstd, fill 0, zarr v3) unless `kw` says otherwise,
    re-opened as the harvest opens it (with `open_config`)."""
    create_kw: dict = {"compressors": ZstdCodec(level=1), "fill_value": 0, **kw}
    zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, zarr_format=3,
                      **create_kw)
    arr = zarr.open_array(str(path), mode="r+")
    return arr.with_config(open_config) if open_config else arr


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_same_files_as_zarr_with_edge_zero_and_negative_zero_chunks(
        tmp_path: Path, dtype: str) -> None:
    # 50 rows x 23 columns in (8, 5) chunks: edge chunks on both axes, a last block that ends
    # at the last row, an all-zero chunk, and one that is all -0.0 (zarr stores that one: its
    # bits differ from the fill value's).
    shape, chunks = (50, 23), (8, 5)
    rng = np.random.default_rng(0)
    vals = np.clip(rng.normal(0, 1, shape), 0, 1).astype(dtype)
    vals[:8, 5:10] = 0
    vals[8:16, 10:15] = -0.0
    ref = _array(tmp_path / "ref.zarr", shape, chunks, dtype)
    out = _array(tmp_path / "out.zarr", shape, chunks, dtype)
    writer = ChunkWriter.for_array(out)
    assert writer is not None
    for start in range(0, 50, 16):
        ref[start : start + 16] = vals[start : start + 16]
        writer.write(start, vals[start : start + 16])
    assert _files(tmp_path / "out.zarr") == _files(tmp_path / "ref.zarr")
    assert "c/0/1" not in _files(tmp_path / "out.zarr") and "c/1/2" in _files(tmp_path / "out.zarr")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[:], vals)


def test_rewriting_a_block_with_zeros_removes_its_chunks_as_zarr_does(tmp_path: Path) -> None:
    # A resumed harvest rewrites a block that was partly written before it was killed.
    shape, chunks = (16, 10), (8, 5)
    ref = _array(tmp_path / "ref.zarr", shape, chunks, "float32")
    out = _array(tmp_path / "out.zarr", shape, chunks, "float32")
    writer = ChunkWriter.for_array(out)
    assert writer is not None
    ones, zeros = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    ref[:] = ones
    writer.write(0, ones)
    ref[:] = zeros
    writer.write(0, zeros)
    assert _files(tmp_path / "out.zarr") == _files(tmp_path / "ref.zarr")
    assert not list((tmp_path / "out.zarr").rglob("c/*/*"))


def test_rows_must_be_whole_chunks(tmp_path: Path) -> None:
    writer = ChunkWriter.for_array(_array(tmp_path / "a.zarr", (20, 4), (8, 4), "float32"))
    assert writer is not None
    with pytest.raises(ValueError, match="whole chunks"):
        writer.write(4, np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match="whole chunks"):
        writer.write(0, np.zeros((12, 4), np.float32))
    with pytest.raises(ValueError, match="expected"):
        writer.write(0, np.zeros((8, 3), np.float32))
    writer.write(16, np.zeros((4, 4), np.float32))  # the last rows end the array: fine


@pytest.mark.parametrize("kw", [
    {"compressors": ZstdCodec(level=1, checksum=True)},
    {"compressors": None},
    {"fill_value": 1.0},
    {"filters": [zarr.codecs.TransposeCodec(order=(1, 0))]},
    {"open_config": {"write_empty_chunks": True}},
])
def test_not_used_where_zarr_would_write_other_bytes(tmp_path: Path, kw: dict) -> None:
    assert ChunkWriter.for_array(_array(tmp_path / "a.zarr", (8, 4), (4, 4), "float32",
                                        **kw)) is None


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ChunkWriter.for_array(_array(tmp_path / "a.zarr", (8, 4), (8, 4), "float32"))
    assert writer is not None

    def full(src: object, dst: object) -> None:  # the disk filled while the file was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "replace", full)
    with pytest.raises(OSError):
        writer.write(0, np.ones((8, 4), np.float32))
    assert [p.name for p in (tmp_path / "a.zarr").rglob("*") if p.is_file()] == ["zarr.json"]
