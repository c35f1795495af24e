"""The offline default language model: a LLaMA-style `LlamaForCausalLM` of the config's shape,
trained from scratch on packed sequences with next-token cross-entropy.

Recipe (config `train`): AdamW with the scheduled learning rate (scalespd.schedules), a batch
of `batch_size` sequences drawn with replacement from the training split each step, gradient
norm clipped at 1 (the usual guard for small transformers, whose early steps spike).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from scalespd.config import HFCausalLMTargetConfig
from scalespd.schedules import scheduled_lr
from scalespd.targets.lm.data import LMData, sample_batch
from scalespd.targets.training import STREAM_TRAIN_DATA, make_generator

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

log = logging.getLogger("scalespd.targets")

GRAD_CLIP_NORM = 1.0
EVAL_SEQUENCES = 512  # held-out sequences the evaluation loss is measured on (the first ones)
EVAL_BATCH = 32


def default_model_config(cfg: HFCausalLMTargetConfig, special_id: int = 0) -> LlamaConfig:
    """The LlamaConfig of the default model. `special_id`: the tokenizer's <|endoftext|> id,
    used as BOS, EOS and PAD (0 for scalespd's tokenizer)."""
    from transformers import LlamaConfig  # noqa: PLC0415

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=special_id,
        eos_token_id=special_id, pad_token_id=special_id,
    )


def build_default_model(cfg: HFCausalLMTargetConfig, special_id: int = 0) -> LlamaForCausalLM:
    """A freshly initialised default model; identical for identical configs (drawn from
    cfg.seed in a forked RNG, so the caller's global RNG state is untouched)."""
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(default_model_config(cfg, special_id))


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, sequences: torch.Tensor,
                 max_sequences: int = EVAL_SEQUENCES) -> dict[str, float]:
    """Mean next-token cross-entropy (nats per token) over the first `max_sequences` rows of
    `sequences` (M, seq_len), its perplexity, and the tokens it was measured on."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = sequences[:max_sequences]
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], EVAL_BATCH):
        batch = rows[start:start + EVAL_BATCH].to(device)
        n = batch.shape[0] * (batch.shape[1] - 1)  # predicted tokens
        total += float(model(input_ids=batch, labels=batch).loss) * n
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_tokens": count}


def train_default_lm(cfg: HFCausalLMTargetConfig, data: LMData, special_id: int = 0,
                     device: str | torch.device = "cpu", progress: bool | None = None,
                     ) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Build and train the default model on data.train with cfg.train; deterministic for a
    given config, data and device. Returns (model in eval mode, info: steps, initial_loss (the
    first step's), final_loss (mean of the last 10% of the steps, at most 50), eval_loss /
    eval_perplexity / eval_tokens on data.heldout, n_params, tokens_seen, seconds,
    seconds_per_step)."""
    recipe = cfg.train
    model = build_default_model(cfg, special_id)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to confuses mypy
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.schedule.lr,
                            weight_decay=recipe.weight_decay)
    gen = make_generator(cfg.seed, STREAM_TRAIN_DATA)
    log_every = max(1, recipe.steps // 10)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="train LM target", mininterval=2.0,
               disable=None if progress is None else not progress)
    for step in bar:
        lr = scheduled_lr(step, recipe.steps, recipe.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(data.train, recipe.batch_size, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"LM target training diverged at step {step} (loss "
                                     f"{losses[-1]}); lower target.train.schedule.lr")
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            log.info("target step %d/%d loss %.3f lr %.2e", step + 1, recipe.steps,
                     losses[-1], lr)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    info: dict[str, Any] = {
        "steps": recipe.steps,
        "initial_loss": losses[0],
        "final_loss": float(np.mean(losses[-max(1, min(50, recipe.steps // 10)):])),
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokens_seen": recipe.steps * recipe.batch_size * data.seq_len,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / recipe.steps, 4),
        **heldout_loss(model, data.heldout),
    }
    return model, info
