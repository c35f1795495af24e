"""What SPD of a language model needs beyond the toys: its token sequences and its metrics.

The data are the target's own packed sequences (`scalespd.targets.lm.load_lm_data` on the
target config recorded in run_dir/target, with the target's tokenizer): SPD trains on the
target's training sequences and evaluates on its held-out ones, so every later stage sees the
same tokens for the same config.

Decomposition quality of a language model (reference: CE/KL of the masked model): the masked
model's next-token cross-entropy and its per-token KL to the target, with

* ``ci_masked``: every subcomponent masked at its CI (no delta component),
* ``rounded``: CI rounded to 0/1 (mask 1 where CI > 0, as the reference's rounding threshold),
* ``alive_only``: mask 1 for the subcomponents alive on the evaluation batch (CI > tau on some
  token) and 0 for the others: how much of the model the alive ones carry,
* ``unmasked``: every subcomponent on (the sum of the subcomponents in place of each weight),
* ``all_ablated``: every subcomponent off (every decomposed weight removed): the bound the
  others are judged against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from scalespd import storage
from scalespd.train.components import ComponentModel, Mask


@dataclass(frozen=True)
class LMSequences:
    """Token sequences of a language-model target. train: (M_train, T) int64; heldout:
    (M_heldout, T) int64; heldout_index: (M_heldout,) int64, each held-out sequence's number in
    the packed text stream."""

    train: Tensor
    heldout: Tensor
    heldout_index: Tensor

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(batch_size, T) training sequences drawn with replacement from `generator`."""
        from scalespd.targets.lm.data import sample_batch  # noqa: PLC0415

        rows = sample_batch(self.train, batch_size, _cpu(generator))
        return rows.to(generator.device)

    def eval_batch(self, n: int, device: torch.device) -> Tensor:
        """The first min(n, M_heldout) held-out sequences: the same at every call."""
        return self.heldout[:n].to(device)


def _cpu(generator: torch.Generator) -> torch.Generator:
    """The sequences live on the CPU: a CUDA generator seeds a CPU one deterministically."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), device=generator.device, generator=generator))
    return torch.Generator().manual_seed(seed)


def load_sequences(target_dir: storage.PathLike) -> LMSequences:
    """The packed train / held-out sequences of the target saved in `target_dir` (its recorded
    config and tokenizer; the text is read and tokenized again, which is deterministic)."""
    from scalespd.config import HFCausalLMTargetConfig  # noqa: PLC0415
    from scalespd.targets.io import read_meta  # noqa: PLC0415
    from scalespd.targets.lm.data import load_lm_data  # noqa: PLC0415
    from scalespd.targets.lm.hf import load_tokenizer  # noqa: PLC0415
    from scalespd.targets.lm.io import model_source  # noqa: PLC0415

    meta = read_meta(target_dir)
    cfg = HFCausalLMTargetConfig.model_validate(meta["config"])
    data = load_lm_data(cfg, load_tokenizer(model_source(target_dir, meta)))
    return LMSequences(train=data.train, heldout=data.heldout, heldout_index=data.heldout_index)


def next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) of logits (B, T, V) on token ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def kl_per_token(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(logits)) per position: (..., V) -> (...)."""
    logp = F.log_softmax(target_logits, dim=-1)
    return (logp.exp() * (logp - F.log_softmax(logits, dim=-1))).sum(-1)


@torch.no_grad()
def ce_kl_metrics(model: ComponentModel, ids: Tensor, tau: float) -> dict[str, float]:
    """`ce/<variant>` and `kl/<variant>` (see the module docstring) plus `ce/target`, on token
    ids (B, T); tau: the alive threshold."""
    target_logits = model(ids)
    ci = model.causal_importances(ids)
    alive = {p: (g.flatten(0, -2).max(0).values > tau).to(g.dtype) for p, g in ci.items()}
    variants: dict[str, dict[str, Tensor]] = {
        "ci_masked": ci,
        "rounded": {p: (g > 0).to(g.dtype) for p, g in ci.items()},
        "alive_only": {p: a.expand_as(ci[p]) for p, a in alive.items()},
        "unmasked": {p: torch.ones_like(g) for p, g in ci.items()},
        "all_ablated": {p: torch.zeros_like(g) for p, g in ci.items()},
    }
    out = {"ce/target": float(next_token_ce(target_logits, ids))}
    for name, masks in variants.items():
        logits = model.forward_masked(ids, {p: Mask(component=m) for p, m in masks.items()})
        out[f"ce/{name}"] = float(next_token_ce(logits, ids))
        out[f"kl/{name}"] = float(kl_per_token(target_logits, logits).mean())
    return out
