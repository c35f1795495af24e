"""Choosing the checkpoint a decompose run resumes from, without starting Ray: damaged
snapshots and checkpoints are reported by path and moved aside, the newest valid checkpoint on
disk wins over Ray's lagging snapshot, and Ray Train's own checkpoint manager then starts.

The checkpoint folders here hold small stand-in states ({"step": n}): validation only needs
state.pt to load and to hold the step of its folder name."""

from __future__ import annotations

import errno
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

from scalespd.errors import StorageError, naming_file, storage_error
from scalespd.train.ray_train import (
    SNAPSHOT_FILE,
    STAGING_PREFIX,
    STATE_FILE,
    _initial_state,
    _storage_failure,
    checkpoint_root,
    find_resume_checkpoint,
    latest_checkpoint_step,
    prepare_resume,
    prune_untracked_checkpoints,
    snapshot_problem,
)


def _ckpt(run_dir: Path, step: int) -> Path:
    d = checkpoint_root(run_dir) / f"checkpoint_{step:07d}"
    d.mkdir(parents=True)
    torch.save({"step": step, "components": {"w": torch.full((3,), float(step))}},
               d / STATE_FILE)
    (d / "metrics.json").write_text(json.dumps({"step": step}))
    return d


def _snapshot(run_dir: Path, steps: list[int]) -> Path:
    """A checkpoint-manager snapshot as Ray Train writes it, listing `steps` (oldest first)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=f"checkpoint_{s:07d}",
                                    metrics={"step": s}) for s in steps]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(steps))),
        latest_checkpoint_result=results[-1] if results else None,
        pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(steps), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[])
    path = checkpoint_root(run_dir) / SNAPSHOT_FILE
    path.write_text(state.model_dump_json())
    return path


def _ray_checkpoint_manager(run_dir: Path):
    """Ray Train's checkpoint manager on this run's checkpoint folder, as a fit constructs it
    (it raises CheckpointManagerInitializationError on a snapshot it cannot use)."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        CheckpointManager,
    )
    from ray.train.v2._internal.execution.storage import StorageContext

    root = checkpoint_root(run_dir)
    storage = StorageContext(storage_path=str(root.parent), experiment_dir_name=root.name)
    return CheckpointManager(CheckpointConfig(num_to_keep=3), storage)


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


def _truncate_mid_string(path: Path) -> bytes:
    """Cut the file inside a JSON string, as a full disk cut Ray's snapshot at 4096 bytes."""
    text = path.read_bytes()
    cut = text.index(b'"checkpoint_0') + 8
    path.write_bytes(text[:cut])
    return text[:cut]


def test_truncated_snapshot_is_reported_moved_aside_and_ray_starts_fresh(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    for s in (100, 200, 300):
        _ckpt(tmp_path, s)
    snap = _snapshot(tmp_path, [100, 200, 300])
    cut = _truncate_mid_string(snap)
    # The reported failure: Ray Train refuses the run directory, naming no file.
    with pytest.raises(CheckpointManagerInitializationError, match="Unterminated string"):
        _ray_checkpoint_manager(tmp_path)

    with caplog.at_level(logging.WARNING, logger="scalespd.train.ray_train"):
        found = prepare_resume(tmp_path)
    assert found == (300, checkpoint_root(tmp_path) / "checkpoint_0000300")
    assert str(snap) in caplog.text and "damaged" in caplog.text
    assert not snap.exists()
    (moved,) = _aside(snap)
    assert moved.read_bytes() == cut  # kept as it was, never deleted
    assert _ray_checkpoint_manager(tmp_path).latest_checkpoint_result is None  # a fresh start


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage", "wrong_step"])
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_valid_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    for s in (100, 200, 300):
        _ckpt(tmp_path, s)
    snap = _snapshot(tmp_path, [100, 200, 300])
    newest = checkpoint_root(tmp_path) / "checkpoint_0000300"
    state = newest / STATE_FILE
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "missing":
        state.unlink()
    elif damage == "garbage":
        state.write_bytes(b"\0" * 4096)
    else:  # a state of another step under this name
        torch.save({"step": 250}, state)

    with caplog.at_level(logging.WARNING, logger="scalespd.train.ray_train"):
        assert latest_checkpoint_step(tmp_path) == 200
        found = prepare_resume(tmp_path)
    assert found == (200, checkpoint_root(tmp_path) / "checkpoint_0000200")
    assert str(newest) in caplog.text
    # Moved aside, not deleted: Ray's next checkpoint_0000300 must not land in it, and Ray must
    # not hand it out. Ray's snapshot lists it, so Ray would refuse that snapshot: moved too.
    assert not newest.exists() and len(_aside(newest)) == 1
    assert not snap.exists() and len(_aside(snap)) == 1
    assert str(snap) in caplog.text
    assert _ray_checkpoint_manager(tmp_path).latest_checkpoint_result is None


def test_checkpoint_newer_than_the_snapshot_is_resumed_from(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ray's snapshot lags the folders: checkpoint_0000300 was written, then the run stopped
    before Ray's controller recorded it. The resume starts from it, not from 200."""
    for s in (100, 200, 300):
        _ckpt(tmp_path, s)
    snap = _snapshot(tmp_path, [100, 200])
    before = snap.read_bytes()
    with caplog.at_level(logging.WARNING, logger="scalespd.train.ray_train"):
        found = prepare_resume(tmp_path)
    assert found is not None and found[0] == 300
    assert not caplog.records  # nothing is damaged
    assert snap.read_bytes() == before  # Ray keeps its record of 100 and 200

    manager = _ray_checkpoint_manager(tmp_path)
    ray_ckpt = manager.latest_checkpoint_result.checkpoint
    assert Path(ray_ckpt.path).name == "checkpoint_0000200"
    # The worker: Ray's checkpoint is older than the driver's pick, so the pick wins...
    resume = {"step": found[0], "path": str(found[1])}
    state, name = _initial_state(ray_ckpt, resume, torch.device("cpu"))
    assert (state["step"], name) == (300, "checkpoint_0000300")
    # ...unless Ray restarted the workers within this fit after newer reports.
    newer = _ckpt(tmp_path, 400)
    from ray.train import Checkpoint

    state, name = _initial_state(Checkpoint.from_directory(str(newer)), resume,
                                 torch.device("cpu"))
    assert (state["step"], name) == (400, "checkpoint_0000400")
    assert _initial_state(None, None, torch.device("cpu")) == (None, None)


def test_snapshot_listing_a_missing_checkpoint_is_moved_aside(tmp_path: Path) -> None:
    for s in (100, 200):
        _ckpt(tmp_path, s)
    snap = _snapshot(tmp_path, [100, 200, 300])  # 300 was deleted by hand
    assert "checkpoint_0000300" in snapshot_problem(snap)
    assert prepare_resume(tmp_path)[0] == 200
    assert not snap.exists() and _aside(snap)
    _ray_checkpoint_manager(tmp_path)  # starts


def test_no_checkpoint_and_stale_staging_folders(tmp_path: Path) -> None:
    assert prepare_resume(tmp_path) is None
    staging = checkpoint_root(tmp_path) / f"{STAGING_PREFIX}checkpoint_0000100-123"
    staging.mkdir(parents=True)
    (staging / STATE_FILE).write_bytes(b"partial")
    assert prepare_resume(tmp_path) is None and latest_checkpoint_step(tmp_path) is None
    assert not staging.exists()  # a partial write of a killed run, ours alone


def test_untracked_checkpoints_are_pruned_after_the_fit(tmp_path: Path) -> None:
    for s in (300, 800, 900, 1000):
        _ckpt(tmp_path, s)
    damaged = checkpoint_root(tmp_path) / "checkpoint_0000200.damaged-20260101T000000"
    damaged.mkdir()
    _snapshot(tmp_path, [800, 900, 1000])
    prune_untracked_checkpoints(tmp_path)
    left = sorted(p.name for p in checkpoint_root(tmp_path).iterdir() if p.is_dir())
    assert left == ["checkpoint_0000200.damaged-20260101T000000", "checkpoint_0000800",
                    "checkpoint_0000900", "checkpoint_0001000"]
    assert find_resume_checkpoint(tmp_path)[0] == 1000


def test_storage_failures_of_a_fit_become_one_storage_error(tmp_path: Path) -> None:
    from ray.train import ControllerError, WorkerGroupError

    named = StorageError("/x/state.pt: the disk is full", errno.ENOSPC, "/x/state.pt")
    # It travels from the worker pickled: errno and file name survive.
    back = pickle.loads(pickle.dumps(named))
    assert (str(back), back.errno, back.filename) == (str(named), errno.ENOSPC, "/x/state.pt")
    err = WorkerGroupError("rank 0 failed", {0: back})
    assert _storage_failure(err, tmp_path) is back

    # Ray's controller writing its snapshot: pyarrow's OSError names no file.
    pyarrow_err = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28]")
    user = _storage_failure(ControllerError(pyarrow_err), tmp_path)
    assert user is not None and user.filename == str(tmp_path)
    assert str(user).startswith(f"{tmp_path}: the disk is full")

    assert _storage_failure(WorkerGroupError("bug", {0: ValueError("x")}), tmp_path) is None


def test_naming_file_names_the_file_of_a_failed_write(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info, naming_file(tmp_path / "state.pt"):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write()/close() raise it
    assert info.value.filename == str(tmp_path / "state.pt") and info.value.errno == errno.ENOSPC
    assert str(storage_error(info.value)).startswith(f"{tmp_path / 'state.pt'}: the disk is full")
    with pytest.raises(FileNotFoundError) as info, naming_file(tmp_path / "other"):
        open(tmp_path / "missing")  # noqa: SIM115  (already named: kept as it is)
    assert info.value.filename == str(tmp_path / "missing")


def test_ctrl_c_during_fit_aborts_the_controller_then_raises_keyboard_interrupt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer launch() uses replaces Ray's SIGINT handler (which ends in sys.exit): the
    first Ctrl-C asks the controller to stop the workers and raises KeyboardInterrupt; another
    one while that waits raises at once."""
    import os
    import signal
    import time

    import ray
    import ray.train

    from scalespd.train.ray_train import _interruptible_trainer_class

    aborts: list[str] = []

    class FakeController:  # the actor handle fit() passes to the handler
        class abort:  # noqa: N801
            @staticmethod
            def remote() -> str:
                aborts.append("abort")
                return "ref"

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: None)
    trainer = _interruptible_trainer_class()(
        lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer._register_sigint_handler(FakeController())
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs (and raises) within the sleep
        assert trainer.interrupted and aborts == ["abort"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert aborts == ["abort"]  # asked once
        trainer.abort()
        assert aborts == ["abort"]
    finally:
        signal.signal(signal.SIGINT, previous)
