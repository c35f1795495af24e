"""Saving and loading trained targets.

A toy target directory holds `model.pt` (the state dict) and `meta.json` ({"config": the target
config dump, plus training info}); a language-model target holds save_pretrained's files
(model and tokenizer) or nothing but meta.json when it was loaded from target.path
(scalespd/targets/lm/io.py). Each file is written all or nothing (`scalespd.storage`: a temporary
name and a rename locally, one object on an object store), and meta.json goes last, so a
directory with a meta.json always holds a complete model. `directory` may be a local path or an
fsspec URL (`scalespd.storage.as_path`).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn
from upath import UPath

from scalespd import storage
from scalespd.config import AnyTargetConfig, HFCausalLMTargetConfig, TargetConfig
from scalespd.targets.models import build_target

MODEL_FILE = "model.pt"
META_FILE = "meta.json"

_target_config_adapter: TypeAdapter[AnyTargetConfig] = TypeAdapter(TargetConfig)


def save_target(
    model: nn.Module, cfg: AnyTargetConfig, directory: storage.PathLike,
    info: dict[str, Any] | None = None,
) -> UPath:
    """Write model.pt and meta.json into `directory` (created if needed); returns it."""
    if isinstance(cfg, HFCausalLMTargetConfig):
        raise TypeError("a language-model target is saved with its tokenizer: use "
                        "scalespd.targets.lm.save_lm_target")
    directory = storage.as_path(directory)
    storage.makedirs(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with storage.atomic_writer(directory / MODEL_FILE) as f:
        torch.save(state, f)
    return write_meta(directory, cfg, info)


def write_meta(directory: storage.PathLike, cfg: AnyTargetConfig,
               info: dict[str, Any] | None = None) -> UPath:
    """Write meta.json ({"config": cfg, **info}) into `directory`, atomically; returns it. Call
    it after every other file of the target is in place: its presence means complete."""
    directory = storage.as_path(directory)
    meta = {"config": cfg.model_dump(mode="json"), **(info or {})}
    storage.write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2, default=str))
    return directory


def read_meta(directory: storage.PathLike) -> dict[str, Any]:
    """meta.json of a target directory, with clear errors for a missing or broken file."""
    path = storage.as_path(directory) / META_FILE
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
    directory: storage.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, AnyTargetConfig]:
    """(model in eval mode with requires_grad as after training, its target config). A
    language-model target (kind hf_causal_lm) comes back as its transformers model; its
    tokenizer: scalespd.targets.lm.load_lm_target."""
    directory = storage.as_path(directory)
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
    with model_path.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    model = build_target(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{model_path} does not match the architecture in {META_FILE}: {err}"
        ) from None
    return model.to(device).eval(), cfg
