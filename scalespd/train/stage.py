"""Decompose stage of `python -m scalespd.run`: run_dir/target -> run_dir/decompose.

A finished decomposition made with the same target and decompose config is kept as it is; an
interrupted one resumes from its newest valid checkpoint on disk (see `ray_train`). Outputs of a
different config are never reused or overwritten here: the orchestrator removes them when the
user forces the stage.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from upath import UPath

from scalespd import storage
from scalespd.config import RunConfig
from scalespd.errors import RunDirError, naming_file
from scalespd.jsonio import write_json_atomic
from scalespd.train.io import read_final_meta
from scalespd.train.ray_train import checkpoint_root, decompose_dir, launch

log = logging.getLogger(__name__)

CONFIG_RECORD = "config.json"  # the target + decompose config the files in decompose/ belong to


def _config_record(cfg: RunConfig) -> dict[str, Any]:
    return {"target": cfg.target.model_dump(mode="json"),
            "decompose": cfg.decompose.model_dump(mode="json")}


def _check_same_config(cfg: RunConfig, run_dir: UPath) -> None:
    """Refuse to resume checkpoints (or keep a model) made with another config."""
    record = decompose_dir(run_dir) / CONFIG_RECORD
    if not record.exists():
        if checkpoint_root(run_dir).exists() or (decompose_dir(run_dir) / "final").exists():
            raise RunDirError(f"{decompose_dir(run_dir)} holds outputs without {CONFIG_RECORD}; "
                              f"refusing to reuse them (use --force decompose to redo)")
        return
    try:
        recorded = json.loads(record.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise RunDirError(f"{record} is unreadable ({err}); use --force decompose to redo the "
                          f"decomposition") from None
    if recorded != _config_record(cfg):
        raise RunDirError(f"{decompose_dir(run_dir)} was made with a different target/decompose "
                          f"config; use another --run-dir or --force decompose")


def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    """Decompose run_dir/target (resuming if interrupted). Returns final metrics, steps, seconds.
    run_dir: a local path or an fsspec URL (see `ray_train.launch` for how each is run)."""
    run_dir = storage.as_path(run_dir)
    if not (run_dir / "target").is_dir():
        raise FileNotFoundError(f"{run_dir / 'target'} is missing: run the target stage first")
    _check_same_config(cfg, run_dir)
    meta = read_final_meta(run_dir)
    if meta is not None and meta["steps"] == cfg.decompose.steps:
        log.info("[decompose] final model already in %s, keeping it", decompose_dir(run_dir))
        return {"steps": meta["steps"], "world_size": meta["world_size"],
                "metrics": meta["metrics"], "skipped": True, "seconds": 0.0}

    storage.makedirs(decompose_dir(run_dir))
    record = decompose_dir(run_dir) / CONFIG_RECORD
    if not record.exists():  # when it exists it matches (checked above): leave it alone
        with naming_file(storage.url(record)):  # atomic: a full disk must not leave half a record
            write_json_atomic(record, _config_record(cfg))
    t0 = time.perf_counter()
    summary = launch(cfg, run_dir)  # holds resumed_from_step: the checkpoint it started from
    summary.update(skipped=False, seconds=round(time.perf_counter() - t0, 3))
    return summary
