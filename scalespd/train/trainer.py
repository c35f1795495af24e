"""`SPDTrainer`: one SPD optimisation run on one rank (reference §1.11).

The Ray Train loop (``ray_train.py``) drives it: ``faithfulness_warmup()`` once at the start,
then ``train_step()`` until ``step == cfg.steps``, ``evaluate()`` / ``save_ci_heatmap()`` at
checkpoints, and ``state_dict()`` / ``load_state_dict()`` to checkpoint and resume.

Determinism and data parallelism:
* Parameters are initialised from a generator seeded with ``cfg.seed`` alone, so every rank
  starts identical (and they are broadcast from rank 0 anyway when a process group exists).
* Every random draw of step t on rank r (its data batch, masks) comes from generators re-seeded
  from (cfg.seed, rank, t). Ranks therefore see different data, and the random stream is a pure
  function of the step: resuming from a checkpoint (model, optimiser, step) replays exactly the
  trajectory of an uninterrupted run, without storing RNG states.
* With ``world_size > 1`` and an initialised ``torch.distributed`` process group (Ray Train sets
  up gloo/nccl), gradients are averaged across ranks with one coalesced all-reduce before each
  optimiser step, equivalent to the mean loss over the global batch; logged losses are averaged
  too. Each rank draws ``batch_size // world_size`` samples.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from scalespd import storage
from scalespd.config import ONE_HOT_VALUE, DecomposeConfig
from scalespd.schedules import scheduled_lr
from scalespd.targets import ground_truth, make_dataset, one_hot_inputs
from scalespd.train.components import ComponentModel, decomposable_modules, match_modules
from scalespd.train.lm import LMSequences, ce_kl_metrics
from scalespd.train.losses import annealed_p, faithfulness_loss, spd_loss
from scalespd.train.metrics import decomposition_metrics, save_ci_heatmap

log = logging.getLogger(__name__)

# Independent random streams derived from cfg.seed.
_STREAM_INIT, _STREAM_DATA, _STREAM_MASKS, _STREAM_EVAL = 0, 1, 2, 3


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, stream, rank, step ...), independent across keys."""
    entropy = [k % (1 << 63) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % (1 << 63))


class SPDTrainer:
    """SPD of a frozen target on one rank; see the module docstring."""

    def __init__(
        self,
        target: nn.Module,
        target_cfg: Any,
        cfg: DecomposeConfig,
        *,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        data: LMSequences | None = None,
    ) -> None:
        """`data`: the token sequences of a language-model target (`lm.load_sequences`);
        toys generate their own data from target_cfg."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} / world_size {world_size}")
        if cfg.batch_size % world_size:
            raise ValueError(f"decompose.batch_size ({cfg.batch_size}) must be divisible by the "
                             f"number of workers ({world_size})")
        self.cfg, self.target_cfg = cfg, target_cfg
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.local_batch = cfg.batch_size // world_size
        self.distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

        infos = decomposable_modules(target, target_cfg)
        module_C = match_modules([(m.pattern, m.C) for m in cfg.modules], [i.path for i in infos])
        init_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _STREAM_INIT))
        self.model = ComponentModel(target, module_C, infos, cfg, generator=init_gen)
        self.model.to(self.device)
        if self.distributed:  # identical already; broadcast makes it independent of the RNG
            for t in [*self.model.components.state_dict().values(),
                      *self.model.ci_fns.state_dict().values()]:
                dist.broadcast(t, src=0)
        self.params = self.model.component_parameters() + self.model.ci_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.schedule.lr,
                                           weight_decay=cfg.weight_decay)
        self.is_lm = target_cfg.kind == "hf_causal_lm"
        if self.is_lm and data is None:
            raise ValueError("a language-model target needs its token sequences (data=)")
        self.dataset: Any = data if self.is_lm else make_dataset(target_cfg)
        self.step = 0
        self.warmed_up = cfg.faithfulness_warmup_steps == 0
        self._data_gen = torch.Generator(device=self.device)
        self._mask_gen = torch.Generator(device=self.device)

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------

    def faithfulness_warmup(self) -> None:
        """cfg.faithfulness_warmup_steps of AdamW (own lr / weight decay, fresh state) on the
        subcomponents alone, minimising the faithfulness loss, so sum_c U_c V_c starts close
        to W. Identical on every rank (no data). A no-op once done (state is checkpointed)."""
        if self.warmed_up:
            return
        params = self.model.component_parameters()
        opt = torch.optim.AdamW(params, lr=self.cfg.faithfulness_warmup_lr,
                                weight_decay=self.cfg.faithfulness_warmup_weight_decay)
        loss = None
        for _ in range(self.cfg.faithfulness_warmup_steps):
            opt.zero_grad(set_to_none=True)
            loss = faithfulness_loss(self.model.weight_deltas())
            loss.backward()
            opt.step()
        self.warmed_up = True
        if loss is not None:
            log.info("faithfulness warm-up done: loss %.3g", float(loss.detach()))

    def _seed_step(self) -> None:
        self._data_gen.manual_seed(derive_seed(self.cfg.seed, _STREAM_DATA, self.rank, self.step))
        self._mask_gen.manual_seed(derive_seed(self.cfg.seed, _STREAM_MASKS, self.rank,
                                               self.step))

    def train_step(self) -> dict[str, float]:
        """One optimiser step on a fresh local batch. Returns the loss terms (averaged over
        ranks), total, lr, p and the per-module train L0 (`l0/<module>`)."""
        if self.step >= self.cfg.steps:
            raise RuntimeError(f"training is finished ({self.step} of {self.cfg.steps} steps)")
        cfg = self.cfg
        lr = scheduled_lr(self.step, cfg.steps, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._seed_step()
        x = self.dataset.sample(self.local_batch, self._data_gen)
        self.model.train()
        total, terms, ci = spd_loss(self.model, x, cfg, self.step, self._mask_gen)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.distributed:
            self._all_reduce_grads()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip_norm)
        self.optimizer.step()
        self.step += 1

        tau = cfg.ci_alive_threshold
        logged: dict[str, Tensor] = {"total": total.detach(), **terms}
        for m, g in ci.lower.items():
            logged[f"l0/{m}"] = (g.detach() > tau).sum(-1).float().mean()
        out = self._mean_over_ranks(logged)
        out["lr"] = lr
        return out

    def _all_reduce_grads(self) -> None:
        """Average gradients over ranks with one all-reduce on a flat buffer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, float]:
        keys = list(values)
        vec = torch.stack([values[k].float().to(self.device).reshape(()) for k in keys])
        if self.distributed:
            dist.all_reduce(vec)
            vec /= self.world_size
        return dict(zip(keys, vec.tolist(), strict=True))

    # ---------------------------------------------------------------------------------------
    # Evaluation
    # ---------------------------------------------------------------------------------------

    def _eval_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.seed, _STREAM_EVAL))

    def _one_hot(self) -> Tensor:
        return one_hot_inputs(self.target_cfg, ONE_HOT_VALUE, device=self.device)

    def evaluate(self) -> dict[str, float]:
        """Decomposition metrics (see `metrics.decomposition_metrics`) on a deterministic eval
        batch of cfg.eval_batch_size (same inputs and masks at every call, on every rank); for
        a language model, on its first held-out sequences, plus `lm.ce_kl_metrics`."""
        self.model.eval()
        gen = self._eval_generator()
        p = annealed_p(min(self.step, self.cfg.steps), self.cfg.steps, self.cfg.loss)
        if self.is_lm:
            x = self.dataset.eval_batch(self.cfg.eval_batch_size, self.device)
            out = decomposition_metrics(self.model, self.cfg, x, None, None, p=p, generator=gen)
            return out | ce_kl_metrics(self.model, x, self.cfg.ci_alive_threshold)
        x = self.dataset.sample(self.cfg.eval_batch_size, gen)
        return decomposition_metrics(self.model, self.cfg, x, self._one_hot(),
                                     ground_truth(self.target_cfg), p=p, generator=gen)

    def save_ci_heatmap(self, path: storage.PathLike) -> None:
        """PNG of the causal importances on one-hot inputs (ONE_HOT_VALUE), columns permuted;
        for a language model, on the tokens of its first held-out sequence."""
        if self.is_lm:
            save_ci_heatmap(self.model, self.dataset.eval_batch(1, self.device), path,
                            title=f"causal importance on one held-out sequence, step {self.step}",
                            ylabel="token position")
            return
        save_ci_heatmap(self.model, self._one_hot(), path,
                        title=f"causal importance on one-hot inputs, step {self.step}")

    # ---------------------------------------------------------------------------------------
    # Checkpointing
    # ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Subcomponents, CI functions, optimiser state, step and warm-up flag. Random draws
        are derived from (seed, rank, step), so the step fixes the RNG state of every rank."""
        return {
            "components": self.model.components.state_dict(),
            "ci_fns": self.model.ci_fns.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "warmed_up": self.warmed_up,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"components", "ci_fns", "optimizer", "step", "warmed_up"} - set(state)
        if missing:
            raise ValueError(f"SPD trainer state is missing {sorted(missing)}")
        self.model.components.load_state_dict(state["components"])
        self.model.ci_fns.load_state_dict(state["ci_fns"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.warmed_up = bool(state["warmed_up"])
