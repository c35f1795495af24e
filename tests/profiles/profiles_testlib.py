"""Helpers shared by the profiles tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalespd.config import DecomposeConfig, ProfilesConfig, TMSTargetConfig
from scalespd.profiles.sources import RowSource
from scalespd.profiles.store import BlockLayout
from scalespd.profiles.synthetic import SyntheticCIModel
from scalespd.targets import build_target, module_info, module_paths, save_target
from scalespd.train.components import ComponentModel, match_modules
from scalespd.train.io import META_FILE, MODEL_FILE, final_dir, model_state

# 3 modules, 7 + 5 + 4 = 16 columns; column 1 dead, column 9 always on.
SIZES = [("enc", 7), ("mid.0", 5), ("dec", 4)]
DEAD, ALWAYS_ON = (1,), (9,)


def tiny_model(seed: int = 0, sizes: list[tuple[str, int]] | None = None) -> SyntheticCIModel:
    return SyntheticCIModel(6, sizes or SIZES, seed=seed, dead=DEAD, always_on=ALWAYS_ON)


def small_cfg(**kw: Any) -> ProfilesConfig:
    base: dict[str, Any] = dict(chunk_rows=32, block_rows=64, chunk_cols=6, batch_rows=24,
                                executor="local", device="cpu", tau=0.1, dtype="float32",
                                storage="dense", zero_below=0.0)
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


def write_decomposed_run_dir(run_dir: Path, target_cfg: TMSTargetConfig,
                             decompose: DecomposeConfig) -> None:
    """A run directory as the target and decompose stages leave it (files per train/io.py),
    holding an untrained SPD model of a freshly built target."""
    target = build_target(target_cfg)
    save_target(target, target_cfg, run_dir / "target")
    specs = [(m.pattern, m.C) for m in decompose.modules]
    model = ComponentModel(target, match_modules(specs, module_paths(target_cfg)),
                           module_info(target_cfg), decompose,
                           generator=torch.Generator().manual_seed(0))
    final = final_dir(run_dir)
    final.mkdir(parents=True)
    torch.save(model_state(model), final / MODEL_FILE)
    (final / META_FILE).write_text(json.dumps({
        "target": target_cfg.model_dump(mode="json"),
        "decompose": decompose.model_dump(mode="json"),
    }))
