"""The entry point as users run it on a cluster: `ray job submit --working-dir . -- python -m
scalespd.run CONFIG --run-dir DIR` against a Ray head started with `ray start --head`.

The head is private to this test: loopback only, its own temp dir (so no other `ray.init()` on
the machine finds it through /tmp/ray/ray_current_cluster), free ports, token auth off (an
earlier in-process `ray.init` leaves ~/.ray/auth_token behind, which would switch it on). It is
stopped by ending the processes it started, by id: `ray stop` would kill every Ray process on
the machine, including other test sessions'.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: the job's `python` comes from the head's PATH

SMALL_CONFIG = """\
name: job_submit_test
target:
  kind: tms
  n_features: 5
  n_hidden: 2
  train: {steps: 1500, batch_size: 1024, schedule: {lr: 0.005}}
decompose:
  steps: 100
  batch_size: 512
  eval_batch_size: 1024
  faithfulness_warmup_steps: 20
  save_every: 50
  log_every: 50
profiles:
  n_samples: 1024
  chunk_rows: 512
  block_rows: 512
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    proc: subprocess.Popen
    dashboard: str
    env: dict[str, str]
    temp_dir: str


def _stop(proc: subprocess.Popen) -> None:
    """End the `ray start --block` process and everything it started (by pid)."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=10)


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and text in cmdline:
                out.append((p.pid, cmdline[:120]))
        except psutil.Error:
            pass
    return out


def _wait_for_dashboard(proc: subprocess.Popen, dashboard: str, deadline: float) -> bool:
    """True once the head's dashboard answers; False if the head exits or time runs out."""
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).read()
            return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.fixture
def ray_head() -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="sjh_", dir="/tmp")  # short: Ray's socket paths
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TMPDIR": temp_dir,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # Free ports are picked, then released for `ray start` to bind: another process can take
    # one in between. A head that exits early is therefore started again on fresh ports.
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115
    proc = None
    try:
        for attempt in range(3):
            ports = {name: _free_port() for name in (
                "port", "dashboard-port", "ray-client-server-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                "object-manager-port")}
            cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats",
                   *[f"--{k}={v}" for k, v in ports.items()]]
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
            if _wait_for_dashboard(proc, dashboard, time.monotonic() + 120):
                break
            _stop(proc)
            if attempt == 2:
                raise RuntimeError("ray head did not come up:\n"
                                   + (Path(temp_dir) / "head.log").read_text())
        yield Head(proc, dashboard, env, temp_dir)
    finally:
        if proc is not None:
            _stop(proc)
        log.close()
        left = _processes_mentioning(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
    assert not left, f"Ray head processes survived the teardown: {left}"


@pytest.mark.ray_cluster
def test_job_submit_runs_the_pipeline(ray_head: Head, tmp_path: Path) -> None:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL_CONFIG)
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    res = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
         "--working-dir", str(REPO), "--", "python", "-m", "scalespd.run", str(cfg),
         "--run-dir", str(run_dir)],
        cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    seconds = time.perf_counter() - t0
    print(f"ray job submit: {seconds:.1f} s")

    # The job's driver joined the head's cluster instead of starting a Ray of its own.
    assert "connecting to Ray at 127.0.0.1" in out, out[-4000:]
    # .venv and runs/ (git-ignored) are not uploaded with --working-dir.
    assert "Uploading package" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    from scalespd.run import STAGES  # noqa: PLC0415

    assert {s: manifest["stages"][s]["status"] for s in STAGES} == {s: "complete" for s in STAGES}
    meta = json.loads((run_dir / "decompose" / "final" / "meta.json").read_text())
    assert meta["steps"] == 100
    assert (run_dir / "decompose" / "final" / "model.pt").stat().st_size > 0
    assert (run_dir / "report" / "summary.json").is_file()

    from scalespd.train import load_decomposition  # noqa: PLC0415

    model = load_decomposition(run_dir)
    assert model.C == {"linear1": 20, "linear2": 20}

