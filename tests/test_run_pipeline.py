"""The orchestrator's bookkeeping (skip, --force, stale configs), with stand-in stage modules so
it is tested independently of the real stages. Every test runs with the run directory on a local
disk, on memory:// and on s3:// (a local S3 server): the same rules hold on every store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scalespd import run as runmod
from scalespd.config import RunConfig, parse_config


@pytest.fixture(params=["local", "memory", "s3"])
def tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder each test works in, on each kind of store (shadows pytest's own tmp_path)."""
    if request.param == "local":
        return tmp_path_factory.mktemp("run")
    return request.getfixturevalue(f"{request.param}_dir")


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
    assert fake_stages == ["graph", "spectral", "evaluate", "report"]


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
    assert fake_stages == ["spectral", "evaluate", "report"]
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
    assert manifest["stages"]["graph"]["status"] == "interrupted"
    graph_mod.run = real_run
    fake_stages.clear()
    runmod.run_pipeline(RunConfig(), tmp_path)
    assert fake_stages == ["graph", "spectral", "evaluate", "report"]



def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_foreign_directory_is_refused_untouched(tmp_path: Path, fake_stages: list[str]) -> None:
    """A user's folder (their own config.yaml, notes) is not a run directory: refused, and
    not one byte changes (config.yaml used to be moved to config.previous.yaml)."""
    user = tmp_path / "userdir"
    (user / "report").mkdir(parents=True)
    (user / "config.yaml").write_text("my: notes\n")
    (user / "report" / "notes.txt").write_text("keep me")
    before = _tree(user)
    with pytest.raises(runmod.RunDirError, match="holds no scalespd manifest.json"):
        runmod.run_pipeline(RunConfig(), user)
    with pytest.raises(runmod.RunDirError, match="holds no scalespd manifest.json"):
        runmod.run_pipeline(RunConfig(), user, force=["report"])
    assert _tree(user) == before
    assert fake_stages == []


def test_a_manifest_that_is_not_scalespd_is_refused(tmp_path: Path,
                                                    fake_stages: list[str]) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "something-else", "stages": {}}')
    with pytest.raises(runmod.RunDirError, match="not a scalespd manifest"):
        runmod.run_pipeline(RunConfig(), tmp_path)
    (tmp_path / "manifest.json").write_text('{"stages": ')
    with pytest.raises(runmod.RunDirError, match="not valid JSON"):
        runmod.run_pipeline(RunConfig(), tmp_path)
    assert fake_stages == []


def test_force_removes_only_what_scalespd_wrote(tmp_path: Path, fake_stages: list[str]) -> None:
    runmod.run_pipeline(RunConfig(), tmp_path)
    (tmp_path / "report" / "notes.txt").write_text("the user's notes")
    fake_stages.clear()
    runmod.run_pipeline(RunConfig(), tmp_path, force=["report"])
    assert fake_stages == ["report"]
    assert (tmp_path / "report" / "notes.txt").read_text() == "the user's notes"
    rec = _manifest(tmp_path)["stages"]["report"]
    assert rec["status"] == "complete"
    assert rec["files"] == ["done.txt"] and rec["foreign"] == ["notes.txt"]
    # Forcing again still keeps the foreign file and records it as not scalespd's.
    runmod.run_pipeline(RunConfig(), tmp_path, force=["report"])
    assert (tmp_path / "report" / "notes.txt").exists()


def test_changed_config_is_refused_without_config_yaml(tmp_path: Path,
                                                       fake_stages: list[str]) -> None:
    """The per-stage hashes in the manifest guard the outputs even when config.yaml is gone."""
    runmod.run_pipeline(RunConfig(), tmp_path)
    (tmp_path / "config.yaml").unlink()
    before = _tree(tmp_path)
    fake_stages.clear()
    changed = parse_config({"graph": {"k": 5}})
    with pytest.raises(runmod.RunDirError, match=r"different config \(stages \['graph', "):
        runmod.run_pipeline(changed, tmp_path)
    assert fake_stages == [] and _tree(tmp_path) == before


def test_interrupted_forced_stage_leaves_no_stale_later_stage(
        tmp_path: Path, fake_stages: list[str]) -> None:
    """A kill during `--force profiles` used to leave graph..report "complete" for the old
    profiles (and the old report on disk)."""
    runmod.run_pipeline(RunConfig(), tmp_path)
    profiles_mod = sys.modules["fake_profiles"]
    real_run = profiles_mod.run

    def interrupted(cfg: RunConfig, run_dir: Path) -> dict:
        (run_dir / "profiles").mkdir(exist_ok=True)
        (run_dir / "profiles" / "partial.bin").write_text("half")
        raise KeyboardInterrupt

    profiles_mod.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        runmod.run_pipeline(RunConfig(), tmp_path, force=["profiles"])
    stages = _manifest(tmp_path)["stages"]
    assert stages["target"]["status"] == stages["decompose"]["status"] == "complete"
    assert stages["profiles"]["status"] == "interrupted"
    for s in ("graph", "spectral", "evaluate", "report"):
        assert stages[s]["status"] == "invalidated", stages[s]
        assert not (tmp_path / s).exists()

    profiles_mod.run = real_run
    fake_stages.clear()
    runmod.run_pipeline(RunConfig(), tmp_path)  # no --force needed: it resumes at profiles
    assert fake_stages == ["profiles", "graph", "spectral", "evaluate", "report"]
    assert (tmp_path / "profiles" / "partial.bin").exists()  # resume keeps partial outputs


def test_failed_stage_is_recorded_with_its_error(tmp_path: Path, fake_stages: list[str]) -> None:
    def broken(cfg: RunConfig, run_dir: Path) -> dict:
        raise RuntimeError("boom in graph")

    sys.modules["fake_graph"].run = broken
    with pytest.raises(RuntimeError, match="boom in graph"):
        runmod.run_pipeline(RunConfig(), tmp_path)
    rec = _manifest(tmp_path)["stages"]["graph"]
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: boom in graph"
    assert "spectral" not in _manifest(tmp_path)["stages"]


def test_finished_run_is_reopened_without_writing(
        tmp_path: Path, fake_stages: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete run on a read-only mount can be re-opened: nothing is rewritten."""
    runmod.run_pipeline(RunConfig(), tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def no_writes(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "manifest.json"))

    monkeypatch.setattr(runmod, "write_json_atomic", no_writes)
    monkeypatch.setattr(runmod, "write_text_atomic", no_writes)
    fake_stages.clear()
    manifest = runmod.run_pipeline(RunConfig(), tmp_path)
    assert fake_stages == []
    assert all(r["status"] == "complete" for r in manifest.data["stages"].values())
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_stage_without_its_inputs_is_refused(tmp_path: Path, fake_stages: list[str]) -> None:
    with pytest.raises(runmod.RunDirError, match="stage 'spectral' needs 'target'"):
        runmod.run_pipeline(RunConfig(), tmp_path / "fresh", stages=["spectral"])
    assert not (tmp_path / "fresh").exists() and fake_stages == []
    runmod.run_pipeline(RunConfig(), tmp_path, stages=["target", "decompose", "profiles"])
    with pytest.raises(runmod.RunDirError, match="needs 'graph'.*add graph to --stages"):
        runmod.run_pipeline(RunConfig(), tmp_path, stages=["spectral"])


def test_run_dir_that_is_a_file(tmp_path: Path, fake_stages: list[str]) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(runmod.RunDirError, match="is a file"):
        runmod.run_pipeline(RunConfig(), tmp_path / "f")
    with pytest.raises(runmod.RunDirError, match="lies under the file"):
        runmod.run_pipeline(RunConfig(), tmp_path / "f" / "run")
