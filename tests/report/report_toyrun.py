"""Test helpers for the report stage (not a test module): a fake TMS+ID-like decomposition with
known mechanisms, and hand-made run artifacts.

The fake model has F features, modules linear1 (encoder, layer 0), hidden_layers.0 (identity,
layer 1) and linear2 (decoder, layer 2). Encoder subcomponent f and decoder subcomponent
DEC_OF[f] serve feature f; identity subcomponents 0 and 1 are important on every non-zero input
(the dense mechanism); the rest are dead.
"""

from __future__ import annotations

import html.parser
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from scalespd.targets import ModuleInfo

F = 4
C_ENC, C_ID, C_DEC = 6, 3, 6
DEC_OF = [2, 0, 3, 1]  # decoder subcomponent serving feature f (not in feature order)


class FakeToyDecomposition(nn.Module):
    """CIModel / ComponentModel stand-in with known ground truth (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.module_paths = ["linear1", "hidden_layers.0", "linear2"]
        self.C = {"linear1": C_ENC, "hidden_layers.0": C_ID, "linear2": C_DEC}
        self.module_info = [ModuleInfo("linear1", 0, "encoder"),
                            ModuleInfo("hidden_layers.0", 1, "identity"),
                            ModuleInfo("linear2", 2, "decoder")]
        # Identity pieces respond to every feature, more to some than to others.
        self.register_buffer("w_id", torch.tensor([[1.0, 0.9, 0.2, 0.1],
                                                   [0.1, 0.2, 0.9, 1.0]]))

    @torch.no_grad()
    def causal_importances(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        B = x.shape[0]
        feat = torch.clamp(2.0 * (x[:, :F] - 0.3), 0.0, 1.0)  # (B, F)
        enc = torch.zeros(B, C_ENC)
        enc[:, :F] = feat
        dec = torch.zeros(B, C_DEC)
        dec[:, DEC_OF] = feat
        ident = torch.zeros(B, C_ID)
        active = (x.abs().sum(dim=1, keepdim=True) > 0).float()
        ident[:, :2] = torch.clamp(0.3 + 0.6 * x[:, :F] @ self.w_id.T, 0.0, 1.0) * active
        return {"linear1": enc, "hidden_layers.0": ident, "linear2": dec}


def expected_truth() -> dict[str, object]:
    """name -> feature id for feature-serving subcomponents, plus the dense names."""
    serve = {f"linear1:{f}": f for f in range(F)}
    serve.update({f"linear2:{DEC_OF[f]}": f for f in range(F)})
    return {"serve": serve, "dense": ["hidden_layers.0:0", "hidden_layers.0:1"]}


def run_config(tmp: Path | None = None, **report):
    """A RunConfig whose target matches the fake decomposition (TMS 4-2 with one identity)."""
    from scalespd.config import parse_config  # noqa: PLC0415

    return parse_config({
        "name": "fake-tms-id",
        "target": {"kind": "tms", "n_features": F, "n_hidden": 2, "n_identity_layers": 1},
        "decompose": {"modules": [{"pattern": "linear1", "C": C_ENC},
                                  {"pattern": "hidden_layers.0", "C": C_ID},
                                  {"pattern": "linear2", "C": C_DEC}]},
        "profiles": {"dataset": "structured", "samples_per_feature": 100, "chunk_rows": 200,
                     "block_rows": 200, "chunk_cols": 8, "tau": 0.1},
        "graph": {"k": 4, "device": "cpu"},
        "spectral": {"k_max": 8, "device": "cpu"},
        "report": report,
    })


def fake_onehot_ci(value: float = 0.75) -> tuple[np.ndarray, list[str]]:
    """(F, N) one-hot CI of the fake model and its N names."""
    model = FakeToyDecomposition()
    ci = model.causal_importances(torch.eye(F) * value)
    cols = np.concatenate([ci[p].numpy() for p in model.module_paths], axis=1)
    names = [f"{p}:{c}" for p in model.module_paths for c in range(model.C[p])]
    return cols, names


# --------------------------------------------------------------------------------------------
# Hand-made artifacts (no graph or spectral stage involved)
# --------------------------------------------------------------------------------------------


def write_profiles(profiles_dir: Path, n_per_feature: int = 50, seed: int = 0) -> pd.DataFrame:
    """ci.zarr (M, N) from the fake model on a structured block design, and components.csv."""
    import zarr  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    rows = []
    for f in range(F):
        x = rng.uniform(0.0, 0.1, size=(n_per_feature, F))
        x[:, f] = rng.uniform(0.8, 1.0, size=n_per_feature)
        rows.append(x)
    x = torch.tensor(np.concatenate(rows), dtype=torch.float32)
    model = FakeToyDecomposition()
    ci = model.causal_importances(x)
    X = np.concatenate([ci[p].numpy() for p in model.module_paths], axis=1).astype(np.float32)
    profiles_dir.mkdir(parents=True, exist_ok=True)
    arr = zarr.create_array(str(profiles_dir / "ci.zarr"), shape=X.shape, chunks=(64, 5),
                            dtype="float32")
    arr[:] = X
    recs = []
    j = 0
    for info in model.module_info:
        for c in range(model.C[info.path]):
            col = X[:, j]
            recs.append({"component": j, "name": f"{info.path}:{c}", "layer": info.layer,
                         "module": info.path, "module_type": info.module_type,
                         "max": col.max(), "mean": col.mean(), "std": col.std(),
                         "frac_active": (col > 0.1).mean(), "alive": bool(col.max() > 0.1)})
            j += 1
    df = pd.DataFrame(recs)
    df.to_csv(profiles_dir / "components.csv", index=False)
    return df


def knn_graph(X: np.ndarray, k: int) -> sp.csr_matrix:
    """Brute-force mutual k-NN graph of clamped correlations (small n only)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.nan_to_num(np.corrcoef(X.T))
    np.fill_diagonal(C, 0)
    S = np.maximum(C, 0)
    n = S.shape[0]
    top = np.argsort(-S, axis=1)[:, :k]
    A = np.zeros((n, n), dtype=bool)
    A[np.repeat(np.arange(n), k), top.ravel()] = True
    A &= A.T
    A &= S > 0
    return sp.csr_matrix(np.where(A, S, 0.0))


class LinkCollector(html.parser.HTMLParser):
    """Every src/href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.links.append(v)


# --------------------------------------------------------------------------------------------
# A whole toy run directory, as the earlier stages leave it (no stage run)
# --------------------------------------------------------------------------------------------


def _toy_clusters(names: list[str], identity_spread: bool) -> np.ndarray:
    """Feature f -> cluster f (encoder f + its decoder); identity pieces either spread over the
    clusters of features 0 and 3 (the paper's failure) or together in cluster F."""
    out = []
    for n in names:
        path, c = n.split(":")
        if path == "linear1":
            out.append(int(c))
        elif path == "linear2":
            out.append(DEC_OF.index(int(c)))
        else:
            out.append((0 if int(c) == 0 else 3) if identity_spread else F)
    return np.array(out)


def write_toy_run(run_dir: Path) -> None:
    """profiles/, graph/, spectral/ (clusters, alternative clustering, spectra, quality),
    evaluate/ (one-hot CI, ground truth) and manifest.json of a finished toy run with the fake
    decomposition, written by hand (local files only), for the report stage to read."""
    from scalespd.graph import GraphResult  # noqa: PLC0415
    from scalespd.targets import ground_truth  # noqa: PLC0415

    cfg = run_config()
    comps = write_profiles(run_dir / "profiles")
    alive = comps["alive"].to_numpy()
    alive_ids = np.flatnonzero(alive)
    names = comps["name"].astype(str).tolist()
    alive_names = [names[j] for j in alive_ids]

    import zarr  # noqa: PLC0415

    X = zarr.open_array(str(run_dir / "profiles" / "ci.zarr"), mode="r")[:][:, alive_ids]
    W = knn_graph(X, k=3)
    n, k = len(alive_ids), 3
    GraphResult(columns=alive_ids.astype(np.int64), mean=X.mean(0).astype(np.float64),
                std=X.std(0).astype(np.float64), min=X.min(0).astype(np.float64),
                max=X.max(0).astype(np.float64), zero_var=np.zeros(n, dtype=bool),
                topk_idx=np.full((n, k), -1, dtype=np.int64),
                topk_val=np.zeros((n, k), dtype=np.float32), graph=W,
                labels=np.zeros(n, dtype=np.int64), threshold=0.1,
                summary={"threshold": 0.1, "n_zero_var": 0}).save(run_dir / "graph")

    spectral = run_dir / "spectral"
    spectral.mkdir(parents=True)
    for fname, spread in (("clusters.csv", True), ("clusters_alternative.csv", False)):
        df = comps[["component", "name", "layer", "module", "alive"]].copy()
        df["connected_component"] = np.where(alive, 0, -1)
        cluster = np.full(len(comps), -1)
        cluster[alive_ids] = _toy_clusters(alive_names, identity_spread=spread)
        df["cluster"] = cluster
        df.to_csv(spectral / fname, index=False)
    (spectral / "spectra.json").write_text(json.dumps({
        "info": {"n_always_on": 2, "n_pieces": 1},
        "pieces": [{"key": 0, "size": n, "depth": 0, "k": 4,
                    "eigenvalues": [0.0, 0.01, 0.02, 0.03, 0.6, 0.7, 0.8]}],
        "alternative": {"label": "always-on grouped", "always_on_fraction": 0.5,
                        "n_always_on": 2}}))
    (spectral / "quality.json").write_text(json.dumps({
        "n_clusters_scored": 2, "n_rows_sample": 200, "median_coherence": 0.8,
        "mean_coherence": 0.75, "median_margin": 0.3, "median_stability": 0.9,
        "resample": {"ari_mean": 0.95, "ari_min": 0.9, "repeats": 3},
        "seeds": {"ari_mean": 1.0, "ari_min": 1.0, "seeds": [0, 1]},
        "clusters": [{"cluster": 0, "size": 3, "coherence": 0.8, "nearest": 1,
                      "margin": 0.3, "stability": 0.9},
                     {"cluster": 3, "size": 3, "coherence": 0.7, "nearest": 0,
                      "margin": 0.2, "stability": 0.8}]}))

    evaluate = run_dir / "evaluate"
    evaluate.mkdir()
    onehot, onehot_names = fake_onehot_ci(cfg.evaluate.onehot_value)
    assert onehot_names == names
    np.save(evaluate / "onehot_ci.npy", onehot.astype(np.float32))
    (evaluate / "ground_truth.json").write_text(json.dumps(ground_truth(cfg.target)))
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {
        "profiles": {"status": "complete", "seconds": 1.5},
        "graph": {"status": "complete", "seconds": 0.5},
        "spectral": {"status": "complete", "seconds": 0.25}}}))
