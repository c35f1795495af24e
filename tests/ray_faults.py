"""Kill a Ray worker process in the middle of a task, as a crash or the OOM killer would.

`setup` is a Ray `worker_process_setup_hook`: in every worker it wraps each function named in
$SCALESPD_KILL_TASKS ("module:function,...") so that the first call of it anywhere in the Ray
cluster (a marker file created with O_EXCL decides; $SCALESPD_KILL_MARKER is its prefix) sends
SIGKILL to its own worker process. Ray pickles a module-level task function by reference, so a
worker that unpickles it gets the wrapper. Later calls, the retry included, run normally.
"""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any


def marker(prefix: str | Path, target: str) -> Path:
    """The marker file of one target: it exists once that target's worker was killed."""
    return Path(f"{prefix}.{target.replace(':', '.')}")


def _killing_once(fn: Callable[..., Any], flag: Path) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return fn(*args, **kwargs)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    return wrapper


def setup() -> None:
    prefix = os.environ.get("SCALESPD_KILL_MARKER")
    for target in filter(None, os.environ.get("SCALESPD_KILL_TASKS", "").split(",")):
        module, name = target.split(":")
        mod = importlib.import_module(module)
        setattr(mod, name, _killing_once(getattr(mod, name), marker(prefix or "", target)))
