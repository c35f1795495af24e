"""The default run's console, as a new user sees it: `python -m scalespd.run` on the built-in
default config (the full run, under a minute on 2 cores: warnings that repeat every few seconds of
training only show in a run of realistic length), stdout and stderr together.

It must end well and stay readable: no line printed twice (after removing what legitimately
differs between otherwise identical lines: timestamps, process ids, colour codes), no Python
warning, no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("target", "decompose", "profiles", "graph", "spectral", "evaluate", "report")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "11:16:16 INFO ..." (scalespd's log) and "2026-11-29 11:16:30,054\tWARNING ..." (Ray's).
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d[ T])?\d\d:\d\d:\d\d([,.]\d+)?\s+")
# "(RayTrainWorker pid=25604)", "[2026-11-29 11:17:01,039 E 25483 25514]", "ip=10.0.0.1".
_PID = re.compile(r"\bpid=\d+")
_IP = re.compile(r"\bip=[\d.]+")
_RAY_CXX_PREFIX = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]) \d+ \d+\]")


def normalize(line: str) -> str:
    """A console line without what differs between two printings of the same message."""
    line = _ANSI.sub("", line).rstrip()
    line = _TIMESTAMP.sub("", line)
    line = _RAY_CXX_PREFIX.sub(r"[\1]", line)
    return _IP.sub("ip=IP", _PID.sub("pid=PID", line))


def repeated_lines(text: str) -> dict[str, int]:
    """Non-blank normalised lines that occur more than once, with their counts."""
    counts = Counter(n for n in map(normalize, text.splitlines()) if n.strip())
    return {line: c for line, c in counts.items() if c > 1}


def test_normalize_removes_only_what_differs_between_printings() -> None:
    a = "\x1b[36m(RayTrainWorker pid=25604)\x1b[0m decompose step 100/2000  loss 0.003"
    b = "\x1b[36m(RayTrainWorker pid=31337)\x1b[0m decompose step 100/2000  loss 0.003"
    assert normalize(a) == normalize(b) == (
        "(RayTrainWorker pid=PID) decompose step 100/2000  loss 0.003")
    assert normalize("11:16:16 INFO scalespd: [target] ok") == "INFO scalespd: [target] ok"
    assert normalize("2026-11-29 11:16:30,054\tWARNING x.py:85 -- hi") == "WARNING x.py:85 -- hi"
    text = ("12:00:01 INFO a: step 1\n12:00:02 INFO a: step 2\n"
            "12:00:03 W: same\n12:00:09 W: same\n\n\n")
    assert repeated_lines(text) == {"W: same": 2}


def test_default_run_console_has_no_repeated_lines_warnings_or_tracebacks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTHONWARNINGS", "PYTEST"))}  # a new user's shell
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "scalespd.run", "--run-dir", str(run_dir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:]
    # The stage log a newcomer should read is there: one line per stage start and end.
    for stage in STAGES:
        assert f"[{stage}] running" in out and f"[{stage}] done" in out, stage
    assert f"report: {run_dir}/report/index.html" in out
    # ... and what it finds: the built-in default (TMS 5-2, the CPU-fast SPD recipe) recovers all
    # five encoder-decoder pairs, ten alive subcomponents in five clusters.
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    gt = summary["ground_truth"]
    assert summary["n_alive"] == 10, summary["n_alive"]
    assert gt["mechanisms_recovered"] == 5 and gt["ari"] == pytest.approx(1.0), gt

    repeats = repeated_lines(out)
    assert not repeats, "lines printed more than once:\n" + "\n".join(
        f"{c} x {line}" for line, c in sorted(repeats.items(), key=lambda x: -x[1]))
    warnings = [line for line in out.splitlines() if "Warning:" in line]
    assert not warnings, "Python warnings on the console:\n" + "\n".join(warnings)
    assert "Traceback (most recent call last)" not in out, out
    # Ray's own notices about a Ray this process started stay out of the default console.
    assert "Token authentication is enabled" not in out
