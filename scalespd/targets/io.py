"""Saving and loading trained targets.

A toy target directory holds `model.pt` (the state dict) and `meta.json` ({"config": the target
config dump, plus training info}); a language-model target holds save_pretrained's files
(model and tokenizer) or nothing but meta.json when it was loaded from target.path
(scalespd/targets/lm/io.py). Files are written to temporary names and renamed, and
meta.json goes last, so a directory with a meta.json always holds a complete model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from scalespd.config import AnyTargetConfig, HFCausalLMTargetConfig, TargetConfig
from scalespd.targets.models import build_target

MODEL_FILE = "model.pt"
META_FILE = "meta.json"

_target_config_adapter: TypeAdapter[AnyTargetConfig] = TypeAdapter(TargetConfig)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_target(
    model: nn.Module, cfg: AnyTargetConfig, directory: str | Path,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write model.pt and meta.json into `directory` (created if needed); returns it."""
    if isinstance(cfg, HFCausalLMTargetConfig):
        raise TypeError("a language-model target is saved with its tokenizer: use "
                        "scalespd.targets.lm.save_lm_target")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write(directory / MODEL_FILE, lambda p: torch.save(state, p))
    return write_meta(directory, cfg, info)


def write_meta(directory: str | Path, cfg: AnyTargetConfig,
               info: dict[str, Any] | None = None) -> Path:
    """Write meta.json ({"config": cfg, **info}) into `directory`, atomically; returns it. Call
    it after every other file of the target is in place: its presence means complete."""
    directory = Path(directory)
    meta = {"config": cfg.model_dump(mode="json"), **(info or {})}
    _atomic_write(directory / META_FILE,
                  lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a target directory, with clear errors for a missing or broken file."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {directory} is not a target directory written by the "
            f"target stage (expected {META_FILE} and {MODEL_FILE})"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{path}: expected a JSON object with a 'config' key")
    return meta


def load_target(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, AnyTargetConfig]:
    """(model in eval mode with requires_grad as after training, its target config). A
    language-model target (kind hf_causal_lm) comes back as its transformers model; its
    tokenizer: scalespd.targets.lm.load_lm_target."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        cfg = _target_config_adapter.validate_python(meta["config"])
    except ValidationError as err:
        raise ValueError(f"{directory / META_FILE}: invalid target config:\n{err}") from None
    if isinstance(cfg, HFCausalLMTargetConfig):
        from scalespd.targets.lm.io import load_lm_target  # noqa: PLC0415  (transformers)

        return load_lm_target(directory, device).model, cfg
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} does not exist (meta.json is there without it)")
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    model = build_target(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{model_path} does not match the architecture in {META_FILE}: {err}"
        ) from None
    return model.to(device).eval(), cfg
