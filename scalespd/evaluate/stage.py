"""Evaluate stage of `python -m scalespd.run`: SPD model + profiles/ -> run_dir/evaluate/.

Writes, for toy targets (the ones with a known ground truth):

    onehot_ci.npy      (F, N) float32: CI of every subcomponent on the F one-hot inputs
                       x_f = evaluate.onehot_value, columns in profiles/components.csv order
    ground_truth.json  `scalespd.targets.ground_truth(target)`: the mechanisms a faithful
                       decomposition has (per module: identity or dense pattern, expected alive)
    summary.json       written last, so its presence marks a complete output

For language models (target kind hf_causal_lm):

    tokens.json        {"tokens": [decoded text of token id i, for every id of the tokenizer]},
                       so the report can show tokens and contexts without a tokenizer
    ablation.json      `scalespd.evaluate.ablation.ablation_test` of the evaluate.ablation_clusters
                       largest clusters on the first evaluate.ablation_sequences held-out
                       sequences, against evaluate.ablation_random_sets random sets each
    summary.json       written last
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from upath import UPath

from scalespd import storage
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


def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    from scalespd.profiles import read_components  # noqa: PLC0415

    run_dir = storage.as_path(run_dir)
    out = run_dir / EVALUATE_DIR
    storage.makedirs(out)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    summary: dict[str, Any] = {"target": cfg.target.kind}
    if cfg.target.kind in TOY_KINDS:
        from scalespd.evaluate.onehot import align_to_components, onehot_ci  # noqa: PLC0415
        from scalespd.targets import ground_truth  # noqa: PLC0415

        names = read_components(run_dir / "profiles")["name"].astype(str).tolist()
        ci, ci_names = onehot_ci(cfg, run_dir)
        onehot = align_to_components(ci, ci_names, names).astype(np.float32)
        with storage.atomic_writer(out / ONEHOT_FILE) as f:
            np.save(f, onehot)
        write_json_atomic(out / GROUND_TRUTH_FILE, ground_truth(cfg.target))
        summary.update(onehot_value=cfg.evaluate.onehot_value, n_features=int(onehot.shape[0]),
                       n_components=int(onehot.shape[1]))
        log.info("evaluate: one-hot CI of %d subcomponents on %d features", onehot.shape[1],
                 onehot.shape[0])
    elif cfg.target.kind == "hf_causal_lm":
        summary.update(_evaluate_lm(cfg, run_dir, out))
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def _evaluate_lm(cfg: RunConfig, run_dir: UPath, out: UPath) -> dict[str, Any]:
    """tokens.json and ablation.json of a language-model run; returns summary fields."""
    import pandas as pd  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from scalespd.evaluate.ablation import ablation_test, column_layout, largest_clusters  # noqa: PLC0415
    from scalespd.spectral.stage import CLUSTERS_FILE  # noqa: PLC0415
    from scalespd.targets.io import read_meta  # noqa: PLC0415
    from scalespd.targets.lm.hf import load_tokenizer  # noqa: PLC0415
    from scalespd.targets.lm.io import model_source  # noqa: PLC0415
    from scalespd.train import load_decomposition  # noqa: PLC0415
    from scalespd.train.lm import load_sequences  # noqa: PLC0415

    target_dir = run_dir / "target"
    tokenizer = load_tokenizer(model_source(target_dir, read_meta(target_dir)))
    # Decoded one id at a time: the text a reader sees for that token in a context.
    tokens = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    write_json_atomic(out / TOKENS_FILE, {"tokens": tokens})

    ecfg = cfg.evaluate
    with (run_dir / "spectral" / CLUSTERS_FILE).open("rb") as f:
        table = pd.read_csv(f)
    clusters = largest_clusters(table, ecfg.ablation_clusters)
    (out / ABLATION_FILE).unlink(missing_ok=True)
    if not clusters:
        log.info("evaluate: no non-singleton cluster to ablate")
        return {"n_tokens": len(tokens), "ablation": None}
    column_layer, alive = column_layout(table)
    ids = load_sequences(target_dir).heldout[: ecfg.ablation_sequences]
    model = load_decomposition(run_dir)
    log.info("evaluate: ablating the %d largest clusters on %d sequences of %d tokens, %d "
             "random sets each", len(clusters), ids.shape[0], ids.shape[1],
             ecfg.ablation_random_sets)
    with torch.inference_mode():
        result = ablation_test(model, ids, list(clusters.values()), column_layer=column_layer,
                               alive=alive, n_random=ecfg.ablation_random_sets,
                               tau=cfg.profiles.tau, seed=ecfg.seed,
                               batch_size=ecfg.ablation_batch, cluster_ids=list(clusters))
    write_json_atomic(out / ABLATION_FILE, result)
    log.info("evaluate: %d of %d clusters hurt their active tokens more than 95%% of random "
             "same-size sets", result["n_beats_95"], result["n_tested"])
    return {"n_tokens": len(tokens),
            "ablation": {k: result[k] for k in ("n_tested", "n_beats_95", "n_random")}}
