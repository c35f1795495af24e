"""Tiny language-model targets for tests: template text, a byte-level BPE tokenizer trained on
it, and random LlamaForCausalLM / GPT2LMHeadModel directories written with save_pretrained.

Template text is for unit tests only (the default target trains on the bundled real corpus).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from scalespd.targets.lm import train_bpe_tokenizer

SUBJECTS = ["the cat", "a dog", "my friend", "the old king", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "helps", "finds", "calls"]
OBJECTS = ["the river", "a red ball", "the queen", "an apple", "the garden", "a letter"]
TAILS = ["today.", "at night.", "in the morning.", "again and again.", "with joy."]
VOCAB = 300


def template_docs(n: int = 240) -> list[str]:
    """n deterministic two-sentence documents (unit-test text, never the default corpus)."""
    docs = []
    for i in range(n):
        s, v, o, t = (SUBJECTS[i % 6], VERBS[(i // 6) % 6], OBJECTS[(i // 36) % 6],
                      TAILS[i % 5])
        docs.append(f"{s.capitalize()} {v} {o} {t} Then {o} {VERBS[(i + 1) % 6]} {s}.")
    return docs


def template_tokenizer() -> Any:
    """A VOCAB-token byte-level BPE tokenizer trained on `template_docs`."""
    return train_bpe_tokenizer(template_docs(), vocab_size=VOCAB, model_max_length=64)


def save_model(model: nn.Module, tokenizer: Any, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """2 layers, d_model 32, 4 heads / 2 KV heads, SwiGLU 48, 64 positions."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """2 layers, d_model 32, 4 heads, 48 positions; dropout off (SPD compares exact outputs)."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=48, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_tiny_llama(path: Path, tokenizer: Any) -> Path:
    return save_model(tiny_llama(), tokenizer, path)


def save_tiny_gpt2(path: Path, tokenizer: Any) -> Path:
    return save_model(tiny_gpt2(), tokenizer, path)
