"""SPD of language models: Conv1D (GPT-2) and nn.Linear (LLaMA) projections inside a Hugging
Face causal LM, the global shared CI function, subset routing, the LM metrics and the trainer on
token sequences. Tiny random models, offline, on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lm_models import tiny_gpt2, tiny_llama
from torch import nn

from scalespd.config import DecomposeConfig, HFCausalLMTargetConfig, LossConfig, ModuleSpec
from scalespd.targets.lm import lm_modules
from scalespd.train.components import GLOBAL_CI_KEY, ComponentModel, Mask, match_modules
from scalespd.train.lm import LMSequences, ce_kl_metrics, kl_per_token, next_token_ce
from scalespd.train.losses import subset_routing
from scalespd.train.trainer import SPDTrainer

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def spd_cfg(**kw: object) -> DecomposeConfig:
    base: dict[str, object] = {
        "modules": [ModuleSpec(pattern="*.layers.*", C=8), ModuleSpec(pattern="*.h.*", C=8)],
        "ci_fn": "global_shared_mlp", "ci_hidden": [16], "faithfulness_warmup_steps": 0,
        "steps": 4, "batch_size": 4, "eval_batch_size": 3, "schedule": {"lr": 1e-3},
        "loss": LossConfig(stochastic_recon=0.0, stochastic_recon_layerwise=0.0,
                           stochastic_recon_subset=1.0, output="kl", p=2.0),
    }
    return DecomposeConfig.model_validate({**base, **kw})


def component_model(which: str, cfg: DecomposeConfig | None = None, C: int = 8
                    ) -> ComponentModel:
    target = MODELS[which]()
    infos = [m.info for m in lm_modules(target)]
    cfg = cfg or spd_cfg()
    module_C = match_modules([(p, C) for p in ("*.layers.*", "*.h.*")
                              if any(p[2:-2] in i.path for i in infos)],
                             [i.path for i in infos])
    return ComponentModel(target, module_C, infos, cfg, generator=torch.Generator().manual_seed(0))


def ids(n: int = 3, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n, T), generator=torch.Generator().manual_seed(seed))


def exact_components(model: ComponentModel) -> None:
    """Set every module's subcomponents to an exact factorisation of its target weight (C is at
    least the weight's rank), so all-ones masks reproduce the target."""
    for p in model.module_paths:
        W = model.target_weight(p).detach()  # (d_out, d_in)
        U_, S, Vh = torch.linalg.svd(W.T, full_matrices=False)  # W^T = U_ S Vh
        comp = model.comp(p)
        r = S.numel()
        assert comp.C >= r
        with torch.no_grad():
            comp.V.zero_()
            comp.U.zero_()
            comp.V[:, :r] = U_ * S
            comp.U[:r] = Vh


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_modules_and_weights_of_both_families(which: str) -> None:
    model = component_model(which, C=200)
    x = ids()
    if which == "gpt2":  # Conv1D stores (d_in, d_out): the decomposed weight is its transpose
        p = "transformer.h.0.mlp.c_fc"
        assert model.target_weight(p).shape == (128, 32)
        assert model.comp(p).V.shape == (32, 200) and model.comp(p).U.shape == (200, 128)
    else:
        assert len(model.module_paths) == 14  # 7 projections x 2 layers
    exact_components(model)
    target = model(x)
    assert target.shape == (3, 12, 300)
    ones = {p: Mask(component=torch.ones(3, 12, model.C[p])) for p in model.module_paths}
    torch.testing.assert_close(model.forward_masked(x, ones), target, atol=2e-4, rtol=1e-4)
    # All-ones masks with the delta component on (mask 1) are exact whatever U and V are.
    fresh = component_model(which)
    full = {p: Mask(component=torch.ones(3, 12, fresh.C[p]), delta=torch.ones(3, 12))
            for p in fresh.module_paths}
    torch.testing.assert_close(fresh.forward_masked(x, full), fresh(x), atol=1e-5, rtol=1e-5)
    # ... and without it the output changes.
    off = {p: Mask(component=torch.zeros(3, 12, fresh.C[p])) for p in fresh.module_paths}
    assert (fresh.forward_masked(x, off) - fresh(x)).abs().max() > 1e-2


def test_global_ci_reads_every_module_and_trains_every_V() -> None:
    model = component_model("llama")
    assert list(model.ci_fns.keys()) == [GLOBAL_CI_KEY] and model.global_ci
    x = ids()
    g = model.causal_importances(x)
    assert list(g) == model.module_paths
    assert all(v.shape == (3, 12, 8) and 0 <= v.min() and v.max() <= 1 for v in g.values())
    cache = model.forward_cached(x)
    ci = model.ci_from_cache(cache)
    sum(v.sum() for v in ci.upper.values()).backward()  # type: ignore[union-attr]
    for p in model.module_paths:  # the CI of every module depends on every module's V
        assert model.comp(p).V.grad is not None and model.comp(p).V.grad.abs().sum() > 0
    # One module's inner activations change the CI of the others.
    with torch.no_grad():
        model.comp(model.module_paths[-1]).V.mul_(3.0)
    g2 = model.causal_importances(x)
    assert not torch.allclose(g[model.module_paths[0]], g2[model.module_paths[0]])


def test_per_module_ci_functions_still_work_on_lms() -> None:
    model = component_model("gpt2", spd_cfg(ci_fn="vector_mlp"))
    assert len(model.ci_fns) == len(model.module_paths)
    assert model.causal_importances(ids())[model.module_paths[0]].shape == (3, 12, 8)


def test_subset_routing_routes_between_one_and_all_modules() -> None:
    gen = torch.Generator().manual_seed(0)
    route = subset_routing(torch.Size([400, 5]), 7, torch.device("cpu"), gen)
    k = route.sum(-1)
    assert route.shape == (400, 5, 7) and k.min() >= 1 and k.max() <= 7
    counts = torch.bincount(k.flatten(), minlength=8)[1:].float()
    assert (counts / counts.sum() - 1 / 7).abs().max() < 0.04  # k ~ Uniform{1..7}
    per_module = route.float().mean((0, 1))
    assert (per_module - 0.5714).abs().max() < 0.05  # E[k]/L = 4/7 for every module
    # Positions not routed keep the target's output.
    model = component_model("llama")
    x = ids()
    none = {p: Mask(component=torch.zeros(3, 12, 8), routing=torch.zeros(3, 12, dtype=torch.bool))
            for p in model.module_paths}
    torch.testing.assert_close(model.forward_masked(x, none), model(x))


def test_lm_metrics() -> None:
    model = component_model("llama", C=200)
    exact_components(model)
    x = ids(4, 16)
    m = ce_kl_metrics(model, x, tau=0.1)
    target = model.target(input_ids=x, labels=x).loss  # the HF loss: next-token CE
    assert m["ce/target"] == pytest.approx(float(target), rel=1e-5)
    assert m["kl/unmasked"] < 1e-6 and m["ce/unmasked"] == pytest.approx(m["ce/target"], 1e-4)
    assert m["kl/all_ablated"] > 1e-4  # a random init barely uses its weights, but does
    for v in ("ci_masked", "rounded", "alive_only"):
        assert m[f"kl/{v}"] >= -1e-6 and f"ce/{v}" in m
    logits = torch.randn(2, 5, 7)
    assert next_token_ce(logits, torch.zeros(2, 5, dtype=torch.long)) == pytest.approx(
        float(F.cross_entropy(logits[:, :-1].reshape(-1, 7), torch.zeros(8, dtype=torch.long))))
    assert kl_per_token(logits, logits).abs().max() < 1e-6


def test_trainer_on_token_sequences_is_deterministic_and_resumes() -> None:
    seqs = torch.randint(0, 300, (20, 12), generator=torch.Generator().manual_seed(1))
    data = LMSequences(train=seqs[:16], heldout=seqs[16:], heldout_index=torch.arange(16, 20))
    tcfg = HFCausalLMTargetConfig(seq_len=12)
    # The modules come from the model itself (2 layers), not from tcfg's default shape.
    cfg = spd_cfg(modules=[ModuleSpec(pattern="model.layers.*", C=8)])

    def trainer() -> SPDTrainer:
        return SPDTrainer(tiny_llama(), tcfg, cfg, device="cpu", data=data)

    a, b = trainer(), trainer()
    la = [a.train_step()["total"] for _ in range(2)]
    state = copy.deepcopy(a.state_dict())  # state_dict() holds the live tensors
    la.append(a.train_step()["total"])
    lb = [b.train_step()["total"] for _ in range(2)]
    b.load_state_dict(state)
    lb.append(b.train_step()["total"])
    assert la == lb
    ev = a.evaluate()
    assert {"ce/target", "kl/ci_masked", "loss/stochastic_recon_subset"} <= set(ev)
    assert any(k.startswith("alive_data/") for k in ev)
    with pytest.raises(ValueError, match="token sequences"):
        SPDTrainer(tiny_llama(), tcfg, cfg, device="cpu")


def test_non_projection_module_is_refused() -> None:
    target = tiny_llama()
    infos = [m.info for m in lm_modules(target)]
    infos.append(type(infos[0])("model.norm", 2, "norm"))
    with pytest.raises(ValueError, match="must be an nn.Linear .or a GPT-2 Conv1D"):
        ComponentModel(target, {"model.norm": 4}, infos, spd_cfg())
    assert isinstance(dict(target.named_modules())["model.norm"], nn.Module)


FAMILIES = {  # other decoder-only families: module patterns alone, no special case in the code
    "GPTNeoXConfig": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64},
    "OPTConfig": {"hidden_size": 32, "num_attention_heads": 4, "ffn_dim": 64,
                  "word_embed_proj_dim": 32},
    "Qwen2Config": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 48},
    "PhiConfig": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64},
    "BloomConfig": {"hidden_size": 32, "n_head": 4},
}


@pytest.mark.parametrize("config_cls", sorted(FAMILIES))
def test_other_families_decompose_through_module_patterns(config_cls: str) -> None:
    import transformers  # noqa: PLC0415

    from scalespd.train.losses import spd_loss  # noqa: PLC0415

    config = getattr(transformers, config_cls)(vocab_size=300, num_hidden_layers=2,
                                               **FAMILIES[config_cls])
    torch.manual_seed(0)
    target = transformers.AutoModelForCausalLM.from_config(config).eval()
    infos = [m.info for m in lm_modules(target)]
    assert {i.layer for i in infos} == {0, 1}
    cfg = spd_cfg(modules=[ModuleSpec(pattern="*", C=6)])
    model = ComponentModel(target, {i.path: 6 for i in infos}, infos, cfg)
    x = ids(2, 10)
    full = {p: Mask(component=torch.ones(2, 10, 6), delta=torch.ones(2, 10))
            for p in model.module_paths}
    torch.testing.assert_close(model.forward_masked(x, full), model(x), atol=1e-5, rtol=1e-5)
    assert all(g.shape == (2, 10, 6) for g in model.causal_importances(x).values())
    total, terms, _ = spd_loss(model, x, cfg, 0, torch.Generator().manual_seed(0))
    total.backward()
    assert torch.isfinite(total) and terms["stochastic_recon_subset"] > 0
