"""SPD loss terms (digest §2.2-2.7, reference §1.5-1.7 and §9 for the normalisations).

* output reconstruction error D: ``mse`` = sum of squared errors over all elements, normaliser
  numel (a mean over batch and output dims); ``kl`` = sum over positions of
  KL(softmax(target) || softmax(pred)) over the last dim, normaliser = number of positions.
  Every reconstruction loss is (sum of D over its forward passes) / (sum of normalisers), so
  the layerwise loss is the mean over its S * L passes.
* faithfulness: sum_l ||W_l - (V_l U_l)^T||_F^2 / sum_l numel(W_l).
* importance minimality: sum_l sum_c mean_positions (g_upper + eps)^p (summed, not averaged,
  over layers, as the reference does deliberately), with optional linear p-annealing.
* masks: m = g + (1 - g) r with r ~ U(0, 1) (continuous) or Bernoulli(1/2) (binomial); the delta
  component gets one U(0, 1) scalar per position and module, whatever the sampling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from scalespd.train.components import CausalImportance, ComponentModel, ForwardCache, Mask

if TYPE_CHECKING:
    from scalespd.config import DecomposeConfig, LossConfig

OutputLoss = Literal["mse", "kl"]


def recon_error(pred: Tensor, target: Tensor, kind: OutputLoss) -> tuple[Tensor, int]:
    """(summed error, normaliser) between a masked output and the target output (..., d)."""
    if kind == "mse":
        return ((pred - target) ** 2).sum(), pred.numel()
    if kind == "kl":
        logp = F.log_softmax(target, dim=-1)
        logq = F.log_softmax(pred, dim=-1)
        return (logp.exp() * (logp - logq)).sum(), pred.numel() // pred.shape[-1]
    raise ValueError(f"unknown output loss {kind!r}; expected 'mse' or 'kl'")


def faithfulness_loss(deltas: dict[str, Tensor]) -> Tensor:
    """Mean squared entry of W - (VU)^T over all decomposed parameters."""
    total = sum((d**2).sum() for d in deltas.values())
    n = sum(d.numel() for d in deltas.values())
    return total / n  # type: ignore[return-value]


def annealed_p(step: int, steps: int, loss: LossConfig) -> float:
    """Minimality exponent at `step`: constant p unless p_anneal_final is set and
    p_anneal_start_frac < 1; then p, linear to p_anneal_final between the start and end
    fractions of training, then p_anneal_final."""
    if loss.p_anneal_final is None or loss.p_anneal_start_frac >= 1.0:
        return loss.p
    frac = step / steps
    start, end = loss.p_anneal_start_frac, loss.p_anneal_end_frac
    if frac < start:
        return loss.p
    if frac >= end:
        return loss.p_anneal_final
    return loss.p + (loss.p_anneal_final - loss.p) * (frac - start) / (end - start)


def importance_minimality_loss(ci_upper: dict[str, Tensor], p: float, eps: float) -> Tensor:
    """sum over modules and components of mean over positions of (g_upper + eps)^p; each g is
    (..., C)."""
    total = None
    for g in ci_upper.values():
        term = ((g + eps) ** p).flatten(0, -2).mean(0).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def sample_masks(
    ci_lower: dict[str, Tensor],
    *,
    sampling: Literal["continuous", "binomial"],
    use_delta: bool,
    generator: torch.Generator | None,
) -> dict[str, Mask]:
    """One stochastic mask per module: m = g + (1 - g) r, plus a U(0, 1) delta mask per
    position when the delta component is on."""
    out = {}
    for p, g in ci_lower.items():
        if sampling == "binomial":
            r = torch.randint(0, 2, g.shape, device=g.device, generator=generator).to(g.dtype)
        else:
            r = torch.rand(g.shape, device=g.device, dtype=g.dtype, generator=generator)
        delta = None
        if use_delta:
            delta = torch.rand(g.shape[:-1], device=g.device, dtype=g.dtype, generator=generator)
        out[p] = Mask(component=g + (1 - g) * r, delta=delta)
    return out


def subset_routing(shape: torch.Size, n_modules: int, device: torch.device,
                   generator: torch.Generator | None) -> Tensor:
    """(..., L) bool: per position, a uniformly random number k in {1..L} of the L modules, a
    uniformly random choice of which (module l is routed iff its rank in a random permutation
    is below k)."""
    noise = torch.rand((*shape, n_modules), device=device, generator=generator)
    rank = noise.argsort(dim=-1).argsort(dim=-1)  # a random permutation per position
    k = torch.randint(1, n_modules + 1, (*shape, 1), device=device, generator=generator)
    return rank < k


def stochastic_recon_losses(
    model: ComponentModel,
    x: Tensor,
    cache: ForwardCache,
    ci: CausalImportance,
    cfg: DecomposeConfig,
    generator: torch.Generator | None,
    *,
    full: bool = True,
    layerwise: bool = True,
    subset: bool = False,
) -> dict[str, Tensor]:
    """Stochastic reconstruction with every module masked at once (`stochastic_recon`), with
    one module masked at a time (`stochastic_recon_layerwise`) and with a random subset of the
    modules masked per position (`stochastic_recon_subset`), over S = n_mask_samples mask
    samples. The layerwise and subset passes use the same sample's masks."""
    kind = cfg.loss.output
    sums: dict[str, list[Tensor]] = {"full": [], "layer": [], "subset": []}
    ns = {"full": 0, "layer": 0, "subset": 0}
    for _ in range(cfg.n_mask_samples):
        masks = sample_masks(ci.lower, sampling=cfg.sampling, use_delta=cfg.use_delta_component,
                             generator=generator)
        if full:
            err, n = recon_error(model.forward_masked(x, masks, cache), cache.output, kind)
            sums["full"].append(err)
            ns["full"] += n
        if subset:
            lead = next(iter(ci.lower.values())).shape[:-1]
            route = subset_routing(lead, len(model.module_paths), x.device, generator)
            routed = {p: Mask(m.component, m.delta, route[..., i])
                      for i, (p, m) in enumerate(masks.items())}
            err, n = recon_error(model.forward_masked(x, routed, cache), cache.output, kind)
            sums["subset"].append(err)
            ns["subset"] += n
        if layerwise:
            for p in model.module_paths:
                layer_out = model.forward_masked(x, {p: masks[p]}, cache)
                err, n = recon_error(layer_out, cache.output, kind)
                sums["layer"].append(err)
                ns["layer"] += n
    out: dict[str, Tensor] = {}
    if full:
        out["stochastic_recon"] = torch.stack(sums["full"]).sum() / ns["full"]
    if layerwise:
        out["stochastic_recon_layerwise"] = torch.stack(sums["layer"]).sum() / ns["layer"]
    if subset:
        out["stochastic_recon_subset"] = torch.stack(sums["subset"]).sum() / ns["subset"]
    return out


def ci_masked_recon_loss(model: ComponentModel, x: Tensor, cache: ForwardCache,
                         ci: CausalImportance, kind: OutputLoss) -> Tensor:
    """All modules masked with m = g (deterministic), no delta component."""
    masks = {p: Mask(component=g) for p, g in ci.lower.items()}
    err, n = recon_error(model.forward_masked(x, masks, cache), cache.output, kind)
    return err / n


def unmasked_recon_loss(model: ComponentModel, x: Tensor, cache: ForwardCache,
                        kind: OutputLoss) -> Tensor:
    """All subcomponents on (mask 1), no delta component: how well sum_c U_c V_c alone works."""
    masks = {p: Mask(component=torch.ones(cache.inputs[p].shape[:-1] + (model.C[p],),
                                          device=x.device, dtype=x.dtype))
             for p in model.module_paths}
    err, n = recon_error(model.forward_masked(x, masks), cache.output, kind)
    return err / n


def spd_loss(
    model: ComponentModel,
    x: Tensor,
    cfg: DecomposeConfig,
    step: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, dict[str, Tensor], CausalImportance]:
    """The total SPD loss on batch x (..., d_in) at `step`:
    faithfulness * L_faith + beta1 * L_stoch + beta2 * L_layerwise + beta_s * L_subset
    + beta3 * L_min.

    Returns (total, {term: value (detached)} incl. 'p', CI). Terms with coefficient 0 are not
    computed (except faithfulness, which is cheap and logged)."""
    lc = cfg.loss
    cache = model.forward_cached(x)
    ci = model.ci_from_cache(cache, generator)
    terms: dict[str, Tensor] = {}
    total = torch.zeros((), device=x.device)

    faith = faithfulness_loss(model.weight_deltas())
    terms["faithfulness"] = faith
    if lc.faithfulness > 0:
        total = total + lc.faithfulness * faith

    recon = stochastic_recon_losses(model, x, cache, ci, cfg, generator,
                                    full=lc.stochastic_recon > 0,
                                    layerwise=lc.stochastic_recon_layerwise > 0,
                                    subset=lc.stochastic_recon_subset > 0)
    for name, coeff in (("stochastic_recon", lc.stochastic_recon),
                        ("stochastic_recon_layerwise", lc.stochastic_recon_layerwise),
                        ("stochastic_recon_subset", lc.stochastic_recon_subset)):
        if name in recon:
            terms[name] = recon[name]
            total = total + coeff * recon[name]

    p = annealed_p(step, cfg.steps, lc)
    imp = importance_minimality_loss(ci.upper, p, lc.eps)
    terms["importance_minimality"] = imp
    if lc.importance_minimality > 0:
        total = total + lc.importance_minimality * imp

    terms = {k: v.detach() for k, v in terms.items()}
    terms["p"] = torch.tensor(p)
    return total, terms, ci
