"""Cluster statistics that need no ground truth (CLU §6 / digest §5.6 metrics).

All functions take per-node arrays over the n alive subcomponents (cluster id, layer, module
type, ...) and return JSON-able dicts. Nothing here is O(n^2) except `correlation_stats`, which
the caller feeds a capped sample of columns.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import scipy.sparse as sp

# Token vocabularies for the attention / MLP split of module types (CLU Table 7 modules:
# q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; toys: mlp_in, mlp_out).
_ATTN_TOKENS = frozenset({"q", "k", "v", "o", "qkv", "attn", "attention", "query", "key",
                          "value", "c_attn"})
_MLP_TOKENS = frozenset({"mlp", "gate", "up", "down", "fc", "ffn", "c_fc", "w1", "w2", "w3"})


def module_category(module_type: str) -> str:
    """"attention", "mlp", or the module type itself (TMS encoder/decoder/identity, ...)."""
    tokens = set(re.split(r"[._\-]", module_type.lower()))
    if tokens & _ATTN_TOKENS:
        return "attention"
    if tokens & _MLP_TOKENS:
        return "mlp"
    return module_type


def composition_label(module_types: set[str]) -> str:
    """One label per cluster from the set of its members' module types: "attention-only",
    "mlp-only", "mixed" (attention and MLP), or, when other types are involved, their categories
    joined by "+" (e.g. "decoder+encoder" for a TMS pair)."""
    cats = {module_category(t) for t in module_types}
    if cats == {"attention"}:
        return "attention-only"
    if cats == {"mlp"}:
        return "mlp-only"
    if cats == {"attention", "mlp"}:
        return "mixed"
    return "+".join(sorted(cats))


def group_members(clusters: np.ndarray) -> dict[int, np.ndarray]:
    """cluster id -> ascending node indices, for every id >= 0, in O(n log n) (no per-cluster
    scan of all n nodes). clusters: (n,)."""
    clusters = np.asarray(clusters)
    idx = np.flatnonzero(clusters >= 0)
    order = idx[np.argsort(clusters[idx], kind="stable")]
    ids, starts = np.unique(clusters[order], return_index=True)
    return {int(c): part for c, part in zip(ids, np.split(order, starts[1:]), strict=True)}


def cluster_table(
    clusters: np.ndarray,
    layers: np.ndarray,
    module_types: np.ndarray,
    modules: np.ndarray,
    names: np.ndarray,
) -> list[dict[str, Any]]:
    """One row per cluster (largest first; ties by id): id, size, layers, layer span, module
    types with counts, composition label, member names. Nodes with cluster -1 are left out.

    All inputs: (n,) arrays over the alive nodes."""
    groups = group_members(clusters)
    rows = []
    for cid in sorted(groups, key=lambda c: (-groups[c].size, c)):
        idx = groups[cid]
        mt = Counter(str(t) for t in module_types[idx])
        rows.append({
            "cluster": int(cid),
            "size": int(len(idx)),
            "layers": sorted({int(v) for v in layers[idx]}),
            "layer_span": len({int(v) for v in layers[idx]}),
            "module_types": dict(sorted(mt.items())),
            "modules": dict(sorted(Counter(str(m) for m in modules[idx]).items())),
            "composition": composition_label(set(mt)),
            "members": [str(names[j]) for j in idx],
        })
    return rows


def cluster_stats(table: list[dict[str, Any]], all_layers: set[int]) -> dict[str, Any]:
    """Size, layer-span and composition statistics from `cluster_table` rows.

    all_layers: the layers of the alive nodes (for "spans every layer")."""
    sizes = [r["size"] for r in table]
    multi = [r for r in table if r["size"] > 1]
    spans = Counter(r["layer_span"] for r in multi)
    n_multi = len(multi)
    n_cross = sum(r["layer_span"] >= 2 for r in multi)
    return {
        "n_clusters": len(table),
        "cluster_sizes": sizes,
        "n_singletons": len(table) - n_multi,
        "n_non_singleton": n_multi,
        "largest_cluster_sizes": sizes[:10],
        # JSON object keys are strings; spans sorted numerically.
        "layer_span_counts": {str(s): spans[s] for s in sorted(spans)},
        "frac_multi_layer": n_cross / n_multi if n_multi else None,
        "n_span_all_layers": sum(
            len(all_layers) > 1 and set(r["layers"]) >= all_layers for r in multi
        ),
        "composition_counts": dict(Counter(r["composition"] for r in multi).most_common()),
        "module_type_set_counts": dict(
            Counter("+".join(sorted(r["module_types"])) for r in multi).most_common()
        ),
    }


def edge_stats(graph: sp.spmatrix, clusters: np.ndarray) -> dict[str, Any]:
    """k-NN graph coherence: fraction of edges inside clusters and mean edge weight inside vs
    across (CLU 3L: 99.8% of edges within clusters).

    graph: (n, n) symmetric sparse weights over the alive nodes; clusters: (n,)."""
    coo = sp.triu(graph, k=1).tocoo()
    clusters = np.asarray(clusters)
    if coo.nnz == 0:
        return {"n_edges": 0, "frac_edges_within": None, "mean_edge_weight_within": None,
                "mean_edge_weight_between": None}
    ci, cj = clusters[coo.row], clusters[coo.col]
    within = (ci == cj) & (ci >= 0)
    w = coo.data.astype(np.float64)
    return {
        "n_edges": int(coo.nnz),
        "frac_edges_within": float(within.mean()),
        "mean_edge_weight_within": float(w[within].mean()) if within.any() else None,
        "mean_edge_weight_between": float(w[~within].mean()) if (~within).any() else None,
    }


def correlation_stats(corr: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    """Mean Pearson correlation over pairs in the same cluster vs in different clusters
    (CLU 3L: 0.175 within vs 0.024 between), from a (s, s) correlation matrix of sampled columns.

    NaN entries (zero-variance columns) are left out. clusters: (s,); -1 nodes are left out."""
    clusters = np.asarray(clusters)
    iu, ju = np.triu_indices(len(clusters), k=1)
    keep = (clusters[iu] >= 0) & (clusters[ju] >= 0)
    iu, ju = iu[keep], ju[keep]
    vals = corr[iu, ju]
    ok = np.isfinite(vals)
    same = clusters[iu] == clusters[ju]
    w, b = vals[same & ok], vals[~same & ok]
    return {
        "n_pairs_within": int(len(w)),
        "n_pairs_between": int(len(b)),
        "mean_corr_within": float(w.mean()) if len(w) else None,
        "mean_corr_between": float(b.mean()) if len(b) else None,
    }


def pearson(X: np.ndarray) -> np.ndarray:
    """Column correlation of X (M, s) -> (s, s), NaN for zero-variance columns."""
    X = np.asarray(X, dtype=np.float64)
    Z = X - X.mean(axis=0)
    norm = np.sqrt((Z * Z).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = Z / norm
        C = Z.T @ Z
    C[:, norm == 0] = np.nan
    C[norm == 0, :] = np.nan
    return np.clip(C, -1.0, 1.0)
