"""The decompose stage with the run directory on an fsspec filesystem.

* s3:// (a moto server on loopback, which every Ray process reaches): Ray Train keeps its
  checkpoints on the bucket; a run of fewer steps, then one of more, resumes from them.
* memory:// (this process only): the stage runs on a local copy and copies decompose/ back.

The two end with the same model as each other (the trainer's random streams are a function of
the step, and the memory run is the local code path on a temporary folder). Three Ray Train fits
in all (~18 s each); the checkpoint bookkeeping on object stores is tested without Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from upath import UPath

from scalespd import storage
from scalespd.config import RunConfig, parse_config
from scalespd.jsonio import write_json_atomic
from scalespd.targets import stage as target_stage
from scalespd.train import ray_train
from scalespd.train import stage as decompose_stage
from scalespd.train.io import final_dir, load_decomposition, read_final_meta, save_torch
from scalespd.train.ray_train import (
    ATTEMPTS_FILE,
    DAMAGED_SUFFIX,
    SNAPSHOT_FILE,
    STAGING_PREFIX,
    STATE_FILE,
    checkpoint_dirs,
    checkpoint_root,
    find_resume_checkpoint,
    prepare_resume,
    prune_untracked_checkpoints,
)

REMOTE = ["memory_dir", "s3_dir"]
TARGET = {"kind": "tms", "n_features": 5, "n_hidden": 2,
          "train": {"steps": 200, "batch_size": 256, "schedule": {"lr": 0.005}}}
# Constant learning rate and no p-annealing: the trajectory does not depend on `steps`, so a
# run of FEW steps resumed to MANY follows a run of MANY from the start.
DECOMPOSE = {"steps": 40, "batch_size": 64, "eval_batch_size": 128,
             "schedule": {"lr": 0.003}, "save_every": 10, "log_every": 10}
FEW, MANY = 20, 40


def _cfg(steps: int = MANY) -> RunConfig:
    return parse_config({"name": "remote_decompose", "target": TARGET,
                         "decompose": {**DECOMPOSE, "steps": steps}})


# --------------------------------------------------------------------------------------------
# Checkpoint bookkeeping on an object store (no Ray)
# --------------------------------------------------------------------------------------------


def _ckpt(run_dir: UPath, step: int, valid: bool = True) -> UPath:
    d = checkpoint_root(run_dir) / f"checkpoint_{step:07d}"
    storage.makedirs(d)
    (d / "metrics.json").write_text(json.dumps({"step": step}))
    if valid:
        save_torch({"step": step}, d / STATE_FILE)
    else:
        (d / STATE_FILE).write_bytes(b"truncated")
    return d


def _names(root: UPath) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("where", REMOTE)
def test_resume_choice_and_pruning_on_an_object_store(where: str,
                                                      request: pytest.FixtureRequest) -> None:
    run_dir: UPath = request.getfixturevalue(where)
    root = checkpoint_root(run_dir)
    for step in (10, 20, 30):
        _ckpt(run_dir, step)
    _ckpt(run_dir, 40, valid=False)  # damaged: newer than the newest valid one
    staging = root / f"{STAGING_PREFIX}checkpoint_0000050-1"
    storage.makedirs(staging)
    (staging / "metrics.json").write_text("{}")
    (root / SNAPSHOT_FILE).write_text('{"checkpoint_results": [{"checkpoint_dir')  # cut short

    assert [s for s, _ in checkpoint_dirs(run_dir)] == [40, 30, 20, 10]
    found = prepare_resume(run_dir)
    assert found is not None and found[0] == 30
    assert storage.url(found[1]) == storage.url(root / "checkpoint_0000030")
    names = _names(root)
    assert not any(n.startswith(STAGING_PREFIX) for n in names), names
    assert "checkpoint_0000040" not in names and SNAPSHOT_FILE not in names
    aside = [n for n in names if DAMAGED_SUFFIX in n]
    assert sorted(n.split(DAMAGED_SUFFIX)[0] for n in aside) == ["checkpoint_0000040",
                                                                 SNAPSHOT_FILE]
    assert [s for s, _ in checkpoint_dirs(run_dir)] == [30, 20, 10]

    # After a fit whose snapshot tracks 20 and 30: 10 goes, the tracked ones stay.
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint_{s:07d}"}
                                       for s in (20, 30)]}
    (root / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    prune_untracked_checkpoints(run_dir)
    assert [s for s, _ in checkpoint_dirs(run_dir)] == [30, 20]


@pytest.mark.parametrize("where", REMOTE)
def test_attempts_are_appended_on_an_object_store(where: str,
                                                  request: pytest.FixtureRequest) -> None:
    run_dir: UPath = request.getfixturevalue(where)
    ray_train._log_attempt(run_dir, {"start_step": 0})
    ray_train._log_attempt(run_dir, {"start_step": 20})
    path = ray_train.decompose_dir(run_dir) / ATTEMPTS_FILE
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"start_step": 0},
                                                                      {"start_step": 20}]


def test_a_process_local_run_dir_is_staged_through_a_local_folder(
        memory_dir: UPath, monkeypatch: pytest.MonkeyPatch) -> None:
    """memory:// goes through `_launch` on a local copy; decompose/ comes back, with what the
    fit removed removed, also when the fit fails."""
    storage.makedirs(memory_dir / "target")
    (memory_dir / "target" / "meta.json").write_text("{}")
    old = _ckpt(memory_dir, 10)
    seen: list[Path] = []

    def fake_launch(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
        assert storage.is_local(run_dir)
        local = storage.local_path(run_dir)
        seen.append(local)
        assert (local / "target" / "meta.json").read_text() == "{}"
        if len(seen) == 1:
            assert find_resume_checkpoint(run_dir) is not None  # the copied checkpoint loads
            storage.rmtree(checkpoint_root(run_dir) / "checkpoint_0000010")
        d = checkpoint_root(run_dir) / "checkpoint_0000020"
        d.mkdir(parents=True)
        torch.save({"step": 20}, d / STATE_FILE)
        if len(seen) == 2:
            raise RuntimeError("the fit failed")
        return {"steps": 20}

    monkeypatch.setattr(ray_train, "_launch", fake_launch)
    assert ray_train.launch(_cfg(), memory_dir) == {"steps": 20}
    assert not old.exists()
    assert [s for s, _ in checkpoint_dirs(memory_dir)] == [20]
    assert not seen[0].exists()  # the local copy is gone

    # A failing fit still brings its checkpoints back (for the next run to resume from).
    storage.rmtree(checkpoint_root(memory_dir) / "checkpoint_0000020")
    with pytest.raises(RuntimeError, match="the fit failed"):
        ray_train.launch(_cfg(), memory_dir)
    assert [s for s, _ in checkpoint_dirs(memory_dir)] == [20]


# --------------------------------------------------------------------------------------------
# Ray Train fits
# --------------------------------------------------------------------------------------------


def _model_state(run_dir: UPath) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(io.BytesIO((final_dir(run_dir) / "model.pt").read_bytes()),
                      weights_only=True)


def _attempts(run_dir: UPath) -> list[tuple[int, bool]]:
    text = (ray_train.decompose_dir(run_dir) / ATTEMPTS_FILE).read_text()
    return [(a["start_step"], a["resumed"]) for a in map(json.loads, text.splitlines())]


def test_decompose_on_s3_resumes_and_matches_a_memory_run(ray_local: Any, s3_dir: UPath,
                                                          memory_dir: UPath) -> None:
    cfg = _cfg()
    for run_dir in (s3_dir, memory_dir):
        target_stage.run(cfg, run_dir)  # seeded: the same target in both

    # s3: FEW steps, then the stage with MANY resumes from the newest checkpoint on the bucket.
    first = ray_train.launch(_cfg(FEW), s3_dir)
    assert first["steps"] == FEW and first["resumed_from_step"] is None
    assert [s for s, _ in checkpoint_dirs(s3_dir)] == [20, 10]
    assert read_final_meta(s3_dir)["steps"] == FEW  # type: ignore[index]
    # The stage itself refuses outputs of another config: record MANY's as the FEW run's.
    write_json_atomic(ray_train.decompose_dir(s3_dir) / decompose_stage.CONFIG_RECORD,
                      decompose_stage._config_record(cfg))
    summary = decompose_stage.run(cfg, s3_dir)
    assert summary["steps"] == MANY and summary["resumed_from_step"] == FEW
    assert _attempts(s3_dir) == [(0, False), (FEW, True)]
    # Ray Train keeps three checkpoints, each complete, on the bucket.
    kept = checkpoint_dirs(s3_dir)
    assert [s for s, _ in kept] == [40, 30, 20]
    for step, d in kept:
        assert _names(d) == ["ci_heatmap.png", "metrics.json", STATE_FILE]
        assert json.loads((d / "metrics.json").read_text())["step"] == step
    assert (checkpoint_root(s3_dir) / SNAPSHOT_FILE).is_file()

    # memory: MANY steps from the start, run on a local copy and copied back.
    mem = decompose_stage.run(cfg, memory_dir)
    assert mem["steps"] == MANY and mem["resumed_from_step"] is None
    assert _attempts(memory_dir) == [(0, False)]
    assert [s for s, _ in checkpoint_dirs(memory_dir)] == [40, 30, 20]
    assert find_resume_checkpoint(memory_dir) is not None  # what a re-run would resume from

    # The same model and meta.json from both.
    got, want = _model_state(s3_dir), _model_state(memory_dir)
    for part in ("components", "ci_fns"):
        assert got[part].keys() == want[part].keys()
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), f"{part}.{k}"
    assert read_final_meta(s3_dir) == read_final_meta(memory_dir)
    for run_dir in (s3_dir, memory_dir):
        d = ray_train.decompose_dir(run_dir)
        assert json.loads((d / "metrics.json").read_text())["step"] == MANY
        assert (d / "ci_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (d / "config.json").is_file()

    # Finished: kept without Ray; the model loads back from the URL.
    assert decompose_stage.run(cfg, s3_dir)["skipped"]
    assert decompose_stage.run(cfg, memory_dir)["skipped"]
    model = load_decomposition(storage.url(s3_dir))
    assert set(model.module_paths) == {"linear1", "linear2"}

