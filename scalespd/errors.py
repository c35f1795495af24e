"""The errors a user can cause or fix, shared by both CLIs and every stage.

A `UserError` ends a command with one `error:` line (its message names the file or field and
what to do) and exit status 2. Anything else is an internal bug and keeps its traceback. Stage
code raises these; it never imports the CLI modules.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# OS errors a user fixes on their side (free space, permissions, a read-only mount): they are
# reported as one line naming the file, never as a traceback.
STORAGE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "the disk is full; free space and re-run the same command to resume",
    errno.EDQUOT: "the disk quota is exceeded; free space and re-run the same command to resume",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; check the file's permissions or choose another location",
    errno.EPERM: "operation not permitted; check the file's permissions or choose another "
                 "location",
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
INTERRUPTED_MESSAGE = "interrupted; re-run the same command to resume"


class UserError(Exception):
    """A failure the user can cause or fix; the message names the file or field and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message that names the offending field or file."""


class RunDirError(UserError):
    """The run directory holds something this run must not overwrite or cannot use."""


class StageInputError(UserError, ValueError):
    """What a stage reads (an earlier stage's output) is missing, unfinished, inconsistent or
    holds nothing to work on; the message names the file and the stage to re-run."""


class StorageError(UserError):
    """Writing or reading a file failed for a reason the user fixes (disk full, permissions).

    `errno` and `filename` are those of the OSError it stands for."""

    def __init__(self, message: str, errno_: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = errno_
        self.filename = filename


def storage_error(err: BaseException) -> StorageError | None:
    """The user-facing form of `err` (or of an OSError in its cause chain) when it is a
    storage problem the user can fix; None otherwise (an internal bug keeps its traceback)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StorageError):
            return cur
        if isinstance(cur, OSError) and cur.errno in STORAGE_ERRNOS:
            where = cur.filename if cur.filename is not None else "a file"
            return StorageError(f"{where}: {STORAGE_ERRNOS[cur.errno]}", cur.errno,
                                None if cur.filename is None else str(cur.filename))
        cur = cur.__cause__ or cur.__context__
    return None


@contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError that names no file as the same error naming `path`.

    A full disk shows up in write() or close() of an already open file (or deep inside torch,
    zarr or matplotlib), and those OSErrors carry no file name; the user must learn which file
    could not be written. The original error stays in the cause chain."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
