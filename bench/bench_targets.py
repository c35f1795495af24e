"""Wall time of training each toy target with its full recipe on this machine.

    python bench/bench_targets.py [--threads 2] [--names tms_5-2 resid_mlp1 ...]
        [--max-steps N]

With --max-steps, targets whose recipe is longer are trained for N steps and the full time is
extrapolated linearly (marked "extrapolated": true). Writes bench/results/targets_train.json
with, per target: steps run, recipe steps, seconds, steps/s, final/eval/zero-output losses and
the one-hot sanity check (`training.sanity_check`) and the
load average around each run (timings are only comparable on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from scalespd.config import load_config
from scalespd.targets import train_target
from scalespd.targets.training import sanity_check

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOYS = ["tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id", "resid_mlp1", "resid_mlp2",
        "resid_mlp3"]




def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--names", nargs="+", default=TOYS, help="configs/<name>.yaml targets")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "targets_train.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.names:
        cfg = load_config(CONFIGS / f"{name}.yaml").target.model_copy(update={"seed": args.seed})
        recipe_steps = cfg.train.steps
        steps = min(recipe_steps, args.max_steps) if args.max_steps else recipe_steps
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        model, info = train_target(cfg, steps=steps, progress=False)
        seconds = time.perf_counter() - t0
        # CPU time of this process: with one thread, close to the wall time on an idle core,
        # and much less disturbed by other processes than the wall time.
        cpu_seconds = time.process_time() - c0
        rec = {
            "name": name, "steps": steps, "recipe_steps": recipe_steps,
            "batch_size": cfg.train.batch_size, "seconds": round(seconds, 2),
            "steps_per_s": round(steps / seconds, 1),
            "full_recipe_seconds": round(seconds * recipe_steps / steps, 1),
            "cpu_seconds": round(cpu_seconds, 2),
            "full_recipe_cpu_seconds": round(cpu_seconds * recipe_steps / steps, 1),
            "extrapolated": steps != recipe_steps,
            # Other processes on this machine slow the run down; the 1-min load average
            # before and after tells how busy it was (cores: os.cpu_count()).
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            **{k: info[k] for k in ("final_loss", "eval_loss", "zero_output_loss")},
        }
        rec.update({k: v for k, v in sanity_check(model, cfg).items() if k != "one_hot_diag"})
        print(json.dumps(rec), flush=True)
        results.append(rec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    existing.update({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
        "threads": args.threads,
        **{r["name"]: r for r in results},
    })
    args.out.write_text(json.dumps(existing, indent=2))


if __name__ == "__main__":
    main()
