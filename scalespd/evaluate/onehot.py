"""Causal importances of the trained SPD model on one-hot inputs (toy targets only)."""

from __future__ import annotations

import numpy as np
from upath import UPath

from scalespd import storage
from scalespd.config import RunConfig


def onehot_ci(cfg: RunConfig, run_dir: UPath) -> tuple[np.ndarray, list[str]]:
    """CI of every subcomponent on the F one-hot inputs x_f = value * e_f.

    Returns (F, N) float32 in global column order (decomposed modules in forward order, then c,
    as in profiles/ci.zarr) and the N names `<path>:<c>`."""
    import torch  # noqa: PLC0415  (heavy; only needed for toy ground truth)

    from scalespd.targets import one_hot_inputs  # noqa: PLC0415

    if cfg.target.kind == "hf_causal_lm":
        raise ValueError("one-hot CI exists for toy targets only")
    model = _load_model(storage.as_path(run_dir))
    x = one_hot_inputs(cfg.target, value=cfg.evaluate.onehot_value)
    params = list(model.parameters())
    if params:
        x = x.to(params[0].device)
    with torch.no_grad():
        ci = model.causal_importances(x)
    cols = [ci[p].detach().float().cpu().numpy().reshape(x.shape[0], -1)
            for p in model.module_paths]
    names = [f"{p}:{c}" for p in model.module_paths for c in range(model.C[p])]
    return np.concatenate(cols, axis=1), names


def _load_model(run_dir: UPath):
    """The trained SPD model (ComponentModel) of a run, in eval mode."""
    from scalespd.train import load_decomposition  # noqa: PLC0415

    model = load_decomposition(run_dir)
    model.eval()
    return model


def align_to_components(ci: np.ndarray, ci_names: list[str], names: list[str]) -> np.ndarray:
    """Reorder the (F, N) one-hot CI columns to the order of `names` (components.csv); a name
    that the model does not have is an error naming it."""
    pos = {n: i for i, n in enumerate(ci_names)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise ValueError(
            f"profiles/components.csv names {missing[:5]} (of {len(missing)}) are not "
            f"subcomponents of the saved decomposition; re-run the profiles stage"
        )
    return ci[:, [pos[n] for n in names]]
