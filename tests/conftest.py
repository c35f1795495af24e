"""Shared fixtures. One in-process Ray per test session: starting Ray costs ~6 s."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalespd import raytools
from scalespd import run as runmod
from scalespd.config import RunConfig

# memory:// and s3:// run directories (the S3 server starts only for tests that ask for it).
pytest_plugins = ["tests.object_stores"]

# Two cores: keep torch from oversubscribing them when Ray workers also run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every Ray the tests start (in-process, `ray start`, CLI subprocesses) polls Ray Train's
# workers as often as the local Ray that scalespd starts does (scalespd/raytools.py).
os.environ.setdefault(raytools.TRAIN_POLL_ENV, raytools.LOCAL_TRAIN_POLL_S)


def start_test_ray() -> None:
    """The tests' local Ray: the machine's 2 CPUs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500_000_000,
             log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray shared by every test that schedules Ray work (a test that needs another Ray
    restarts this one when it is done)."""
    import ray

    if not ray.is_initialized():
        start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in stage modules (each writes run_dir/<stage>/done.txt and records its call), so
    the orchestrator is tested independently of the real stages."""
    calls: list[str] = []
    for stage in runmod.STAGES:
        mod = types.ModuleType(f"fake_{stage}")

        def run(cfg: RunConfig, run_dir: Path, _stage: str = stage) -> dict:
            calls.append(_stage)
            out = run_dir / _stage
            out.mkdir(exist_ok=True)
            (out / "done.txt").write_text(str(len(calls)))
            return {"ok": True}

        mod.run = run  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, f"fake_{stage}", mod)
        monkeypatch.setitem(runmod.STAGE_MODULES, stage, f"fake_{stage}")
    monkeypatch.setattr(runmod, "validate_run", lambda cfg, stages=(): None)
    return calls


@pytest.fixture(scope="module")
def hf_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the Arrow caches of a module's small files out of the user's HF cache. (datasets
    is imported here, not at the top: tests/targets/test_targets_lm.py sets the environment
    before datasets first reads it.)"""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE",
                   str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield
