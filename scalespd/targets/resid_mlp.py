"""Residual MLP toy ("compressed computation", digest §1.1, ref §2.3).

    resid = x @ W_E                                    (B, d_embed)
    resid = resid + mlp_out(act(mlp_in(resid)))        for each layer
    y_hat = resid @ W_U,   W_U = W_E^T                 (B, n_features)

W_E (n_features, d_embed) is fixed and random: randn rows normalised to unit L2 norm, drawn
from the target's seed. It is a buffer (saved in the state dict, never trained); W_U is a
property returning the transpose view, so the two can never disagree. The decomposable modules
are `layers.{i}.mlp_in` (d_mlp, d_embed) and `layers.{i}.mlp_out` (d_embed, d_mlp), plain
nn.Linear with the default torch init and biases per config (the shipped recipes use none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalespd.config import ResidMLPTargetConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu,
                                                                  "gelu": F.gelu}


class MLPBlock(nn.Module):
    """resid (B, d_embed) -> mlp_out(act(mlp_in(resid))) (B, d_embed); the residual add is
    done by the caller."""

    def __init__(self, cfg: ResidMLPTargetConfig) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(cfg.d_embed, cfg.d_mlp, bias=cfg.in_bias)
        self.mlp_out = nn.Linear(cfg.d_mlp, cfg.d_embed, bias=cfg.out_bias)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(self.act(self.mlp_in(resid)))


class ResidMLP(nn.Module):
    """x (B, n_features) -> y_hat (B, n_features)."""

    W_E: torch.Tensor

    def __init__(self, cfg: ResidMLPTargetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w_e = torch.randn(cfg.n_features, cfg.d_embed)
        self.register_buffer("W_E", w_e / w_e.norm(dim=1, keepdim=True))
        self.layers = nn.ModuleList([MLPBlock(cfg) for _ in range(cfg.n_layers)])

    @property
    def W_U(self) -> torch.Tensor:  # noqa: N802 (the papers' name)
        """(d_embed, n_features) unembedding = W_E^T."""
        return self.W_E.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid = x @ self.W_E
        for layer in self.layers:
            resid = resid + layer(resid)
        return resid @ self.W_U
