"""Helpers shared by the profiles tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalespd.config import ProfilesConfig
from scalespd.profiles.sources import RowSource
from scalespd.profiles.store import BlockLayout
from scalespd.profiles.synthetic import SyntheticCIModel

# 3 modules, 7 + 5 + 4 = 16 columns; column 1 dead, column 9 always on.
SIZES = [("enc", 7), ("mid.0", 5), ("dec", 4)]
DEAD, ALWAYS_ON = (1,), (9,)


def tiny_model(seed: int = 0, sizes: list[tuple[str, int]] | None = None) -> SyntheticCIModel:
    return SyntheticCIModel(6, sizes or SIZES, seed=seed, dead=DEAD, always_on=ALWAYS_ON)


def small_cfg(**kw: Any) -> ProfilesConfig:
    base: dict[str, Any] = dict(chunk_rows=32, block_rows=64, chunk_cols=6, batch_rows=24,
                                executor="local", device="cpu", tau=0.1, dtype="float32")
    base.update(kw)
    return ProfilesConfig(**base)


def direct_inputs(source: RowSource, cfg: ProfilesConfig, n_cols: int) -> torch.Tensor:
    """Every row's input, generated block by block exactly as the source defines them."""
    layout = BlockLayout.make(source.n_rows, n_cols, cfg.chunk_rows, cfg.chunk_cols,
                              cfg.block_rows, 4)
    return torch.cat([source.block_inputs(b, *layout.block_range(b))
                      for b in range(layout.n_blocks)])


def direct_ci(model: Any, x: torch.Tensor) -> np.ndarray:
    """(M, N) CI computed in memory in one forward, columns in module order."""
    ci = model.causal_importances(x)
    return torch.cat([ci[p] for p in model.module_paths], dim=1).numpy()


def snapshot(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under root (to prove nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}
