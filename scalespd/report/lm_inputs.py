"""Reading what the earlier stages write for a language-model target, for the report's LM
sections (no torch).

    profiles/inputs.zarr        group of (M,) arrays: token_ids int, seq_ids int, positions int;
                                one profile row per token position, sequence-major (the rows of
                                one sequence are contiguous and in position order)
    evaluate/tokens.json        {"tokens": [decoded text of token id i, ...]}
    evaluate/ablation.json      the cluster ablation test (optional)
    decompose/final/meta.json   "metrics": the decomposition's final metrics (optional; the
                                manifest's decompose record is the fallback)

A run is an LM run for the report when inputs.zarr holds `token_ids` (toys store `x` there).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from upath import UPath

from scalespd import storage
from scalespd.evaluate.stage import ABLATION_FILE, EVALUATE_DIR, TOKENS_FILE
from scalespd.profiles.reader import INPUTS_FILE
from scalespd.report.inputs import ReportInputError

log = logging.getLogger(__name__)

# Metric families of the decomposition shown in the "Decomposition quality" table.
METRIC_PREFIXES = ("ce/", "kl/", "l0/", "alive_data/", "loss/")
# Fields of inputs.zarr that make a run an LM run.
LM_FIELDS = ("token_ids", "seq_ids", "positions")


@dataclass
class LMInputs:
    """What each profile row was, and the LM-only outputs of the other stages. M = rows.

    token_ids: (M,) int64 token id per row.
    seq_ids: (M,) int64 sequence id per row; rows of one sequence are contiguous.
    positions: (M,) int64 position inside the sequence.
    tokens: decoded text per token id, or None when evaluate/tokens.json is absent (then tokens
        are shown as their ids).
    ablation: evaluate/ablation.json, or None.
    metrics: the decomposition's final metrics whose names start with METRIC_PREFIXES.
    """

    token_ids: np.ndarray
    seq_ids: np.ndarray
    positions: np.ndarray
    tokens: list[str] | None = None
    ablation: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        """The decoded text of a token id; "[id]" when it is unknown."""
        if self.tokens is not None and 0 <= token_id < len(self.tokens):
            return self.tokens[token_id]
        return f"[{token_id}]"


def read_lm_inputs(run_dir: storage.PathLike,
                   manifest: dict[str, Any] | None = None) -> LMInputs | None:
    """The LM inputs of run_dir, or None when profiles/inputs.zarr holds no token ids (a toy
    run, or inputs not saved)."""
    run_dir = storage.as_path(run_dir)
    path = run_dir / "profiles" / INPUTS_FILE
    if not path.exists():
        return None
    import zarr  # noqa: PLC0415

    group = zarr.open_group(store=storage.zarr_store(path, read_only=True), mode="r")
    if "token_ids" not in group:
        return None
    missing = [f for f in LM_FIELDS if f not in group]
    if missing:
        raise ReportInputError(f"{storage.url(path)}: has token_ids but not {missing}; re-run "
                               "the profiles stage")
    cols = {}
    for f in LM_FIELDS:
        member = group[f]
        if not isinstance(member, zarr.Array):
            raise ReportInputError(f"{storage.url(path / f)} is not an array; re-run the "
                                   "profiles stage")
        cols[f] = np.asarray(member[:]).astype(np.int64)
    shapes = {f: a.shape for f, a in cols.items()}
    if any(len(s) != 1 or s != shapes["token_ids"] for s in shapes.values()):
        raise ReportInputError(f"{storage.url(path)}: expected three 1-D arrays of equal "
                               f"length, got {shapes}; re-run the profiles stage")
    return LMInputs(**cols, tokens=_read_tokens(run_dir), ablation=_read_ablation(run_dir),
                    metrics=read_decompose_metrics(run_dir, manifest or {}))


def _read_tokens(run_dir: UPath) -> list[str] | None:
    path = run_dir / EVALUATE_DIR / TOKENS_FILE
    if not path.is_file():
        # The report still works, with ids instead of text (the evaluate stage writes it).
        log.warning("%s is missing: tokens are shown as ids", storage.url(path))
        return None
    tokens = json.loads(path.read_text(encoding="utf-8")).get("tokens")
    if not isinstance(tokens, list):
        raise ReportInputError(f"{storage.url(path)}: expected {{'tokens': [str, ...]}}; "
                               "re-run the evaluate stage")
    return [str(t) for t in tokens]


def _read_ablation(run_dir: UPath) -> dict[str, Any] | None:
    path = run_dir / EVALUATE_DIR / ABLATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def read_decompose_metrics(run_dir: storage.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """The decomposition's final metrics with names in METRIC_PREFIXES:
    decompose/final/meta.json "metrics", else the manifest's decompose record; {} if neither
    has them. (Read directly: scalespd.train.io imports torch.)"""
    metrics: Any = None
    meta = storage.as_path(run_dir) / "decompose" / "final" / "meta.json"
    if meta.is_file():
        metrics = json.loads(meta.read_text()).get("metrics")
    if not isinstance(metrics, dict):
        info = (manifest.get("stages", {}).get("decompose", {}) or {}).get("info", {}) or {}
        metrics = info.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    # Grouped by family (CE, KL, L0, alive), each in the producer's order (ce/target first).
    return {k: metrics[k] for prefix in METRIC_PREFIXES for k in metrics
            if str(k).startswith(prefix)}
