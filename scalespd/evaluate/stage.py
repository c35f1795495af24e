"""Evaluate stage of `python -m scalespd.run`: SPD model + profiles/ -> run_dir/evaluate/.

Writes, for toy targets (the ones with a known ground truth):

    onehot_ci.npy      (F, N) float32: CI of every subcomponent on the F one-hot inputs
                       x_f = evaluate.onehot_value, columns in profiles/components.csv order
    ground_truth.json  `scalespd.targets.ground_truth(target)`: the mechanisms a faithful
                       decomposition has (per module: identity or dense pattern, expected alive)
    summary.json       written last, so its presence marks a complete output

For other targets it writes only summary.json (nothing to evaluate yet).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from scalespd.config import RunConfig
from scalespd.jsonio import write_json_atomic

log = logging.getLogger(__name__)

EVALUATE_DIR = "evaluate"
ONEHOT_FILE = "onehot_ci.npy"
GROUND_TRUTH_FILE = "ground_truth.json"
SUMMARY_FILE = "summary.json"
# Language-model targets (see scalespd.evaluate.ablation and the report's LM sections):
TOKENS_FILE = "tokens.json"  # {"tokens": [decoded text of token id i, for every id]}
ABLATION_FILE = "ablation.json"  # the cluster ablation test against random same-size sets
# Targets with a known ground truth, scored against it in the report.
TOY_KINDS = ("tms", "resid_mlp")


def run(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    from scalespd.profiles import read_components  # noqa: PLC0415

    run_dir = Path(run_dir)
    out = run_dir / EVALUATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    summary: dict[str, Any] = {"target": cfg.target.kind}
    if cfg.target.kind in TOY_KINDS:
        from scalespd.evaluate.onehot import align_to_components, onehot_ci  # noqa: PLC0415
        from scalespd.targets import ground_truth  # noqa: PLC0415

        names = read_components(run_dir / "profiles")["name"].astype(str).tolist()
        ci, ci_names = onehot_ci(cfg, run_dir)
        onehot = align_to_components(ci, ci_names, names).astype(np.float32)
        tmp = out / f".{ONEHOT_FILE}.tmp.npy"
        np.save(tmp, onehot)
        tmp.replace(out / ONEHOT_FILE)
        write_json_atomic(out / GROUND_TRUTH_FILE, ground_truth(cfg.target))
        summary.update(onehot_value=cfg.evaluate.onehot_value, n_features=int(onehot.shape[0]),
                       n_components=int(onehot.shape[1]))
        log.info("evaluate: one-hot CI of %d subcomponents on %d features", onehot.shape[1],
                 onehot.shape[0])
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary
