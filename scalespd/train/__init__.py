"""SPD: rank-one components, CI functions, sigmoids, losses, the trainer and its Ray Train launch.

Importing this package needs neither Ray nor a running cluster: `ray_train` imports Ray only
when a decomposition is launched.

Public: `load_decomposition(run_dir)` (the trained ComponentModel of a run directory),
`read_final_meta(run_dir)`, and lazily `ComponentModel`, `match_modules`, `SPDTrainer`.
"""

from __future__ import annotations

from typing import Any

from scalespd.train.io import load_decomposition, read_final_meta

_LAZY = {
    "ComponentModel": "scalespd.train.components",
    "match_modules": "scalespd.train.components",
    "SPDTrainer": "scalespd.train.trainer",
}

__all__ = ["ComponentModel", "SPDTrainer", "load_decomposition", "match_modules",
           "read_final_meta"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalespd.train' has no attribute {name!r}")
