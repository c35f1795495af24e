"""Saving and loading language-model targets (run_dir/target/).

A trained default model is saved with save_pretrained (config.json, model.safetensors,
generation_config.json) together with its tokenizer (tokenizer.json, tokenizer_config.json),
so the folder is itself a local Hugging Face directory that `target.path` (or
AutoModelForCausalLM / AutoTokenizer.from_pretrained) can load. A model loaded from
`target.path` is not copied (models can be gigabytes): the folder then holds only meta.json,
whose `loaded_from` names the model. meta.json is removed first and written last, so its
presence means the folder is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scalespd.config import HFCausalLMTargetConfig
from scalespd.targets.io import META_FILE, read_meta, write_meta
from scalespd.targets.lm.hf import CONFIG_FILE, load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LMTarget:
    """A loaded language-model target: model (eval mode, float32), tokenizer, the run's target
    config and where the weights came from (a local directory or a hub name)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: HFCausalLMTargetConfig
    source: str


def save_lm_target(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   cfg: HFCausalLMTargetConfig, directory: str | Path,
                   info: dict[str, Any] | None = None) -> Path:
    """save_pretrained of the model and the tokenizer into `directory`, then meta.json, whose
    `files` lists what was written (so a later, different target can remove exactly those)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    before = _mtimes(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    files = sorted(n for n, t in _mtimes(directory).items() if before.get(n) != t)
    return write_meta(directory, cfg, {**(info or {}), "files": files})


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def write_loaded_meta(cfg: HFCausalLMTargetConfig, directory: str | Path, source: str,
                      info: dict[str, Any] | None = None) -> Path:
    """meta.json of a target loaded from `source` (not copied into `directory`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    return write_meta(directory, cfg, {**(info or {}), "loaded_from": source})


def model_source(directory: str | Path, meta: dict[str, Any]) -> str:
    """Where the target of `directory` keeps its weights: the folder itself when it holds a
    saved model, else the `loaded_from` recorded in its meta.json."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return str(directory)
    if "loaded_from" not in meta:
        raise FileNotFoundError(f"{directory} has meta.json but neither a saved model "
                                f"({CONFIG_FILE}) nor a loaded_from entry")
    return str(meta["loaded_from"])


def load_lm_target(directory: str | Path, device: str | torch.device = "cpu") -> LMTarget:
    """The language-model target the target stage wrote into `directory`."""
    meta = read_meta(directory)
    cfg = HFCausalLMTargetConfig.model_validate(meta["config"])
    source = model_source(directory, meta)
    model = load_model(source)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to confuses mypy
    return LMTarget(model=model, tokenizer=load_tokenizer(source), cfg=cfg, source=source)
