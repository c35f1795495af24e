"""The `target` stage: train the toy target (or copy the one named by target.path) into
run_dir/target/{model.pt, meta.json}.

Language models (target.kind hf_causal_lm) are handled by scalespd/targets/lm/stage.py.

Re-running is cheap: if run_dir/target already holds a complete target (meta.json is written
last) made from the same target config, it is reused as is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from upath import UPath

from scalespd import storage
from scalespd.config import ONE_HOT_VALUE, ConfigError, RunConfig
from scalespd.targets.io import load_target, read_meta, save_target
from scalespd.targets.training import eval_loss, sanity_check, train_target

log = logging.getLogger("scalespd.targets")

STAGE_DIR = "target"
# Fields that may differ between a loaded target and the run's target config: they describe
# how it was trained or where it lives, not the network.
_NON_ARCH_FIELDS = {"path", "train", "seed", "feature_probability"}
_SUMMARY_KEYS = ("source", "steps", "final_loss", "eval_loss", "zero_output_loss", "seconds",
                 "one_hot_features_ok", "one_hot_features_represented", "one_hot_diag_mean")


def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    if cfg.target.kind == "hf_causal_lm":
        from scalespd.targets.lm.stage import run as run_lm  # noqa: PLC0415

        return run_lm(cfg, run_dir)
    out = storage.as_path(run_dir) / STAGE_DIR
    tcfg = cfg.target
    assert tcfg.kind != "hf_causal_lm"  # handled above; this narrows the type
    wanted = tcfg.model_dump(mode="json")
    if (out / "meta.json").is_file() and (out / "model.pt").is_file():
        meta = read_meta(out)
        if meta["config"] == wanted:
            log.info("[target] %s already holds this target; reusing it", out)
            return _summary(meta)
        log.info("[target] %s holds a different target; replacing it", out)

    if tcfg.path is not None:
        model, src_cfg = load_target(tcfg.path)
        _check_same_architecture(src_cfg.model_dump(mode="json"), wanted, tcfg.path)
        src_meta = read_meta(tcfg.path)
        info: dict[str, Any] = {k: src_meta[k] for k in ("steps", "final_loss", "seconds")
                                if k in src_meta}
        info |= {"source": "loaded", "loaded_from": str(tcfg.path),
                 "source_config": src_meta["config"], **eval_loss(model, tcfg)}
    else:
        log.info("[target] training %s target (%d steps, batch %d)", tcfg.kind,
                 tcfg.train.steps, tcfg.train.batch_size)
        # Toy targets are a few small matmuls per step: with more than one torch thread on a
        # busy 2-core machine, thread hand-offs cost far more than they save (measured: the
        # 40-10 recipe ran ~10x slower with 2 threads while other work ran).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, info = train_target(tcfg)
        finally:
            torch.set_num_threads(threads)
        info["source"] = "trained"
    info |= sanity_check(model, tcfg)
    if tcfg.kind == "tms" and info["one_hot_features_represented"] < tcfg.n_features:
        log.warning("[target] only %d of %d TMS features come back from a one-hot %g (output "
                    "> %g); the decomposition cannot find the missing ones",
                    info["one_hot_features_represented"], tcfg.n_features, ONE_HOT_VALUE,
                    ONE_HOT_VALUE / 2)
    save_target(model, tcfg, out, info)
    return _summary(read_meta(out))


def _check_same_architecture(loaded: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    diffs = [f"target.{k}: config says {wanted[k]!r}, {path} has {loaded.get(k)!r}"
             for k in wanted if k not in _NON_ARCH_FIELDS and loaded.get(k) != wanted[k]]
    if diffs:
        raise ConfigError("target.path points to a different architecture:\n  "
                          + "\n  ".join(diffs))


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in _SUMMARY_KEYS if k in meta}
