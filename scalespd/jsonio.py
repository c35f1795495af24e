"""Atomic JSON writing shared by the stages.

Stage outputs are often read to decide whether a stage is complete, so a crash must never leave
a half-written file where a good one stood: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` hook for NumPy scalars and arrays."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder, fsync and a rename: a
    crash or a full disk leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=json_default))
