"""SPD training throughput (steps/s) for TMS 40-10 and the 2-layer residual MLP at the reference
settings, against a baseline measured in the same run.

    python bench/spd_steps.py [--steps 30] [--warmup 5] [--threads 1] [--device cpu|cuda]
        [--out bench/results/spd_steps.json]

Settings come from the shipped configs (configs/tms_40-10.yaml: C = 200 per matrix, mlp CI [16],
batch 4096; configs/resid_mlp2.yaml: C = 400 per module, mlp CI [16], batch 2048; digest §2.8).
The target is built untrained: the cost of a step does not depend on the weights.

One SPD step = `SPDTrainer.train_step()` (batch sampling, CI functions, the masked forwards of
the stochastic and layerwise reconstruction losses, importance minimality, backward, AdamW).
Baseline = one plain training step of the target itself on the same batch size (sampling,
forward, MSE, backward, AdamW). Their ratio, `spd_step_over_target_step`, says how many target
training steps one SPD step costs and is much less machine-dependent than the raw steps/s.
Process CPU time is recorded too: with one thread it is close to the wall time on an idle core
and far less disturbed by other processes on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scalespd.config import load_config
from scalespd.targets import build_target, make_dataset
from scalespd.train.trainer import SPDTrainer

REPO = Path(__file__).resolve().parents[1]
CASES = {"tms_40-10": REPO / "configs" / "tms_40-10.yaml",
         "resid_mlp2": REPO / "configs" / "resid_mlp2.yaml"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], object], n: int, warmup: int, device: torch.device
          ) -> dict[str, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    _sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"steps": n, "seconds": round(wall, 4), "steps_per_s": round(n / wall, 3),
            "ms_per_step": round(1000 * wall / n, 3), "cpu_ms_per_step": round(1000 * cpu / n, 3)}


def bench_case(name: str, n: int, warmup: int, device: torch.device) -> dict:
    cfg = load_config(CASES[name])
    tcfg, dcfg = cfg.target, cfg.decompose.model_copy(update={"faithfulness_warmup_steps": 0})
    load_before = os.getloadavg()[0]

    # Baseline: a plain training step of the target on the same batch size.
    target = build_target(tcfg).to(device)
    data = make_dataset(tcfg)
    gen = torch.Generator(device=device).manual_seed(0)
    opt = torch.optim.AdamW(target.parameters(), lr=1e-3)

    def target_step() -> None:
        x = data.sample(dcfg.batch_size, gen)
        # MSE against the input: the TMS task; for ResidMLP the output has the same shape and
        # the cost of the real labels (a ReLU of x) is negligible next to the network.
        loss = (target(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    baseline = _time(target_step, n, warmup, device)

    trainer = SPDTrainer(build_target(tcfg), tcfg, dcfg, device=device)
    spd = _time(trainer.train_step, n, warmup, device)

    n_params = sum(p.numel() for p in trainer.params)
    return {
        "config": str(CASES[name].relative_to(REPO)),
        "batch_size": dcfg.batch_size,
        "modules": trainer.model.C,
        "ci_fn": dcfg.ci_fn, "ci_hidden": list(dcfg.ci_hidden),
        "trainable_params": n_params,
        "spd": spd,
        "target_baseline": baseline,
        "spd_step_over_target_step": round(spd["seconds"] / baseline["seconds"], 2),
        "spd_step_over_target_step_cpu": round(spd["cpu_ms_per_step"]
                                               / baseline["cpu_ms_per_step"], 2),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--names", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "spd_steps.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    results = {}
    for name in args.names:
        results[name] = bench_case(name, args.steps, args.warmup, device)
        r = results[name]
        print(f"{name}: SPD {r['spd']['steps_per_s']:.2f} steps/s "
              f"({r['spd']['ms_per_step']:.1f} ms), target step "
              f"{r['target_baseline']['ms_per_step']:.2f}"
              f" ms -> SPD step = {r['spd_step_over_target_step']}x target step", flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
               "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    out = {"machine": machine, "note": "load_avg_1min: other processes on the machine during "
           "the run (cpus = os.cpu_count()); compare the ratios, not raw steps/s, across runs",
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
