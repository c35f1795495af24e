"""A small synthetic CI model with the `CIModel` interface, for tests and benchmarks.

Each "module" is a random linear map of the input followed by clamp(., 0, 1), so its values are
real causal-importance-like numbers in [0, 1] with many exact zeros. Some columns can be forced
dead (always 0) or always on (always 1), the two degenerate cases the statistics and the alive
filter must handle. It is a real nn.Module, so it pickles to Ray actors and has a state_dict.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SyntheticModuleInfo(NamedTuple):
    path: str
    layer: int
    module_type: str


class SyntheticCIModel(nn.Module):
    """CI values g = clamp(scale * (x W^T) + b, 0, 1) per module.

    sizes: [(path, C), ...] in column order; module i gets layer i. dead / always_on: global
    column indices forced to 0 / 1."""

    def __init__(
        self,
        in_dim: int,
        sizes: list[tuple[str, int]],
        seed: int = 0,
        dead: tuple[int, ...] = (),
        always_on: tuple[int, ...] = (),
        bias: float = -0.3,
        scale: float = 1.5,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.module_paths = [p for p, _ in sizes]
        self.C = {p: c for p, c in sizes}
        self.module_info = [SyntheticModuleInfo(p, i, "synthetic")
                            for i, (p, _) in enumerate(sizes)]
        n = sum(c for _, c in sizes)
        w = torch.randn(n, in_dim, generator=gen) * (scale / in_dim**0.5)
        b = torch.full((n,), bias) + 0.2 * torch.randn(n, generator=gen)
        for j in dead:
            w[j], b[j] = 0.0, -1.0
        for j in always_on:
            w[j], b[j] = 0.0, 2.0
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)

    @torch.no_grad()
    def causal_importances(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, in_dim) -> {path: (B, C) in [0, 1]}."""
        g = torch.clamp(torch.addmm(self.bias, x, self.weight.T), 0.0, 1.0)
        parts = torch.split(g, list(self.C.values()), dim=1)
        return dict(zip(self.module_paths, parts, strict=True))
