"""Loading a finished decomposition from a run directory (no Ray needed).

run_dir/decompose/final/ holds `model.pt` ({"components": ..., "ci_fns": ...} state dicts of the
ComponentModel) and `meta.json` (the target and decompose configs, steps, final metrics); the
frozen target itself lives once, in run_dir/target/. `run_dir` may be a local path or an
fsspec URL (`scalespd.storage.as_path`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from upath import UPath

from scalespd import storage
from scalespd.config import DecomposeConfig
from scalespd.errors import naming_file

if TYPE_CHECKING:
    from scalespd.train.components import ComponentModel

FINAL_DIR = "final"
MODEL_FILE = "model.pt"
META_FILE = "meta.json"


def save_torch(obj: Any, path: storage.PathLike) -> None:
    """torch.save through a Python file object, all or nothing (`storage.atomic_writer`: a
    reader never sees half a file). Given a path, torch's own writer turns a full disk into a
    RuntimeError without errno; through a file object it stays an OSError (ENOSPC), which
    `naming_file` then ties to `path`."""
    with naming_file(storage.url(path)), storage.atomic_writer(path) as f:
        torch.save(obj, f)


def load_torch(path: storage.PathLike, **kwargs: Any) -> Any:
    """torch.load of the file at `path` (local or URL) through a file object."""
    with storage.as_path(path).open("rb") as f:
        return torch.load(f, **kwargs)


def final_dir(run_dir: storage.PathLike) -> UPath:
    return storage.as_path(run_dir) / "decompose" / FINAL_DIR


def read_final_meta(run_dir: storage.PathLike) -> dict[str, Any] | None:
    """final/meta.json of a finished decomposition, or None when there is none (yet)."""
    d = final_dir(run_dir)
    if not (d / META_FILE).is_file() or not (d / MODEL_FILE).is_file():
        return None
    return json.loads((d / META_FILE).read_text())


def model_state(model: ComponentModel) -> dict[str, Any]:
    """What final/model.pt stores: the trained parts only (the target is in run_dir/target)."""
    return {"components": model.components.state_dict(), "ci_fns": model.ci_fns.state_dict()}


def load_decomposition(run_dir: storage.PathLike, device: str | torch.device = "cpu"):
    """The trained ComponentModel of run_dir (target from run_dir/target, SPD parts from
    run_dir/decompose/final), in eval mode on `device`."""
    from scalespd.targets import load_target  # noqa: PLC0415
    from scalespd.train.components import (  # noqa: PLC0415
        ComponentModel,
        decomposable_modules,
        match_modules,
    )

    run_dir = storage.as_path(run_dir)
    meta = read_final_meta(run_dir)
    if meta is None:
        raise FileNotFoundError(
            f"{final_dir(run_dir)} has no finished decomposition ({MODEL_FILE} + {META_FILE}); "
            f"run the decompose stage first")
    target, target_cfg = load_target(run_dir / "target")
    if target_cfg.model_dump(mode="json") != meta["target"]:
        raise ValueError(f"{final_dir(run_dir) / META_FILE} was trained on a different target "
                         f"than {run_dir / 'target'}; re-run with --force decompose")
    dcfg = DecomposeConfig.model_validate(meta["decompose"])
    infos = decomposable_modules(target, target_cfg)
    module_C = match_modules([(m.pattern, m.C) for m in dcfg.modules], [i.path for i in infos])
    model = ComponentModel(target, module_C, infos, dcfg)
    state = load_torch(final_dir(run_dir) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.components.load_state_dict(state["components"])
    model.ci_fns.load_state_dict(state["ci_fns"])
    return model.to(device).eval()
