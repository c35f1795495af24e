"""Test helpers for the report's language-model sections (not a test module): a hand-made
LM-shaped run directory with planted clusters that fire on known tokens. No torch.

Two layers, each with `self_attn.q_proj` and `mlp.down_proj` (LLaMA names), C = 4 per module,
N = 16 columns; SEQS sequences of SEQ_LEN tokens (M rows, sequence-major). Planted:

  cluster 0  q_proj[0]:0 + down_proj[1]:0   fires on token HTML_TOKEN ("<b>&")   mixed, 2 layers
  cluster 1  q_proj[0]:1 + q_proj[0]:2      fires on token 3                     attention, 1 layer
  cluster 2  down_proj[0]:1 + down_proj[1]:1  token 5 strongly, token 6 weakly   MLP, 2 layers
  cluster 3  q_proj[1]:0 (singleton)        token 9
  cluster 4  q_proj[1]:1 (singleton)        frequent: half of all rows
  cluster 5  q_proj[1]:2 (singleton)        rare: one row
  every other column is dead (CI 0).

Cluster 0 also fires at 1.0 on RARE_TOKEN, which occurs in only 2 rows: too few to rank.
Activations on the planted tokens vary per row (0.5..1), so the top rows are unique.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SEQS, SEQ_LEN, VOCAB = 40, 32, 20
M = SEQS * SEQ_LEN
C = 4
MODULES = [("model.layers.0.self_attn.q_proj", 0, "self_attn.q_proj"),
           ("model.layers.0.mlp.down_proj", 0, "mlp.down_proj"),
           ("model.layers.1.self_attn.q_proj", 1, "self_attn.q_proj"),
           ("model.layers.1.mlp.down_proj", 1, "mlp.down_proj")]
HTML_TOKEN, RARE_TOKEN = 7, 19
TOKENS = [f"t{i}" for i in range(VOCAB)]
TOKENS[0], TOKENS[1], TOKENS[HTML_TOKEN] = " the", "\n", "<b>&"


def col(module: int, c: int) -> int:
    """Global column of subcomponent c of MODULES[module]."""
    return module * C + c


# cluster id -> (member columns, {token: activation scale})
PLANTED: dict[int, tuple[list[int], dict[int, float]]] = {
    0: ([col(0, 0), col(3, 0)], {HTML_TOKEN: 1.0}),
    1: ([col(0, 1), col(0, 2)], {3: 1.0}),
    2: ([col(1, 1), col(3, 1)], {5: 1.0, 6: 0.3}),
    3: ([col(2, 0)], {9: 1.0}),
}
FREQUENT, RARE = col(2, 1), col(2, 2)
ABLATION: dict[str, Any] = {
    "n_random": 50, "tau": 0.1, "seed": 0, "n_positions": 512, "baseline_kl": 0.0,
    "clusters": [
        {"cluster": 0, "size": 2, "layers": {"0": 1, "1": 1}, "n_active": 60,
         "n_inactive": 452, "effect_active": 0.42, "effect_inactive": 0.01,
         "specificity": 42.0, "random_effect_mean": 0.05, "random_effect_p95": 0.12,
         "percentile": 100.0, "beats_95": True, "n_random_drawn": 50},
        {"cluster": 2, "size": 2, "layers": {"0": 1, "1": 1}, "n_active": 40,
         "n_inactive": 472, "effect_active": 0.02, "effect_inactive": 0.02,
         "specificity": 1.0, "random_effect_mean": 0.05, "random_effect_p95": 0.12,
         "percentile": 30.0, "beats_95": False, "n_random_drawn": 50},
        # Untested (the producer's record when nothing could be compared): not in n_tested.
        {"cluster": 1, "size": 2, "layers": {"0": 2}, "n_active": 0, "n_inactive": 512,
         "effect_active": None, "effect_inactive": 0.01, "specificity": None,
         "random_effect_mean": None, "random_effect_p95": None, "percentile": None,
         "beats_95": False, "n_random_drawn": 0},
    ],
    "n_tested": 2, "n_beats_95": 1,
}
METRICS = {"ce/target": 2.0, "ce/ci_masked": 2.5, "kl/ci_masked": 0.3,
           "l0/model.layers.0.mlp.down_proj": 1.5, "alive_data/model.layers.0.mlp.down_proj": 2,
           "mmcs": 0.9}


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """token_ids, seq_ids, positions (M,): random tokens except RARE_TOKEN exactly twice."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB - 1, size=M)  # never RARE_TOKEN (= VOCAB - 1) ...
    tokens[[100, 700]] = RARE_TOKEN  # ... except here
    return {"token_ids": tokens.astype(np.int32),
            "seq_ids": np.repeat(np.arange(SEQS), SEQ_LEN).astype(np.int64),
            "positions": np.tile(np.arange(SEQ_LEN), SEQS).astype(np.int32)}


def make_ci(tokens: np.ndarray, seed: int = 1) -> np.ndarray:
    """(M, N) CI with the planted clusters (see the module docstring)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((M, len(MODULES) * C), dtype=np.float32)
    for members, scale in PLANTED.values():
        for tok, s in scale.items():
            rows = np.flatnonzero(tokens == tok)
            X[np.ix_(rows, members)] = s * rng.uniform(0.5, 1.0, size=(len(rows), len(members)))
    X[np.flatnonzero(tokens == RARE_TOKEN), col(0, 0)] = 1.0
    X[rng.random(M) < 0.5, FREQUENT] = 0.7
    X[3, RARE] = 0.6
    return X


def components(X: np.ndarray, tau: float = 0.1) -> pd.DataFrame:
    recs = []
    for m, (path, layer, mtype) in enumerate(MODULES):
        for c in range(C):
            j = col(m, c)
            v = X[:, j]
            recs.append({"component": j, "name": f"{path}:{c}", "layer": layer, "module": path,
                         "module_type": mtype, "max": v.max(), "mean": v.mean(),
                         "std": v.std(), "frac_active": (v > tau).mean(),
                         "alive": bool(v.max() > tau)})
    return pd.DataFrame(recs)


def write_lm_run(run_dir: Path, ablation: bool = True, tokens: bool = True,
                 metrics: bool = True) -> dict[str, Any]:
    """profiles/{ci.zarr, inputs.zarr, components.csv}, spectral/clusters.csv and (optionally)
    evaluate/{tokens.json, ablation.json}, decompose/final/meta.json. Returns the inputs."""
    import zarr  # noqa: PLC0415

    inputs = make_inputs()
    X = make_ci(inputs["token_ids"])
    prof = run_dir / "profiles"
    prof.mkdir(parents=True)
    arr = zarr.create_array(str(prof / "ci.zarr"), shape=X.shape, chunks=(128, 6),
                            dtype="float32")
    arr[:] = X
    group = zarr.open_group(str(prof / "inputs.zarr"), mode="w")
    for name, a in inputs.items():
        group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(128,))[:] = a
    comps = components(X)
    comps.to_csv(prof / "components.csv", index=False)

    cluster = np.full(len(comps), -1)
    for cid, (members, _) in PLANTED.items():
        cluster[members] = cid
    cluster[FREQUENT], cluster[RARE] = 4, 5
    assert (comps["alive"].to_numpy() == (cluster >= 0)).all()
    df = comps[["component", "name", "layer", "module", "alive"]].copy()
    df["connected_component"] = np.where(cluster >= 0, cluster, -1)
    df["cluster"] = cluster
    (run_dir / "spectral").mkdir()
    df.to_csv(run_dir / "spectral" / "clusters.csv", index=False)

    ev = run_dir / "evaluate"
    ev.mkdir()
    if tokens:
        (ev / "tokens.json").write_text(json.dumps({"tokens": TOKENS}))
    if ablation:
        (ev / "ablation.json").write_text(json.dumps(ABLATION))
    if metrics:
        final = run_dir / "decompose" / "final"
        final.mkdir(parents=True)
        (final / "meta.json").write_text(json.dumps({"steps": 10, "metrics": METRICS}))
    return {**inputs, "ci": X}


def lm_config(**report: Any):
    from scalespd.config import parse_config  # noqa: PLC0415

    return parse_config({"name": "fake-lm", "target": {"kind": "hf_causal_lm"},
                         "profiles": {"tau": 0.1}, "report": report})
