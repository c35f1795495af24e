"""Decomposition metrics (digest §1.5, reference §4): MMCS / ML2R against the target weights,
CI-L0 and alive counts per module, ground-truth CI-pattern errors on one-hot inputs,
reconstruction losses, and the permuted causal-importance heatmap.

All functions are pure (model and tensors in, numbers or a PNG out) so the trainer, the decompose
stage and the report can share them.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from scalespd import storage
from scalespd.train.components import ComponentModel
from scalespd.train.losses import (
    ci_masked_recon_loss,
    faithfulness_loss,
    importance_minimality_loss,
    stochastic_recon_losses,
    unmasked_recon_loss,
)

if TYPE_CHECKING:
    from scalespd.config import DecomposeConfig

# Per-feature ground truth: encoders are compared column by column (input feature j), decoders
# row by row (output feature i), i.e. along the axis that indexes the features.
FEATURE_AXIS = {"encoder": "in", "decoder": "out"}


def mmcs_ml2r(W: Tensor, V: Tensor, U: Tensor, axis: str = "in",
              min_norm_frac: float = 0.1) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio of the rank-one subcomponents against W.

    W (d_out, d_in) target weight; V (d_in, C), U (C, d_out). axis "in": feature j is column
    W[:, j] and subcomponent c contributes the piece V[j, c] * U[c, :]; axis "out": feature i is
    row W[i, :] and c contributes U[c, i] * V[:, c]. MMCS = mean_j max_c cos(piece, W_j);
    ML2R = mean_j ||piece of that argmax c|| / ||W_j||.

    Only pieces with norm >= min_norm_frac * ||W_j|| compete for the max (all of them if none
    does): a dead subcomponent's piece has a negligible norm (the SPD paper: "the other 15 have
    negligible norm") and an arbitrary direction that can align with W_j to the 5th decimal,
    which would otherwise make it the argmax and drop that feature's L2 ratio to ~0."""
    if axis == "in":
        coef, direc, targ = V, U, W.T  # coef (n, C), direc (C, k), targ (n, k)
    elif axis == "out":
        coef, direc, targ = U.T, V.T, W
    else:
        raise ValueError(f"axis must be 'in' or 'out', got {axis!r}")
    coef, direc, targ = coef.double(), direc.double(), targ.double()
    dn = direc.norm(dim=1)  # (C,)
    tn = targ.norm(dim=1).clamp_min(1e-30)  # (n,)
    cos = torch.sign(coef) * (targ @ direc.T) / (tn[:, None] * dn[None, :]).clamp_min(1e-30)
    ratio = coef.abs() * dn[None, :] / tn[:, None]  # (n, C) piece norm / ||W_j||
    big = ratio >= min_norm_frac
    big[~big.any(dim=1)] = True  # no sizeable piece: let every subcomponent compete
    best = torch.where(big, cos, torch.full_like(cos, -2.0)).argmax(dim=1)  # (n,)
    rows = torch.arange(targ.shape[0])
    return float(cos[rows, best].mean()), float(ratio[rows, best].mean())


def identity_ci_error(ci: np.ndarray, tau: float) -> int:
    """Errors against a one-subcomponent-per-feature CI pattern (reference IdentityCIPattern):
    ci (n_features, C) on one-hot inputs; columns matched to features by the Hungarian
    assignment; errors = #(off-diagonal > tau) + #(diagonal < 1 - tau)."""
    n, C = ci.shape
    rows, cols = linear_sum_assignment(-ci)
    order = list(cols) + [c for c in range(C) if c not in set(cols)]
    P = ci[:, order]
    k = min(n, C)
    diag = np.zeros_like(P, dtype=bool)
    diag[np.arange(k), np.arange(k)] = True
    return int((P[~diag] > tau).sum() + (P[diag] < 1 - tau).sum() + max(0, n - C))


def dense_ci_error(ci: np.ndarray, k: int, tau: float) -> int:
    """Errors against k always-on subcomponents (reference DenseCIPattern, min_entries 1):
    columns sorted by total CI; each of the first k needs an entry >= 1 - tau, the rest must
    have no entry > tau."""
    order = np.argsort(-ci.sum(0), kind="stable")
    P = ci[:, order]
    first = P[:, :k]
    rest = P[:, k:]
    return int(np.maximum(0, 1 - (first >= 1 - tau).sum(0)).sum() + (rest > tau).sum())


def one_per_feature(ci: np.ndarray, tau: float) -> int:
    """How many features f have exactly one subcomponent with CI > tau on one-hot input f, and
    that subcomponent is above tau on no other one-hot input. ci: (n_features, C)."""
    on = ci > tau
    cols_per_feature = on.sum(1)
    feats_per_col = on.sum(0)
    good = 0
    for f in range(on.shape[0]):
        if cols_per_feature[f] == 1 and feats_per_col[np.argmax(on[f])] == 1:
            good += 1
    return good


def matched_features(ci: np.ndarray, tau: float) -> int:
    """How many features get their own alive subcomponent: features f whose subcomponent under
    the Hungarian assignment (features -> distinct subcomponents, maximising total CI) has
    CI > tau on one-hot input f. ci: (n_features, C). Unlike `one_per_feature` this tolerates
    small CIs on other features (a target whose one-hot outputs interfere through the ReLU
    makes a decoder subcomponent genuinely, if weakly, important on neighbouring features)."""
    rows, cols = linear_sum_assignment(-ci)
    return int((ci[rows, cols] > tau).sum())


def greedy_permutation(ci: np.ndarray) -> np.ndarray:
    """Column order for heatmaps (digest §1.5): for each feature row in turn pick the unused
    column with the highest CI; the remaining columns follow by decreasing max CI."""
    n, C = ci.shape
    used: list[int] = []
    free = np.ones(C, dtype=bool)
    for f in range(min(n, C)):
        row = np.where(free, ci[f], -np.inf)
        c = int(np.argmax(row))
        used.append(c)
        free[c] = False
    rest = np.flatnonzero(free)
    rest = rest[np.argsort(-ci[:, rest].max(0), kind="stable")] if rest.size else rest
    return np.concatenate([np.asarray(used, dtype=int), rest.astype(int)])


@torch.no_grad()
def decomposition_metrics(
    model: ComponentModel,
    cfg: DecomposeConfig,
    x_eval: Tensor,
    one_hot: Tensor | None,
    ground_truth: dict[str, Any] | None,
    *,
    p: float,
    generator: torch.Generator | None,
) -> dict[str, float]:
    """All decomposition metrics as a flat {name: float} dict.

    x_eval (B, ...) a data batch; one_hot (F, F) one-hot probe inputs (toys) or None;
    ground_truth the targets' ground_truth(cfg) (per-module CI pattern) or None; p the current
    minimality exponent. Keys: loss/{faithfulness, stochastic_recon, stochastic_recon_layerwise,
    ci_masked_recon, unmasked_recon, importance_minimality}, l0/<m>, alive_data/<m> and, with
    one-hot inputs, l0_onehot/<m>, alive_onehot/<m>, one_per_feature/<m>, matched_features/<m>,
    ci_error/<m>,
    plus mmcs/<m>, ml2r/<m> for TMS encoder/decoder modules; alive_*/total sums."""
    tau = cfg.ci_alive_threshold
    out: dict[str, float] = {}

    cache = model.forward_cached(x_eval)
    ci = model.ci_from_cache(cache, generator)
    out["loss/faithfulness"] = float(faithfulness_loss(model.weight_deltas()))
    rec = stochastic_recon_losses(model, x_eval, cache, ci, cfg, generator,
                                  subset=cfg.loss.stochastic_recon_subset > 0)
    for name, value in rec.items():
        out[f"loss/{name}"] = float(value)
    out["loss/ci_masked_recon"] = float(ci_masked_recon_loss(model, x_eval, cache, ci,
                                                             cfg.loss.output))
    out["loss/unmasked_recon"] = float(unmasked_recon_loss(model, x_eval, cache, cfg.loss.output))
    out["loss/importance_minimality"] = float(importance_minimality_loss(ci.upper, p,
                                                                         cfg.loss.eps))

    g_data = model.causal_importances(x_eval)
    g_hot = model.causal_importances(one_hot) if one_hot is not None else None
    info = {mi.path: mi for mi in model.module_info}
    gt_modules = (ground_truth or {}).get("modules", {})
    for m in model.module_paths:
        g = g_data[m].flatten(0, -2)
        out[f"l0/{m}"] = float((g > tau).sum(-1).float().mean())
        out[f"alive_data/{m}"] = float((g.max(0).values > tau).sum())
        if g_hot is not None:
            h = g_hot[m].flatten(0, -2)
            hn = h.cpu().numpy()
            out[f"l0_onehot/{m}"] = float((h > tau).sum(-1).float().mean())
            out[f"alive_onehot/{m}"] = float((h.max(0).values > tau).sum())
            out[f"one_per_feature/{m}"] = float(one_per_feature(hn, tau))
            out[f"matched_features/{m}"] = float(matched_features(hn, tau))
            gt = gt_modules.get(m)
            if gt is not None:
                err = (identity_ci_error(hn, tau) if gt["ci_pattern"] == "identity"
                       else dense_ci_error(hn, int(gt["k"]), tau))
                out[f"ci_error/{m}"] = float(err)
        axis = FEATURE_AXIS.get(info[m].module_type)
        if axis is not None:
            comp = model.comp(m)
            mm, ml = mmcs_ml2r(model.target_weight(m).detach().cpu(), comp.V.detach().cpu(),
                               comp.U.detach().cpu(), axis)
            out[f"mmcs/{m}"] = mm
            out[f"ml2r/{m}"] = ml
    for kind in ("alive_data", "alive_onehot"):
        vals = [v for k, v in out.items() if k.startswith(kind + "/")]
        if vals:
            out[f"{kind}/total"] = float(sum(vals))
    return out


@torch.no_grad()
def save_ci_heatmap(model: ComponentModel, one_hot: Tensor, path: storage.PathLike,
                    title: str | None = None, ylabel: str = "one-hot input feature") -> None:
    """PNG of CI on one-hot inputs (F, F) (or on the tokens of one sequence (1, T) of a
    language model), one panel per module: rows = inputs, columns = subcomponents permuted
    greedily (digest §1.5), colour scale [0, 1]."""
    # The object API (no pyplot): no global backend state, safe in workers and threads.
    from matplotlib.figure import Figure  # noqa: PLC0415

    g = model.causal_importances(one_hot)
    paths = model.module_paths
    n_feat = g[paths[0]].flatten(0, -2).shape[0]  # rows: inputs (one-hot features, tokens)
    width = sum(max(2.0, 0.12 * model.C[p]) for p in paths) + 1.5
    fig = Figure(figsize=(min(width, 40), max(2.5, 0.12 * n_feat + 1.5)), layout="constrained")
    axes = fig.subplots(1, len(paths), squeeze=False)
    im = None
    for i, (ax, p) in enumerate(zip(axes[0], paths, strict=True)):
        ci = g[p].flatten(0, -2).cpu().numpy()
        order = greedy_permutation(ci)
        im = ax.imshow(ci[:, order], vmin=0, vmax=1, cmap="Blues", aspect="auto",
                       interpolation="nearest")
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("subcomponent (permuted)")
        if i == 0:
            ax.set_ylabel(ylabel)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="causal importance")
    if title:
        fig.suptitle(title)
    path = storage.as_path(path)
    storage.makedirs(path.parent)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    storage.write_bytes_atomic(path, buf.getvalue())
