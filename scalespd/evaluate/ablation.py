"""Causal validation of clusters: ablate a cluster and compare with random sets of the same shape.

Method. The SPD model is run with every subcomponent masked at its own causal importance
(mask m = g, no delta component). The KL divergence KL(softmax(target) || softmax(output)) over
the last dim, per position, is the baseline KL_base. Ablating a set A of subcomponents means the
same forward with m_c = 0 for c in A and every other mask unchanged; its *effect* at a position
is KL_A - KL_base.

A cluster is *active* at a position when any member has g > tau there. Per cluster we report
the mean effect over its active positions (effect_active), over the other positions
(effect_inactive) and their ratio (specificity): a mechanism should matter where it fires and
hardly anywhere else.

Null model: `n_random` sets of alive subcomponents with the cluster's size and per-layer counts,
drawn without replacement within each layer from the alive columns that are not members. Each
set is ablated and its effect measured on the *cluster's* active positions, so the percentile of
the cluster among them answers "does this cluster hurt the positions where it is active more
than arbitrary sets of the same size and layer mix do?". Ties count half; beats_95 means the
percentile is at least 95.

Cost: per batch of rows (dim 0 of x), CI, the target output and the baseline are computed once;
each cluster then needs one forward on the batch, and its random sets are forwarded only on the
rows that contain an active position of the cluster — whole rows, because in a sequence model the
output at a position depends on the earlier positions of its row. Several random sets are stacked
into one forward (as many copies of those rows as fit in `batch_size`). Only sums per position
group are kept, never the KLs of all positions.

Positions are all leading dims of the output except the first (rows): x (S, T) token ids gives
CI (S, T, C) and logits (S, T, V), S*T positions; a toy x (B, d) gives B positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from scalespd.train.components import Mask

log = logging.getLogger(__name__)


class AblatableModel(Protocol):
    """What the test needs of a `ComponentModel`; global column order is module by module in
    `module_paths` order, C[p] columns each."""

    @property
    def module_paths(self) -> Sequence[str]: ...
    @property
    def C(self) -> Mapping[str, int]: ...
    def causal_importances(self, x: Tensor) -> dict[str, Tensor]: ...
    def forward_masked(self, x: Tensor, masks: dict[str, Mask]) -> Tensor: ...
    def __call__(self, x: Tensor) -> Tensor: ...


# ------------------------------------------------------------------------------------------
# Clusters from the spectral stage's table
# ------------------------------------------------------------------------------------------


def largest_clusters(table: pd.DataFrame, n: int) -> dict[int, np.ndarray]:
    """The `n` largest non-singleton clusters of a clusters.csv table (columns `component` =
    global column id and `cluster`; −1 = not clustered), largest first, ties by cluster id.

    Returns {cluster id: sorted int64 global column ids of its members}."""
    cl = table.loc[table["cluster"] >= 0, ["component", "cluster"]]
    sizes = cl.groupby("cluster").size()
    sizes = sizes[sizes > 1]
    order = sorted(sizes.index, key=lambda c: (-int(sizes[c]), int(c)))[: max(n, 0)]
    groups = cl.groupby("cluster")["component"]
    return {int(c): np.sort(groups.get_group(c).to_numpy(np.int64)) for c in order}


def column_layout(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """column_layer (N,) int64 and alive (N,) bool indexed by global column id, from a table with
    one row per subcomponent (`component`, `layer`, `alive`; clusters.csv has them). The
    component ids must be exactly 0..N−1."""
    comp = table["component"].to_numpy(np.int64)
    n = comp.size
    if not np.array_equal(np.sort(comp), np.arange(n)):
        raise ValueError(f"the table's component ids are not exactly 0..{n - 1}")
    layer = np.empty(n, dtype=np.int64)
    alive = np.empty(n, dtype=bool)
    layer[comp] = table["layer"].to_numpy(np.int64)
    alive[comp] = table["alive"].astype(bool).to_numpy()
    return layer, alive


# ------------------------------------------------------------------------------------------
# Random sets
# ------------------------------------------------------------------------------------------


def draw_random_sets(
    rng: np.random.Generator,
    members: np.ndarray,
    column_layer: np.ndarray,
    alive: np.ndarray,
    n: int,
) -> tuple[np.ndarray, dict[int, int]]:
    """`n` random sets with the per-layer counts of `members` (k,), each drawn without
    replacement within a layer from the alive non-member columns of that layer.

    Returns sets (n, s) int64 global column ids, layer blocks in increasing layer order, and
    `short` {layer: candidates} for layers with fewer candidates than members; such a layer
    contributes all its candidates, so s < k then."""
    layers, counts = np.unique(column_layer[members], return_counts=True)
    pool = alive.astype(bool).copy()
    pool[members] = False
    parts: list[np.ndarray] = []
    short: dict[int, int] = {}
    for layer, count in zip(layers, counts, strict=True):
        cand = np.flatnonzero(pool & (column_layer == layer))
        take = min(int(count), cand.size)
        if take < count:
            short[int(layer)] = int(cand.size)
        if take:
            parts.append(np.stack([rng.choice(cand, size=take, replace=False)
                                   for _ in range(n)]).reshape(n, take))
    sets = np.concatenate(parts, axis=1) if parts else np.empty((n, 0), dtype=np.int64)
    return sets.astype(np.int64), short


# ------------------------------------------------------------------------------------------
# Forwards
# ------------------------------------------------------------------------------------------


@dataclass
class _Columns:
    """Global column id -> (module, local index): module_of (N,), local (N,)."""

    paths: list[str]
    C: dict[str, int]
    module_of: np.ndarray
    local: np.ndarray

    @classmethod
    def of(cls, model: AblatableModel) -> _Columns:
        paths = list(model.module_paths)
        C = {p: int(model.C[p]) for p in paths}
        module_of = np.repeat(np.arange(len(paths)), [C[p] for p in paths])
        local = np.concatenate([np.arange(C[p]) for p in paths]) if paths else np.empty(0, int)
        return cls(paths, C, module_of, local.astype(np.int64))

    @property
    def n(self) -> int:
        return int(self.module_of.size)

    def by_module(self, cols: np.ndarray) -> dict[str, np.ndarray]:
        """Global ids (k,) -> {path: local ids} for the modules that have any."""
        mods = self.module_of[cols]
        return {self.paths[m]: self.local[cols[mods == m]] for m in np.unique(mods)}

    def keep_factors(self, sets: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """Sets (k, s) of global ids -> {path: (k, C_p) 0/1 factors, 0 at the set's columns},
        only for the modules the sets touch."""
        k = sets.shape[0]
        draw = np.repeat(np.arange(k), sets.shape[1])
        cols = sets.ravel()
        mods = self.module_of[cols]
        out: dict[str, Tensor] = {}
        for m in np.unique(mods):
            sel = mods == m
            p = self.paths[m]
            keep = torch.ones(k, self.C[p], device=device)
            keep[torch.as_tensor(draw[sel], device=device),
                 torch.as_tensor(self.local[cols[sel]], device=device)] = 0.0
            out[p] = keep
        return out


@dataclass
class _Batch:
    """One batch of R rows: x (R, ...), CI {path: (R, ..., C_p)}, target probabilities
    p_t (R, Q, V), sum_v p log p (R, Q) and the baseline KL (R, Q)."""

    x: Tensor
    ci: dict[str, Tensor]
    p_t: Tensor
    plogp: Tensor
    base: Tensor | None = None

    @property
    def baseline(self) -> Tensor:
        assert self.base is not None, "baseline not computed yet"
        return self.base

    def rows(self, sel: Tensor) -> _Batch:
        """The rows `sel` (R,) bool of this batch."""
        return _Batch(self.x[sel], {p: g[sel] for p, g in self.ci.items()}, self.p_t[sel],
                      self.plogp[sel], self.baseline[sel])


def _set_kl(model: AblatableModel, b: _Batch, keep: dict[str, Tensor], k: int) -> Tensor:
    """KL per position (k, R, Q) of k ablations at once: the R rows are repeated k times, copy j
    with masks g * keep[p][j] (modules absent from `keep` stay at g)."""
    R = b.x.shape[0]
    xk = b.x.repeat(k, *([1] * (b.x.dim() - 1))) if k > 1 else b.x
    masks: dict[str, Mask] = {}
    for p, g in b.ci.items():
        if p in keep:
            f = keep[p].to(g.dtype).view(k, *([1] * (g.dim() - 1)), g.shape[-1])
            m = (g.unsqueeze(0) * f).reshape(k * R, *g.shape[1:])
        else:
            m = g.repeat(k, *([1] * (g.dim() - 1))) if k > 1 else g
        masks[p] = Mask(component=m)
    out = model.forward_masked(xk, masks)
    logq = F.log_softmax(_upcast(out).reshape(k, R, -1, out.shape[-1]), dim=-1)
    # KL(p || q) = sum p log p - sum p log q; p log p is the same for every ablation. In place,
    # since logq (k, R, Q, V) is the largest tensor here.
    return b.plogp - logq.mul_(b.p_t).sum(-1)


def _upcast(t: Tensor) -> Tensor:
    """Half-precision outputs to float32 for the softmax; float32/64 stay as they are."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _model_device(model: AblatableModel, x: Tensor) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if isinstance(first, Tensor):
            return first.device
    return x.device


# ------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------


@dataclass
class _ClusterRun:
    """Accumulators of one cluster over all batches."""

    cid: int
    members: np.ndarray
    local: dict[str, np.ndarray]
    random_sets: np.ndarray  # (n_random, s)
    sum_active: float = 0.0
    n_active: int = 0
    sum_inactive: float = 0.0
    n_inactive: int = 0
    random_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))


def ablation_test(
    model: AblatableModel,
    x: Tensor,
    clusters: Sequence[np.ndarray],
    *,
    column_layer: np.ndarray,
    alive: np.ndarray,
    n_random: int,
    tau: float,
    seed: int,
    batch_size: int,
    cluster_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Ablate each cluster and compare it with `n_random` random same-shape sets (module doc).

    x (S, ...): S rows of inputs, processed `batch_size` rows at a time. clusters: per cluster
    an int array of global column ids (distinct, at least one). column_layer (N,) and alive (N,)
    bool over the N = sum(C) global columns. cluster_ids: the ids reported (default 0..); the
    random sets of cluster c come from `np.random.default_rng([seed, c])`, so they depend only
    on the seed and the cluster, not on which other clusters are tested.

    Returns the JSON-able dict written to evaluate/ablation.json:
    n_random, tau, seed, n_positions, baseline_kl (mean KL_base over all positions), clusters
    (one record each, in input order), n_tested (clusters with a percentile) and n_beats_95.
    Per cluster: cluster, size, layers {"<layer>": count}, n_active, n_inactive, effect_active
    and effect_inactive (null without such positions), specificity = effect_active /
    effect_inactive (null when either is null or effect_inactive <= 0: a ratio to a zero or
    negative effect has no meaning as "how much more"; negative when ablating the cluster
    brings its active positions closer to the target), random_effect_mean, random_effect_p95,
    percentile (100 * fraction of random sets with a smaller effect on the cluster's active
    positions, ties half; null without active positions or random sets), beats_95,
    n_random_drawn (0 when there was nothing to compare), and random_size (the random sets'
    size: smaller than size only when a layer had too few alive non-member columns; logged).
    """
    cols = _Columns.of(model)
    column_layer = np.asarray(column_layer, dtype=np.int64)
    alive = np.asarray(alive, dtype=bool)
    if column_layer.shape != (cols.n,) or alive.shape != (cols.n,):
        raise ValueError(f"column_layer {column_layer.shape} and alive {alive.shape} must have "
                         f"one entry per global column ({cols.n})")
    if n_random < 0 or batch_size < 1 or seed < 0:
        raise ValueError("need n_random >= 0, batch_size >= 1 and seed >= 0")
    ids = list(range(len(clusters))) if cluster_ids is None else [int(c) for c in cluster_ids]
    if len(ids) != len(clusters) or any(c < 0 for c in ids):
        raise ValueError("cluster_ids must be one non-negative id per cluster")

    runs: list[_ClusterRun] = []
    for cid, raw in zip(ids, clusters, strict=True):
        members = np.asarray(raw, dtype=np.int64).ravel()
        if members.size == 0 or np.unique(members).size != members.size:
            raise ValueError(f"cluster {cid}: members must be distinct and non-empty")
        if members.min() < 0 or members.max() >= cols.n:
            raise ValueError(f"cluster {cid}: column ids outside 0..{cols.n - 1}")
        sets, short = draw_random_sets(np.random.default_rng([seed, cid]), members,
                                       column_layer, alive, n_random)
        if short:
            log.warning("ablation: cluster %d: too few alive non-member columns in layer(s) %s "
                        "(layer: candidates); random sets have %d of %d columns", cid, short,
                        sets.shape[1], members.size)
        runs.append(_ClusterRun(cid, members, cols.by_module(members), sets,
                                random_sum=np.zeros(n_random)))

    device = _model_device(model, x)
    base_sum, n_pos = 0.0, 0
    n_batches = -(-x.shape[0] // batch_size)
    # A bar on a terminal only (disable=None): with 100 random sets per cluster this is the
    # evaluate stage's long part.
    bar = tqdm(total=n_batches * len(runs), desc="ablation (batch x cluster)", unit="cluster",
               disable=None, leave=False)
    with torch.inference_mode(), bar:
        for start in range(0, x.shape[0], batch_size):
            b = _prepare(model, x[start:start + batch_size].to(device))
            base_sum += float(b.baseline.double().sum())
            n_pos += b.baseline.numel()
            for r in runs:
                _accumulate(model, b, r, cols, batch_size, device, tau)
                bar.update()

    records = [_record(r, column_layer) for r in runs]
    return {
        "n_random": int(n_random), "tau": float(tau), "seed": int(seed),
        "n_positions": n_pos, "baseline_kl": base_sum / n_pos if n_pos else 0.0,
        "clusters": records,
        "n_tested": sum(rec["percentile"] is not None for rec in records),
        "n_beats_95": sum(bool(rec["beats_95"]) for rec in records),
    }


def _prepare(model: AblatableModel, xb: Tensor) -> _Batch:
    """CI, target distribution and baseline KL of one batch xb (R, ...)."""
    R = xb.shape[0]
    ci = model.causal_importances(xb)
    ci = {p: ci[p] for p in model.module_paths}
    target = model(xb)
    logp = F.log_softmax(_upcast(target).reshape(R, -1, target.shape[-1]), dim=-1)
    p_t = logp.exp()
    for p, g in ci.items():
        if g.reshape(R, -1, g.shape[-1]).shape[1] != p_t.shape[1]:
            raise ValueError(f"CI of {p!r} {tuple(g.shape)} and output {tuple(target.shape)} "
                             "disagree on the positions")
    b = _Batch(xb, ci, p_t, (p_t * logp).sum(-1))
    b.base = _set_kl(model, b, {}, 1)[0]
    return b


def _accumulate(model: AblatableModel, b: _Batch, r: _ClusterRun, cols: _Columns,
                batch_size: int, device: torch.device, tau: float) -> None:
    """Add one batch's sums for cluster `r`: its own ablation on all positions, and its random
    sets on the rows that hold an active position of the cluster."""
    R = b.x.shape[0]
    # active (R, Q): any member above tau
    active = torch.zeros_like(b.baseline, dtype=torch.bool)
    for p, loc in r.local.items():
        g = b.ci[p].reshape(R, -1, cols.C[p])[..., torch.as_tensor(loc, device=device)]
        active |= (g > tau).any(-1)
    eff = _set_kl(model, b, cols.keep_factors(r.members[None], device), 1)[0] - b.baseline
    n_act = int(active.sum())
    r.n_active += n_act
    r.n_inactive += active.numel() - n_act
    r.sum_active += float(eff[active].double().sum())
    r.sum_inactive += float(eff[~active].double().sum())
    n_draws = r.random_sets.shape[0]
    if n_act == 0 or n_draws == 0 or r.random_sets.shape[1] == 0:
        return
    sub = b.rows(active.any(1))
    act = active[active.any(1)].double()  # (R', Q)
    chunk = max(1, batch_size // sub.x.shape[0])
    for j in range(0, n_draws, chunk):
        sets = r.random_sets[j:j + chunk]
        kl = _set_kl(model, sub, cols.keep_factors(sets, device), sets.shape[0])
        r.random_sum[j:j + sets.shape[0]] += (
            ((kl - sub.baseline).double() * act).sum((1, 2)).cpu().numpy())


def _record(r: _ClusterRun, column_layer: np.ndarray) -> dict[str, Any]:
    """The JSON record of one cluster (schema in `ablation_test`)."""
    layers, counts = np.unique(column_layer[r.members], return_counts=True)
    e_act = r.sum_active / r.n_active if r.n_active else None
    e_inact = r.sum_inactive / r.n_inactive if r.n_inactive else None
    spec = e_act / e_inact if e_act is not None and e_inact is not None and e_inact > 0 else None
    tested = e_act is not None and r.random_sets.shape[1] > 0 and r.random_sets.shape[0] > 0
    rand_mean = rand_p95 = pct = None
    if tested:
        assert e_act is not None
        rand = r.random_sum / r.n_active
        rand_mean = float(rand.mean())
        rand_p95 = float(np.percentile(rand, 95))
        pct = float(100.0 * (np.sum(rand < e_act) + 0.5 * np.sum(rand == e_act)) / rand.size)
    return {
        "cluster": r.cid, "size": int(r.members.size),
        "layers": {str(int(la)): int(c) for la, c in zip(layers, counts, strict=True)},
        "n_active": r.n_active, "n_inactive": r.n_inactive,
        "effect_active": e_act, "effect_inactive": e_inact, "specificity": spec,
        "random_effect_mean": rand_mean, "random_effect_p95": rand_p95, "percentile": pct,
        "beats_95": pct is not None and pct >= 95.0,
        "n_random_drawn": int(r.random_sets.shape[0]) if tested else 0,
        "random_size": int(r.random_sets.shape[1]),
    }
