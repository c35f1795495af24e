"""SPD loss terms: values on hand-made inputs and the normalisations of reference §1.6 / §9."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scalespd.config import DecomposeConfig, LossConfig
from scalespd.targets import ModuleInfo
from scalespd.train.components import ComponentModel, Mask
from scalespd.train.losses import (
    annealed_p,
    ci_masked_recon_loss,
    faithfulness_loss,
    importance_minimality_loss,
    recon_error,
    sample_masks,
    spd_loss,
    stochastic_recon_losses,
    unmasked_recon_loss,
)

INFO = [ModuleInfo("0", 0, "a"), ModuleInfo("2", 1, "b"), ModuleInfo("4", 2, "c")]


def make_model(Cs: tuple[int, int, int] = (3, 4, 2), **kw
               ) -> tuple[ComponentModel, DecomposeConfig]:
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                           nn.Linear(4, 3))
    cfg = DecomposeConfig(ci_hidden=[4], **kw)
    model = ComponentModel(target, dict(zip(["0", "2", "4"], Cs, strict=True)), INFO, cfg,
                           generator=torch.Generator().manual_seed(0))
    return model, cfg


def test_mse_recon_error_is_a_mean_over_batch_and_output_dims():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    target = torch.zeros(3, 2)
    err, n = recon_error(pred, target, "mse")
    assert n == 6 and err.item() == pytest.approx(30.0)


def test_kl_recon_error_sums_vocab_and_averages_positions():
    target = torch.tensor([[[0.0, 0.0]], [[1.0, -1.0]]])  # (B=2, T=1, V=2)
    pred = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
    err, n = recon_error(pred, target, "kl")
    assert n == 2
    p = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    expected = (p * (p.log() - torch.log(torch.tensor([0.5, 0.5])))).sum()
    assert err.item() == pytest.approx(expected.item(), rel=1e-5)
    assert recon_error(target, target, "kl")[0].item() == pytest.approx(0.0, abs=1e-7)


def test_faithfulness_is_mse_over_all_decomposed_parameters():
    deltas = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0]])}
    assert faithfulness_loss(deltas).item() == pytest.approx((1 + 4 + 9) / 3)


def test_importance_minimality_sums_layers_and_components_and_averages_batch():
    # Reference unit-test values: p=1 on {[1,2,3]}, {[.5,1.5]} -> 8; p=2 on [2,3] -> 13.
    ci = {"a": torch.tensor([[1.0, 2.0, 3.0]]), "b": torch.tensor([[0.5, 1.5]])}
    assert importance_minimality_loss(ci, 1.0, 0.0).item() == pytest.approx(8.0)
    assert importance_minimality_loss({"a": torch.tensor([[2.0, 3.0]])}, 2.0, 0.0).item() == \
        pytest.approx(13.0)
    # Batch (and sequence) positions are averaged, not summed.
    batch = {"a": torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])}  # (B=2, T=1, C=2)
    assert importance_minimality_loss(batch, 1.0, 0.0).item() == pytest.approx((4 + 2) / 2)
    # eps is added before the power.
    assert importance_minimality_loss({"a": torch.zeros(1, 4)}, 0.5, 1e-4).item() == \
        pytest.approx(4 * 1e-2)


def test_p_annealing_schedule():
    const = LossConfig(p=2.0)
    assert annealed_p(900, 1000, const) == 2.0
    ann = LossConfig(p=2.0, p_anneal_final=0.5, p_anneal_start_frac=0.5, p_anneal_end_frac=1.0)
    assert annealed_p(0, 1000, ann) == 2.0
    assert annealed_p(499, 1000, ann) == 2.0
    assert annealed_p(750, 1000, ann) == pytest.approx(1.25)
    assert annealed_p(1000, 1000, ann) == 0.5
    # start_frac 1.0 switches annealing off even with a final p.
    assert annealed_p(999, 1000, LossConfig(p=2.0, p_anneal_final=0.5)) == 2.0


@pytest.mark.parametrize("sampling", ["continuous", "binomial"])
def test_sample_masks_lie_between_ci_and_one(sampling):
    g = torch.rand(500, 6)
    g[:, 0] = 1.0
    masks = sample_masks({"x": g}, sampling=sampling, use_delta=True,
                         generator=torch.Generator().manual_seed(0))
    m = masks["x"]
    assert m.component.shape == (500, 6) and m.delta.shape == (500,)
    assert (m.component >= g - 1e-7).all() and (m.component <= 1 + 1e-7).all()
    assert torch.equal(m.component[:, 0], torch.ones(500))
    assert (m.delta >= 0).all() and (m.delta <= 1).all()
    if sampling == "binomial":
        at_g = torch.isclose(m.component, g) | torch.isclose(m.component, torch.ones(()))
        assert at_g.all()
        assert 0.4 < (m.component[:, 1:] == 1).float().mean() < 0.6
    no_delta = sample_masks({"x": g}, sampling=sampling, use_delta=False, generator=None)
    assert no_delta["x"].delta is None


def test_stochastic_recon_normalisations():
    """Full loss = mean over S passes; layerwise = mean over S*L single-module passes, each the
    MSE mean over batch and output dims, with the masks drawn in the documented order."""
    model, cfg = make_model(n_mask_samples=2)
    x = torch.randn(32, 6)
    cache = model.forward_cached(x)
    ci = model.ci_from_cache(cache)
    losses = stochastic_recon_losses(model, x, cache, ci, cfg, torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)
    full, layer = [], []
    with torch.no_grad():
        for _ in range(2):
            masks = sample_masks(ci.lower, sampling="continuous", use_delta=True, generator=gen)
            full.append(((model.forward_masked(x, masks) - cache.output) ** 2).mean())
            for p in model.module_paths:
                out = model.forward_masked(x, {p: masks[p]})
                layer.append(((out - cache.output) ** 2).mean())
    assert len(layer) == 6
    assert losses["stochastic_recon"].item() == pytest.approx(torch.stack(full).mean().item(),
                                                              rel=1e-5)
    assert losses["stochastic_recon_layerwise"].item() == pytest.approx(
        torch.stack(layer).mean().item(), rel=1e-5)


def _set_svd_components(model: ComponentModel, rank: int) -> None:
    """V U = the best rank-`rank` approximation of each W (exact when rank >= rank(W))."""
    for p in model.module_paths:
        comp, W = model.comp(p), model.target_weight(p)
        r = min(rank, comp.C, *W.shape)
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        comp.V.zero_()
        comp.U.zero_()
        comp.V[:, :r] = vh[:r].T * s[:r]
        comp.U[:r] = u[:, :r].T


def test_ci_masked_and_unmasked_recon():
    model, cfg = make_model(Cs=(6, 6, 6))
    x = torch.randn(16, 6)
    cache = model.forward_cached(x)
    ci = model.ci_from_cache(cache)
    with torch.no_grad():
        masks = {p: Mask(g) for p, g in ci.lower.items()}
        expected = ((model.forward_masked(x, masks) - cache.output) ** 2).mean()
        assert ci_masked_recon_loss(model, x, cache, ci, "mse").item() == pytest.approx(
            expected.item(), rel=1e-6)
        # All subcomponents on and no delta: exact iff sum_c U_c V_c = W.
        _set_svd_components(model, rank=6)
        assert unmasked_recon_loss(model, x, cache, "mse").item() < 1e-10
        _set_svd_components(model, rank=1)
        assert unmasked_recon_loss(model, x, cache, "mse").item() > 1e-4


def test_spd_loss_total_is_the_weighted_sum_of_its_terms():
    model, cfg = make_model(loss=LossConfig(faithfulness=0.5, stochastic_recon=2.0,
                                            stochastic_recon_layerwise=3.0,
                                            importance_minimality=0.1, p=1.5))
    x = torch.randn(16, 6)
    total, terms, ci = spd_loss(model, x, cfg, step=0, generator=torch.Generator().manual_seed(0))
    expected = (0.5 * terms["faithfulness"] + 2.0 * terms["stochastic_recon"]
                + 3.0 * terms["stochastic_recon_layerwise"] + 0.1 * terms["importance_minimality"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["p"].item() == 1.5
    total.backward()
    assert all(p.grad is not None for p in model.ci_parameters())
    assert set(ci.lower) == {"0", "2", "4"}


def test_zero_coefficients_skip_recon_terms():
    model, cfg = make_model(loss=LossConfig(stochastic_recon=0.0, stochastic_recon_layerwise=0.0))
    total, terms, _ = spd_loss(model, torch.randn(4, 6), cfg, 0, None)
    assert "stochastic_recon" not in terms and "stochastic_recon_layerwise" not in terms
    assert total.item() == pytest.approx(3e-3 * terms["importance_minimality"].item(), rel=1e-6)


def test_kl_output_loss_runs_end_to_end():
    model, cfg = make_model(loss=LossConfig(output="kl"))
    total, terms, _ = spd_loss(model, torch.randn(8, 6), cfg, 0, None)
    assert torch.isfinite(total) and terms["stochastic_recon"] >= 0
