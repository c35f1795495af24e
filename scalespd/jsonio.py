"""JSON writing shared by the stages.

Stage outputs are often read to decide whether a stage is complete, so a crash must never leave
a half-written file where a good one stood: every write goes through `scalespd.storage`'s
all-or-nothing writer (temp + rename locally, one object on an object store)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from scalespd.storage import PathLike, write_text_atomic

__all__ = ["json_default", "write_json_atomic", "write_text_atomic"]


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` hook for NumPy scalars and arrays."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json_atomic(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=json_default))
