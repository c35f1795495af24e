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


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=json_default))
    os.replace(tmp, path)
