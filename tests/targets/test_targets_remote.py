"""The target stage with the run directory on memory:// and on s3:// (a moto server on
loopback): the same files as a local run, reused on a re-run, loadable through the loaders the
later stages call (toy targets and a tiny default language model)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_models import template_docs
from object_stores import files_under
from toys import preset
from upath import UPath

from scalespd.config import HFCausalLMTargetConfig, RunConfig
from scalespd.targets import load_target, read_meta
from scalespd.targets import stage as target_stage
from scalespd.targets.lm import load_lm_target
from scalespd.targets.lm.io import model_source
from scalespd.train.lm import load_sequences

REMOTE = ["memory_dir", "s3_dir"]
# Differ between two runs of the same config: wall time.
_TIMING = {"seconds", "seconds_per_step"}


pytestmark = pytest.mark.usefixtures("hf_datasets_cache")


def _state(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True)


def _meta(data: bytes) -> dict[str, Any]:
    return {k: v for k, v in json.loads(data).items() if k not in _TIMING}


def _toy_cfg() -> RunConfig:
    base = preset("tms_5-2")
    return RunConfig(target=preset("tms_5-2", train={**base.train.model_dump(), "steps": 40,
                                                     "batch_size": 128}))


@pytest.mark.parametrize("where", REMOTE)
def test_toy_target_stage_writes_what_a_local_run_writes(where: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    remote: UPath = request.getfixturevalue(where)
    cfg = _toy_cfg()
    local_summary = target_stage.run(cfg, tmp_path / "run")
    summary = target_stage.run(cfg, remote)
    assert {k: v for k, v in summary.items() if k not in _TIMING} == \
        {k: v for k, v in local_summary.items() if k not in _TIMING}

    local, got = files_under(tmp_path / "run" / "target"), files_under(remote / "target")
    assert sorted(got) == sorted(local) == ["meta.json", "model.pt"]
    want_state, got_state = _state(local["model.pt"]), _state(got["model.pt"])
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    assert _meta(got["meta.json"]) == _meta(local["meta.json"])

    # Re-running reuses the remote target untouched; it loads back like the local one.
    assert target_stage.run(cfg, remote) == summary
    assert (remote / "target" / "model.pt").read_bytes() == got["model.pt"]
    model, tcfg = load_target(remote / "target")
    assert tcfg == cfg.target
    assert torch.equal(model.linear1.weight, want_state["linear1.weight"])
    # A URL string is accepted as well as a UPath.
    assert read_meta(str(remote / "target"))["config"] == cfg.target.model_dump(mode="json")

    # target.path may point at the remote target: it is loaded and copied into another run.
    cfg2 = RunConfig(target=preset("tms_5-2", path=tmp_path / "run" / "target"))
    assert target_stage.run(cfg2, remote / "second")["source"] == "loaded"
    copied, _ = load_target(remote / "second" / "target")
    assert torch.equal(copied.linear1.weight, model.linear1.weight)


@pytest.mark.parametrize("where", REMOTE)
def test_lm_target_stage_on_a_remote_run_dir(where: str, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    """The default LM is saved with save_pretrained into a local folder and uploaded; the
    loaders (model, tokenizer, the decomposition's token sequences) read it back."""
    remote: UPath = request.getfixturevalue(where)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(template_docs()) + "\n")
    tcfg = HFCausalLMTargetConfig.model_validate(dict(
        dataset=str(text), n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_mlp=32,
        vocab_size=300, max_seq_len=32, seq_len=16, heldout_fraction=0.2,
        train={"steps": 5, "batch_size": 8, "schedule": {"lr": 1e-2}}))
    cfg = RunConfig(target=tcfg)
    local_summary = target_stage.run(cfg, tmp_path / "run")
    summary = target_stage.run(cfg, remote)
    assert summary["eval_loss"] == pytest.approx(local_summary["eval_loss"], rel=1e-6)

    local, got = files_under(tmp_path / "run" / "target"), files_under(remote / "target")
    assert sorted(got) == sorted(local)
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= set(got)
    assert _meta(got["meta.json"]) == _meta(local["meta.json"])
    assert got["tokenizer.json"] == local["tokenizer.json"]

    out = remote / "target"
    assert model_source(out, read_meta(out)) == str(out)
    lm = load_lm_target(out)
    want = load_lm_target(tmp_path / "run" / "target")
    for (name, p), (_, q) in zip(lm.model.state_dict().items(), want.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(p, q), name
    assert lm.tokenizer.get_vocab() == want.tokenizer.get_vocab()
    seqs, want_seqs = load_sequences(out), load_sequences(tmp_path / "run" / "target")
    assert torch.equal(seqs.train, want_seqs.train)
    assert torch.equal(seqs.heldout, want_seqs.heldout)

    # Same config again: reused, nothing rewritten.
    assert target_stage.run(cfg, remote) == summary
    assert (out / "model.safetensors").read_bytes() == got["model.safetensors"]
