"""The orchestrator's bookkeeping (skip, --force, stale configs), with stand-in stage modules so
it is tested independently of the real stages."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from scalespd import run as runmod
from scalespd.config import RunConfig, parse_config


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
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
    monkeypatch.setattr(runmod, "validate_run", lambda cfg: None)
    return calls


def test_runs_all_then_skips(tmp_path: Path, fake_stages: list[str]) -> None:
    cfg = RunConfig()
    runmod.run_pipeline(cfg, tmp_path)
    assert fake_stages == list(runmod.STAGES)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "complete" for s in runmod.STAGES)
    assert "torch" in manifest["versions"]
    fake_stages.clear()
    runmod.run_pipeline(cfg, tmp_path)
    assert fake_stages == []


def test_force_redoes_stage_and_later_ones(tmp_path: Path, fake_stages: list[str]) -> None:
    cfg = RunConfig()
    runmod.run_pipeline(cfg, tmp_path)
    fake_stages.clear()
    runmod.run_pipeline(cfg, tmp_path, force=["graph"])
    assert fake_stages == ["graph", "spectral", "report"]


def test_stages_subset(tmp_path: Path, fake_stages: list[str]) -> None:
    runmod.run_pipeline(RunConfig(), tmp_path, stages=["target", "decompose"])
    assert fake_stages == ["target", "decompose"]


def test_changed_config_is_refused_then_forced(tmp_path: Path, fake_stages: list[str]) -> None:
    runmod.run_pipeline(RunConfig(), tmp_path)
    before = (tmp_path / "config.yaml").read_text()
    changed = parse_config({"spectral": {"k_max": 5}})
    with pytest.raises(runmod.RunDirError, match="different config"):
        runmod.run_pipeline(changed, tmp_path)
    assert (tmp_path / "config.yaml").read_text() == before
    assert (tmp_path / "spectral" / "done.txt").exists()
    fake_stages.clear()
    runmod.run_pipeline(changed, tmp_path, force=["spectral"])
    assert fake_stages == ["spectral", "report"]
    assert (tmp_path / "config.previous.yaml").read_text() == before


def test_interrupted_stage_reruns(tmp_path: Path, fake_stages: list[str]) -> None:
    graph_mod = sys.modules["fake_graph"]
    real_run = graph_mod.run

    def boom(cfg: RunConfig, run_dir: Path) -> dict:
        raise KeyboardInterrupt

    graph_mod.run = boom
    with pytest.raises(KeyboardInterrupt):
        runmod.run_pipeline(RunConfig(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["graph"]["status"] == "running"
    graph_mod.run = real_run
    fake_stages.clear()
    runmod.run_pipeline(RunConfig(), tmp_path)
    assert fake_stages == ["graph", "spectral", "report"]


def test_missing_stage_package_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runmod.STAGE_MODULES, "report", "scalespd.no_such_stage")
    with pytest.raises(runmod.StageNotBuilt, match="not built yet"):
        runmod.load_stage("report")
