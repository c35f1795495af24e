"""Row sources: which inputs the profile rows are, generated block by block, reproducibly.

A `RowSource` produces the inputs of any row block from (seed, block index) alone, so any block
can be recomputed on any worker, in any order, and a resumed harvest sees exactly the inputs an
uninterrupted one would have seen.

Row metadata (`profiles/inputs.zarr`). A source declares per-row fields with `row_fields()`
(name -> (dtype, per-row shape)) and fills them for a block with `row_metadata(...)`; the harvest
writes each field as an (M, *shape) array of `inputs.zarr`, chunked like the CI rows so the same
writer owns the same chunks. Toy sources store the input vector itself (`x`). The
language-model source stores `token_ids`, `seq_ids` and `positions` (one row per token
position); its `block_inputs` returns whole sequences (B, T), and its `rows_per_input` = T tells
the harvest that each input gives T rows.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from scalespd.config import ProfilesConfig

RowField = tuple[str, tuple[int, ...]]  # (numpy dtype name, per-row shape)


@runtime_checkable
class RowSource(Protocol):
    """Inputs of the M profile rows. Must be picklable (it is shipped to Ray actors)."""

    @property
    def n_rows(self) -> int: ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the input set (stored in ci.zarr; a resumed harvest must
        describe its inputs identically)."""
        ...

    def block_inputs(self, block: int, start: int, stop: int) -> torch.Tensor:
        """Model inputs of rows [start, stop) (block index `block`), (stop - start, ...)."""
        ...

    def row_fields(self) -> dict[str, RowField]:
        """Per-row metadata fields written to inputs.zarr (empty: nothing written)."""
        ...

    def row_metadata(
        self, block: int, start: int, stop: int, inputs: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """Values of `row_fields()` for rows [start, stop), each (stop - start, *shape)."""
        ...


def block_seed(seed: int, block: int) -> int:
    """A torch seed for (seed, block) that is independent across blocks (SeedSequence)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, block]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def block_generator(seed: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed(block_seed(seed, block))


class ToyRowSource:
    """Inputs of a toy target: fresh samples of its sparse-feature distribution ("train", M =
    n_samples, rows of block b drawn from a generator seeded by (seed, b)), or the clustering
    paper's structured TMS evaluation set ("structured", M = n_features * samples_per_feature,
    generated once from `seed` and sliced)."""

    def __init__(self, target_cfg: Any, cfg: ProfilesConfig) -> None:
        self.target_cfg = target_cfg
        self.dataset = cfg.dataset
        self.seed = cfg.seed
        self.block_rows = cfg.block_rows
        self.samples_per_feature = cfg.samples_per_feature
        self.save_inputs = cfg.save_inputs
        self.n_features = int(target_cfg.n_features)
        if self.dataset == "structured":
            self._n_rows = self.n_features * self.samples_per_feature
        else:
            self._n_rows = cfg.n_samples
        self._structured: torch.Tensor | None = None  # built lazily, never pickled
        self._data: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_structured": None, "_data": None}

    @property
    def n_rows(self) -> int:
        return self._n_rows

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": "toy",
            "dataset": self.dataset,
            "n_rows": self._n_rows,
            "seed": self.seed,
            "target": self.target_cfg.model_dump(mode="json", exclude={"train", "path"}),
        }
        if self.dataset == "structured":
            d["samples_per_feature"] = self.samples_per_feature
        else:
            d["block_rows"] = self.block_rows  # the per-block seeding depends on the layout
        return d

    def block_inputs(self, block: int, start: int, stop: int) -> torch.Tensor:
        from scalespd import targets  # noqa: PLC0415  (targets import torch models)

        if self.dataset == "structured":
            if self._structured is None:
                gen = torch.Generator().manual_seed(self.seed)
                self._structured = targets.structured_eval_inputs(
                    self.target_cfg, self.samples_per_feature, gen
                )
            return self._structured[start:stop]
        if self._data is None:
            self._data = targets.make_dataset(self.target_cfg)
        return self._data.sample(stop - start, block_generator(self.seed, block))

    def row_fields(self) -> dict[str, RowField]:
        return {"x": ("float32", (self.n_features,))} if self.save_inputs else {}

    def row_metadata(
        self, block: int, start: int, stop: int, inputs: torch.Tensor
    ) -> dict[str, np.ndarray]:
        if not self.save_inputs:
            return {}
        return {"x": inputs.detach().to("cpu", torch.float32).numpy()}


class RandomRowSource:
    """Synthetic sparse inputs (tests and benchmarks): each entry is U(0, 1) with probability
    `p`, else 0; block b is drawn from a generator seeded by (seed, b)."""

    def __init__(
        self, n_rows: int, dim: int, seed: int = 0, p: float = 0.1, save_inputs: bool = False
    ) -> None:
        self._n_rows = n_rows
        self.dim = dim
        self.seed = seed
        self.p = p
        self.save_inputs = save_inputs

    @property
    def n_rows(self) -> int:
        return self._n_rows

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "n_rows": self._n_rows, "dim": self.dim, "seed": self.seed,
                "p": self.p}

    def block_inputs(self, block: int, start: int, stop: int) -> torch.Tensor:
        gen = block_generator(self.seed, block)
        rows = stop - start
        vals = torch.rand(rows, self.dim, generator=gen)
        on = torch.rand(rows, self.dim, generator=gen) < self.p
        return vals * on

    def row_fields(self) -> dict[str, RowField]:
        return {"x": ("float32", (self.dim,))} if self.save_inputs else {}

    def row_metadata(
        self, block: int, start: int, stop: int, inputs: torch.Tensor
    ) -> dict[str, np.ndarray]:
        return {"x": inputs.numpy()} if self.save_inputs else {}


class LMRowSource:
    """Token positions of a language model's held-out sequences: row r is position r % T of
    sequence r // T of `sequences` (M_seq, T), so rows of a sequence are contiguous and in
    order. Block b covers whole sequences (block_rows must be a multiple of T).

    Row metadata: `token_ids` (int32), `seq_ids` (int64: the sequence's number in the target's
    packed text stream, `LMData.heldout_index`, which maps it back to the text) and `positions`
    (int32)."""

    def __init__(self, sequences: torch.Tensor, seq_index: torch.Tensor, block_rows: int,
                 describe: dict[str, Any]) -> None:
        self.sequences = sequences.to(torch.int64).cpu()
        self.seq_index = seq_index.to(torch.int64).cpu()
        self.rows_per_input = int(sequences.shape[1])
        if block_rows % self.rows_per_input:
            raise ValueError(f"block_rows ({block_rows}) must be a multiple of the sequence "
                             f"length ({self.rows_per_input})")
        self._describe = describe

    @property
    def n_rows(self) -> int:
        return int(self.sequences.shape[0]) * self.rows_per_input

    def describe(self) -> dict[str, Any]:
        return {"kind": "lm", "n_rows": self.n_rows, "seq_len": self.rows_per_input,
                **self._describe}

    def block_inputs(self, block: int, start: int, stop: int) -> torch.Tensor:
        T = self.rows_per_input
        return self.sequences[start // T : stop // T]

    def row_fields(self) -> dict[str, RowField]:
        return {"token_ids": ("int32", ()), "seq_ids": ("int64", ()), "positions": ("int32", ())}

    def row_metadata(
        self, block: int, start: int, stop: int, inputs: torch.Tensor
    ) -> dict[str, np.ndarray]:
        T = self.rows_per_input
        seqs = self.seq_index[start // T : stop // T].numpy()
        return {"token_ids": inputs.reshape(-1).numpy().astype(np.int32),
                "seq_ids": np.repeat(seqs, T),
                "positions": np.tile(np.arange(T, dtype=np.int32), len(seqs))}
