"""The decompose stage under Ray Train: kill-and-resume through the CLI, checkpoints and the
final model, and that two DDP workers decompose TMS 5-2 as well as one.

Each TorchTrainer fit spends ~18 s starting its worker group, so the 1-worker reference run *is*
the killed-and-resumed CLI run (the trainer's random streams are a function of the step, so a
resumed run follows the uninterrupted trajectory), and the only other fit is the 2-worker one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import pgroup_alive, processes_with_env

from scalespd.config import RunConfig, parse_config
from scalespd.targets import one_hot_inputs
from scalespd.train import load_decomposition, read_final_meta
from scalespd.train import stage as decompose_stage
from scalespd.train.ray_train import checkpoint_root, latest_checkpoint_step

REPO = Path(__file__).resolve().parents[2]

TARGET = {"kind": "tms", "n_features": 5, "n_hidden": 2,
          "train": {"steps": 3000, "batch_size": 1024, "schedule": {"lr": 0.005}}}
# The smallest TMS 5-2 SPD setting we found that still recovers the ground truth (5 alive
# subcomponents per matrix, MMCS ~ 1) on CPU: 2000 steps of batch 512 at lr 3e-3 (reference:
# 10k-40k steps of 4096 at 1e-3).
DECOMPOSE = {"steps": 2000, "batch_size": 512, "eval_batch_size": 2048,
             "schedule": {"lr": 0.003, "fn": "cosine", "final_frac": 0.0},
             "save_every": 500, "log_every": 250}
STEPS, EVERY = DECOMPOSE["steps"], DECOMPOSE["save_every"]


def _cfg(**decompose: Any) -> RunConfig:
    return parse_config({"name": "ray_train_test", "target": TARGET,
                         "decompose": {**DECOMPOSE, **decompose}})


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has committed (its snapshot), oldest first."""
    snap = checkpoint_root(run_dir) / "checkpoint_manager_snapshot.json"
    for _ in range(50):  # the controller may be rewriting it
        try:
            data = json.loads(snap.read_text())
            break
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    else:
        return []
    return [int(r["checkpoint_dir_name"].split("_")[-1]) for r in data["checkpoint_results"]]


# ML2R is left out of the comparisons: on these runs it flips between ~0.997 and ~0.80 from one
# checkpoint to the next (1 and 2 workers alike) while MMCS and the alive counts stay put.
def _quality(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if k.split("/")[0] in ("mmcs", "ml2r", "alive_onehot", "one_per_feature")}


def _write_yaml(cfg: RunConfig, path: Path) -> Path:
    from scalespd.config import save_config  # noqa: PLC0415

    save_config(cfg, path)
    return path


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SIGKILL `python -m scalespd.run` (driver, its local Ray and the Ray Train worker) once
    the first checkpoint is committed, then run the same command again."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg_path = _write_yaml(_cfg(), tmp / "cfg.yaml")
    run_dir = tmp / "run"
    # A private Ray temp dir: this driver must start its own local Ray, never join another
    # test's head through /tmp/ray/ray_current_cluster.
    ray_tmp = tempfile.mkdtemp(prefix="srr_", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "scalespd.run", str(cfg_path), "--run-dir", str(run_dir),
           "--stages", "target", "decompose"]
    try:
        t0 = time.perf_counter()
        with open(tmp / "first.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + 400
            while not _checkpoint_steps(run_dir):
                assert proc.poll() is None, (tmp / "first.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint after 400 s"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        first_s = time.perf_counter() - t0
        # Ray's workers are not all in the driver's process group; they die when they notice
        # their raylet is gone. Wait for every process of this run's Ray (they inherited its
        # private RAY_TMPDIR) before looking at what is on disk.
        deadline = time.monotonic() + 60
        while ((left := pgroup_alive(proc.pid) + processes_with_env("RAY_TMPDIR", ray_tmp))
               and time.monotonic() < deadline):
            time.sleep(0.2)
        committed = _checkpoint_steps(run_dir)
        # What a re-run resumes from: the newest valid checkpoint on disk, which may be newer
        # than the newest one Ray's snapshot had recorded when the kill came.
        on_disk = latest_checkpoint_step(run_dir)
        final_after_kill = read_final_meta(run_dir)

        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        second_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\nkilled after {first_s:.1f} s at checkpoint(s) {committed} (on disk: {on_disk}); "
          f"resumed run {second_s:.1f} s")
    return {"run_dir": run_dir, "left": left, "committed": committed, "on_disk": on_disk,
            "res": res, "final_after_kill": final_after_kill}


def test_kill_and_resume_continues_from_checkpoint(resumed_run: dict[str, Any]) -> None:
    assert not resumed_run["left"], f"processes of the killed run survive: {resumed_run['left']}"
    committed, on_disk = resumed_run["committed"], resumed_run["on_disk"]
    assert committed and max(committed) <= on_disk < STEPS, (committed, on_disk)
    assert resumed_run["final_after_kill"] is None
    res = resumed_run["res"]
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    # The local Ray has no dashboard; its State API warnings are silenced in the workers.
    assert "Failed to query Ray Train Controller" not in res.stdout + res.stderr

    run_dir = resumed_run["run_dir"]
    attempts = [json.loads(x) for x in (run_dir / "decompose" / "attempts.jsonl").open()]
    assert [(a["start_step"], a["resumed"]) for a in attempts] == [(0, False), (on_disk, True)]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["decompose"]["status"] == "complete"
    assert manifest["stages"]["decompose"]["info"]["resumed_from_step"] == on_disk
    assert manifest["stages"]["decompose"]["info"]["steps"] == STEPS


def test_checkpoints_and_final_model(resumed_run: dict[str, Any]) -> None:
    run_dir = resumed_run["run_dir"]
    assert resumed_run["res"].returncode == 0
    cfg = _cfg()

    # A checkpoint every save_every steps; Ray keeps three: the resumed run's newest two, and
    # the newest it tracked before. (A checkpoint the killed run's orphaned worker committed
    # after the kill is resumed from, but Ray never tracked it; the stage prunes it at the end.)
    expected = _checkpoint_steps(run_dir)
    resumed_from = resumed_run["on_disk"]
    assert len(expected) == 3 and expected[1:] == [STEPS - EVERY, STEPS], expected
    # Either the resumed run wrote all three, or the oldest is one Ray tracked before the kill.
    assert expected[0] == STEPS - 2 * EVERY or expected[0] < resumed_from, (expected,
                                                                           resumed_from)
    on_disk = sorted(p.name for p in checkpoint_root(run_dir).glob("checkpoint_*") if p.is_dir())
    assert on_disk == [f"checkpoint_{s:07d}" for s in expected]
    for s in expected:
        d = checkpoint_root(run_dir) / f"checkpoint_{s:07d}"
        assert json.loads((d / "metrics.json").read_text())["step"] == s
        assert (d / "ci_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert torch.load(d / "state.pt", weights_only=False)["step"] == s

    # Final model, metrics and heatmap in the run directory.
    meta = read_final_meta(run_dir)
    assert meta is not None and meta["steps"] == STEPS and meta["world_size"] == 1
    final_metrics = json.loads((run_dir / "decompose" / "metrics.json").read_text())
    assert final_metrics == {"step": STEPS, **meta["metrics"]}
    assert (run_dir / "decompose" / "ci_heatmap.png").stat().st_size > 0

    # TMS 5-2 is recovered, although the run was killed and resumed on the way.
    q = _quality(meta["metrics"])
    for m in ("linear1", "linear2"):
        assert q[f"mmcs/{m}"] >= 0.99, q
        assert q[f"alive_onehot/{m}"] == 5, q

    # The saved model loads back: 5 live subcomponents per matrix on one-hot inputs.
    model = load_decomposition(run_dir)
    ci = model.causal_importances(one_hot_inputs(cfg.target, 0.75))
    assert {k: tuple(v.shape) for k, v in ci.items()} == {"linear1": (5, 20), "linear2": (5, 20)}
    alive = {m: int((g > cfg.decompose.ci_alive_threshold).any(0).sum()) for m, g in ci.items()}
    assert alive == {"linear1": 5, "linear2": 5}

    # Re-running the finished stage keeps the model instead of training again (no Ray needed).
    before = (run_dir / "decompose" / "final" / "model.pt").read_bytes()
    again = decompose_stage.run(cfg, run_dir)
    assert again["skipped"] and again["steps"] == STEPS
    assert (run_dir / "decompose" / "final" / "model.pt").read_bytes() == before


def test_two_workers_match_one_worker(ray_local, resumed_run: dict[str, Any],
                                      tmp_path: Path) -> None:
    one_dir = resumed_run["run_dir"]
    one = read_final_meta(one_dir)
    assert one is not None, "the 1-worker run did not finish"
    shutil.copytree(one_dir / "target", tmp_path / "target")  # the very same target model
    cfg = _cfg(num_workers=2)  # same global batch, half on each rank
    t0 = time.perf_counter()
    two = decompose_stage.run(cfg, tmp_path)
    print(f"\n2-worker fit of {STEPS} steps: {time.perf_counter() - t0:.1f} s")
    assert two["world_size"] == 2 and two["steps"] == STEPS
    q1, q2 = _quality(one["metrics"]), _quality(two["metrics"])
    for m in ("linear1", "linear2"):
        assert q2[f"alive_onehot/{m}"] == q1[f"alive_onehot/{m}"] == 5, (q1, q2)
        assert q2[f"mmcs/{m}"] >= 0.99 and abs(q2[f"mmcs/{m}"] - q1[f"mmcs/{m}"]) < 0.01, (q1, q2)


def test_ray_train_report_logger_is_quieted() -> None:
    """Ray Train's per-report INFO line (the whole metrics dict, every log_every steps) is
    silenced in workers; its logger is named by file path, which a dotted name misses."""
    import logging

    from ray.train.v2._internal.execution import context

    from scalespd.train.ray_train import _quiet_ray_train_reports

    context.logger.setLevel(logging.NOTSET)
    _quiet_ray_train_reports()
    assert not context.logger.isEnabledFor(logging.INFO)
    assert context.logger.isEnabledFor(logging.WARNING)
