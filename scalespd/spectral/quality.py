"""Cluster quality without ground truth: how tight, how separated and how reproducible the
clusters are (spectral/quality.json). Language models have no planted mechanisms to score
against, so these are the numbers that say whether a clustering is worth reading.

For a clustering (labels over the n graph nodes) of the graph built from profiles X (M, N_total):

  coherence      per non-singleton cluster: the mean Pearson correlation over all pairs of its
                 members, exact, on the first `spectral.quality_rows` rows of X. Only the member
                 columns are read, in column batches of at most _SAMPLE_BYTES (one read of the
                 whole row sample when it fits); a cluster of s members costs O(rows · s) via
                 Σ_{i≠j} z_i·z_j = ‖Σ_i z_i‖² − s for unit-norm centred columns z_i, never an
                 s×s (let alone N×N) matrix. Members constant on the sample have no correlation
                 and are left out (`n_scored`); fewer than 2 left: no coherence (null).
  nearest        per cluster: the largest correlation between a member and any non-member, read
                 from the graph's top-k candidate lists (GraphResult.topk_idx / topk_val, on all
                 M rows), both ways: a member's list naming an outsider or an outsider's naming
                 a member. The lists hold each node's strongest correlations above the edge
                 threshold, so this is exact whenever the strongest outside link is in some
                 member's list (or in the outsider's), else a lower bound; 0 when no list links
                 the cluster to any outsider (every outside correlation is below the members'
                 k-th neighbours or the edge threshold).
  margin         coherence − nearest (> 0: members correlate more with each other, on average,
                 than the cluster's best outside link).
  resample ARI   `quality_resamples` times: the rows are split into two random disjoint halves
                 (random rows, sorted; `RowSample` reads each half chunk-wise without copying
                 X), each half's graph is built with the same GraphConfig over the same columns
                 and clustered with the same SpectralConfig, and the two clusterings are
                 compared by the adjusted Rand index. Rows of one LM sequence are not
                 independent, so both halves see parts of the same sequences (an optimistic
                 estimate for LMs).
  stability      per cluster (Hennig's clusterwise stability): the mean over all halves of the
                 best Jaccard overlap |C ∩ D| / |C ∪ D| of the cluster C with any cluster D of
                 that half's clustering, in [0, 1].
  seed ARI       the same graph clustered again with seeds seed+1 .. seed+`quality_seeds`; the
                 adjusted Rand index over every pair of these and the main clustering.

Clusterings are compared on the nodes both label (≥ 0). `cluster_quality` computes everything;
the spectral stage writes its result, the report reads it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import scipy.sparse as sp

from scalespd.config import GraphConfig, RayConfig, SpectralConfig
from scalespd.executor import Executor
from scalespd.graph import GraphResult, build_graph
from scalespd.graph.panels import read_block
from scalespd.graph.stats import ZERO_VAR_RTOL
from scalespd.profiles.stats import ColumnStats
from scalespd.spectral.clustering import cluster_alive
from scalespd.spectral.tasks import Device

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise logger `name` to WARNING for the duration of the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)

QUALITY_FILE = "quality.json"
# float64 working memory for the coherence of one column batch (rows × columns × 8 B): the
# whole row sample of all member columns is read at once when it fits.
_SAMPLE_BYTES = 256 << 20
# Definitions written next to the numbers, so quality.json explains itself.
DEFINITIONS = {
    "coherence": "mean Pearson correlation over all member pairs, on the first n_rows_sample "
                 "profile rows (members constant there left out)",
    "nearest": "largest correlation between a member and a non-member among the pairs in "
               "the graph's top-k lists (exact when that pair is listed; 0 when no list links "
               "the cluster to an outsider)",
    "margin": "coherence - nearest",
    "stability": "mean over row halves of the best Jaccard overlap with a cluster of that "
                 "half's clustering (Hennig)",
    "resample_ari": "ARI between the clusterings of two random disjoint row halves",
    "seed_ari": "ARI between every pair of clusterings with seeds seed..seed+quality_seeds",
}


# --------------------------------------------------------------------------------------------
# Reading a random subset of rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSample:
    """Read-only (m, N) view of the rows `rows` of a dense X, for building a graph on them.

    X: (M, N) zarr.Array, np.ndarray or NpyFile; rows: (m,) int64 source rows, strictly
    ascending. Offers what the graph code reads (shape, dtype, chunks, `X[rows]`,
    `X[rows, cols]` and `get_orthogonal_selection((rows, cols))` for a step-1 row slice): a
    read of subset rows r0..r1 reads the source span rows[r0] .. rows[r1-1] (about twice as
    many rows for a random half) and keeps the chosen ones, so reads stay chunked."""

    X: Any
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.size), int(self.X.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.X.dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(getattr(self.X, "chunks", (1, self.X.shape[1])))

    def _span(self, rows: slice) -> tuple[slice, np.ndarray]:
        """The source row span covering subset rows `rows` and the picked rows within it."""
        r0, r1, step = rows.indices(self.rows.size)
        if step != 1:
            raise IndexError("RowSample supports row slices with step 1 only")
        src = self.rows[r0:r1]
        if src.size == 0:
            return slice(0, 0), src
        return slice(int(src[0]), int(src[-1]) + 1), src - src[0]

    def _read(self, span: slice, cols: Any) -> np.ndarray:
        if isinstance(cols, slice) or np.ndim(cols) == 0 or isinstance(self.X, np.ndarray):
            return np.asarray(self.X[span, cols])
        # zarr / NpyFile: outer indexing reads only the chunks of these columns.
        return np.asarray(self.X.get_orthogonal_selection((span, np.asarray(cols))))

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        span, pick = self._span(rows)
        return self._read(span, cols)[pick]

    def get_orthogonal_selection(self, selection: tuple[slice, Any]) -> np.ndarray:
        rows, cols = selection
        span, pick = self._span(rows)
        return self._read(span, cols)[pick]


def random_halves(n_rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of 0..n_rows-1 (sizes differ by at most 1), each sorted."""
    perm = rng.permutation(n_rows)
    half = n_rows // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def _count(labels: np.ndarray) -> int:
    """Number of cluster ids 0..C-1 in labels (n,) (−1 = none)."""
    return int(labels.max()) + 1 if (labels >= 0).any() else 0


# --------------------------------------------------------------------------------------------
# Coherence
# --------------------------------------------------------------------------------------------


def _square_sums(X: Any, cols: np.ndarray, starts: np.ndarray, n_rows: int,
                 budget: int) -> tuple[np.ndarray, np.ndarray]:
    """For consecutive column groups of `cols` (group g = cols[starts[g]:starts[g+1]]): the
    squared norm ‖Σ_i z_i‖² of the sum of its unit-norm centred columns z_i over rows
    0..n_rows-1, and how many of its columns are not constant there. Both (len(starts),).

    One read when (n_rows, len(cols)) float64 fits in `budget`; else two passes over row
    chunks (moments first, since z needs each column's mean and norm)."""
    w = cols.size
    step = max(1, min(n_rows, budget // (8 * w)))
    bounds = [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]
    cache: np.ndarray | None = None
    acc = ColumnStats.empty(w, tau=0.0)
    for r0, r1 in bounds:
        block = read_block(X, r0, r1, cols).astype(np.float64)
        if len(bounds) == 1:
            cache = block
        acc = acc.merge(ColumnStats.of(block, tau=0.0))
    std = np.sqrt(np.maximum(acc.m2, 0.0) / n_rows)
    ok = (std > 0) & (std > ZERO_VAR_RTOL * np.abs(acc.mean))
    inv_norm = np.where(ok, 1.0 / np.sqrt(np.where(ok, acc.m2, 1.0)), 0.0)
    sq = np.zeros(starts.size)
    for r0, r1 in bounds:
        block = cache if cache is not None else read_block(X, r0, r1, cols).astype(np.float64)
        block -= acc.mean
        block *= inv_norm  # constant columns become 0: they add nothing to the sums
        s = np.add.reduceat(block, starts, axis=1)  # (r, groups)
        sq += np.einsum("rg,rg->g", s, s)
    return sq, np.add.reduceat(ok.astype(np.int64), starts)


def cluster_coherence(
    X: Any, columns: np.ndarray, labels: np.ndarray, n_rows: int,
    budget: int = _SAMPLE_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean pairwise Pearson correlation of each cluster's members on rows 0..n_rows-1 of X.

    X: (M, N_total) profiles (anything `read_block` reads); columns: (n,) global column id of
    each graph node; labels: (n,) cluster id per node (−1: none), ids 0..C-1. Returns
    coherence (C,) float64 (NaN for singletons and clusters with fewer than 2 non-constant
    members on the sample) and n_scored (C,) int64 (members non-constant on the sample).
    Reads only non-singleton members' columns, clusters batched so that one batch's
    (n_rows, columns) float64 block stays within `budget` (a larger cluster streams alone)."""
    labels = np.asarray(labels, dtype=np.int64)
    n_clusters = _count(labels)
    coherence = np.full(n_clusters, np.nan)
    n_scored = np.zeros(n_clusters, dtype=np.int64)
    sizes = np.bincount(labels[labels >= 0], minlength=n_clusters)
    multi = np.flatnonzero(sizes > 1)
    if multi.size == 0 or n_rows < 2:
        return coherence, n_scored
    # Member nodes grouped by cluster (a stable sort keeps each group in node order).
    nodes = np.flatnonzero(np.isin(labels, multi))
    nodes = nodes[np.argsort(labels[nodes], kind="stable")]
    group_sizes = sizes[multi]
    offsets = np.concatenate([[0], np.cumsum(group_sizes)])
    max_cols = max(2, budget // (8 * n_rows))
    g = 0
    while g < multi.size:
        # Whole clusters up to max_cols columns (at least one cluster per batch).
        h = g + 1
        while h < multi.size and offsets[h + 1] - offsets[g] <= max_cols:
            h += 1
        batch = nodes[offsets[g]:offsets[h]]
        starts = offsets[g:h] - offsets[g]
        sq, ok = _square_sums(X, np.asarray(columns)[batch], starts, n_rows, budget)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Σ_{i≠j} z_i·z_j = ‖Σ z_i‖² − (number of unit-norm z_i), over ok·(ok−1) pairs.
            coh = np.where(ok >= 2, (sq - ok) / (ok * (ok - 1.0)), np.nan)
        coherence[multi[g:h]] = coh
        n_scored[multi[g:h]] = ok
        g = h
    return coherence, n_scored


# --------------------------------------------------------------------------------------------
# Separation
# --------------------------------------------------------------------------------------------


def nearest_outside(graph: GraphResult, labels: np.ndarray) -> np.ndarray:
    """Per cluster (C,): the largest correlation between a member and a non-member (nodes
    labelled −1 count as non-members) among the pairs in the top-k lists, read both ways (a
    member's list naming an outsider, or an outsider's naming a member); 0 when there is none.
    labels: (n,)."""
    labels = np.asarray(labels, dtype=np.int64)
    n_clusters = _count(labels)
    out = np.zeros(n_clusters)
    idx = np.asarray(graph.topk_idx)
    val = np.asarray(graph.topk_val, dtype=np.float64)
    listed = idx >= 0
    src = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)[listed]
    dst, v = idx[listed], val[listed]
    a, b = labels[src], labels[dst]
    cross = a != b
    # Each cross-cluster pair bounds the nearest outside link of both of its clusters.
    for mine in (a, b):
        keep = cross & (mine >= 0)
        np.maximum.at(out, mine[keep], v[keep])
    return out


# --------------------------------------------------------------------------------------------
# Agreement between clusterings
# --------------------------------------------------------------------------------------------


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (n,) over the nodes both label (≥ 0); 1.0 when
    fewer than 2 such nodes."""
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415

    both = (np.asarray(a) >= 0) & (np.asarray(b) >= 0)
    if both.sum() < 2:
        return 1.0
    return float(adjusted_rand_score(np.asarray(a)[both], np.asarray(b)[both]))


def best_jaccard(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per cluster c of `labels` (C,): max over clusters d of `other` of |c ∩ d| / |c ∪ d|
    (0 when no member of c is in a cluster of `other`). labels, other: (n,), −1 = none."""
    labels = np.asarray(labels, dtype=np.int64)
    other = np.asarray(other, dtype=np.int64)
    n_clusters = _count(labels)
    out = np.zeros(n_clusters)
    size_c = np.bincount(labels[labels >= 0], minlength=n_clusters)
    n_other = _count(other)
    size_d = np.bincount(other[other >= 0], minlength=n_other)
    both = (labels >= 0) & (other >= 0)
    if not both.any():
        return out
    # Sparse contingency table: intersections of every overlapping (c, d) pair.
    inter = sp.coo_matrix((np.ones(int(both.sum())), (labels[both], other[both])),
                          shape=(n_clusters, n_other)).tocsr().tocoo()  # sums duplicates
    jac = inter.data / (size_c[inter.row] + size_d[inter.col] - inter.data)
    np.maximum.at(out, inter.row, jac)
    return out


def _pairwise_ari(clusterings: list[np.ndarray]) -> list[float]:
    return [ari(a, b) for a, b in combinations(clusterings, 2)]


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------


def _stat(x: np.ndarray, fn: Any) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else None


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def cluster_quality(
    X: Any,
    graph: GraphResult,
    labels: np.ndarray,
    gcfg: GraphConfig,
    scfg: SpectralConfig,
    *,
    frac_active: np.ndarray | None = None,
    graph_device: str = "cpu",
    device: Device = "cpu",
    executor: Executor = "local",
    ray_cfg: RayConfig | None = None,
) -> dict[str, Any]:
    """The quality.json document of clustering `labels` (see the module docstring).

    X: (M, N_total) dense profiles the graph was built from (zarr.Array, ndarray, NpyFile);
    graph: its GraphResult (n nodes); labels: (n,) cluster ids 0..C-1 (−1: none) over the
    graph's nodes, as cluster_alive returns them; gcfg / scfg: the configs that made them;
    frac_active: (n,) as given to cluster_alive (needed with always_on_fraction). graph_device:
    device of the half graphs' tile math; device, executor, ray_cfg: of the re-clusterings
    (the half graphs are built in this process)."""
    t0 = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    n_rows_total = int(X.shape[0])
    n_clusters = _count(labels)
    sizes = np.bincount(labels[labels >= 0], minlength=n_clusters)
    timings: dict[str, float] = {}

    rows = min(n_rows_total, scfg.quality_rows)
    coherence, n_scored = cluster_coherence(X, graph.columns, labels, rows)
    nearest = nearest_outside(graph, labels)
    margin = coherence - nearest
    timings["coherence_s"] = time.perf_counter() - t0

    def recluster(g: GraphResult, cfg: SpectralConfig, Xg: Any) -> np.ndarray:
        profiles = Xg if cfg.mode == "largest_component" else None
        return cluster_alive(g, cfg, frac_active=frac_active, profiles=profiles,
                             executor=executor, ray_cfg=ray_cfg, device=device).labels

    # Resampling the rows: two halves per repeat, each graph built and clustered afresh.
    t1 = time.perf_counter()
    resample: dict[str, Any] | None = None
    stability = np.full(n_clusters, np.nan)
    if scfg.quality_resamples and n_rows_total >= 4:
        rng = np.random.default_rng([scfg.seed, 0x5eed])
        jaccards: list[np.ndarray] = []
        aris, halves_info = [], []
        for rep in range(scfg.quality_resamples):
            log.info("spectral quality: resample %d/%d, graphs of two random halves of the %d "
                     "rows", rep + 1, scfg.quality_resamples, n_rows_total)
            half_labels = []
            for half in random_halves(n_rows_total, rng):
                view = RowSample(X, half)
                # The half builds repeat the stage graph's own log lines; only warnings show.
                with _quiet("scalespd.graph.build"):
                    g = build_graph(view, gcfg, graph.columns, device=graph_device,
                                    use_ray=False)
                lab = recluster(g, scfg, view)
                half_labels.append(lab)
                jaccards.append(best_jaccard(labels, lab))
                halves_info.append({"n_rows": int(half.size), "n_edges": int(g.graph.nnz // 2),
                                    "threshold": float(g.threshold),
                                    "n_clusters": _count(lab)})
            aris.append(ari(*half_labels))
        stability = np.mean(jaccards, axis=0)
        resample = {"repeats": scfg.quality_resamples, "ari": aris,
                    "ari_mean": float(np.mean(aris)), "ari_min": float(np.min(aris)),
                    "halves": halves_info}
    timings["resample_s"] = time.perf_counter() - t1

    # Seeds: the same graph, other k-means / eigensolver seeds.
    t2 = time.perf_counter()
    seeds: dict[str, Any] | None = None
    if scfg.quality_seeds:
        runs = [labels]
        for s in range(1, scfg.quality_seeds + 1):
            runs.append(recluster(graph, scfg.model_copy(update={"seed": scfg.seed + s}), X))
        pair = _pairwise_ari(runs)
        seeds = {"seeds": [scfg.seed + s for s in range(scfg.quality_seeds + 1)],
                 "n_pairs": len(pair), "ari_mean": float(np.mean(pair)),
                 "ari_min": float(np.min(pair)),
                 "n_clusters": [_count(r) for r in runs]}
    timings["seeds_s"] = time.perf_counter() - t2

    multi = np.flatnonzero(sizes > 1)
    multi = multi[np.argsort(-sizes[multi], kind="stable")]  # largest first, then by id
    per_cluster = [{"cluster": int(c), "size": int(sizes[c]), "n_scored": int(n_scored[c]),
                    "coherence": _num(coherence[c]), "nearest": float(nearest[c]),
                    "margin": _num(margin[c]), "stability": _num(stability[c])}
                   for c in multi]
    scored = multi[np.isfinite(coherence[multi])]
    timings["total_s"] = time.perf_counter() - t0
    return {
        "definitions": DEFINITIONS,
        "n_rows_sample": rows,
        "n_clusters": n_clusters,
        "n_non_singleton": int(multi.size),
        "n_clusters_scored": int(scored.size),
        "median_coherence": _stat(coherence[scored], np.median),
        "mean_coherence": _stat(coherence[scored], np.mean),
        "median_margin": _stat(margin[scored], np.median),
        "median_stability": _stat(stability[multi], np.median),
        "resample": resample,
        "seeds": seeds,
        "clusters": per_cluster,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def headline(doc: dict[str, Any]) -> str:
    """One log line with the headline numbers of a quality.json document."""
    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    res, sd = doc.get("resample") or {}, doc.get("seeds") or {}
    return (f"{doc['n_clusters_scored']} clusters scored: median coherence "
            f"{f(doc['median_coherence'])}, median margin {f(doc['median_margin'])}, "
            f"median stability {f(doc['median_stability'])}; resample ARI mean "
            f"{f(res.get('ari_mean'))} min {f(res.get('ari_min'))}; seed ARI mean "
            f"{f(sd.get('ari_mean'))} min {f(sd.get('ari_min'))}")
