"""Learning-rate schedules shared by target training and SPD training.

One function, `scheduled_lr`, implements the SPD reference's schedule (spec
spd_reference_impl §1.11 "LR schedule"): a linear warm-up from 0 over the first
`int(steps * warmup_pct)` steps, then `constant`, `linear` or `cosine` decay from `lr` to
`lr * final_frac`, reaching the final value at step `steps - 1` (the last step that updates).
"""

from __future__ import annotations

import math

from scalespd.config import ScheduleConfig


def scheduled_lr(step: int, steps: int, sched: ScheduleConfig) -> float:
    """Learning rate for `step` (0-based) of a run with `steps` optimiser steps."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = int(steps * sched.warmup_pct)
    if step < warmup:
        return sched.lr * step / warmup
    decay_steps = steps - warmup
    if sched.fn == "constant" or decay_steps <= 1:
        return sched.lr
    # t runs 0 -> 1 from the end of warm-up to the last updating step (steps - 1); later steps
    # (the reference's extra log-only step) stay at the final value.
    t = min(1.0, (step - warmup) / (decay_steps - 1))
    f = sched.final_frac
    if sched.fn == "linear":
        return sched.lr * (f + (1 - f) * (1 - t))
    if sched.fn == "cosine":
        return sched.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"unknown schedule fn {sched.fn!r}; expected constant, linear or cosine")
