"""Causal-importance (CI) functions: one per decomposed module, mapping what the module sees to
raw (pre-sigmoid) importances of its C subcomponents (digest §2.3, reference §1.3).

* ``mlp`` (SPD paper): C independent scalar MLPs 1 -> h1 -> ... -> 1, each reading its own
  subcomponent's inner activation h_c = (x V)_c. Because the input depends on V, the
  minimality and reconstruction losses also train V through this path.
* ``vector_mlp``: C independent MLPs d_in -> h1 -> ... -> 1 reading the module input x.
* ``shared_mlp``: one MLP d_in -> h1 -> ... -> C reading the module input x.
* ``global_shared_mlp``: one MLP for all decomposed modules together, reading every module's
  inner activations concatenated (sum C -> h1 -> ... -> sum C), as the reference's recent
  language-model configs share one CI network across modules. A subcomponent's importance can
  then depend on what every other module's subcomponents see at that position.

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

CIKind = Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"]


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


# On CPU the parallel MLPs are memory-bound: their hidden activations (C, N, h) are far larger
# than the caches for realistic N and C, and every elementwise op streams them through memory
# again. Evaluating them in blocks of components whose activations fit in ~2 MB, and recomputing
# the block's activations in the backward pass instead of storing them, measured ~2x faster for
# the forward+backward of C = 200, N = 4096, h = 16 on one core (and saves the memory of every
# hidden activation). GPUs keep the one-shot evaluation.
_CPU_BLOCK_BYTES = 2 * 2**20


def _mlp_core(x: Tensor, weights: list[Tensor], biases: list[Tensor],
              per_component: bool) -> Tensor:
    """c independent MLPs. x: (c, N) one scalar per MLP, or (N, d_in) shared by all; weights[k]
    (c, fan_in, fan_out), biases[k] (c, fan_out). Returns (c, N). Works in a (c, N, fan) layout
    so every layer is one batched matmul over components."""
    w0, b0 = weights[0], biases[0]
    if per_component:
        a = torch.baddbmm(b0.unsqueeze(1), x.unsqueeze(-1), w0)  # (c, N, h1)
    else:
        c, d_in, h1 = w0.shape
        flat = w0.permute(1, 0, 2).reshape(d_in, c * h1)  # one matmul for all c first layers
        a = (x @ flat).view(-1, c, h1).transpose(0, 1) + b0.unsqueeze(1)
    for w, b in zip(weights[1:], biases[1:], strict=True):
        a = torch.baddbmm(b.unsqueeze(1), F.gelu(a), w)  # (c, N, fan_out)
    return a.squeeze(-1)


class _BlockedMLP(torch.autograd.Function):
    """`_mlp_core` over blocks of `block` components, activations recomputed per block in the
    backward pass (see _CPU_BLOCK_BYTES). Same values and gradients as the one-shot version."""

    @staticmethod
    def forward(ctx, block: int, per_component: bool, n_layers: int, x: Tensor,
                *params: Tensor) -> Tensor:
        ctx.save_for_backward(x, *params)
        ctx.block, ctx.per_component, ctx.n_layers = block, per_component, n_layers
        C = params[0].shape[0]
        outs = []
        for s in range(0, C, block):
            ps = [p[s:s + block] for p in params]
            xs = x[s:s + block] if per_component else x
            outs.append(_mlp_core(xs, ps[:n_layers], ps[n_layers:], per_component))
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *params = ctx.saved_tensors
        block, per_component, n = ctx.block, ctx.per_component, ctx.n_layers
        want_x = ctx.needs_input_grad[3]
        gx = torch.zeros_like(x) if want_x else None
        gps = [torch.empty_like(p) for p in params]
        for s in range(0, params[0].shape[0], block):
            e = s + block
            xs = (x[s:e] if per_component else x).detach().requires_grad_(want_x)
            ps = [p[s:e].detach().requires_grad_(True) for p in params]
            with torch.enable_grad():
                out = _mlp_core(xs, ps[:n], ps[n:], per_component)
            grads = torch.autograd.grad(out, ([xs] if want_x else []) + ps, grad[s:e])
            if want_x:
                assert gx is not None
                if per_component:
                    gx[s:e] = grads[0]
                else:
                    gx += grads[0]
                grads = grads[1:]
            for G, g in zip(gps, grads, strict=True):
                G[s:e] = g
        return (None, None, None, gx, *gps)


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
        self._widest = max([1, *hidden])

    def block_size(self, n_rows: int, device: torch.device) -> int:
        """Components per block: all of them on GPUs, else as many as fit _CPU_BLOCK_BYTES."""
        if device.type != "cpu":
            return self.C
        return max(1, min(self.C, _CPU_BLOCK_BYTES // (4 * n_rows * self._widest)))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.per_component_input:
            x2 = x2.T.contiguous()  # (C, N)
        weights, biases = list(self.weights), list(self.biases)
        n_rows = x2.shape[1] if self.per_component_input else x2.shape[0]
        block = self.block_size(n_rows, x.device)
        if block >= self.C:
            out = _mlp_core(x2, weights, biases, self.per_component_input)
        else:
            out = _BlockedMLP.apply(block, self.per_component_input, len(weights), x2,
                                    *weights, *biases)
        return out.T.reshape(*lead, self.C)  # (..., C)


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
        elif kind in ("shared_mlp", "global_shared_mlp"):
            # global_shared_mlp: d_in = C = the total over modules (see ComponentModel)
            self.net = SharedMLP(C, d_in, hidden, generator=generator)
        else:
            raise ValueError(f"unknown CI function kind {kind!r}; expected mlp, vector_mlp, "
                             f"shared_mlp or global_shared_mlp")

    @property
    def reads_inner(self) -> bool:
        return self.kind in ("mlp", "global_shared_mlp")

    def forward(self, module_input: Tensor | None, inner: Tensor | None) -> Tensor:
        if self.reads_inner:
            assert inner is not None
            return self.net(inner)
        assert module_input is not None
        return self.net(module_input)
