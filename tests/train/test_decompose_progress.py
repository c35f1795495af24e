"""The driver's progress bar of SPD training, fed by rank 0's decompose/progress.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from scalespd import progress
from scalespd.train import ray_train


def test_rank0_progress_file_and_the_driver_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ray_train.decompose_dir(tmp_path).mkdir(parents=True)
    ray_train.write_progress(tmp_path, 40, 100)
    path = ray_train.decompose_dir(tmp_path) / ray_train.PROGRESS_FILE
    assert json.loads(path.read_text()) == {"step": 40, "steps": 100}
    assert [p.name for p in path.parent.iterdir()] == [ray_train.PROGRESS_FILE]  # no temp left

    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with ray_train._ProgressBar(tmp_path, 100):
        time.sleep(1.5)
    err = capsys.readouterr().err
    assert "decompose steps" in err and "40/100" in err


def test_no_bar_off_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ray_train._ProgressBar(tmp_path, 100) as bar:
        assert bar.thread is None
    assert capsys.readouterr().err == ""
