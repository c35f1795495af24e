"""Toy model of superposition (TMS): x_hat = ReLU(W^T [I ...] W x + b)  (digest §1.1, ref §2.2).

Modules, in forward order: `linear1` (W, (n_hidden, n_features), no bias), `hidden_layers.{i}`
(fixed identities (n_hidden, n_hidden), no bias, requires_grad False) and `linear2`
((n_features, n_hidden) with bias b).

Tied weights: `linear2` is a `TiedLinear`, an `nn.Linear` subclass that owns only its bias and
whose `.weight` property returns `linear1.weight.T`. There is a single weight Parameter, so the
optimiser keeps one AdamW state for W and the tie can never drift (the reference instead aliases
two Parameters' storage and updates it twice per step). `linear2` is still called as a module,
so SPD forward hooks see it like any other Linear, `isinstance(linear2, nn.Linear)` holds and
`linear2.weight.shape == (out_features, in_features)`. The state dict holds W once
(`linear1.weight`) plus `linear2.bias`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scalespd.config import TMSTargetConfig


class TiedLinear(nn.Linear):
    """y = x @ source.weight + b: a Linear whose weight is the transpose of `source`'s.

    Only the bias is a Parameter of this module; the weight is a view of `source.weight`
    (shape (source.in_features, source.out_features)), so gradients flow to the one shared
    Parameter. `source` is kept out of `_modules` because it is already registered as a
    sibling; registering it here too would duplicate it in the state dict and module list."""

    def __init__(self, source: nn.Linear, bias: bool = True) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would create a weight Parameter
        self.in_features = source.out_features
        self.out_features = source.in_features
        self.__dict__["_source"] = source
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default bias init
            self.bias = nn.Parameter(torch.empty(self.out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """(out_features, in_features) = source.weight.T (a view; shares storage)."""
        source: nn.Linear = self.__dict__["_source"]
        return source.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class TMSModel(nn.Module):
    """x (B, n_features) -> ReLU(linear2(hidden_layers(linear1(x)))) (B, n_features)."""

    def __init__(self, cfg: TMSTargetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear1 = nn.Linear(cfg.n_features, cfg.n_hidden, bias=False)
        self.hidden_layers = nn.ModuleList(
            [_fixed_identity(cfg.n_hidden) for _ in range(cfg.n_identity_layers)]
        )
        self.linear2: nn.Linear = (
            TiedLinear(self.linear1, bias=True)
            if cfg.tied_weights
            else nn.Linear(cfg.n_hidden, cfg.n_features, bias=True)
        )
        if cfg.init_bias_to_zero:
            with torch.no_grad():
                self.linear2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))


def _fixed_identity(n: int) -> nn.Linear:
    """An (n, n) identity Linear without bias that training leaves untouched."""
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
    layer.weight.requires_grad_(False)
    return layer
