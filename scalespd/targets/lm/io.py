"""Saving and loading language-model targets (run_dir/target/).

A trained default model is saved with save_pretrained (config.json, model.safetensors,
generation_config.json) together with its tokenizer (tokenizer.json, tokenizer_config.json),
so the folder is itself a local Hugging Face directory that `target.path` (or
AutoModelForCausalLM / AutoTokenizer.from_pretrained) can load. A model loaded from
`target.path` is not copied (models can be gigabytes): the folder then holds only meta.json,
whose `loaded_from` names the model. meta.json is removed first and written last, so its
presence means the folder is complete. On an object store (any fsspec URL) save_pretrained
writes into a local temporary folder that is then uploaded; loading goes through a local copy
(`scalespd.targets.lm.hf`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from upath import UPath

from scalespd import storage
from scalespd.config import HFCausalLMTargetConfig
from scalespd.targets.io import META_FILE, read_meta, write_meta
from scalespd.targets.lm.hf import CONFIG_FILE, load_model, load_tokenizer, local_model_dir

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
                   cfg: HFCausalLMTargetConfig, directory: storage.PathLike,
                   info: dict[str, Any] | None = None) -> UPath:
    """save_pretrained of the model and the tokenizer into `directory`, then meta.json, whose
    `files` lists what was written (so a later, different target can remove exactly those)."""
    directory = storage.as_path(directory)
    storage.makedirs(directory)
    _unlink(directory / META_FILE)
    if storage.is_local(directory):
        local = storage.local_path(directory)
        before = _mtimes(local)
        model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        files = sorted(n for n, t in _mtimes(local).items() if before.get(n) != t)
    else:  # transformers writes only local folders: save there, then upload
        with tempfile.TemporaryDirectory(prefix="scalespd-lm-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
            storage.upload_dir(Path(tmp), directory)
    return write_meta(directory, cfg, {**(info or {}), "files": files})


def _unlink(path: UPath) -> None:
    if path.exists():
        path.unlink()


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def write_loaded_meta(cfg: HFCausalLMTargetConfig, directory: storage.PathLike, source: str,
                      info: dict[str, Any] | None = None) -> UPath:
    """meta.json of a target loaded from `source` (not copied into `directory`)."""
    directory = storage.as_path(directory)
    storage.makedirs(directory)
    _unlink(directory / META_FILE)
    return write_meta(directory, cfg, {**(info or {}), "loaded_from": source})


def model_source(directory: storage.PathLike, meta: dict[str, Any]) -> str:
    """Where the target of `directory` keeps its weights: the folder itself when it holds a
    saved model (its `storage.url`: a local path or a URL, which `hf.load_model` and
    `hf.load_tokenizer` both take), else the `loaded_from` recorded in its meta.json."""
    directory = storage.as_path(directory)
    if (directory / CONFIG_FILE).is_file():
        return storage.url(directory)
    if "loaded_from" not in meta:
        raise FileNotFoundError(f"{directory} has meta.json but neither a saved model "
                                f"({CONFIG_FILE}) nor a loaded_from entry")
    return str(meta["loaded_from"])


def load_lm_target(directory: storage.PathLike, device: str | torch.device = "cpu") -> LMTarget:
    """The language-model target the target stage wrote into `directory`."""
    meta = read_meta(directory)
    cfg = HFCausalLMTargetConfig.model_validate(meta["config"])
    source = model_source(directory, meta)
    with local_model_dir(source) as local:  # one download for both, where it is remote
        model = load_model(local)
        tokenizer = load_tokenizer(local)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to confuses mypy
    return LMTarget(model=model, tokenizer=tokenizer, cfg=cfg, source=source)
