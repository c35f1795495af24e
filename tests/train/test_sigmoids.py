"""Forward values and gradients of the CI bounding functions (digest §2.4, reference §1.4)."""

from __future__ import annotations

import pytest
import torch

from scalespd.train.sigmoids import (
    hard_sigmoid,
    lower_fn,
    lower_leaky_forward,
    lower_leaky_straight_through,
    upper_fn,
    upper_leaky_hard_sigmoid,
)

X = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0])


def _grad(fn, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).backward(upstream)
    return x.grad


def test_hard_sigmoid_values_and_grad():
    assert torch.equal(hard_sigmoid(X), torch.tensor([0, 0, 0, 0.3, 1, 1, 1.0]))
    g = _grad(hard_sigmoid, torch.tensor([-1.0, 0.5, 2.0]), torch.ones(3))
    assert torch.equal(g, torch.tensor([0.0, 1.0, 0.0]))


def test_upper_leaky_forward_and_grad():
    y = upper_leaky_hard_sigmoid(X, leak=0.01)
    assert torch.allclose(y, torch.tensor([0, 0, 0, 0.3, 1, 1.005, 1.02]))
    g = _grad(lambda t: upper_leaky_hard_sigmoid(t, 0.01), torch.tensor([-1.0, 0.5, 2.0]),
              torch.ones(3))
    assert torch.allclose(g, torch.tensor([0.0, 1.0, 0.01]))


def test_lower_leaky_forward_variant_is_leaky_below_zero():
    y = lower_leaky_forward(X, leak=0.01)
    assert torch.allclose(y, torch.tensor([-0.02, -0.005, 0, 0.3, 1, 1, 1.0]))
    g = _grad(lambda t: lower_leaky_forward(t, 0.01), torch.tensor([-1.0, 0.5, 2.0]),
              torch.ones(3))
    assert torch.allclose(g, torch.tensor([0.01, 1.0, 0.0]))


def test_lower_leaky_straight_through_forward_is_clamp():
    assert torch.equal(lower_leaky_straight_through(X, 0.01), X.clamp(0, 1))


def test_lower_leaky_straight_through_backward_leaks_only_for_negative_upstream():
    x = torch.tensor([-1.0, -1.0, 0.0, 0.5, 0.5, 2.0, 2.0])
    up = torch.tensor([-2.0, 3.0, -1.0, 4.0, -4.0, 5.0, -5.0])
    g = _grad(lambda t: lower_leaky_straight_through(t, 0.1), x, up)
    # below/at 0: leak*g only where g < 0; inside: g; above 1: 0.
    assert torch.allclose(g, torch.tensor([-0.2, 0.0, -0.1, 4.0, -4.0, 0.0, 0.0]))


@pytest.mark.parametrize("variant", ["straight_through", "forward"])
def test_selection_by_config(variant):
    lo = lower_fn("leaky_hard", variant, 0.01)
    up = upper_fn("leaky_hard", 0.01)
    expected_lo = (lower_leaky_straight_through(X, 0.01) if variant == "straight_through"
                   else lower_leaky_forward(X, 0.01))
    assert torch.equal(lo(X), expected_lo)
    assert torch.equal(up(X), upper_leaky_hard_sigmoid(X, 0.01))
    # "hard" ignores the leaky settings for both.
    assert torch.equal(lower_fn("hard", variant, 0.5)(X), X.clamp(0, 1))
    assert torch.equal(upper_fn("hard", 0.5)(X), X.clamp(0, 1))
