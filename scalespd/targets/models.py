"""Building toy targets, naming their decomposable modules, and their ground truth."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from scalespd.config import (
    AnyTargetConfig,
    HFCausalLMTargetConfig,
    ResidMLPTargetConfig,
    TMSTargetConfig,
)
from scalespd.targets.resid_mlp import ResidMLP
from scalespd.targets.tms import TMSModel


class ModuleInfo(NamedTuple):
    """A decomposable nn.Linear (or, in GPT-2 LMs, Conv1D) of a target: dotted path, layer
    index, role."""

    path: str
    layer: int
    module_type: str


def module_info(cfg: AnyTargetConfig) -> list[ModuleInfo]:
    """Every decomposable nn.Linear of the target, in forward order.

    TMS: linear1 (layer 0, "encoder"), hidden_layers.{i} (layer 1+i, "identity"),
    linear2 (layer 1+n_identity_layers, "decoder").
    ResidMLP: layers.{i}.mlp_in (layer i, "mlp_in"), layers.{i}.mlp_out (layer i, "mlp_out").
    Language models (hf_causal_lm): every nn.Linear / Conv1D of decoder block i (layer i),
    module_type its path inside the block, e.g. "self_attn.q_proj", "mlp.c_fc"; shapes and
    Conv1D transposition: scalespd.targets.lm.target_modules."""
    if isinstance(cfg, HFCausalLMTargetConfig):
        from scalespd.targets.lm.modules import target_modules  # noqa: PLC0415

        return [m.info for m in target_modules(cfg)]
    if isinstance(cfg, TMSTargetConfig):
        n_id = cfg.n_identity_layers
        return [
            ModuleInfo("linear1", 0, "encoder"),
            *(ModuleInfo(f"hidden_layers.{i}", 1 + i, "identity") for i in range(n_id)),
            ModuleInfo("linear2", 1 + n_id, "decoder"),
        ]
    if isinstance(cfg, ResidMLPTargetConfig):
        out: list[ModuleInfo] = []
        for i in range(cfg.n_layers):
            out += [ModuleInfo(f"layers.{i}.mlp_in", i, "mlp_in"),
                    ModuleInfo(f"layers.{i}.mlp_out", i, "mlp_out")]
        return out
    raise TypeError(f"target config of type {type(cfg).__name__} is not a toy target config")


def module_paths(cfg: AnyTargetConfig) -> list[str]:
    """The dotted paths of `module_info(cfg)`, in forward order."""
    return [m.path for m in module_info(cfg)]


def build_target(cfg: AnyTargetConfig) -> nn.Module:
    """A freshly initialised target; identical for identical configs (init drawn from
    cfg.seed in a forked RNG, so the caller's global RNG state is untouched). Language models:
    the default LLaMA (path None) or the architecture saved at cfg.path, randomly initialised
    (the trained weights: scalespd.targets.lm.load_lm_target)."""
    if isinstance(cfg, HFCausalLMTargetConfig):
        return _fresh_lm(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if isinstance(cfg, TMSTargetConfig):
            return TMSModel(cfg)
        if isinstance(cfg, ResidMLPTargetConfig):
            return ResidMLP(cfg)
    raise TypeError(f"target config of type {type(cfg).__name__} is not a toy target config")


def _fresh_lm(cfg: HFCausalLMTargetConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (heavy import)

    from scalespd.targets.lm.modules import target_model_config  # noqa: PLC0415
    from scalespd.targets.lm.training import build_default_model  # noqa: PLC0415

    if cfg.path is None:
        return build_default_model(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(target_model_config(cfg))


def ground_truth(cfg: AnyTargetConfig) -> dict[str, Any]:
    """The mechanisms a faithful SPD decomposition of this target should find (digest §1.4,
    ref §4.3), for scoring decompositions and clusters.

    Returns
      modules: {path: {"ci_pattern": "identity" | "dense", "expected_alive": int, "k": int?}}
        "identity": on one-hot inputs exactly one subcomponent responds per feature (the CI
        matrix (n_features, C) is a column permutation of I padded with dead columns);
        "dense": k subcomponents are active on every input (k = n_hidden for a TMS identity
        layer, d_mlp for a ResidMLP mlp_out).
      mechanisms: list of {"name", "kind": "feature" | "dense", "feature": int | None,
        "subcomponents": {path: count}}. A subcomponent of an "identity" module belongs to
        mechanism feature_f where f is the one-hot input it responds to most; every alive
        subcomponent of a "dense" module belongs to the single dense mechanism, which spans
        all dense modules (they co-activate on every input).
      n_mechanisms, expected_alive_total, expected_clusters (one per mechanism)."""
    if isinstance(cfg, HFCausalLMTargetConfig):
        raise TypeError("language-model targets have no known ground truth")
    modules: dict[str, dict[str, Any]] = {}
    feature_paths: list[str] = []
    dense_paths: dict[str, int] = {}
    for info in module_info(cfg):
        if info.module_type in ("encoder", "decoder", "mlp_in"):
            modules[info.path] = {"ci_pattern": "identity", "expected_alive": cfg.n_features}
            feature_paths.append(info.path)
        else:
            k = cfg.n_hidden if isinstance(cfg, TMSTargetConfig) else cfg.d_mlp
            modules[info.path] = {"ci_pattern": "dense", "k": k, "expected_alive": k}
            dense_paths[info.path] = k
    mechanisms: list[dict[str, Any]] = [
        {"name": f"feature_{f}", "kind": "feature", "feature": f,
         "subcomponents": {p: 1 for p in feature_paths}}
        for f in range(cfg.n_features)
    ]
    if dense_paths:
        name = "identity" if isinstance(cfg, TMSTargetConfig) else "mlp_out"
        mechanisms.append({"name": name, "kind": "dense", "feature": None,
                           "subcomponents": dense_paths})
    return {
        "kind": cfg.kind,
        "modules": modules,
        "mechanisms": mechanisms,
        "n_mechanisms": len(mechanisms),
        "expected_alive_total": sum(m["expected_alive"] for m in modules.values()),
        "expected_clusters": len(mechanisms),
    }
