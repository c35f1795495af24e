"""Sparse-feature data for the toy targets (digest §1.2, reference impl §2.1).

All randomness comes from a `torch.Generator` the caller passes in, so a run is reproducible
from its seed and independent of the global RNG; tensors are created on the generator's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalespd.config import ONE_HOT_VALUE, ToyTargetConfig

# Value range of an active feature: TMS features are intensities in (0, 1); ResidMLP features
# are signed so that the label x + ReLU(x) needs the non-linearity.
VALUE_RANGES: dict[str, tuple[float, float]] = {"tms": (0.0, 1.0), "resid_mlp": (-1.0, 1.0)}


@dataclass(frozen=True)
class SparseFeatureDataset:
    """The "at_least_zero_active" distribution: every feature is independently active with
    probability `feature_probability`, with a value ~ U(lo, hi); all-zero rows are allowed."""

    kind: str
    n_features: int
    feature_probability: float
    value_range: tuple[float, float]

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A batch x of shape (batch_size, n_features), float32, on the generator's device."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        shape = (batch_size, self.n_features)
        dev = generator.device
        active = torch.rand(shape, generator=generator, device=dev) < self.feature_probability
        lo, hi = self.value_range
        values = torch.rand(shape, generator=generator, device=dev) * (hi - lo) + lo
        return torch.where(active, values, torch.zeros((), device=dev))

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Training labels for inputs x (B, n_features) -> (B, n_features).

        TMS reconstructs its input (the reference uses |x|, equal to x for values in (0, 1));
        ResidMLP computes y = x + ReLU(x) ("act_plus_resid" with trivial coefficients 1)."""
        if self.kind == "tms":
            return x.abs()
        return resid_mlp_labels(x)


def resid_mlp_labels(x: torch.Tensor) -> torch.Tensor:
    """ResidMLP labels y = x + ReLU(x), elementwise; shape unchanged."""
    return x + F.relu(x)


def make_dataset(cfg: ToyTargetConfig) -> SparseFeatureDataset:
    """The training/SPD data distribution of a toy target."""
    return SparseFeatureDataset(
        kind=cfg.kind,
        n_features=cfg.n_features,
        feature_probability=cfg.feature_probability,
        value_range=VALUE_RANGES[cfg.kind],
    )


def structured_eval_inputs(
    cfg: ToyTargetConfig, samples_per_feature: int, generator: torch.Generator
) -> torch.Tensor:
    """The clustering paper's TMS evaluation set: (n_features * samples_per_feature, n_features).

    Rows come in consecutive blocks, block k (rows k*S .. (k+1)*S - 1) belonging to feature k:
    there x_k ~ U(0.8, 1.0) and every other feature ~ U(0, 0.1) (dense, low amplitude)."""
    if samples_per_feature <= 0:
        raise ValueError(f"samples_per_feature must be positive, got {samples_per_feature}")
    n, s = cfg.n_features, samples_per_feature
    dev = generator.device
    x = torch.rand((n * s, n), generator=generator, device=dev) * 0.1
    strong = torch.rand((n * s,), generator=generator, device=dev) * 0.2 + 0.8
    rows = torch.arange(n * s, device=dev)
    x[rows, rows // s] = strong
    return x


def one_hot_inputs(
    cfg: ToyTargetConfig, value: float = ONE_HOT_VALUE, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """value * I, shape (n_features, n_features): row f activates feature f alone."""
    return torch.eye(cfg.n_features, device=device) * value
