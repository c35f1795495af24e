"""Text for language-model targets: load it with `datasets`, tokenize it, pack it into
fixed-length sequences and split off a seeded held-out set.

Packing: documents (rows of the text column) are tokenized without special tokens and
concatenated, each followed by the tokenizer's end-of-text token (EOS; BOS when there is no
EOS), and the stream is cut into M = floor(tokens / seq_len) sequences in text order (the tail
that does not fill a sequence is dropped). The held-out split is a seeded random choice of
whole sequences; both parts keep text order, and `LMData.*_index` maps each row back to its
position in the packed stream (sequence i covers tokens [i * seq_len, (i + 1) * seq_len)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scalespd.config import HFCausalLMTargetConfig
from scalespd.errors import ConfigError
from scalespd.targets.lm.hf import hub_offline
from scalespd.targets.training import derive_seed

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("scalespd.targets")

CORPUS_DIR = Path(__file__).with_name("corpus")
BUNDLED_CORPUS = CORPUS_DIR / "shakespeare.jsonl.gz"
# Random stream of the held-out choice (the target's init uses the seed itself; the training
# batches use scalespd.targets.training.STREAM_TRAIN_DATA).
STREAM_HELDOUT_SPLIT = 3

# File suffix -> `datasets` packaged builder (after a compression suffix is removed).
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
             ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass(frozen=True)
class LMData:
    """Packed token ids of a language-model dataset.

    train: (M_train, seq_len) int64; heldout: (M_heldout, seq_len) int64;
    train_index / heldout_index: (M_train,) / (M_heldout,) int64, each row's sequence number
    in the packed stream (ascending); n_tokens: tokens in the packed stream (M * seq_len);
    n_documents: documents read."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_index: torch.Tensor
    heldout_index: torch.Tensor
    n_tokens: int
    n_documents: int

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def _builder(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _BUILDERS:
        raise ConfigError(f"target.dataset: cannot tell the format of {path} from its name; "
                          f"use one of {sorted(_BUILDERS)} (optionally {'/'.join(_COMPRESSION)}"
                          " compressed)")
    return _BUILDERS[suffixes[-1]]


def _local_files(root: Path) -> tuple[str, list[str]]:
    """(builder, files) of a local file or of a folder's data files (one format per folder)."""
    if root.is_file():
        return _builder(root), [str(root)]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_builder: dict[str, list[str]] = {}
    for f in files:
        try:
            by_builder.setdefault(_builder(f), []).append(str(f))
        except ConfigError:
            continue  # READMEs, licences, ...
    if len(by_builder) != 1:
        found = ", ".join(sorted(by_builder)) or "none"
        raise ConfigError(f"target.dataset: the folder {root} must hold data files of one "
                          f"format (found: {found}); point target.dataset at one file instead")
    (builder, paths), = by_builder.items()
    return builder, paths


def load_texts(cfg: HFCausalLMTargetConfig) -> datasets.Dataset:
    """The dataset named by cfg.dataset (None: the bundled corpus), as a `datasets.Dataset`
    with cfg.text_column checked. ConfigError naming target.dataset / dataset_split /
    text_column for a missing file, an unreachable hub name or a missing column."""
    import datasets  # noqa: PLC0415

    # Its per-split progress bars would interleave with the stage log; the log says what loads.
    datasets.disable_progress_bars()
    if cfg.dataset is None:
        builder, files, source = "json", [str(BUNDLED_CORPUS)], "the bundled corpus"
    else:
        local = Path(cfg.dataset).expanduser()
        builder, files, source = "", [], cfg.dataset
        if local.exists():
            builder, files = _local_files(local)
        elif cfg.dataset.startswith(("/", ".", "~")) or cfg.dataset.count("/") > 1:
            raise ConfigError(f"target.dataset: {cfg.dataset} does not exist")
    kwargs: dict[str, object] = {}
    if builder == "text":
        kwargs = {"sample_by": cfg.text_sample_by, "keep_linebreaks": True}
    try:
        if builder:
            ds = datasets.load_dataset(builder, data_files=files, split=cfg.dataset_split,
                                       **kwargs)
        else:
            ds = datasets.load_dataset(cfg.dataset, split=cfg.dataset_split)
    except (ValueError, KeyError) as err:
        if "split" in str(err).lower():
            raise ConfigError(f"target.dataset_split: {source} has no split "
                              f"{cfg.dataset_split!r} ({err})") from None
        raise ConfigError(f"target.dataset: cannot read {source}: {err}") from None
    except Exception as err:  # the hub client and the file readers raise many types
        if builder:
            raise ConfigError(f"target.dataset: cannot read {source}: "
                              f"{type(err).__name__}: {err}") from None
        why = ("HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set and it is not cached"
               if hub_offline() or _datasets_offline() else "it could not be downloaded")
        raise ConfigError(f"target.dataset: cannot load {source!r}: it is not a local file or "
                          f"folder and {why} ({type(err).__name__}: {err})") from None
    if cfg.text_column not in ds.column_names:
        raise ConfigError(f"target.text_column: {source} has no column {cfg.text_column!r}; "
                          f"its columns are {ds.column_names}")
    return ds


def _datasets_offline() -> bool:
    import datasets  # noqa: PLC0415

    return bool(datasets.config.HF_HUB_OFFLINE)


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token put after every document: EOS, else BOS, else none."""
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if isinstance(tid, int):
            return tid
    return None


def pack_tokens(texts: datasets.Dataset, column: str, tokenizer: PreTrainedTokenizerBase,
                seq_len: int, max_sequences: int | None = None,
                batch_rows: int = 64) -> tuple[torch.Tensor, int]:
    """(sequences (M, seq_len) int64, documents read): the documents of `column` tokenized in
    batches and packed in order (module docstring). Stops once max_sequences are filled."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    sep = separator_id(tokenizer)
    need = None if max_sequences is None else max_sequences * seq_len
    chunks: list[np.ndarray] = []
    total = n_docs = 0
    for batch in texts.select_columns([column]).iter(batch_size=batch_rows):
        docs = [t for t in batch[column] if isinstance(t, str) and t]
        if not docs:
            continue
        # verbose=False: whole documents are longer than model_max_length on purpose.
        ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in ids:
            arr = np.asarray(doc + ([sep] if sep is not None else []), dtype=np.int64)
            chunks.append(arr)
            total += arr.size
            n_docs += 1
            if need is not None and total >= need:
                break
        if need is not None and total >= need:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    m = stream.size // seq_len
    if max_sequences is not None:
        m = min(m, max_sequences)
    return torch.from_numpy(stream[: m * seq_len].reshape(m, seq_len).copy()), n_docs


def split_heldout(n_sequences: int, fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_index, heldout_index), both ascending int64: round(fraction * n) sequences (at
    least 1, at most n - 1) chosen at random from a stream derived from `seed`."""
    if n_sequences < 2:
        raise ValueError(f"need at least 2 sequences to hold one out, got {n_sequences}")
    n_held = min(max(1, round(fraction * n_sequences)), n_sequences - 1)
    gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_HELDOUT_SPLIT))
    perm = torch.randperm(n_sequences, generator=gen)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def load_lm_data(cfg: HFCausalLMTargetConfig, tokenizer: PreTrainedTokenizerBase,
                 texts: datasets.Dataset | None = None) -> LMData:
    """Load (unless `texts` is given), tokenize, pack and split cfg's dataset. ConfigError when
    it yields fewer than 2 sequences of cfg.seq_len tokens."""
    if texts is None:
        texts = load_texts(cfg)
    seqs, n_docs = pack_tokens(texts, cfg.text_column, tokenizer, cfg.seq_len,
                               cfg.max_sequences)
    if seqs.shape[0] < 2:
        raise ConfigError(f"target.dataset: {cfg.dataset or 'the bundled corpus'} gives "
                          f"{seqs.shape[0]} sequence(s) of seq_len {cfg.seq_len} tokens; at "
                          "least 2 are needed (one to train on, one held out); use more text "
                          "or a shorter target.seq_len")
    train_idx, held_idx = split_heldout(seqs.shape[0], cfg.heldout_fraction, cfg.seed)
    log.info("LM data: %d documents -> %d sequences of %d tokens (%d held out)", n_docs,
             seqs.shape[0], cfg.seq_len, held_idx.numel())
    return LMData(train=seqs[train_idx], heldout=seqs[held_idx], train_index=train_idx,
                  heldout_index=held_idx, n_tokens=int(seqs.numel()), n_documents=n_docs)


def sample_batch(sequences: torch.Tensor, batch_size: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """(batch_size, seq_len) rows of `sequences` (M, seq_len) drawn uniformly with
    replacement; the same generator state gives the same batch."""
    rows = torch.randint(0, sequences.shape[0], (batch_size,), generator=generator)
    return sequences[rows]
