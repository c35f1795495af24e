"""`python -m scalespd.run` as a user meets it: bad configs stop with exit code 2 and a message
naming the problem before any work starts, an existing run directory is never overwritten
with a different config unless forced, and `--stages` selects stages."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scalespd import run as runmod

REPO = Path(__file__).resolve().parents[1]

TINY_TARGET = {"kind": "tms", "n_features": 5, "n_hidden": 2,
               "train": {"steps": 200, "batch_size": 256, "schedule": {"lr": 0.005}}}


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = runmod.main(argv)
    return rc, capsys.readouterr().err


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_unknown_key_exits_2_before_any_work(tmp_path: Path) -> None:
    """Through the real entry point: exit status 2, the key named, no run directory made."""
    cfg = _write(tmp_path, {"decompose": {"stepz": 10}})
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "scalespd.run", str(cfg), "--run-dir",
                          str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "decompose.stepz: unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"graph": {"k": "ten"}}, "graph.k"),
        ({"decompose": {"steps": 1.5}}, "decompose.steps"),
        ({"decompose": {"modules": [{"pattern": "linear1", "C": 0}]}}, "decompose.modules.0.C"),
        ({"decompose": {"modules": [{"pattern": "linear1", "C": -3}]}}, "decompose.modules.0.C"),
        ({"target": TINY_TARGET, "decompose": {"modules": [{"pattern": "linear1", "C": 4},
                                                           {"pattern": "mlp_*", "C": 4}]}},
         "'mlp_*' matches no decomposable module"),
        ({"target": TINY_TARGET, "decompose": {"modules": [{"pattern": "linear1", "C": 4},
                                                           {"pattern": "linear2", "C": 3}]}},
         "need the same C"),
    ],
    ids=["wrong-type", "float-for-int", "C-zero", "C-negative", "pattern-matches-nothing",
         "tied-modules-different-C"],
)
def test_bad_config_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             data: dict, expected: str) -> None:
    run_dir = tmp_path / "run"
    rc, err = _main([str(_write(tmp_path, data)), "--run-dir", str(run_dir)], capsys)
    assert rc == 2
    assert expected in err
    assert not run_dir.exists()  # nothing was started


def test_stages_selection_and_no_overwrite_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    first = _write(tmp_path, {"target": TINY_TARGET}, "first.yaml")
    rc, err = _main([str(first), "--run-dir", str(run_dir), "--stages", "target"], capsys)
    assert rc == 0, err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["target"]
    assert manifest["stages"]["target"]["status"] == "complete"
    assert (run_dir / "target" / "model.pt").is_file()
    assert not (run_dir / "decompose").exists()

    # Same run directory, a different target: refused, and not one byte changes.
    before = _tree_digest(run_dir)
    changed = _write(tmp_path, {"target": {**TINY_TARGET, "seed": 7}}, "changed.yaml")
    rc, err = _main([str(changed), "--run-dir", str(run_dir), "--stages", "target"], capsys)
    assert rc == 2
    assert "different config" in err and "--force" in err
    assert _tree_digest(run_dir) == before

    # --force target redoes it with the new config (and keeps the old config snapshot).
    rc, err = _main([str(changed), "--run-dir", str(run_dir), "--stages", "target",
                     "--force", "target"], capsys)
    assert rc == 0, err
    assert json.loads((run_dir / "target" / "meta.json").read_text())["config"]["seed"] == 7
    assert yaml.safe_load((run_dir / "config.previous.yaml").read_text())["target"]["seed"] == 0


def test_more_workers_than_local_cpus_is_a_clear_error(
        ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a local Ray, Ray Train would wait forever for CPUs that do not exist."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = int(ray_local.cluster_resources()["CPU"])
    cfg = _write(tmp_path, {"target": TINY_TARGET,
                            "decompose": {"num_workers": cpus + 2, "batch_size": 64 * (cpus + 2),
                                          "steps": 10}})
    run_dir = tmp_path / "run"
    rc, err = _main([str(cfg), "--run-dir", str(run_dir), "--stages", "target", "decompose"],
                    capsys)
    assert rc == 2
    assert "decompose.num_workers" in err and f"local Ray has {cpus}" in err
    assert not (run_dir / "decompose" / "ray").exists()


# --------------------------------------------------------------------------------------------
# Failures a user can cause or fix: one `error:` line, exit 2; Ctrl-C: exit 130
# --------------------------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("graph:\n  k: 5\ngraph:\n  k: 6\n", "duplicate key 'graph' (lines 1 and 3)"),
        ("decompose:\n  steps: true\n", "decompose.steps: Input should be a valid integer"),
        ("decompose:\n  use_gpu: \"yes\"\n", "decompose.use_gpu: Input should be a valid boolean"),
        ("decompose:\n  use_gpu: yes\n", "decompose.use_gpu: Input should be a valid boolean"),
        ("graph:\n  edge_threshold: 2\n", "graph.edge_threshold"),
    ],
    ids=["empty", "comment-only", "duplicate-key", "bool-as-int", "quoted-yes", "yaml11-yes",
         "threshold-above-1"],
)
def test_strict_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                     expected: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    rc, err = _main([str(cfg), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert expected in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; the strict loader reads it as a number."""
    from scalespd.config import load_config  # noqa: PLC0415

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("decompose:\n  schedule: {lr: 1e-3}\n")
    assert load_config(cfg).decompose.schedule.lr == 1e-3


def test_config_path_that_is_a_directory(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _main([str(tmp_path), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and "is a directory; expected a YAML file" in _one_error_line(err)


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_run_dir_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  fake_stages: list[str], where: str) -> None:
    (tmp_path / "f").write_text("x")
    run_dir = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    rc, err = _main(["--run-dir", str(run_dir)], capsys)
    assert rc == 2 and f"--run-dir {run_dir}" in _one_error_line(err)


def test_missing_target_path_is_refused_before_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, {"target": {**TINY_TARGET, "path": str(tmp_path / "nope")}})
    rc, err = _main([str(cfg), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and "target.path" in _one_error_line(err) and "nope" in err
    assert not (tmp_path / "run").exists()


def test_unreachable_ray_address_is_refused_fast(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _write(tmp_path, {"target": TINY_TARGET, "ray": {"address": f"127.0.0.1:{port}"}})
    rc, err = _main([str(cfg), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and f"ray.address '127.0.0.1:{port}'" in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_disk_full_is_one_line_and_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_stages: list[str]) -> None:
    import errno  # noqa: PLC0415

    full = tmp_path / "run" / "profiles" / "ci.zarr" / "c0"

    def disk_full(cfg: object, run_dir: Path) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device", str(full))

    sys.modules["fake_profiles"].run = disk_full
    rc, err = _main(["--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert f"error: {full}: the disk is full; free space and re-run" in _one_error_line(err)
    rec = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["profiles"]
    assert rec["status"] == "failed" and "No space left on device" in rec["error"]


def test_ctrl_c_exits_130_and_says_how_to_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_stages: list[str]) -> None:

    def ctrl_c(cfg: object, run_dir: Path) -> dict:
        raise KeyboardInterrupt

    sys.modules["fake_graph"].run = ctrl_c
    rc, err = _main(["--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 130
    assert "interrupted; re-run the same command to resume" in err and "Traceback" not in err
    rec = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["graph"]
    assert rec["status"] == "interrupted"


def test_internal_bug_keeps_its_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_stages: list[str]) -> None:

    def bug(cfg: object, run_dir: Path) -> dict:
        return {}["no such key"]

    sys.modules["fake_spectral"].run = bug
    with pytest.raises(KeyError, match="no such key"):
        runmod.main(["--run-dir", str(tmp_path / "run")])


def test_language_model_target_is_checked_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An hf_causal_lm target.path (a string: it may be a hub name) is checked by the LM
    pre-flight; decompose module patterns are matched against the LM's module names (listed
    in the error) before any training."""
    missing = str(tmp_path / "no_model")
    cfg = _write(tmp_path, {"target": {"kind": "hf_causal_lm", "path": missing}})
    rc, err = _main([str(cfg), "--run-dir", str(tmp_path / "run"), "--stages", "target"], capsys)
    assert rc == 2 and "target.path" in _one_error_line(err) and missing in err
    cfg = _write(tmp_path, {"target": {"kind": "hf_causal_lm"}}, "lm.yaml")
    rc, err = _main([str(cfg), "--run-dir", str(tmp_path / "run")], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "decompose.modules" in line and "'linear1' matches no" in line
    assert "model.layers.3.mlp.down_proj" in line  # the modules that do exist are listed
    assert not (tmp_path / "run").exists()
