"""From a `GraphResult` to one cluster id per alive node, and the clusters.csv table.

Shared by the pipeline stage (`stage.py`) and `python -m scalespd.cluster`.

Always-on option (cfg.always_on_fraction, on by default): nodes active (CI > tau) on more than
that fraction of the inputs whose strongest correlation with any other node stays below
cfg.always_on_max_corr ("frequent and unpartnered": the TMS identity, near-constant always-active
pathways) correlate weakly with everything and would otherwise be spread over the feature
clusters (the clustering paper's TMS 5-2+ID failure case). With grouping "join" (default) each
of them without an edge to another always-on node is linked to every other always-on node and
all are clustered with the rest, so they form one cluster unless their own edges tie them to
others, and groups of always-on nodes already linked among themselves stay apart ("join_all"
links every pair of them); "single" takes them out as one cluster of all of them, "connected"
as one cluster per connected set of them in the k-NN graph (their edges to other nodes are
dropped in both).

Containment edges (cfg.edge_mass_ratio, on by default): before anything else, an edge whose two
nodes' second moments E[x^2] = std^2 + mean^2 differ by more than that factor is dropped — a
hub that serves many mechanisms correlates with a member whose inputs it contains as strongly
as with other hubs, but carries several times its mass; members of one mechanism fire on the
same inputs and differ only by their levels.

Modes:
- per_component (default): spectral clustering of every connected piece; isolated nodes
  (zero-variance columns included) are singleton clusters.
- largest_component: spectral clustering of the largest connected piece only; every other
  alive node gets the cluster with the highest mean correlation to its members
  (`assign.mean_correlation_to_clusters`). Zero-variance columns have no correlation and are
  excluded (cluster −1).

Global cluster ids are ordered by each cluster's smallest global column id, so they depend only
on the partition, and the partition only on the data, the config and the seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from scalespd.config import RayConfig, SpectralConfig
from scalespd.executor import Executor
from scalespd.graph import GraphResult
from scalespd.graph.knn import components, strongest_weight
from scalespd.spectral.assign import mean_correlation_to_clusters
from scalespd.spectral.tasks import Device, cluster_graph_detailed, graph_pieces

# The columns of clusters.csv (the spectral stage's output contract, read by the report).
CLUSTER_COLUMNS = ["component", "name", "layer", "module", "alive", "connected_component",
                   "cluster"]


@dataclass
class AliveClustering:
    """labels (n,): global cluster id per graph node (−1 = excluded); always_on (n,) bool;
    spectra: per-piece records; info: counts and timings (JSON-able)."""

    labels: np.ndarray
    always_on: np.ndarray
    spectra: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def order_by_keys(labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. in order of their smallest key; −1 stays −1. (n,) → (n,)."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    ok = labels >= 0
    if not ok.any():
        return out
    ids, inv = np.unique(labels[ok], return_inverse=True)
    first = np.full(ids.size, np.iinfo(np.int64).max)
    np.minimum.at(first, inv, keys[ok])
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(ids.size)
    out[ok] = rank[inv]
    return out


def _always_on_groups(W: sp.csr_matrix, on: np.ndarray, grouping: str) -> np.ndarray:
    """Group id (0..) for each always-on node, in the order of np.flatnonzero(on)."""
    idx = np.flatnonzero(on)
    if grouping == "single":
        return np.zeros(idx.size, dtype=np.int64)
    sub = W[idx][:, idx].tocsr()
    sub.eliminate_zeros()
    return connected_components(sub, directed=False)[1].astype(np.int64)


def always_on_nodes(graph: GraphResult, cfg: SpectralConfig,
                    frac_active: np.ndarray | None) -> np.ndarray:
    """(n,) bool: the always-on nodes — active on more than cfg.always_on_fraction of the inputs
    and with no candidate neighbour correlated at cfg.always_on_max_corr or more. Without
    frac_active (a caller that has no activity fractions) there is no always-on group."""
    n = graph.columns.size
    if cfg.always_on_fraction is None or frac_active is None:
        return np.zeros(n, dtype=bool)
    if np.shape(frac_active) != (n,):
        raise ValueError(f"frac_active has shape {np.shape(frac_active)}, expected ({n},): one "
                         "value per graph node")
    unpartnered = strongest_weight(graph.topk_idx, graph.topk_val) < cfg.always_on_max_corr
    return (np.asarray(frac_active) > cfg.always_on_fraction) & unpartnered


def drop_containment_edges(W: sp.csr_matrix, mean: np.ndarray, std: np.ndarray,
                           ratio: float) -> tuple[sp.csr_matrix, int]:
    """W (n, n) without the edges whose endpoints' second moments E[x^2] = std^2 + mean^2 (n,)
    differ by more than `ratio` (see SpectralConfig.edge_mass_ratio), and the number of
    undirected edges dropped. O(nnz)."""
    W = sp.csr_matrix(W)
    m2 = np.asarray(std, dtype=np.float64) ** 2 + np.asarray(mean, dtype=np.float64) ** 2
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
    lo = np.minimum(m2[rows], m2[W.indices])
    hi = np.maximum(m2[rows], m2[W.indices])
    drop = hi > ratio * lo
    n_drop = int(drop.sum())
    if not n_drop:
        return W, 0
    out = W.copy()
    out.data[drop] = 0.0
    out.eliminate_zeros()
    out.sort_indices()
    return out, n_drop // 2


def join_nodes(W: sp.csr_matrix, on: np.ndarray, *, all_pairs: bool = False) -> sp.csr_matrix:
    """W (n, n) with the `on` nodes linked at the median edge weight of W (1 if W has no
    edges): each `on` node without an edge to another `on` node to every other `on` node, or
    every pair of them with all_pairs. Existing heavier links stay. O(a^2) new entries for a
    always-on nodes."""
    idx = np.flatnonzero(on)
    weight = float(np.median(W.data)) if W.nnz else 1.0
    r, c = np.meshgrid(idx, idx, indexing="ij")
    off = r != c
    if not all_pairs:
        lonely = np.diff(W[idx][:, idx].tocsr().indptr) == 0
        off &= lonely[:, None] | lonely[None, :]
    clique = sp.csr_matrix((np.full(int(off.sum()), weight), (r[off], c[off])), shape=W.shape)
    out = sp.csr_matrix(W.maximum(clique))
    out.sort_indices()
    return out


def cluster_alive(
    graph: GraphResult,
    cfg: SpectralConfig,
    *,
    frac_active: np.ndarray | None = None,
    profiles: Any = None,
    executor: Executor = "auto",
    ray_cfg: RayConfig | None = None,
    device: Device = "cpu",
    progress: bool = False,
) -> AliveClustering:
    """Cluster the n nodes of `graph` (its columns are the alive global column ids).

    frac_active (n,): fraction of inputs each node is active on, for the always-on group (None:
    no group). profiles: the (M, N_total)
    matrix the graph was built from, needed in largest_component mode."""
    t0 = time.perf_counter()
    n = graph.columns.size
    keys = np.asarray(graph.columns, dtype=np.int64)
    W = sp.csr_matrix(graph.graph)
    labels = np.full(n, -1, dtype=np.int64)
    info: dict[str, Any] = {"mode": cfg.mode, "n_nodes": n}

    edited = False  # the graph's components hold until an edge is dropped or added
    if cfg.edge_mass_ratio is not None:
        W, n_dropped = drop_containment_edges(W, graph.mean, graph.std, cfg.edge_mass_ratio)
        info["n_containment_edges_dropped"] = n_dropped
        edited = n_dropped > 0

    on = always_on_nodes(graph, cfg, frac_active)
    info["n_always_on"] = int(on.sum())
    joined = cfg.always_on_grouping in ("join", "join_all")
    if on.any() and joined:
        W = join_nodes(W, on, all_pairs=cfg.always_on_grouping == "join_all")
        edited = True
    elif on.any():
        # Offset keeps group ids apart from the spectral ids until the global renumbering.
        labels[on] = _always_on_groups(W, on, cfg.always_on_grouping) + n
    taken_out = np.zeros(n, dtype=bool) if joined else on
    pieces_of = components(W)[1] if edited else graph.labels

    rest = np.flatnonzero(~taken_out)
    W_rest = W[rest][:, rest].tocsr()
    if cfg.mode == "per_component":
        res = cluster_graph_detailed(W_rest, pieces_of[rest], cfg, node_keys=keys[rest],
                                     executor=executor, ray_cfg=ray_cfg, device=device,
                                     progress=progress)
        labels[rest] = res.labels
    else:
        pieces = graph_pieces(W_rest)
        big = rest[pieces[0]] if pieces else np.empty(0, dtype=np.int64)
        res = cluster_graph_detailed(W[big][:, big].tocsr(), None, cfg, node_keys=keys[big],
                                     executor=executor, ray_cfg=ray_cfg, device=device,
                                     progress=progress)
        labels[big] = res.labels
        info["largest_component_size"] = int(big.size)
        t_assign = time.perf_counter()
        query = np.setdiff1d(rest, big)
        query = query[~graph.zero_var[query]]
        if query.size and big.size:
            if profiles is None:
                raise ValueError("spectral.mode 'largest_component' needs the profile matrix to "
                                 "assign the other nodes by correlation")
            member_ok = ~graph.zero_var[big]
            members = big[member_ok]
            corr = mean_correlation_to_clusters(
                profiles, keys[members], res.labels[member_ok], graph.mean[members],
                graph.std[members], keys[query], graph.mean[query], graph.std[query],
            )
            labels[query] = np.argmax(corr, axis=1)  # ties: lowest cluster id
        info["n_assigned"] = int(query.size)
        info["n_excluded"] = int((labels[rest] < 0).sum())
        info["assign_seconds"] = time.perf_counter() - t_assign

    out = order_by_keys(labels, keys)
    info.update(n_pieces=res.n_pieces, n_tasks=res.n_tasks, executor=res.executor,
                n_clusters=int(out.max()) + 1 if (out >= 0).any() else 0,
                timings=res.timings, seconds=time.perf_counter() - t0)
    for r in res.spectra:
        r["key"] = int(r["key"])
    return AliveClustering(out, on, res.spectra, info)


def clusters_table(
    meta: pd.DataFrame, columns: np.ndarray, graph_labels: np.ndarray, clusters: np.ndarray
) -> pd.DataFrame:
    """DESIGN §4 clusters.csv: one row per subcomponent of `meta` (needs component, name, layer,
    module, alive; one row per global column id in `component`). Alive graph nodes `columns`
    (n,) get their connected component and cluster; every other row gets −1 for both."""
    missing = [c for c in CLUSTER_COLUMNS[:5] if c not in meta.columns]
    if missing:
        raise ValueError(f"component table lacks columns {missing}")
    out = meta[CLUSTER_COLUMNS[:5]].copy().reset_index(drop=True)
    pos = pd.Index(out["component"]).get_indexer(np.asarray(columns))
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} graph node(s) are not in the component table")
    cc = np.full(len(out), -1, dtype=np.int64)
    cl = np.full(len(out), -1, dtype=np.int64)
    cc[pos] = graph_labels
    cl[pos] = clusters
    out["connected_component"] = cc
    out["cluster"] = cl
    return out


def cluster_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Counts from a clusters.csv table: n_clusters, cluster_sizes (descending), singletons, and
    layer_span_counts (number of distinct layers → count of non-singleton clusters)."""
    cl = table[table["cluster"] >= 0]
    sizes = cl.groupby("cluster").size()
    spans = cl.groupby("cluster")["layer"].nunique()[sizes > 1]
    span_counts = spans.value_counts().sort_index()
    return {
        "n_clusters": int(sizes.size),
        "cluster_sizes": sorted((int(s) for s in sizes), reverse=True),
        "n_singletons": int((sizes == 1).sum()),
        "n_nonsingleton": int((sizes > 1).sum()),
        "layer_span_counts": {str(int(k)): int(v) for k, v in span_counts.items()},
    }
