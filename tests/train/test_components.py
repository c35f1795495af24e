"""Rank-one components, the hooked ComponentModel and the CI functions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scalespd.config import DecomposeConfig
from scalespd.targets import ModuleInfo
from scalespd.train.ci_fns import CIFunction
from scalespd.train.components import ComponentModel, LinearComponents, Mask, match_modules

INFO = [ModuleInfo("0", 0, "a"), ModuleInfo("2", 1, "b")]


def tiny_target(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def make_model(ci_fn: str = "mlp", C: int = 5, **kw) -> ComponentModel:
    cfg = DecomposeConfig(ci_fn=ci_fn, ci_hidden=[7], **kw)
    gen = torch.Generator().manual_seed(0)
    return ComponentModel(tiny_target(), {"0": C, "2": C}, INFO, cfg, generator=gen)


# ------------------------------------------------------------------------------------------
# match_modules
# ------------------------------------------------------------------------------------------

PATHS = ["linear1", "hidden_layers.0", "linear2"]


def test_match_modules_expands_patterns_in_forward_order():
    assert match_modules([("linear*", 3), ("hidden_layers.*", 2)], PATHS) == {
        "linear1": 3, "hidden_layers.0": 2, "linear2": 3}
    assert list(match_modules([("linear2", 1), ("linear1", 1)], PATHS)) == ["linear1", "linear2"]


def test_match_modules_rejects_pattern_matching_nothing():
    with pytest.raises(ValueError, match="'mlp_in'"):
        match_modules([("linear1", 3), ("mlp_in", 2)], PATHS)


def test_match_modules_rejects_module_matched_twice():
    with pytest.raises(ValueError, match="'linear1' is matched by two patterns"):
        match_modules([("linear*", 3), ("*1", 2)], PATHS)


@pytest.mark.parametrize("C", [0, -3])
def test_match_modules_rejects_non_positive_C(C):
    with pytest.raises(ValueError, match="C must be a positive integer"):
        match_modules([("linear1", C)], PATHS)


# ------------------------------------------------------------------------------------------
# LinearComponents
# ------------------------------------------------------------------------------------------


def test_linear_components_shapes_and_init_scale():
    gen = torch.Generator().manual_seed(0)
    comp = LinearComponents(d_in=400, d_out=300, C=200, generator=gen)
    assert comp.V.shape == (400, 200) and comp.U.shape == (200, 300)
    assert comp.weight().shape == (300, 400)
    assert comp.V.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.02)
    assert comp.U.std().item() == pytest.approx(1 / math.sqrt(200), rel=0.02)


def test_masked_output_matches_per_sample_weights():
    """((xV) * m) U + m_d * x dW^T + b equals x W'(x)^T + b with the per-sample masked weight
    W'_b = sum_c m_bc U_c V_c + m_d,b dW, written out explicitly here."""
    gen = torch.Generator().manual_seed(1)
    comp = LinearComponents(d_in=5, d_out=3, C=4, generator=gen)
    W = torch.randn(3, 5, generator=gen)
    b = torch.randn(3, generator=gen)
    x = torch.randn(8, 5, generator=gen)
    m = torch.rand(8, 4, generator=gen)
    md = torch.rand(8, generator=gen)
    y = x @ W.T + b
    out = comp.masked_output(comp.inner(x), y, b, m, md)
    dW = W - comp.weight()
    per_sample = torch.einsum("bc,ic,co->boi", m, comp.V, comp.U) + md[:, None, None] * dW
    expected = torch.einsum("bi,boi->bo", x, per_sample) + b
    assert torch.allclose(out, expected, atol=1e-5)
    # Without the delta component only the masked subcomponents contribute.
    out = comp.masked_output(comp.inner(x), y, b, m, None)
    expected = torch.einsum("bi,bc,ic,co->bo", x, m, comp.V, comp.U) + b
    assert torch.allclose(out, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------
# ComponentModel
# ------------------------------------------------------------------------------------------


def test_component_model_attributes_and_frozen_target():
    model = make_model()
    assert model.module_paths == ["0", "2"]
    assert model.C == {"0": 5, "2": 5}
    assert [mi.path for mi in model.module_info] == ["0", "2"]
    assert not any(p.requires_grad for p in model.target.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.component_parameters() + model.ci_parameters()}
    assert {k: v.shape for k, v in model.weight_deltas().items()} == {
        "0": (4, 6), "2": (3, 4)}


def test_component_model_rejects_unknown_and_non_linear_modules():
    cfg = DecomposeConfig()
    with pytest.raises(ValueError, match="not decomposable"):
        ComponentModel(tiny_target(), {"5": 3}, INFO, cfg)
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        ComponentModel(tiny_target(), {"1": 3}, [ModuleInfo("1", 0, "relu")], cfg)


@pytest.mark.parametrize("only", [None, "0", "2"])
def test_all_masks_one_with_delta_reproduce_target(only):
    model = make_model()
    x = torch.randn(16, 6)
    paths = model.module_paths if only is None else [only]
    masks = {p: Mask(torch.ones(16, 5), torch.ones(16)) for p in paths}
    with torch.no_grad():
        assert torch.allclose(model.forward_masked(x, masks), model.target(x), atol=1e-6)


def test_exact_decomposition_without_delta_reproduces_target_and_zero_masks_ablate():
    model = make_model(C=6)
    with torch.no_grad():
        for p in ("0", "2"):
            comp, W = model.comp(p), model.target_weight(p)
            # V = I (first d_in columns), U = W^T: sum_c U_c V_c = W exactly.
            comp.V.zero_()
            comp.V[:, : W.shape[1]] = torch.eye(W.shape[1])
            comp.U.zero_()
            comp.U[: W.shape[1]] = W.T
    x = torch.randn(16, 6)
    ones = {p: Mask(torch.ones(16, 6)) for p in model.module_paths}
    zeros = {"2": Mask(torch.zeros(16, 6))}
    with torch.no_grad():
        assert torch.allclose(model.forward_masked(x, ones), model.target(x), atol=1e-5)
        # Ablating every subcomponent of the last layer leaves only its bias.
        out = model.forward_masked(x, zeros)
        assert torch.allclose(out, model.target[2].bias.expand(16, 3), atol=1e-6)


def test_cached_inner_activations_give_the_same_output_and_gradients():
    model = make_model()
    x = torch.randn(16, 6)
    gen = torch.Generator().manual_seed(3)
    masks = {p: Mask(torch.rand(16, 5, generator=gen), torch.rand(16, generator=gen))
             for p in model.module_paths}
    results = []
    for use_cache in (False, True):
        model.zero_grad()
        cache = model.forward_cached(x)
        ci = model.ci_from_cache(cache)
        out = model.forward_masked(x, masks, cache if use_cache else None)
        (out.square().sum() + sum(g.sum() for g in ci.lower.values())).backward()
        results.append((out.detach(), [p.grad.clone() for p in model.component_parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_forward_without_masks_is_the_target():
    model = make_model()
    x = torch.randn(4, 6)
    assert torch.equal(model(x), model.target(x))
    cache = model.forward_cached(x)
    assert torch.equal(cache.output, model.target(x))
    assert torch.equal(cache.inputs["0"], x)
    assert cache.inputs["2"].shape == (4, 4)


def test_module_called_twice_is_an_error():
    lin = nn.Linear(3, 3)
    target = nn.Sequential(lin, lin)  # the same module twice
    model = ComponentModel(target, {"0": 2}, [ModuleInfo("0", 0, "x")], DecomposeConfig())
    with pytest.raises(RuntimeError, match="ran twice"):
        model.forward_cached(torch.randn(2, 3))


# ------------------------------------------------------------------------------------------
# CI functions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "vector_mlp", "shared_mlp"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_causal_importances_shapes_and_range(kind, lead):
    model = make_model(ci_fn=kind)
    x = torch.randn(*lead, 6) * 3
    g = model.causal_importances(x)
    assert set(g) == {"0", "2"}
    for v in g.values():
        assert v.shape == (*lead, 5)
        assert v.min() >= 0 and v.max() <= 1
        assert not v.requires_grad


@pytest.mark.parametrize("kind", ["mlp", "vector_mlp", "shared_mlp"])
def test_ci_function_param_shapes_and_init(kind):
    gen = torch.Generator().manual_seed(0)
    f = CIFunction(kind, d_in=300, C=50, hidden=[64], generator=gen)
    shapes = [tuple(p.shape) for p in f.parameters()]
    first_w = next(iter(f.parameters()))
    if kind == "mlp":
        assert shapes == [(50, 1, 64), (50, 64, 1), (50, 64), (50, 1)]
        assert first_w.std().item() == pytest.approx(math.sqrt(2), rel=0.05)
    elif kind == "vector_mlp":
        assert shapes == [(50, 300, 64), (50, 64, 1), (50, 64), (50, 1)]
        assert first_w.std().item() == pytest.approx(math.sqrt(2 / 300), rel=0.05)
    else:
        assert shapes == [(300, 64), (64, 50), (64,), (50,)]
        assert first_w.std().item() == pytest.approx(math.sqrt(2 / 300), rel=0.05)
    assert all(torch.count_nonzero(b) == 0 for n, b in f.named_parameters() if "bias" in n)


@pytest.mark.parametrize("kind", ["mlp", "vector_mlp"])
def test_parallel_mlp_equals_independent_mlps(kind):
    """Component c of the parallel MLP is an ordinary MLP with its own weight slices."""
    gen = torch.Generator().manual_seed(0)
    f = CIFunction(kind, d_in=4, C=3, hidden=[5, 2], generator=gen)
    with torch.no_grad():
        for b in f.net.biases:
            b.normal_(generator=gen)
    x = torch.randn(7, 4)
    inner = torch.randn(7, 3)
    out = f(x, inner)
    for c in range(3):
        a = inner[:, c : c + 1] if kind == "mlp" else x
        ws, bs = f.net.weights, f.net.biases
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            a = a @ w[c] + b[c]
            if i < len(ws) - 1:
                a = torch.nn.functional.gelu(a)
        assert a.shape == (7, 1)
        assert torch.allclose(out[:, c], a[:, 0], atol=1e-5)


def test_mlp_ci_trains_V_but_vector_mlp_does_not():
    for kind, expect in (("mlp", True), ("vector_mlp", False)):
        model = make_model(ci_fn=kind)
        cache = model.forward_cached(torch.randn(8, 6))
        ci = model.ci_from_cache(cache)
        sum(g.sum() for g in ci.upper.values()).backward()
        V = model.comp("0").V
        assert (V.grad is not None and V.grad.abs().sum() > 0) == expect


@pytest.mark.parametrize("kind", ["mlp", "vector_mlp"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_blocked_cpu_evaluation_matches_one_shot(kind, x_grad, monkeypatch):
    """The CPU path evaluates blocks of components and recomputes activations in backward; its
    outputs and gradients must equal the one-shot evaluation."""
    import scalespd.train.ci_fns as ci_mod

    gen = torch.Generator().manual_seed(0)
    f = CIFunction(kind, d_in=5, C=7, hidden=[6, 3], generator=gen)
    with torch.no_grad():
        for b in f.net.biases:
            b.normal_(generator=gen)
    x = torch.randn(11, 5, requires_grad=x_grad)
    inner = torch.randn(11, 7, requires_grad=x_grad)
    results = []
    for block_bytes in (10**9, 4 * 11 * 6 * 2):  # one shot, then blocks of 2 components
        monkeypatch.setattr(ci_mod, "_CPU_BLOCK_BYTES", block_bytes)
        assert f.net.block_size(11, x.device) == (7 if block_bytes > 10**6 else 2)
        f.zero_grad()
        for t in (x, inner):
            t.grad = None
        out = f(x, inner)
        out.pow(3).sum().backward()
        grads = [p.grad.clone() for p in f.parameters()]
        if x_grad:
            grads.append((inner if kind == "mlp" else x).grad.clone())
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-6)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_copied_model_applies_its_own_masks():
    import copy

    model = make_model()
    clone = copy.deepcopy(model)
    x = torch.randn(4, 6)
    zeros = {"2": Mask(torch.zeros(4, 5))}
    with torch.no_grad():
        out = clone.forward_masked(x, zeros)
        assert torch.allclose(out, clone.target[2].bias.expand(4, 3))
        assert not model.target[2]._forward_hooks and not clone.target[2]._forward_hooks
