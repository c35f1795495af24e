"""Benchmark: SPD of the 1-layer residual MLP with the reference hyperparameters (issue 2 must-hold:
100 alive mlp_in subcomponents, one per feature, and 50 alive mlp_out at tau = 0.1).

    python bench/spd_resid_mlp1.py [--steps 20000] [--threads 2]
        [--out bench/results/spd_resid_mlp1.json]

Trains the target with its recipe (1000 steps), then SPD: C = 100 per module, mlp CI [16],
beta3 = 1e-5, p = 2, lr 2e-3 constant, batch 2048, faithfulness warm-up 200 @ lr 0.01 wd 0.1,
delta component on (reference `resid_mlp1_config.yaml`). Writes the final decomposition metrics,
the expected counts and whether they hold, wall time and steps/s as JSON (rewritten at every
evaluation, so an interrupted run still leaves its latest numbers), plus the CI heatmap PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from scalespd.config import DecomposeConfig, LossConfig, ScheduleConfig, load_config
from scalespd.targets import train_target
from scalespd.train.trainer import SPDTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/spd_resid_mlp1.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tc = load_config(Path(__file__).resolve().parents[1] / "configs" / "resid_mlp1.yaml").target
    t0 = time.perf_counter()
    target, target_info = train_target(tc, progress=False)
    target_s = time.perf_counter() - t0

    cfg = DecomposeConfig(
        modules=[{"pattern": "layers.*.mlp_in", "C": 100},
                 {"pattern": "layers.*.mlp_out", "C": 100}],
        ci_fn="mlp", ci_hidden=[16],
        loss=LossConfig(importance_minimality=1e-5, p=2.0),
        schedule=ScheduleConfig(lr=2e-3), steps=args.steps, batch_size=2048,
        eval_batch_size=2048, faithfulness_warmup_steps=200, faithfulness_warmup_lr=0.01,
        faithfulness_warmup_weight_decay=0.1, seed=args.seed,
    )
    trainer = SPDTrainer(target, tc, cfg, device="cpu")
    expected = {"alive_onehot/layers.0.mlp_in": 100, "alive_onehot/layers.0.mlp_out": 50,
                "matched_features/layers.0.mlp_in": 100}
    history: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)

    eval_s = 0.0

    def write(final: bool, elapsed: float) -> dict:
        nonlocal eval_s
        train_s = elapsed - eval_s  # optimisation time only, evaluations excluded
        te = time.perf_counter()
        ev = trainer.evaluate()
        eval_s += time.perf_counter() - te
        history.append({"step": trainer.step, **{k: round(v, 6) for k, v in ev.items()}})
        result = {
            "benchmark": "spd_resid_mlp1",
            "finished": final,
            "step": trainer.step,
            "steps": args.steps,
            "threads": args.threads,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__},
            "target": {"seconds": round(target_s, 1), **target_info},
            "decompose_config": cfg.model_dump(mode="json"),
            "train_seconds": round(train_s, 1),
            "steps_per_s": round(trainer.step / max(train_s, 1e-9), 3),
            "expected": expected,
            "holds": {k: ev.get(k) == v for k, v in expected.items()},
            "metrics": ev,
            "history": history,
        }
        args.out.write_text(json.dumps(result, indent=2))
        print(f"step {trainer.step}: "
              + " ".join(f"{k}={ev[k]:g}" for k in (*expected, "l0/layers.0.mlp_in",
                                                    "l0/layers.0.mlp_out",
                                                    "loss/stochastic_recon")),
              flush=True)
        return result

    t0 = time.perf_counter()
    trainer.faithfulness_warmup()
    while trainer.step < args.steps:
        trainer.train_step()
        if trainer.step % args.eval_every == 0 and trainer.step < args.steps:
            write(False, time.perf_counter() - t0)
    result = write(True, time.perf_counter() - t0)
    trainer.save_ci_heatmap(args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("holds", "train_seconds", "steps_per_s")}))


if __name__ == "__main__":
    main()
