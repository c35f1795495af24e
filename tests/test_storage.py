"""scalespd/storage.py: one path type for local folders and fsspec URLs, writes that are all or
nothing on every store, folder moves on object stores, zarr stores, local copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from upath import UPath

from scalespd import run as runmod
from scalespd import storage
from scalespd.errors import StorageError

STORES = ["local", "memory_dir", "s3_dir"]


@pytest.fixture(params=STORES)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> UPath:
    """An empty folder on a local disk, on memory:// and on s3:// (a local S3 server)."""
    if request.param == "local":
        return storage.as_path(tmp_path / "run")
    return storage.as_path(request.getfixturevalue(request.param))


def test_local_paths_stay_pathlib_paths_and_urls_round_trip(tmp_path: Path) -> None:
    local = storage.as_path(tmp_path)
    assert isinstance(local, Path) and storage.is_local(local) and storage.has_rename(local)
    assert storage.as_path(f"file://{tmp_path}") == local
    assert storage.url(local) == str(tmp_path)
    mem = storage.as_path("memory://bucket/run")
    assert not storage.is_local(mem) and not storage.shared_across_processes(mem)
    assert storage.url(mem / "a.json") == "memory://bucket/run/a.json"
    assert storage.as_path(storage.url(mem)) == mem
    with pytest.raises(ValueError, match="not on the local file system"):
        storage.local_path(mem)


def test_url_paths_list_what_another_filesystem_instance_wrote(s3_dir: UPath) -> None:
    """A listing made before another process (here: another filesystem instance) wrote a file
    must not hide that file: URL paths are made without cached listings."""
    import fsspec

    p = storage.as_path(str(s3_dir))
    (p / "a").write_text("1")
    assert [q.name for q in p.iterdir()] == ["a"]
    other = fsspec.filesystem("s3", skip_instance_cache=True)
    other.pipe(f"{p.path}/b", b"2")
    assert sorted(q.name for q in p.iterdir()) == ["a", "b"]
    # A UPath made elsewhere (with the default cache) is normalised the same way.
    assert storage.as_path(UPath(str(p))).storage_options["use_listings_cache"] is False


def test_an_unknown_protocol_is_one_error_naming_the_url(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StorageError, match=r"nosuchfs://x/run: cannot open nosuchfs://"):
        storage.as_path("nosuchfs://x/run")
    # The CLI says it in one line, before any work.
    assert runmod.main(["--run-dir", "nosuchfs://x/run", "--stages", "target"]) == 2
    assert "error: nosuchfs://x/run: cannot open" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_atomic_writer_keeps_the_old_file_when_the_write_fails(root: UPath, mode: str) -> None:
    path = root / "sub" / "x.bin"
    storage.makedirs(path.parent)
    storage.write_bytes_atomic(path, b"old")
    with pytest.raises(RuntimeError), storage.atomic_writer(path, mode) as f:
        f.write(b"new" if mode == "wb" else "new")
        raise RuntimeError("cut short")
    assert path.read_bytes() == b"old"
    with storage.atomic_writer(path, mode) as f:
        f.write(b"new" if mode == "wb" else "new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]  # no temporary left


def test_rename_dir_moves_a_folder_and_a_file(root: UPath) -> None:
    src = root / "ckpt"
    storage.makedirs(src / "inner")
    storage.write_bytes_atomic(src / "state.pt", b"s")
    storage.write_bytes_atomic(src / "inner" / "m.json", b"{}")
    storage.rename_dir(src, root / "ckpt.aside")
    assert not src.exists()
    assert (root / "ckpt.aside" / "state.pt").read_bytes() == b"s"
    assert (root / "ckpt.aside" / "inner" / "m.json").read_bytes() == b"{}"
    storage.rename_dir(root / "ckpt.aside" / "state.pt", root / "state.moved")
    assert (root / "state.moved").read_bytes() == b"s"
    storage.rmtree(root / "ckpt.aside")
    assert not (root / "ckpt.aside").exists()
    storage.rmtree(root / "never-there")  # missing_ok by default


def test_zarr_store_and_local_copy_round_trip(root: UPath, tmp_path: Path) -> None:
    g = zarr.open_group(store=storage.zarr_store(root / "x.zarr"), mode="w")
    g.create_array("a", shape=(6, 2), chunks=(3, 2), dtype="f4")[:] = np.arange(12).reshape(6, 2)
    back = zarr.open_group(store=storage.zarr_store(root / "x.zarr", read_only=True), mode="r")
    np.testing.assert_array_equal(back["a"][:], np.arange(12).reshape(6, 2))
    with storage.local_copy(root) as local:
        assert (local / "x.zarr" / "a" / "zarr.json").is_file()
        copied = local
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("hi")
    storage.upload_dir(src, root / "up")
    assert (root / "up" / "d" / "f.txt").read_text() == "hi"
    if not storage.is_local(root):
        assert not copied.exists()  # the temporary copy is gone afterwards
