"""Fault-injection helpers shared by the fault tests (test helper, not a test module)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import psutil


def fill_until_full(ballast: Path) -> None:
    """Write zeros to `ballast` until its file system is full (ENOSPC), in ever smaller pieces
    so that not even a small write fits afterwards."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def pgroup_alive(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes of process group `pgid`."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of the live (non-zombie) processes whose environment has key=value. Ray renames its
    worker processes (`ray::RayTrainWorker`), so their command lines do not say which Ray they
    belong to; the environment they inherited (e.g. a private RAY_TMPDIR) does."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(key) == value:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out
