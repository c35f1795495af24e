"""The `target` stage for language models (target.kind hf_causal_lm).

path None: train the byte-level BPE tokenizer and the default LLaMA-style model on
target.dataset, save both with save_pretrained into run_dir/target/ with meta.json.
path set: load and check the model and its tokenizer, measure its held-out loss on
target.dataset, and record it in run_dir/target/meta.json (the weights are not copied).

Everything a user can get wrong (a missing model directory, an unreachable hub name, a tokenizer
larger than the embedding, a missing text column, sequences longer than the model's positions)
is checked by `preflight` before any training, as one ConfigError naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from upath import UPath

from scalespd import storage
from scalespd.config import HFCausalLMTargetConfig, RunConfig
from scalespd.errors import ConfigError
from scalespd.targets.io import META_FILE, read_meta
from scalespd.targets.lm.data import load_lm_data, load_texts
from scalespd.targets.lm.hf import (
    CONFIG_FILE,
    check_seq_len,
    check_tokenizer_fits,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
    skeleton,
)
from scalespd.targets.lm.io import save_lm_target, write_loaded_meta
from scalespd.targets.lm.modules import lm_modules
from scalespd.targets.lm.tokenizer import train_bpe_tokenizer
from scalespd.targets.lm.training import default_model_config, heldout_loss, train_default_lm

if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("scalespd.targets")

STAGE_DIR = "target"
_SUMMARY_KEYS = ("source", "loaded_from", "steps", "initial_loss", "final_loss", "eval_loss",
                 "eval_perplexity", "n_params", "seconds", "seconds_per_step")


@dataclass
class Preflight:
    """What the checks loaded, reused by the stage: the model's config, its tokenizer (None
    for the default model, whose tokenizer is trained) and the text dataset."""

    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None
    texts: datasets.Dataset


def preflight(cfg: HFCausalLMTargetConfig) -> Preflight:
    """Every check that needs no training or weights; ConfigError naming the field."""
    tokenizer = None
    if cfg.path is not None:
        model_config = load_hf_config(cfg.path)
        tokenizer = load_tokenizer(cfg.path)
        check_tokenizer_fits(tokenizer, model_config)
        check_seq_len(cfg.seq_len, model_config)
        try:
            found = lm_modules(skeleton(model_config))
        except ValueError as err:
            raise ConfigError(f"target.path: {cfg.path}: {err}") from None
        if not found:
            raise ConfigError(f"target.path: {cfg.path} has no nn.Linear / Conv1D projections "
                              "inside its decoder blocks; nothing to decompose")
    else:
        model_config = default_model_config(cfg)
    return Preflight(model_config, tokenizer, load_texts(cfg))


def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    tcfg = cfg.target
    if not isinstance(tcfg, HFCausalLMTargetConfig):
        raise TypeError(f"the LM target stage got a {type(tcfg).__name__}")
    out = storage.as_path(run_dir) / STAGE_DIR
    wanted = tcfg.model_dump(mode="json")
    if (out / META_FILE).is_file():
        meta = read_meta(out)
        if meta["config"] == wanted and _complete(out, meta):
            log.info("[target] %s already holds this target; reusing it", out)
            return _summary(meta)
        log.info("[target] %s holds a different target; replacing it", out)
        _remove_previous(out, meta)

    pre = preflight(tcfg)
    if tcfg.path is None:
        info = _train_default(tcfg, pre, out)
    else:
        info = _load_and_evaluate(tcfg, pre, out)
    return _summary(info)


def _train_default(cfg: HFCausalLMTargetConfig, pre: Preflight, out: UPath) -> dict[str, Any]:
    column = cfg.text_column
    # The tokenizer reads all the text, held-out part included: the held-out split is made on
    # packed token sequences, which need the tokenizer first. Merges learned from ~10% more
    # text barely change a held-out loss; the model itself never trains on held-out tokens.
    log.info("[target] training a %d-token byte-level BPE tokenizer", cfg.vocab_size)
    tokenizer = train_bpe_tokenizer(
        (t for batch in pre.texts.select_columns([column]).iter(batch_size=64)
         for t in batch[column] if isinstance(t, str) and t),
        cfg.vocab_size, cfg.max_seq_len)
    check_tokenizer_fits(tokenizer, pre.model_config, "target.vocab_size")
    data = load_lm_data(cfg, tokenizer, pre.texts)
    log.info("[target] training the default LM (%d layers, d_model %d; %d steps of %d x %d "
             "tokens)", cfg.n_layers, cfg.d_model, cfg.train.steps, cfg.train.batch_size,
             cfg.seq_len)
    model, info = train_default_lm(cfg, data, special_id=int(tokenizer.eos_token_id))
    info |= {"source": "trained", **_data_info(data, tokenizer)}
    log.info("[target] held-out loss %.3f (perplexity %.1f) after %.0f s", info["eval_loss"],
             info["eval_perplexity"], info["seconds"])
    save_lm_target(model, tokenizer, cfg, out, info)
    return info


def _load_and_evaluate(cfg: HFCausalLMTargetConfig, pre: Preflight,
                       out: UPath) -> dict[str, Any]:
    assert cfg.path is not None and pre.tokenizer is not None
    source = resolve_model_path(cfg.path)
    data = load_lm_data(cfg, pre.tokenizer, pre.texts)
    model = load_model(source)
    info: dict[str, Any] = {
        "source": "loaded",
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        **heldout_loss(model, data.heldout),
        **_data_info(data, pre.tokenizer),
    }
    log.info("[target] loaded %s (%s); held-out loss %.3f", source, info["architecture"],
             info["eval_loss"])
    write_loaded_meta(cfg, out, source, info)
    return {**info, "loaded_from": source}


def _data_info(data: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    return {"n_documents": data.n_documents, "n_tokens": data.n_tokens,
            "n_train_sequences": int(data.train.shape[0]),
            "n_heldout_sequences": int(data.heldout.shape[0]),
            "tokenizer_size": len(tokenizer)}


def _complete(out: UPath, meta: dict[str, Any]) -> bool:
    if meta.get("source") == "loaded":
        return "loaded_from" in meta
    return all((out / f).is_file() for f in meta.get("files", [CONFIG_FILE]))


def _remove_previous(out: UPath, meta: dict[str, Any]) -> None:
    """Remove the previous target's meta.json first (the folder stops being complete), then
    the files it listed, and config.json, which would otherwise pass for a saved model."""
    for name in [META_FILE, *meta.get("files", []), CONFIG_FILE]:
        if "/" not in name and name != "..":
            path = out / name
            if path.is_file():
                path.unlink()


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in _SUMMARY_KEYS if k in meta}
