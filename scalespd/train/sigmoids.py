"""Bounding functions that turn raw CI-function outputs into causal importances (digest §2.4).

Three hard sigmoids, all equal to clamp(x, 0, 1) on [0, 1]:

* ``hard``: clamp(x, 0, 1) (gradient 1 inside [0, 1], 0 outside).
* ``upper_leaky``: 0 below 0, ``1 + leak*(x - 1)`` above 1. Used only inside the
  importance-minimality loss: CI cannot go negative there (or the L_p penalty could not
  sparsify it), but it can exceed 1 with a small slope so the penalty keeps a gradient.
* ``lower_leaky``: the bounding used for masks and reconstruction, in two variants:
    - ``forward`` (the SPD paper): ``leak*x`` below 0, so masks can be slightly negative;
    - ``straight_through`` (the reference code on main): the forward is clamp(x, 0, 1), and
      below 0 the backward passes ``leak * grad`` only when the upstream gradient is negative,
      i.e. only when the loss wants the value to *increase*. A component whose CI got stuck
      below 0 can therefore be revived by the reconstruction losses, while nothing pushes it
      further down.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def hard_sigmoid(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0)


def upper_leaky_hard_sigmoid(x: Tensor, leak: float = 0.01) -> Tensor:
    """0 for x <= 0, x on [0, 1], 1 + leak*(x - 1) for x >= 1."""
    return torch.where(x > 1.0, 1.0 + leak * (x - 1.0), x.clamp(min=0.0))


def lower_leaky_forward(x: Tensor, leak: float = 0.01) -> Tensor:
    """The paper's lower-leaky hard sigmoid: leak*x for x <= 0, x on [0, 1], 1 for x >= 1."""
    return torch.where(x > 0.0, x.clamp(max=1.0), leak * x)


class _LowerLeakyStraightThrough(torch.autograd.Function):
    """clamp(x, 0, 1) forward; backward: g on (0, 1], 0 above 1, and below 0 leak*g only where
    the upstream gradient g is negative (the loss would decrease if x grew)."""

    @staticmethod
    def forward(ctx, x: Tensor, leak: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.leak = leak
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        inside = (x > 0.0) & (x <= 1.0)
        below_and_wants_up = (x <= 0.0) & (grad < 0.0)
        out = torch.where(inside, grad, torch.zeros_like(grad))
        out = torch.where(below_and_wants_up, ctx.leak * grad, out)
        return out, None


def lower_leaky_straight_through(x: Tensor, leak: float = 0.01) -> Tensor:
    return _LowerLeakyStraightThrough.apply(x, leak)


SigmoidKind = Literal["leaky_hard", "hard"]
LowerLeakyKind = Literal["straight_through", "forward"]


def lower_fn(kind: SigmoidKind, variant: LowerLeakyKind, leak: float):
    """The bounding applied to CI for masks and reconstruction (`DecomposeConfig.sigmoid`,
    `.lower_leaky`, `.leak`)."""
    if kind == "hard":
        return hard_sigmoid
    if variant == "straight_through":
        return lambda x: lower_leaky_straight_through(x, leak)
    return lambda x: lower_leaky_forward(x, leak)


def upper_fn(kind: SigmoidKind, leak: float):
    """The bounding applied to CI inside the importance-minimality loss."""
    if kind == "hard":
        return hard_sigmoid
    return lambda x: upper_leaky_hard_sigmoid(x, leak)
