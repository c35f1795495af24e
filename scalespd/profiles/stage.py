"""The profiles stage: load the SPD model from run_dir, harvest its CI over the configured inputs
into run_dir/profiles/ (ci.zarr, inputs.zarr, blocks/, components.csv, harvest.json). run_dir
may be a local path or an fsspec URL (`scalespd.storage`).

Re-running after an interruption resumes from the completion record in profiles/blocks/.
"""

from __future__ import annotations

import logging
from typing import Any

from upath import UPath

from scalespd import storage
from scalespd.config import RunConfig
from scalespd.errors import ConfigError
from scalespd.profiles.harvest import CIModel, harvest
from scalespd.profiles.sources import LMRowSource, ToyRowSource
from scalespd.profiles.store import ProfilesError

log = logging.getLogger(__name__)


def check_model_matches_config(model: CIModel, cfg: RunConfig, where: storage.PathLike) -> None:
    """The loaded decomposition must decompose exactly the modules (and C) the config asks for."""
    from scalespd.targets import module_paths  # noqa: PLC0415
    from scalespd.train.components import match_modules  # noqa: PLC0415

    expected = match_modules([(m.pattern, m.C) for m in cfg.decompose.modules],
                             module_paths(cfg.target))
    got = {p: int(model.C[p]) for p in model.module_paths}
    if list(got) != list(expected) or got != expected:
        diffs = [f"{p}: checkpoint C={got.get(p, 'absent')}, config C={expected.get(p, 'absent')}"
                 for p in dict.fromkeys([*expected, *got]) if got.get(p) != expected.get(p)]
        if not diffs:
            diffs = [f"module order: checkpoint {list(got)}, config {list(expected)}"]
        raise ProfilesError(
            f"the decomposition in {storage.url(where)} does not match the config's "
            "decompose.modules:\n  "
            + "\n  ".join(diffs)
            + "\n(re-run the decompose stage with --force decompose, or fix the config)"
        )


def lm_source(cfg: RunConfig, run_dir: UPath) -> LMRowSource:
    """The first profiles.n_samples // seq_len held-out sequences of the language-model target
    (all of them if there are fewer), one row per token position."""
    from scalespd.train.lm import load_sequences  # noqa: PLC0415  (tokenizer, datasets)

    data = load_sequences(run_dir / "target")
    seq_len = int(data.heldout.shape[1])
    n_seq = min(cfg.profiles.n_samples // seq_len, int(data.heldout.shape[0]))
    if n_seq < 1:
        raise ConfigError(f"profiles.n_samples ({cfg.profiles.n_samples}) is smaller than one "
                          f"sequence of target.seq_len = {seq_len} tokens")
    if cfg.profiles.block_rows % seq_len:
        raise ConfigError(f"profiles.block_rows ({cfg.profiles.block_rows}) must be a multiple "
                          f"of target.seq_len ({seq_len}): a block holds whole sequences")
    if n_seq < cfg.profiles.n_samples // seq_len:
        log.warning("profiles: the target has only %d held-out sequences (%d tokens); "
                    "profiles.n_samples asks for %d tokens", n_seq, n_seq * seq_len,
                    cfg.profiles.n_samples)
    return LMRowSource(data.heldout[:n_seq], data.heldout_index[:n_seq], cfg.profiles.block_rows,
                       {"split": "heldout", "n_sequences": n_seq})


def run(cfg: RunConfig, run_dir: storage.PathLike) -> dict[str, Any]:
    from scalespd.train import load_decomposition  # noqa: PLC0415  (heavy; only when run)

    run_dir = storage.as_path(run_dir)
    model = load_decomposition(run_dir)
    check_model_matches_config(model, cfg, run_dir / "decompose")
    source = (lm_source(cfg, run_dir) if cfg.target.kind == "hf_causal_lm"
              else ToyRowSource(cfg.target, cfg.profiles))
    res = harvest(model, source, run_dir / "profiles", cfg.profiles, ray_cfg=cfg.ray)
    log.info("profiles: %d x %d CI matrix, %d alive of %d", *res.shape, res.n_alive, res.shape[1])
    return res.summary()
