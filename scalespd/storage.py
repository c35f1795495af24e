"""Where a run directory lives: a local path or an fsspec URL, behind one interface.

Every stage addresses its files as `upath.UPath` objects, which have pathlib's API on any fsspec
filesystem: `/`, `exists`, `is_dir`, `iterdir`, `open`, `read_text`, `unlink`, ... A local run
directory is a `PosixUPath`, a subclass of `pathlib.Path`, so local runs behave exactly as plain
paths do; `memory://`, `s3://`, `gs://` (and any other fsspec protocol) go through the same
calls. What pathlib cannot express the same way everywhere lives here:

* **Writes a reader never sees half-done.** On a local disk: a temporary name in the same
  folder, fsync, rename. An object store has no rename but makes every object appear whole or
  not at all, so a file is written as one object (`write_bytes_atomic`, `atomic_writer`).
  Folders (a checkpoint, a zarr block) are renamed into place locally; on an object store they
  are written in place and a completion record written last marks them done (`has_rename`).
* **zarr** opens a local folder with its `LocalStore` and anything else through its
  `FsspecStore` (`zarr_store`).
* **Libraries that need a real folder** (Hugging Face `save_pretrained`/`from_pretrained`, a Ray
  Train checkpoint) get one through `local_copy` / `upload_dir`.
* **Process-local filesystems** (`memory://`) are seen by this process only: Ray workers in other
  processes cannot share them (`shared_across_processes`), so the stages keep that work in the
  driver or stage it through a local folder.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec
from upath import UPath

from scalespd.errors import StorageError, naming_file

LOCAL_PROTOCOLS = ("", "file", "local")
# scalespd's optional extras that bring a protocol's fsspec filesystem (pyproject.toml).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# Filesystems whose contents live in the memory of one process.
PROCESS_LOCAL_PROTOCOLS = ("memory",)

PathLike = str | os.PathLike[str] | UPath


def as_path(where: PathLike) -> UPath:
    """`where` as a UPath: a local path (or `file://` URL) becomes a `PosixUPath` (a
    `pathlib.Path`), a URL a UPath on its fsspec filesystem (credentials from the environment,
    as fsspec finds them)."""
    if isinstance(where, UPath):
        if where.protocol in LOCAL_PROTOCOLS or where.storage_options.get(
                "use_listings_cache") is False:
            return where
        return UPath(str(where), **{**where.storage_options, "use_listings_cache": False})
    text = os.fspath(where)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" not in text:
        return UPath(text)
    try:
        # No cached directory listings: files appear from other processes (Ray workers) and
        # from zarr's own filesystem instance, and a stale listing would hide them (s3fs and
        # gcsfs cache them).
        p = UPath(text, use_listings_cache=False)
        p.fs  # noqa: B018 - the filesystem is made here, so a missing package is named now
    except (ImportError, ValueError) as err:
        protocol = text.split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        how = (f'pip install "scalespd[{extra}]"' if extra else
               "install the fsspec filesystem package for it")
        raise StorageError(f"{text}: cannot open {protocol}:// locations ({err}); {how}") from None
    return p


def is_local(path: PathLike) -> bool:
    """True for a path on this machine's file system."""
    return as_path(path).protocol in LOCAL_PROTOCOLS


def has_rename(path: PathLike) -> bool:
    """True where a folder can be renamed into place atomically (a local file system); object
    stores and memory:// write in place and rely on completion records instead."""
    return is_local(path)


def shared_across_processes(path: PathLike) -> bool:
    """False for a filesystem only this process sees (memory://): Ray workers cannot use it."""
    return as_path(path).protocol not in PROCESS_LOCAL_PROTOCOLS


def url(path: PathLike) -> str:
    """A string that `as_path` turns back into the same location (for configs, logs, Ray
    task arguments): the plain path locally, the URL otherwise."""
    p = as_path(path)
    return p.path if is_local(p) else str(p)


def local_path(path: PathLike) -> Path:
    """`path` as a `pathlib.Path`; an error for a URL (callers that need a real file check
    `is_local` first or use `local_copy`)."""
    p = as_path(path)
    if not is_local(p):
        raise ValueError(f"{url(p)} is not on the local file system")
    return Path(p.path)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@contextmanager
def atomic_writer(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object whose contents appear at `path` only when the block ends without an
    error; before that `path` keeps what it held. Locally: a temporary file in the same folder,
    fsync and a rename. Elsewhere: the bytes are collected and stored as one object.

    mode: "wb" or "w" (text, UTF-8)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer mode must be 'wb' or 'w', not {mode!r}")
    p = as_path(path)
    if is_local(p):
        dest = local_path(p)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with naming_file(dest), open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    buf = io.BytesIO()
    if mode == "w":
        text = io.TextIOWrapper(buf, encoding="utf-8", newline="")
        yield text
        text.flush()
        data = buf.getvalue()
        text.detach()
    else:
        yield buf
        data = buf.getvalue()
    with naming_file(url(p)):
        p.write_bytes(data)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Store `data` at `path`, all or nothing (see `atomic_writer`)."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Store `text` (UTF-8) at `path`, all or nothing (see `atomic_writer`); an OSError of the
    write (a full disk) names `path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def makedirs(path: PathLike) -> None:
    """Create the folder `path` with its parents; object stores have no folders (a no-op there
    beyond what the filesystem itself does)."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def rmtree(path: PathLike, missing_ok: bool = True) -> None:
    """Remove the folder `path` and everything in it."""
    p = as_path(path)
    if is_local(p):
        shutil.rmtree(local_path(p), ignore_errors=missing_ok)
        return
    if not p.exists():
        if missing_ok:
            return
        raise FileNotFoundError(url(p))
    p.fs.rm(p.path, recursive=True)


def remove(path: PathLike) -> None:
    """Remove a file or a folder (recursively) at `path`; nothing if it is absent."""
    p = as_path(path)
    if p.is_dir() and not (is_local(p) and local_path(p).is_symlink()):
        rmtree(p)
    elif p.exists() or (is_local(p) and local_path(p).is_symlink()):
        p.unlink()


def rename_dir(src: PathLike, dst: PathLike) -> None:
    """Move the file or folder `src` to `dst` (which must not exist): atomic on a local disk; on
    an object store a copy, object by object, then a delete (used only where a half-moved folder
    is harmless, e.g. setting a damaged checkpoint aside). s3fs's own recursive `mv` also tries
    to copy the folder's key, which does not exist on an object store."""
    s, d = as_path(src), as_path(dst)
    if is_local(s):
        os.replace(local_path(s), local_path(d))
        return
    fs: fsspec.AbstractFileSystem = s.fs
    if s.is_file():
        fs.copy(s.path, d.path)
        fs.rm(s.path)
        return
    root, to = s.path.rstrip("/"), d.path.rstrip("/")
    for found in fs.find(root):
        fs.copy(found, to + found[len(root):])
    rmtree(s)


# --------------------------------------------------------------------------------------------
# Local copies, for libraries that need real folders
# --------------------------------------------------------------------------------------------


@contextmanager
def local_copy(path: PathLike) -> Iterator[Path]:
    """A local folder with the contents of the folder `path`, for reading with a library that
    takes only local paths. A local `path` is used as is."""
    p = as_path(path)
    if is_local(p):
        yield local_path(p)
        return
    with tempfile.TemporaryDirectory(prefix="scalespd-") as tmp:
        dest = Path(tmp) / (p.name or "data")
        p.fs.get(p.path.rstrip("/") + "/", os.fspath(dest), recursive=True)
        dest.mkdir(exist_ok=True)  # an empty remote folder downloads as nothing
        yield dest


def upload_dir(src: Path, dest: PathLike) -> None:
    """Copy the local folder `src` into `dest` (which it replaces, file by file)."""
    d = as_path(dest)
    if is_local(d):
        shutil.copytree(src, local_path(d), dirs_exist_ok=True)
        return
    for f in sorted(src.rglob("*")):
        if f.is_file():
            (d / f.relative_to(src).as_posix()).write_bytes(f.read_bytes())


# --------------------------------------------------------------------------------------------
# zarr
# --------------------------------------------------------------------------------------------


def zarr_store(path: PathLike, read_only: bool = False) -> Any:
    """The zarr store of the folder `path`: `LocalStore` on a local disk, `FsspecStore` on the
    URL's filesystem otherwise."""
    import zarr.storage  # noqa: PLC0415 - zarr is needed only by the stages that store arrays

    p = as_path(path)
    if is_local(p):
        return zarr.storage.LocalStore(os.fspath(local_path(p)), read_only=read_only)
    # from_url wraps a synchronous filesystem (memory://) for zarr's async store API.
    return zarr.storage.FsspecStore.from_url(str(p), storage_options=dict(p.storage_options),
                                             read_only=read_only)
