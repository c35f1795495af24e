"""Causal-importance (CI) functions: one per decomposed module, mapping what the module sees to
raw (pre-sigmoid) importances of its C subcomponents (digest §2.3, reference §1.3).

* ``mlp`` (SPD paper): C independent scalar MLPs 1 -> h1 -> ... -> 1, each reading its own
  subcomponent's inner activation h_c = (x V)_c. Because the input depends on V, the
  minimality and reconstruction losses also train V through this path.
* ``vector_mlp``: C independent MLPs d_in -> h1 -> ... -> 1 reading the module input x.
* ``shared_mlp``: one MLP d_in -> h1 -> ... -> C reading the module input x.

The C independent MLPs are evaluated together with parallel weights of shape
(C, fan_in, fan_out) and einsum, never with a Python loop over components. GELU (exact erf
form) between layers. Init as the reference: N(0, gain/sqrt(fan_in)) with relu gain sqrt(2) for
layers followed by GELU and gain 1 for the output layer; biases zero.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIKind = Literal["mlp", "vector_mlp", "shared_mlp"]


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).normal_(0.0, std, generator=generator))


def _layer_dims(d_in: int, hidden: list[int], d_out: int) -> list[tuple[int, int, float]]:
    """(fan_in, fan_out, init std) per layer."""
    dims = [d_in, *hidden, d_out]
    n = len(dims) - 1
    return [
        (a, b, (math.sqrt(2.0) if i < n - 1 else 1.0) / math.sqrt(a))
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    ]


class ParallelMLP(nn.Module):
    """C independent MLPs d_in -> hidden... -> 1 evaluated at once.

    Weights: ``w{k}`` (C, fan_in, fan_out), ``b{k}`` (C, fan_out).
    ``per_component_input=True``: input (..., C) holds one scalar per MLP (d_in must be 1);
    otherwise the input (..., d_in) is shared by all C MLPs. Output (..., C)."""

    def __init__(
        self,
        C: int,
        d_in: int,
        hidden: list[int],
        *,
        per_component_input: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if per_component_input and d_in != 1:
            raise ValueError("a per-component input is a scalar per MLP (d_in must be 1)")
        self.C = C
        self.per_component_input = per_component_input
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out, std in _layer_dims(d_in, hidden, 1):
            self.weights.append(_normal((C, fan_in, fan_out), std, generator))
            self.biases.append(nn.Parameter(torch.zeros(C, fan_out)))

    def forward(self, x: Tensor) -> Tensor:
        # Work in a (C, N, fan) layout so every layer is one batched matmul over components
        # (measured ~1.7x faster on CPU than broadcasting in (N, C, fan)).
        lead = x.shape[:-1]
        w0, b0 = self.weights[0], self.biases[0]
        if self.per_component_input:
            xs = x.reshape(-1, self.C).T.unsqueeze(-1)  # (C, N, 1)
            a = torch.baddbmm(b0.unsqueeze(1), xs, w0)  # (C, N, h1)
        else:
            # Shared input: one matmul against all C first layers at once.
            C, d_in, h1 = w0.shape
            flat = w0.permute(1, 0, 2).reshape(d_in, C * h1)
            a = (x.reshape(-1, d_in) @ flat).view(-1, C, h1).transpose(0, 1) + b0.unsqueeze(1)
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            a = torch.baddbmm(b.unsqueeze(1), F.gelu(a), w)  # (C, N, fan_out)
        return a.squeeze(-1).T.reshape(*lead, self.C)  # (..., C)


class SharedMLP(nn.Module):
    """One MLP d_in -> hidden... -> C. Input (..., d_in), output (..., C)."""

    def __init__(
        self, C: int, d_in: int, hidden: list[int], *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.C = C
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out, std in _layer_dims(d_in, hidden, C):
            self.weights.append(_normal((fan_in, fan_out), std, generator))
            self.biases.append(nn.Parameter(torch.zeros(fan_out)))

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x @ w + b
            if i < n - 1:
                x = F.gelu(x)
        return x


class CIFunction(nn.Module):
    """A module's CI function. ``forward(module_input (..., d_in), inner (..., C)) -> (..., C)``
    raw importances; ``kind`` decides which of the two inputs it reads."""

    def __init__(
        self,
        kind: CIKind,
        d_in: int,
        C: int,
        hidden: list[int],
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.net: nn.Module = ParallelMLP(C, 1, hidden, per_component_input=True,
                                              generator=generator)
        elif kind == "vector_mlp":
            self.net = ParallelMLP(C, d_in, hidden, per_component_input=False,
                                   generator=generator)
        elif kind == "shared_mlp":
            self.net = SharedMLP(C, d_in, hidden, generator=generator)
        else:
            raise ValueError(f"unknown CI function kind {kind!r}; expected mlp, vector_mlp or "
                             f"shared_mlp")

    @property
    def reads_inner(self) -> bool:
        return self.kind == "mlp"

    def forward(self, module_input: Tensor | None, inner: Tensor | None) -> Tensor:
        if self.reads_inner:
            assert inner is not None
            return self.net(inner)
        assert module_input is not None
        return self.net(module_input)
