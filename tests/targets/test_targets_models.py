"""Toy target architectures: module naming, shapes, tying, fixed layers, seeding, ground truth."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import CONFIGS, TOYS, preset

from scalespd.config import ResidMLPTargetConfig, TMSTargetConfig
from scalespd.targets import (
    ModuleInfo,
    build_target,
    ground_truth,
    make_dataset,
    module_info,
    module_paths,
    train_target,
)
from scalespd.targets.tms import TiedLinear

torch.set_num_threads(1)

# (name, expected module_info, (d_out, d_in) of each module) for the seven toys of the papers.
EXPECTED = {
    "tms_5-2": ([("linear1", 0, "encoder"), ("linear2", 1, "decoder")], [(2, 5), (5, 2)]),
    "tms_5-2-id": (
        [("linear1", 0, "encoder"), ("hidden_layers.0", 1, "identity"), ("linear2", 2, "decoder")],
        [(2, 5), (2, 2), (5, 2)],
    ),
    "tms_40-10": ([("linear1", 0, "encoder"), ("linear2", 1, "decoder")], [(10, 40), (40, 10)]),
    "tms_40-10-id": (
        [("linear1", 0, "encoder"), ("hidden_layers.0", 1, "identity"), ("linear2", 2, "decoder")],
        [(10, 40), (10, 10), (40, 10)],
    ),
    "resid_mlp1": ([("layers.0.mlp_in", 0, "mlp_in"), ("layers.0.mlp_out", 0, "mlp_out")],
                   [(50, 1000), (1000, 50)]),
    "resid_mlp2": (
        [("layers.0.mlp_in", 0, "mlp_in"), ("layers.0.mlp_out", 0, "mlp_out"),
         ("layers.1.mlp_in", 1, "mlp_in"), ("layers.1.mlp_out", 1, "mlp_out")],
        [(25, 1000), (1000, 25)] * 2,
    ),
    "resid_mlp3": (
        [(f"layers.{i}.{m}", i, m) for i in range(3) for m in ("mlp_in", "mlp_out")],
        [(17, 1000), (1000, 17)] * 3,
    ),
}
N_FEATURES = {"tms_5-2": 5, "tms_5-2-id": 5, "tms_40-10": 40, "tms_40-10-id": 40,
              "resid_mlp1": 100, "resid_mlp2": 100, "resid_mlp3": 102}
# Digest §1.4, with linear1 and linear2 decomposed separately.
EXPECTED_ALIVE = {"tms_5-2": 10, "tms_5-2-id": 12, "tms_40-10": 80, "tms_40-10-id": 90,
                  "resid_mlp1": 150, "resid_mlp2": 250, "resid_mlp3": 357}


def test_configs_are_the_seven_toys_with_their_recipes() -> None:
    assert set(TOYS) == set(EXPECTED)
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(TOYS)
    assert preset("resid_mlp3").train.steps == 10_000
    assert preset("resid_mlp1").train.steps == preset("resid_mlp2").train.steps == 1000
    assert preset("tms_40-10").train.batch_size == 8192
    assert preset("tms_5-2").train.batch_size == 1024
    with pytest.raises(KeyError, match="unknown toy target"):
        preset("tms_3-1")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_module_info_paths_and_shapes(name: str) -> None:
    cfg = preset(name)
    infos, shapes = EXPECTED[name]
    assert module_info(cfg) == [ModuleInfo(*i) for i in infos]
    assert all(isinstance(i, ModuleInfo) for i in module_info(cfg))
    assert module_paths(cfg) == [i[0] for i in infos]
    model = build_target(cfg)
    for path, shape in zip(module_paths(cfg), shapes, strict=True):
        mod = model.get_submodule(path)
        assert isinstance(mod, nn.Linear), path
        assert tuple(mod.weight.shape) == shape == (mod.out_features, mod.in_features), path
    x = make_dataset(cfg).sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, N_FEATURES[name])
    assert model(x).shape == (7, N_FEATURES[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ground_truth_counts(name: str) -> None:
    cfg = preset(name)
    gt = ground_truth(cfg)
    assert list(gt["modules"]) == module_paths(cfg)
    assert gt["expected_alive_total"] == EXPECTED_ALIVE[name]
    n = N_FEATURES[name]
    has_dense = name.endswith("-id") or name.startswith("resid")
    assert gt["n_mechanisms"] == n + has_dense == len(gt["mechanisms"])
    features = [m for m in gt["mechanisms"] if m["kind"] == "feature"]
    assert [m["feature"] for m in features] == list(range(n))
    for info in module_info(cfg):
        mod = gt["modules"][info.path]
        if info.module_type in ("identity", "mlp_out"):
            assert mod["ci_pattern"] == "dense"
            assert mod["k"] == mod["expected_alive"] == (cfg.n_hidden if cfg.kind == "tms"
                                                         else cfg.d_mlp)
        else:
            assert mod["ci_pattern"] == "identity" and mod["expected_alive"] == n
            assert all(m["subcomponents"][info.path] == 1 for m in features)
    if has_dense:
        dense = gt["mechanisms"][-1]
        assert dense["kind"] == "dense"
        assert sum(dense["subcomponents"].values()) == (
            cfg.n_hidden if cfg.kind == "tms" else cfg.d_mlp * cfg.n_layers)


def test_tms_forward_is_relu_wt_w_x_plus_b() -> None:
    cfg = preset("tms_5-2-id", init_bias_to_zero=False)
    model = build_target(cfg)
    x = torch.rand(11, 5)
    w = model.linear1.weight  # (2, 5)
    expected = F.relu(x @ w.T @ w + model.linear2.bias)
    torch.testing.assert_close(model(x), expected)
    assert model.linear2.bias.abs().sum() > 0  # default torch bias init when not zeroed
    assert preset("tms_5-2").init_bias_to_zero
    assert build_target(preset("tms_5-2")).linear2.bias.abs().sum() == 0


def test_tms_tied_weights_share_one_parameter_and_stay_tied_after_training() -> None:
    cfg = preset("tms_5-2", train=dict(steps=30, batch_size=64, schedule={"lr": 5e-2}))
    model = build_target(cfg)
    assert isinstance(model.linear2, TiedLinear)
    assert model.linear2.weight.data_ptr() == model.linear1.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["linear1.weight", "linear2.bias"]
    assert "linear2.weight" not in model.state_dict()

    w0 = model.linear1.weight.detach().clone()
    trained, _ = train_target(cfg, progress=False)
    w1 = trained.linear1.weight
    assert not torch.allclose(w0, w1)  # training did move W ...
    torch.testing.assert_close(trained.linear2.weight, w1.T, rtol=0, atol=0)  # ... and W^T
    assert trained.linear2.weight.data_ptr() == w1.data_ptr()
    # Gradients of both uses reach the one Parameter.
    trained.zero_grad()
    trained(torch.rand(4, 5)).sum().backward()
    assert trained.linear1.weight.grad is not None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_tms_tying_survives_copies(how: str) -> None:
    """Ray and checkpointing copy models; the copy must tie to its own linear1."""
    model = build_target(preset("tms_5-2"))
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert copied.linear2.weight.data_ptr() == copied.linear1.weight.data_ptr()
    assert copied.linear1.weight.data_ptr() != model.linear1.weight.data_ptr()
    with torch.no_grad():
        copied.linear1.weight.mul_(2.0)
    torch.testing.assert_close(copied.linear2.weight, 2 * model.linear1.weight.T)


def test_tms_untied_has_independent_linear2() -> None:
    model = build_target(preset("tms_5-2", tied_weights=False))
    assert type(model.linear2) is nn.Linear
    assert model.linear2.weight.data_ptr() != model.linear1.weight.data_ptr()
    assert {"linear1.weight", "linear2.weight", "linear2.bias"} == set(model.state_dict())


def test_tms_identity_layers_fixed_during_training() -> None:
    cfg = TMSTargetConfig(n_features=5, n_hidden=2, n_identity_layers=2,
                          train=dict(steps=30, batch_size=64, schedule={"lr": 5e-2}))
    model, _ = train_target(cfg, progress=False)
    for layer in model.hidden_layers:
        assert not layer.weight.requires_grad and layer.bias is None
        torch.testing.assert_close(layer.weight, torch.eye(2), rtol=0, atol=0)
    assert [i.path for i in module_info(cfg)][1:3] == ["hidden_layers.0", "hidden_layers.1"]
    assert module_info(cfg)[-1] == ModuleInfo("linear2", 3, "decoder")


def test_resid_mlp_embedding_and_forward() -> None:
    cfg = ResidMLPTargetConfig(n_features=12, d_embed=30, d_mlp=4, n_layers=2, seed=3)
    model = build_target(cfg)
    assert model.W_E.shape == (12, 30)
    torch.testing.assert_close(model.W_E.norm(dim=1), torch.ones(12))
    assert torch.equal(model.W_U, model.W_E.T)
    # Frozen: a buffer, not a parameter; saved in the state dict.
    assert "W_E" in dict(model.named_buffers()) and "W_E" in model.state_dict()
    assert all("W_E" not in n for n, _ in model.named_parameters())
    assert model.layers[0].mlp_in.bias is None and model.layers[0].mlp_out.bias is None

    x = torch.randn(5, 12)
    r = x @ model.W_E
    for layer in model.layers:
        r = r + F.relu(r @ layer.mlp_in.weight.T) @ layer.mlp_out.weight.T
    torch.testing.assert_close(model(x), r @ model.W_E.T)


def test_resid_mlp_biases_and_gelu_follow_config() -> None:
    cfg = ResidMLPTargetConfig(n_features=6, d_embed=8, d_mlp=3, in_bias=True, out_bias=True,
                               act="gelu")
    model = build_target(cfg)
    layer = model.layers[0]
    assert layer.mlp_in.bias.shape == (3,) and layer.mlp_out.bias.shape == (8,)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), layer.mlp_out(F.gelu(layer.mlp_in(x))))


def test_embedding_frozen_during_training() -> None:
    cfg = ResidMLPTargetConfig(n_features=10, d_embed=20, d_mlp=4,
                               train=dict(steps=20, batch_size=32, schedule={"lr": 1e-2}))
    w_e = build_target(cfg).W_E.clone()
    model, _ = train_target(cfg, progress=False)
    torch.testing.assert_close(model.W_E, w_e, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tms_40-10-id", "resid_mlp2"])
def test_build_is_seeded_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_target(preset(name, seed=5)).state_dict()
    after = torch.rand(3)
    assert torch.equal(before, after)  # global RNG stream untouched by build_target
    b = build_target(preset(name, seed=5)).state_dict()
    c = build_target(preset(name, seed=6)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 4)
