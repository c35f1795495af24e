"""The seven toy targets of the papers, read from the shipped configs (configs/<name>.yaml is
the one definition of each toy and its training recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scalespd.config import AnyTargetConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOYS = ("tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id", "resid_mlp1", "resid_mlp2",
        "resid_mlp3")


def preset(name: str, **overrides: Any) -> AnyTargetConfig:
    """The target of configs/<name>.yaml with top-level fields replaced by `overrides`
    (validated like YAML input)."""
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown toy target {name!r}; expected one of {TOYS}")
    base = load_config(path).target
    return type(base).model_validate({**base.model_dump(), **overrides})
