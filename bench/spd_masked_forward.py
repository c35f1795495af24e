"""Benchmark: SPD steps/s with our factored masked forward vs the naive materialised one, at
the reference settings of configs/<name>.yaml (batch size, C, CI function).

    python bench/spd_masked_forward.py [--configs tms_5-2 tms_40-10 resid_mlp1] [--threads 1]
                                       [--seconds 20] [--out bench/results/spd_masked_forward.json]

For each config: an untrained target (speed does not depend on its weights), `SPDTrainer`
without warm-up, a few untimed steps, then `train_step()` repeatedly for about `--seconds`.

Baseline: the same step with the masked forward computed the naive way, by materialising the
per-sample masked weight W'_b = sum_c m_bc U_c V_c + m_delta,b dW (B x d_out x d_in) and applying
it with a batched matmul, which our factored form ((x V) * m) U avoids. The baseline runs a few
steps only (it can be orders of magnitude slower), and is skipped when its per-sample weights
would exceed --baseline-max-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from scalespd.config import load_config
from scalespd.targets import build_target
from scalespd.train import components
from scalespd.train.trainer import SPDTrainer

ROOT = Path(__file__).resolve().parents[1]


def _materialised_output(self: components.LinearComponents, inner: Tensor, y: Tensor,
                         bias: Tensor | None, mask: Tensor, delta_mask: Tensor | None,
                         *, x: Tensor, W: Tensor) -> Tensor:
    """Naive masked forward: build every sample's masked weight matrix, then apply it."""
    per_sample = torch.einsum("bc,ic,co->boi", mask, self.V, self.U)  # (B, d_out, d_in)
    if delta_mask is not None:
        per_sample = per_sample + delta_mask[:, None, None] * (W - self.weight())
    out = torch.bmm(per_sample, x.unsqueeze(-1)).squeeze(-1)
    return out if bias is None else out + bias


def _time_steps(trainer: SPDTrainer, seconds: float, max_steps: int, warm: int = 3) -> dict:
    for _ in range(warm):
        trainer.train_step()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < max_steps and (time.perf_counter() - t0 < seconds or n < 2):
        trainer.train_step()
        n += 1
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    # Process CPU time is far less disturbed than wall time by other jobs on a busy machine.
    return {"steps": n, "seconds": round(dt, 3), "steps_per_s": round(n / dt, 3),
            "cpu_ms_per_step": round(1000 * dc / n, 2)}


def _make_trainer(name: str) -> tuple[SPDTrainer, dict]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    dcfg = cfg.decompose.model_copy(update={"faithfulness_warmup_steps": 0,
                                            "steps": 1_000_000})
    trainer = SPDTrainer(build_target(cfg.target), cfg.target, dcfg, device="cpu")
    info = {"batch_size": dcfg.batch_size, "C": trainer.model.C, "ci_fn": dcfg.ci_fn,
            "ci_hidden": list(dcfg.ci_hidden), "tied": trainer.model.tied}
    return trainer, info


def bench(name: str, seconds: float, baseline_steps: int, baseline_max_mb: float) -> dict:
    trainer, info = _make_trainer(name)
    result = {"config": f"configs/{name}.yaml", **info,
              "factored": _time_steps(trainer, seconds, 1_000_000)}

    # Baseline: patch the hook's masked output to the materialised form. Each module's
    # per-sample weight is B x d_out x d_in floats.
    trainer, _ = _make_trainer(name)
    model = trainer.model
    B = trainer.local_batch
    mb = max(B * model.comp(p).d_in * model.comp(p).d_out * 4 / 2**20 for p in model.module_paths)
    result["baseline_per_sample_weight_mb"] = round(mb, 1)
    if mb > baseline_max_mb:
        result["materialised"] = {"skipped": f"per-sample weights {mb:.0f} MB > {baseline_max_mb}"}
        return result
    original = components.LinearComponents.masked_output
    calls: dict[str, Tensor] = {}

    def hook_capture(path: str):
        def pre(module, args):  # remember the module input for the naive product
            calls[path] = args[0]
        return pre

    handles = [model._targets[p].register_forward_pre_hook(hook_capture(p))
               for p in model.module_paths]
    by_comp = {id(model.comp(p)): p for p in model.module_paths}

    def patched(self, inner, y, bias, mask, delta_mask):
        p = by_comp[id(self)]
        return _materialised_output(self, inner, y, bias, mask, delta_mask, x=calls[p],
                                    W=model.target_weight(p))

    components.LinearComponents.masked_output = patched  # type: ignore[method-assign]
    try:
        result["materialised"] = _time_steps(trainer, seconds, baseline_steps, warm=1)
    finally:
        components.LinearComponents.masked_output = original  # type: ignore[method-assign]
        for h in handles:
            h.remove()
    result["speedup_vs_materialised"] = round(
        result["materialised"]["cpu_ms_per_step"] / result["factored"]["cpu_ms_per_step"], 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tms_5-2", "tms_40-10", "resid_mlp1"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--baseline-steps", type=int, default=5)
    ap.add_argument("--baseline-max-mb", type=float, default=1024.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/spd_masked_forward.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {
        "benchmark": "spd_masked_forward",
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "results": {},
    }
    for name in args.configs:
        out["results"][name] = bench(name, args.seconds, args.baseline_steps,
                                     args.baseline_max_mb)
        print(name, json.dumps(out["results"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
