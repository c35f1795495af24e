"""The decompose stage under faults, end to end: Ctrl-C through the CLI, a full disk, a damaged
Ray Train snapshot, a truncated newest checkpoint and a snapshot that lags the checkpoint
folders. Every interrupted or failed run, re-run, finishes with exactly the model of an
undisturbed run (the trainer's random streams are a function of the step).

TorchTrainer fits are shared between tests (each spends ~15 s starting its workers):
* `interrupted`: `python -m scalespd.run` gets SIGINT (to its process group, as a terminal
  sends it) once three checkpoints are on disk; `cli_rerun` then runs the same command again.
* `disk_full`: a copy of the interrupted run directory on a small tmpfs; the disk fills up
  while decompose runs (StorageError); then space is freed, Ray's snapshot is cut in the middle
  of a string and the newest state.pt truncated, and the stage runs again to the end.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import fill_until_full, pgroup_alive

from scalespd.config import RunConfig, parse_config, save_config
from scalespd.errors import INTERRUPTED_MESSAGE, StorageError
from scalespd.targets import load_target
from scalespd.train import stage as decompose_stage
from scalespd.train.io import final_dir, model_state
from scalespd.train.ray_train import (
    CHECKPOINTS_TO_KEEP,
    SNAPSHOT_FILE,
    checkpoint_dirs,
    checkpoint_problem,
    checkpoint_root,
    find_resume_checkpoint,
    snapshot_checkpoints,
)

REPO = Path(__file__).resolve().parents[2]
TARGET = {"kind": "tms", "n_features": 5, "n_hidden": 2,
          "train": {"steps": 3000, "batch_size": 1024, "schedule": {"lr": 0.005}}}
# Short steps between checkpoints, so that the faults land between checkpoints of one run.
DECOMPOSE = {"steps": 1000, "batch_size": 512, "eval_batch_size": 1024,
             "schedule": {"lr": 0.003, "fn": "cosine", "final_frac": 0.0},
             "save_every": 100, "log_every": 50}
STEPS = DECOMPOSE["steps"]
LOGGER = "scalespd.train.ray_train"


def _cfg() -> RunConfig:
    return parse_config({"name": "resume_faults", "target": TARGET, "decompose": DECOMPOSE})


def _steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(s for s, _ in checkpoint_dirs(run_dir))


def _attempts(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "decompose" / "attempts.jsonl").open()]


def _drop_from_snapshot(run_dir: Path, name: str) -> None:
    """Rewrite Ray's snapshot as it was before Ray recorded checkpoint `name` (its lag behind
    the folders, made certain instead of left to timing)."""
    path = checkpoint_root(run_dir) / SNAPSHOT_FILE
    data = json.loads(path.read_text())
    keep = [i for i, r in enumerate(data["checkpoint_results"])
            if r["checkpoint_dir_name"] != name]
    data["checkpoint_results"] = [data["checkpoint_results"][i] for i in keep]
    data["checkpoint_report_indices"] = [data["checkpoint_report_indices"][i] for i in keep]
    data["latest_checkpoint_result"] = (data["checkpoint_results"][-1]
                                        if data["checkpoint_results"] else None)
    path.write_text(json.dumps(data))


def _final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(final_dir(run_dir) / "model.pt", weights_only=True)


def _assert_same_model(got: dict[str, Any], want: dict[str, Any]) -> None:
    for part in ("components", "ci_fns"):
        assert got[part].keys() == want[part].keys()
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), f"{part}.{k} differs from the undisturbed run"


# --------------------------------------------------------------------------------------------
# Ctrl-C through the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m scalespd.run ... --stages target decompose`, SIGINT to its process group once
    checkpoint_0000300 is on disk. Also returns a copy of the run directory as it was left."""
    tmp = tmp_path_factory.mktemp("ctrl_c")
    cfg_path = tmp / "cfg.yaml"
    save_config(_cfg(), cfg_path)
    run_dir = tmp / "run"
    ray_tmp = tempfile.mkdtemp(prefix="srf_", dir="/tmp")  # this driver's own local Ray
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "scalespd.run", str(cfg_path), "--run-dir", str(run_dir),
           "--stages", "target", "decompose"]
    try:
        with open(tmp / "first.out", "w") as out, open(tmp / "first.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                                    start_new_session=True)
            deadline = time.monotonic() + 400
            while not (checkpoint_root(run_dir) / "checkpoint_0000300").is_dir():
                assert proc.poll() is None, (tmp / "first.err").read_text()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint_0000300 after 400 s"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            try:
                rc = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail("the interrupted run did not exit within 120 s of SIGINT")
        deadline = time.monotonic() + 30
        while (left := pgroup_alive(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    found = find_resume_checkpoint(run_dir)
    assert found is not None, "no valid checkpoint after the interrupt"
    newest = found[0]
    # Ray's snapshot usually lags the folders already; make sure it does.
    _drop_from_snapshot(run_dir, found[1].name)
    copy = tmp / "copy"
    shutil.copytree(run_dir, copy, symlinks=True)
    return {"tmp": tmp, "cmd": cmd, "run_dir": run_dir, "copy": copy, "rc": rc, "left": left,
            "stderr": (tmp / "first.err").read_text(), "newest": newest,
            "snapshot": snapshot_checkpoints(run_dir)}


@pytest.fixture(scope="module")
def cli_rerun(interrupted: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    ray_tmp = tempfile.mkdtemp(prefix="srf_", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run(interrupted["cmd"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def undisturbed(interrupted: dict[str, Any]) -> dict[str, Any]:
    """The final model of an uninterrupted decomposition of the same target, trained in this
    process as a Ray Train worker trains it (one rank, one thread)."""
    from scalespd.train.trainer import SPDTrainer

    target, target_cfg = load_target(interrupted["copy"] / "target")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = SPDTrainer(target, target_cfg, _cfg().decompose, device="cpu")
        trainer.faithfulness_warmup()
        while trainer.step < STEPS:
            trainer.train_step()
    finally:
        torch.set_num_threads(threads)
    return model_state(trainer.model)


def test_ctrl_c_exits_130_and_says_how_to_resume(interrupted: dict[str, Any]) -> None:
    assert not interrupted["left"], f"processes survive the Ctrl-C: {interrupted['left']}"
    stderr = interrupted["stderr"]
    assert INTERRUPTED_MESSAGE in stderr, stderr[-3000:]
    assert interrupted["rc"] == 130, stderr[-3000:]
    manifest = json.loads((interrupted["copy"] / "manifest.json").read_text())
    assert manifest["stages"]["decompose"]["status"] == "interrupted"
    assert interrupted["newest"] < STEPS


def test_rerun_after_ctrl_c_resumes_from_the_newest_checkpoint_on_disk(
        interrupted: dict[str, Any], cli_rerun: subprocess.CompletedProcess[str],
        undisturbed: dict[str, Any]) -> None:
    res = cli_rerun
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    newest = interrupted["newest"]
    # The checkpoint folder was on disk, Ray's snapshot did not list it: resumed from it.
    listed = [int(n.split("_")[1]) for n in interrupted["snapshot"] or []]
    assert all(s < newest for s in listed), (listed, newest)
    run_dir = interrupted["run_dir"]
    attempts = _attempts(run_dir)
    assert [(a["start_step"], a["resumed"]) for a in attempts] == [(0, False), (newest, True)]
    info = json.loads((run_dir / "manifest.json").read_text())["stages"]["decompose"]
    assert info["status"] == "complete" and info["info"]["resumed_from_step"] == newest
    _assert_same_model(_final_state(run_dir), undisturbed)
    # Ray keeps its newest three; the one resumed from without Ray knowing it is gone too.
    assert _steps_on_disk(run_dir) == [800, 900, 1000]


# --------------------------------------------------------------------------------------------
# A full disk, then a damaged snapshot and a truncated newest checkpoint
# --------------------------------------------------------------------------------------------


class _Fault:
    """A file system that can fill up: a small tmpfs when this process may mount one (root);
    otherwise the run directory's checkpoint folder made read-only (EACCES instead of ENOSPC)."""

    def __init__(self, base: Path) -> None:
        self.mount = base / "fs"
        self.mount.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(self.mount)],
                           capture_output=True, text=True)
        self.kind = "full" if r.returncode == 0 else "read_only"
        if self.kind == "read_only" and os.geteuid() == 0:
            pytest.skip(f"cannot mount a tmpfs to fill ({r.stderr.strip()}), and as root a "
                        "read-only folder does not fail writes")
        self.ballast = self.mount / "ballast"
        self.locked: Path | None = None

    def inject(self, run_dir: Path) -> None:
        if self.kind == "full":
            fill_until_full(self.ballast)
        else:
            self.locked = checkpoint_root(run_dir)
            self.locked.chmod(0o555)

    def repair(self) -> None:
        if self.kind == "full":
            self.ballast.unlink()
        elif self.locked is not None:
            self.locked.chmod(0o755)

    def close(self) -> None:
        if self.kind == "full":
            r = subprocess.run(["umount", str(self.mount)], capture_output=True)
            if r.returncode != 0:  # still busy (a process of Ray's): detach it anyway
                subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        else:
            self.repair()


@pytest.fixture(scope="module")
def disk_full(ray_local, interrupted: dict[str, Any],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("disk_full")
    fault = _Fault(tmp)
    try:
        run_dir = fault.mount / "run"
        shutil.copytree(interrupted["copy"], run_dir, symlinks=True)
        start = find_resume_checkpoint(run_dir)[0]
        cfg = _cfg()

        # The disk fills up once the resumed run has written one more checkpoint.
        stop = threading.Event()

        def fill_after_next_checkpoint() -> None:
            while not stop.is_set():
                if any(s > start for s in _steps_on_disk(run_dir)):
                    fault.inject(run_dir)
                    return
                time.sleep(0.02)

        sigint_before = signal.getsignal(signal.SIGINT)
        watcher = threading.Thread(target=fill_after_next_checkpoint, daemon=True)
        watcher.start()
        try:
            with pytest.raises(StorageError) as failed:
                decompose_stage.run(cfg, run_dir)
        finally:
            stop.set()
            watcher.join()
        # fit() installs a Ctrl-C handler bound to its controller; launch() puts ours back.
        assert signal.getsignal(signal.SIGINT) is sigint_before
        after_fault = {s: checkpoint_problem(p) for s, p in checkpoint_dirs(run_dir)}
        fault.repair()

        # Then, before the re-run: Ray's snapshot cut inside a string (as a full disk leaves
        # it) and the newest checkpoint's state.pt truncated.
        snapshot = checkpoint_root(run_dir) / SNAPSHOT_FILE
        text = snapshot.read_bytes()
        cut = text[: text.index(b'"checkpoint_0') + 9]
        snapshot.write_bytes(cut)
        (newest, newest_dir), (previous, _) = checkpoint_dirs(run_dir)[:2]
        state = newest_dir / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger(LOGGER).addHandler(handler)
        try:
            summary = decompose_stage.run(cfg, run_dir)
        finally:
            logging.getLogger(LOGGER).removeHandler(handler)
        assert signal.getsignal(signal.SIGINT) is sigint_before
        yield {"run_dir": run_dir, "kind": fault.kind, "error": failed.value, "start": start,
               "after_fault": after_fault, "snapshot": snapshot, "cut": cut,
               "newest_dir": newest_dir, "newest": newest, "previous": previous,
               "summary": summary, "warnings": [r.getMessage() for r in records],
               "final": _final_state(run_dir)}
    finally:
        fault.close()


def _rerun_checkpoints(resumed_from: int) -> list[int]:
    """The checkpoints a run resumed from step `resumed_from` writes and Ray Train keeps (its
    newest CHECKPOINTS_TO_KEEP). Where the disk filled, and so where the re-run resumes, depends
    on how fast the machine trains; [800, 900, 1000] when it resumes from 700 or earlier."""
    every = DECOMPOSE["save_every"]
    return list(range(resumed_from + every, STEPS + 1, every))[-CHECKPOINTS_TO_KEEP:]


def test_disk_full_during_decompose_is_one_storage_error_naming_the_file(
        disk_full: dict[str, Any]) -> None:
    err, run_dir = disk_full["error"], disk_full["run_dir"]
    assert err.filename is not None and Path(err.filename).is_relative_to(run_dir), err
    assert "\n" not in str(err) and str(err).startswith(err.filename)
    if disk_full["kind"] == "full":
        assert err.errno == errno.ENOSPC and "the disk is full" in str(err)
    else:
        assert err.errno == errno.EACCES
    # Checkpoint folders appear complete or not at all: every one left is valid.
    assert disk_full["after_fault"] and not any(disk_full["after_fault"].values()), \
        disk_full["after_fault"]
    assert max(disk_full["after_fault"]) > disk_full["start"]


def test_damaged_snapshot_is_reported_moved_aside_and_the_run_finishes(
        disk_full: dict[str, Any]) -> None:
    snapshot = disk_full["snapshot"]
    assert any(str(snapshot) in w and "damaged" in w for w in disk_full["warnings"]), \
        disk_full["warnings"]
    moved = list(snapshot.parent.glob(f"{SNAPSHOT_FILE}.damaged-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == disk_full["cut"]
    # Ray's fresh snapshot: the re-run's own checkpoints, the newest CHECKPOINTS_TO_KEEP.
    assert snapshot_checkpoints(disk_full["run_dir"]) == [
        f"checkpoint_{s:07d}" for s in _rerun_checkpoints(disk_full["previous"])]
    assert disk_full["summary"]["steps"] == STEPS


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(
        disk_full: dict[str, Any]) -> None:
    newest_dir, previous = disk_full["newest_dir"], disk_full["previous"]
    assert any(str(newest_dir) in w for w in disk_full["warnings"]), disk_full["warnings"]
    attempts = _attempts(disk_full["run_dir"])
    assert attempts[-1]["start_step"] == previous and attempts[-1]["resumed"]
    assert disk_full["summary"]["resumed_from_step"] == previous
    assert list(newest_dir.parent.glob(f"{newest_dir.name}.damaged-*"))


def test_rerun_after_disk_full_equals_the_undisturbed_run(
        disk_full: dict[str, Any], undisturbed: dict[str, Any]) -> None:
    _assert_same_model(disk_full["final"], undisturbed)
    # Only what Ray's fresh snapshot tracks stays: the folder the re-run resumed from and older
    # ones are pruned once it is superseded.
    assert _steps_on_disk(disk_full["run_dir"]) == _rerun_checkpoints(disk_full["previous"])
    assert not list(checkpoint_root(disk_full["run_dir"]).glob(".staging-*"))
