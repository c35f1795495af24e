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


def processes_mentioning(text: str) -> list[int]:
    """Pids of the live (non-zombie) processes whose command line contains `text`."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(
                    p.info["cmdline"] or []):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out
