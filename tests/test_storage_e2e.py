"""The default pipeline with its run directory on memory:// and on s3:// (a local S3-compatible
server on loopback, tests/object_stores.py): the same files appear as with a local run
directory, with the same results, and an interrupted run resumes there as it does locally.

The built-in default config runs with a shorter SPD (300 steps instead of 2000): what is tested is
where the files go, not how well the toy is decomposed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from upath import UPath

from scalespd import run as runmod
from scalespd.config import load_config
from scalespd.run import STAGES, run_pipeline

OVERRIDES = ["target.train.steps=2000", "decompose.steps=300", "decompose.save_every=100",
             "decompose.log_every=100", "profiles.n_samples=2048"]
# Files whose bytes depend on when or where the run happened, not on what it computed.
VARIES = {"manifest.json", "decompose/attempts.jsonl", "decompose/progress.json"}
SAME_BYTES = ["profiles/components.csv", "spectral/clusters.csv", "graph/labels.npy"]
# JSON records that also hold how long their stage took.
SAME_JSON = ["target/meta.json", "decompose/final/meta.json"]


def _untimed(obj: object) -> object:
    """`obj` without its timings ("seconds" fields)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _files(root: UPath) -> dict[str, bytes]:
    """Every file under `root`, by path relative to it (Ray Train's own bookkeeping aside)."""
    fs, base = root.fs, root.path.rstrip("/")
    out = {}
    for full in fs.find(base):
        rel = full[len(base) + 1:]
        if "/ray/" in f"/{rel}" and "checkpoint_" not in rel:
            continue  # Ray Train's experiment state (names carry timestamps)
        out[rel] = fs.cat_file(full)
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_pipeline(load_config(None, OVERRIDES), run_dir)
    return _files(UPath(run_dir))


def _check_same(remote: dict[str, bytes], local: dict[str, bytes]) -> None:
    assert sorted(remote) == sorted(local)
    for name in SAME_BYTES:
        assert remote[name] == local[name], name
    for name in SAME_JSON:
        assert _untimed(json.loads(remote[name])) == _untimed(json.loads(local[name])), name
    summary_l = json.loads(local["report/summary.json"])
    summary_r = json.loads(remote["report/summary.json"])
    for key in ("n_alive", "n_edges", "cluster_sizes", "ground_truth", "quality"):
        assert summary_r[key] == summary_l[key], key


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_default_pipeline_on_an_fsspec_run_dir(store: str, local_run: dict[str, bytes],
                                               request: pytest.FixtureRequest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir: UPath = request.getfixturevalue(f"{store}_dir")
    cfg = load_config(None, OVERRIDES)

    # A driver stopped in the middle of the graph stage (Ctrl-C, SIGTERM, a lost head node) ...
    graph_stage = __import__("scalespd.graph.stage", fromlist=["run"])
    real_graph = graph_stage.run

    def interrupted(*args: object, **kwargs: object) -> dict:
        real_graph(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(graph_stage, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["graph"]["status"] == "interrupted"
    assert all(manifest["stages"][s]["status"] == "complete" for s in STAGES[:3])

    # ... and the same command again: the finished stages are kept, the rest completes.
    monkeypatch.setattr(graph_stage, "run", real_graph)
    ran: list[str] = []
    real_stage = runmod.run_stage
    monkeypatch.setattr(runmod, "run_stage",
                        lambda m, c, stage, d: (ran.append(stage), real_stage(m, c, stage, d)))
    run_pipeline(cfg, run_dir)
    assert ran == list(STAGES[3:])
    files = _files(run_dir)
    _check_same(files, local_run)
    assert not [n for n in files if ".tmp" in n], "temporary names left behind"


def test_run_cli_takes_a_url_run_dir(s3_dir: UPath, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    """`--run-dir s3://...` reaches the pipeline as that URL (a finished run is reopened)."""
    (tmp_path / "cfg.yaml").write_text("name: x\n")
    assert runmod.main(["--run-dir", str(s3_dir), "--stages", "target",
                        "--set", "target.train.steps=10", str(tmp_path / "cfg.yaml")]) == 0
    assert (s3_dir / "target" / "meta.json").exists()
    assert f"run directory: {s3_dir}" in capsys.readouterr().out
