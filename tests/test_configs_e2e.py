"""Every shipped config, scaled down, runs through all seven stages in CI.

The full reproductions (bench/results/repro_*.json) take from minutes to hours; here each config
keeps its architecture, module patterns, C and clustering settings but trains for a few dozen
SPD steps on small batches, so this checks that the config and every stage fit together and that
the report scores the result against that toy's ground truth. Such short runs recover none or
few of the mechanisms, so none is held to a result here: the built-in default (TMS 5-2 with the
package's CPU-fast recipe) is, by tests/test_console.py, which runs it in full.

The language-model config keeps its recipe (offline default target trained on the bundled
corpus, global CI function, subset loss, per-token profiles, ablations) on a 2-layer, d_model 32
model with a 512-token vocabulary and a few dozen steps everywhere (about a minute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scalespd.config import parse_config
from scalespd.run import STAGES, run_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOYS = ["tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id", "resid_mlp1", "resid_mlp2",
        "resid_mlp3"]
LANGUAGE_MODELS = ["lm_tiny"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, val in over.items():
        out[key] = _merge(base[key], val) if isinstance(val, dict) and key in base else val
    return out


# Ground truth of each toy (digest §1.4): alive subcomponents a perfect decomposition has.
EXPECTED_ALIVE = {"tms_5-2": 10, "tms_5-2-id": 12, "tms_40-10": 80, "tms_40-10-id": 90,
                  "resid_mlp1": 150, "resid_mlp2": 250, "resid_mlp3": 357}


def _scaled(name: str) -> dict:
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    train = data["target"].get("train", {"schedule": {"lr": 3e-3}})
    over = {
        "target": {"train": {**train, "steps": 200, "batch_size": 256}},
        "decompose": {"steps": 60, "batch_size": 256, "faithfulness_warmup_steps": 20,
                      "save_every": 30, "log_every": 30, "eval_batch_size": 512},
        "profiles": {"n_samples": 2048, "chunk_rows": 1024, "block_rows": 1024,
                     "samples_per_feature": 20},
    }
    return _merge(data, over)


def test_every_config_is_tested() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(TOYS + LANGUAGE_MODELS)


def _scaled_lm(name: str) -> dict:
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    over = {
        "target": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 64,
                   "vocab_size": 512, "seq_len": 32, "max_sequences": 1500,
                   "train": {"steps": 60, "batch_size": 16, "schedule": {"lr": 0.003}}},
        "decompose": {"modules": [{**m, "C": 8} for m in data["decompose"]["modules"]],
                      "ci_hidden": [32], "steps": 40, "save_every": 20, "log_every": 20,
                      "faithfulness_warmup_steps": 20, "cpus_per_worker": 1},
        "profiles": {"n_samples": 2048, "block_rows": 1024, "chunk_rows": 1024},
        "evaluate": {"ablation_clusters": 4, "ablation_random_sets": 10,
                     "ablation_sequences": 16},
    }
    return _merge(data, over)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_scaled_down_lm_config_runs_end_to_end(name: str, tmp_path: Path, ray_local) -> None:
    cfg = parse_config(_scaled_lm(name), source=name)
    run_pipeline(cfg, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s for s in STAGES if manifest["stages"][s]["status"] == "complete"] == list(STAGES)
    assert (tmp_path / "target" / "tokenizer.json").is_file()  # trained here, offline
    clusters = pd.read_csv(tmp_path / "spectral" / "clusters.csv")
    assert len(clusters) == 8 * 7 * 2  # C x 7 projections x 2 layers
    lm = json.loads((tmp_path / "report" / "summary.json").read_text())["lm"]
    assert lm["n_rows"] == 2048 and lm["tokens_decoded"]
    assert sum(m["C"] for m in lm["modules"].values()) == len(clusters)
    ablation = json.loads((tmp_path / "evaluate" / "ablation.json").read_text())
    assert ablation["n_random"] == 10
    assert len(ablation["clusters"]) == min(4, lm["n_non_singleton"])


@pytest.mark.parametrize("name", TOYS)
def test_scaled_down_config_runs_end_to_end(name: str, tmp_path: Path, ray_local) -> None:
    cfg = parse_config(_scaled(name), source=name)
    run_pipeline(cfg, tmp_path)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s for s in STAGES if manifest["stages"][s]["status"] == "complete"] == list(STAGES)

    n_sub = sum(m.C for m in cfg.decompose.modules) * (
        cfg.target.n_layers if cfg.target.kind == "resid_mlp" else 1)
    clusters = pd.read_csv(tmp_path / "spectral" / "clusters.csv")
    assert len(clusters) == n_sub
    assert clusters["component"].tolist() == list(range(n_sub))
    alive = clusters[clusters["alive"]]
    assert (alive["cluster"] >= 0).all()
    assert (clusters.loc[~clusters["alive"], "cluster"] == -1).all()

    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["n_components"] == n_sub
    assert summary["n_alive"] == int(clusters["alive"].sum())
    assert sum(summary["cluster_sizes"]) == summary["n_alive"]
    gt = summary["ground_truth"]
    assert gt["mechanisms_total"] == cfg.target.n_features
    assert gt["expected_alive"] == EXPECTED_ALIVE[name]
    assert gt["n_nodes"] == summary["n_alive"]
    assert (tmp_path / "report" / "index.html").stat().st_size > 0
