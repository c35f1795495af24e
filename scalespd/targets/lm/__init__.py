"""Language-model targets (target.kind hf_causal_lm): Hugging Face causal LMs, their text data
and the offline default model.

Public API (the contract later stages use):
  LMModule, lm_modules, target_modules, weight_matrix   decomposable projections (nn.Linear and
                                                        GPT-2 Conv1D), (d_out, d_in) weights
  LMData, load_texts, load_lm_data, pack_tokens,        text -> (M, seq_len) token ids, seeded
  split_heldout, sample_batch                           held-out split, batches
  LMTarget, load_lm_target, save_lm_target              run_dir/target/ (save_pretrained + meta)
  preflight                                             every user-input check before training
  train_bpe_tokenizer, build_default_model,             the offline default model
  train_default_lm, heldout_loss
transformers, tokenizers and datasets are imported when a function needs them, not on import.
"""

from scalespd.targets.lm.data import (
    BUNDLED_CORPUS,
    LMData,
    load_lm_data,
    load_texts,
    pack_tokens,
    sample_batch,
    split_heldout,
)
from scalespd.targets.lm.io import LMTarget, load_lm_target, save_lm_target
from scalespd.targets.lm.modules import LMModule, lm_modules, target_modules, weight_matrix
from scalespd.targets.lm.stage import preflight
from scalespd.targets.lm.tokenizer import train_bpe_tokenizer
from scalespd.targets.lm.training import build_default_model, heldout_loss, train_default_lm

__all__ = [
    "BUNDLED_CORPUS",
    "LMData",
    "LMModule",
    "LMTarget",
    "build_default_model",
    "heldout_loss",
    "lm_modules",
    "load_lm_data",
    "load_lm_target",
    "load_texts",
    "pack_tokens",
    "preflight",
    "sample_batch",
    "save_lm_target",
    "split_heldout",
    "target_modules",
    "train_bpe_tokenizer",
    "train_default_lm",
    "weight_matrix",
]
