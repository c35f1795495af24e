"""The whole pipeline on language models: a tiny random LlamaForCausalLM and a GPT2LMHeadModel
directory (save_pretrained, with their tokenizer) go through target -> decompose -> profiles ->
graph -> spectral -> evaluate -> report, offline, on CPU.

The models are random and SPD runs for a few steps, so nothing is asserted about the quality of
the clusters, only that every stage produces its LM outputs and that they agree with each other
(rows map back to the tokens of the held-out sequences, every cluster has its top tokens, the
ablation test has numbers).
"""

# ruff: noqa: E402  (the environment is set before transformers / datasets are imported)
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from lm_models import save_tiny_gpt2, save_tiny_llama, template_docs, template_tokenizer

from scalespd.config import parse_config
from scalespd.profiles import open_profiles
from scalespd.profiles.sparse_store import SparseProfiles
from scalespd.run import STAGES, run_pipeline
from scalespd.train.lm import load_sequences

SEQ_LEN = 16
PATTERNS = {"llama": ["model.layers.*.self_attn.*", "model.layers.*.mlp.*"],
            "gpt2": ["transformer.h.*.attn.*", "transformer.h.*.mlp.*"]}


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    tok = template_tokenizer()
    (root / "docs.jsonl").write_text("".join(json.dumps({"story": d}) + "\n"
                                             for d in template_docs(400)))
    return {"llama": save_tiny_llama(root / "llama", tok),
            "gpt2": save_tiny_gpt2(root / "gpt2", tok), "data": root / "docs.jsonl"}


def lm_config(path: Path, data: Path, which: str) -> dict:
    return {
        "name": f"tiny_{which}",
        "target": {"kind": "hf_causal_lm", "path": str(path), "dataset": str(data),
                   "text_column": "story", "seq_len": SEQ_LEN},
        "decompose": {
            "modules": [{"pattern": p, "C": 6} for p in PATTERNS[which]],
            "ci_fn": "global_shared_mlp", "ci_hidden": [32],
            "loss": {"stochastic_recon": 0.0, "stochastic_recon_layerwise": 0.0,
                     "stochastic_recon_subset": 1.0, "importance_minimality": 1e-3,
                     "p": 2.0, "output": "kl"},
            "steps": 20, "batch_size": 8, "eval_batch_size": 8, "save_every": 10,
            "log_every": 10, "faithfulness_warmup_steps": 10, "schedule": {"lr": 1e-3}},
        "profiles": {"n_samples": 1024, "block_rows": 256, "chunk_rows": 256},
        "graph": {"k": 4},
        "evaluate": {"ablation_clusters": 3, "ablation_random_sets": 5,
                     "ablation_sequences": 16},
    }


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_lm_pipeline_end_to_end(which: str, lm_dirs: dict[str, Path], tmp_path: Path,
                                ray_local) -> None:
    cfg = parse_config(lm_config(lm_dirs[which], lm_dirs["data"], which), source=which)
    run_pipeline(cfg, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s for s in STAGES if manifest["stages"][s]["status"] == "complete"] == list(STAGES)

    # Decomposition metrics of an LM.
    metrics = json.loads((tmp_path / "decompose" / "final" / "meta.json").read_text())["metrics"]
    assert {"ce/target", "kl/ci_masked", "ce/rounded", "kl/alive_only"} <= set(metrics)

    # One profile row per token position of the first held-out sequences, in order.
    heldout = load_sequences(tmp_path / "target")
    inputs = zarr.open_group(str(tmp_path / "profiles" / "inputs.zarr"), mode="r")
    token_ids = np.asarray(inputs["token_ids"][:])
    n_seq = token_ids.size // SEQ_LEN
    assert n_seq == min(1024 // SEQ_LEN, heldout.heldout.shape[0])
    np.testing.assert_array_equal(token_ids, heldout.heldout[:n_seq].reshape(-1).numpy())
    np.testing.assert_array_equal(np.asarray(inputs["positions"][:]),
                                  np.tile(np.arange(SEQ_LEN), n_seq))
    np.testing.assert_array_equal(np.asarray(inputs["seq_ids"][:]),
                                  np.repeat(heldout.heldout_index[:n_seq].numpy(), SEQ_LEN))
    ci = open_profiles(tmp_path / "profiles")  # the default layout: sparse CSR row blocks
    assert isinstance(ci, SparseProfiles) and ci.csr_rows(0, SEQ_LEN).nnz > 0
    n_modules = 14 if which == "llama" else 8  # 7 projections (4: GPT-2) x 2 layers
    assert ci.shape == (token_ids.size, 6 * n_modules)

    clusters = pd.read_csv(tmp_path / "spectral" / "clusters.csv")
    assert len(clusters) == 6 * n_modules

    tokens = json.loads((tmp_path / "evaluate" / "tokens.json").read_text())["tokens"]
    assert len(tokens) == 300 and "".join(tokens[int(t)] for t in token_ids[:SEQ_LEN])

    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    lm = summary["lm"]
    sizes = clusters[clusters["cluster"] >= 0].groupby("cluster").size()
    assert lm["n_non_singleton"] == int((sizes > 1).sum())
    clusters_lm = json.loads((tmp_path / "report" / "clusters_lm.json").read_text())
    records = clusters_lm if isinstance(clusters_lm, list) else clusters_lm["clusters"]
    assert len(records) == lm["n_non_singleton"]
    for rec in records:
        assert "top_tokens" in rec and "contexts" in rec
    if lm["n_non_singleton"]:
        ablation = json.loads((tmp_path / "evaluate" / "ablation.json").read_text())
        assert ablation["n_random"] == 5
        assert len(ablation["clusters"]) == min(3, lm["n_non_singleton"])
        assert all(np.isfinite(c["effect_active"]) for c in ablation["clusters"]
                   if c["effect_active"] is not None)
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Ablation" in html or not lm["n_non_singleton"]
