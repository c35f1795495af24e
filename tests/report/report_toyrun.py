"""Test helpers for the report stage (not a test module): a fake TMS+ID-like decomposition with
known mechanisms, and hand-made run artifacts.

The fake model has F features, modules linear1 (encoder, layer 0), hidden_layers.0 (identity,
layer 1) and linear2 (decoder, layer 2). Encoder subcomponent f and decoder subcomponent
DEC_OF[f] serve feature f; identity subcomponents 0 and 1 are important on every non-zero input
(the dense mechanism); the rest are dead.
"""

from __future__ import annotations

import html.parser
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
