"""Run toy-model reproductions and record their results in bench/results/repro_<name>.json.

    python bench/reproduce.py configs/tms_40-10.yaml [configs/...] [--runs-dir runs/repro]
    python bench/reproduce.py --collect runs/repro/tms_40-10   # record an already finished run

Each record holds the run's report/summary.json (ground-truth scoring included), the per-stage
wall times from manifest.json, the end-to-end wall time, the config and the machine, so the
numbers quoted in issue notes and the README can be checked and re-measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def collect(run_dir: Path, wall_s: float | None = None) -> Path:
    import yaml

    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    stage_s = {s: r.get("seconds") for s, r in manifest["stages"].items()}
    record = {
        "benchmark": "reproduction",
        "name": cfg["name"],
        "wall_seconds": (wall_s if wall_s is not None
                         else round(sum(v or 0 for v in stage_s.values()), 1)),
        "stage_seconds": stage_s,
        "decompose_metrics": manifest["stages"].get("decompose", {}).get("info", {}).get("metrics"),
        "summary": summary,
        "config": cfg,
        "machine": machine(),
        "versions": manifest.get("versions"),
    }
    out = RESULTS / f"repro_{cfg['name']}.json"
    out.write_text(json.dumps(record, indent=1))
    gt = summary.get("ground_truth", {})
    print(f"{cfg['name']}: {gt.get('mechanisms_recovered')}/{gt.get('mechanisms_total')} "
          f"mechanisms, purity {gt.get('purity')}, ARI {gt.get('ari')} -> {out}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "repro")
    ap.add_argument("--collect", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    for run_dir in args.collect:
        collect(run_dir)
    for cfg in args.configs:
        run_dir = args.runs_dir / cfg.stem
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "scalespd.run", str(cfg), "--run-dir", str(run_dir)],
                       check=True, cwd=REPO)
        collect(run_dir, round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
