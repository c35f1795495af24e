"""Ground-truth scoring of a clustering on toy targets.

Each toy mechanism is known (digest §1.4): one rank-1 piece per input feature in every
feature-serving matrix (TMS encoder and decoder, ResidMLP mlp_in of every layer) plus one dense
component that is important on almost every input (TMS identity, ResidMLP mlp_out). We recover
which alive subcomponent serves which feature from its causal importance on one-hot inputs
(x_i = 0.75, one row per feature): the feature with the largest CI, unless

- it is important (CI > tau) on more than `dense_fraction` of the one-hot inputs -> DENSE,
- it belongs to a matrix that is one dense mechanism by construction (TMS identity, ResidMLP
  mlp_out: `DENSE_MODULE_TYPES`) and is important on any one-hot input -> DENSE. Such a matrix's
  subcomponents need not align with any feature basis: SPD's ResidMLP heatmaps show each
  mlp_out subcomponent important on an arbitrary subset of the features, all of them together
  forming the identity projection (SPD paper Fig. 8 and 12),
- it is important on none of them -> INACTIVE (alive on the profile data, but serving no single
  feature: the noise components of a poorly sparsified decomposition),
- its best and second-best CI are within `tie_tol` -> TIE (serves two features equally).

A mechanism (feature f) counts as recovered when the alive subcomponents assigned to f form
exactly one cluster with nothing else in it, and they cover every feature-serving layer (a lone
encoder piece whose decoder partner died is not a recovered encoder-decoder pair).

Everything here works on plain arrays, so it is testable without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Special labels (features are 0..F-1).
DENSE = -1
INACTIVE = -2
TIE = -3

# Module types whose subcomponents are dense in the toy models.
DENSE_MODULE_TYPES = frozenset({"identity", "mlp_out"})


@dataclass(frozen=True)
class FeatureAssignment:
    """Which feature each of n alive subcomponents serves.

    labels: (n,) int, a feature id in [0, F) or DENSE / INACTIVE / TIE.
    best_ci: (n,) float, the largest one-hot CI of the subcomponent.
    n_served: (n,) int, number of one-hot inputs with CI > tau.
    tied: node index -> the features it is tied between (TIE nodes only).
    n_features: F.
    """

    labels: np.ndarray
    best_ci: np.ndarray
    n_served: np.ndarray
    tied: dict[int, list[int]]
    n_features: int


def assign_features(
    onehot_ci: np.ndarray,
    tau: float,
    dense_fraction: float = 0.5,
    tie_tol: float = 1e-3,
    dense_module: np.ndarray | None = None,
) -> FeatureAssignment:
    """Map each subcomponent (column) to the feature it serves.

    onehot_ci: (F, n) causal importances, row f = input with only feature f on.
    dense_module: (n,) bool, True where the subcomponent's matrix is a dense mechanism by
        construction (see `DENSE_MODULE_TYPES`); None: decide from the one-hot CI alone.
    """
    ci = np.asarray(onehot_ci, dtype=np.float64)
    if ci.ndim != 2 or ci.shape[0] == 0:
        raise ValueError(f"onehot_ci must be a (F, n) array with F >= 1, got shape {ci.shape}")
    if not np.isfinite(ci).all():
        raise ValueError("onehot_ci contains NaN or inf")
    F, n = ci.shape
    served = ci > tau
    n_served = served.sum(axis=0)
    order = np.argsort(-ci, axis=0, kind="stable")  # (F, n), best feature first
    best = order[0] if n else np.zeros(0, dtype=np.int64)
    best_ci = ci[best, np.arange(n)] if n else np.zeros(0)
    labels = best.astype(np.int64).copy()
    tied: dict[int, list[int]] = {}
    if F > 1 and n:
        second_ci = ci[order[1], np.arange(n)]
        is_tie = (best_ci - second_ci <= tie_tol) & (second_ci > tau)
        for j in np.flatnonzero(is_tie):
            feats = np.flatnonzero(ci[:, j] >= best_ci[j] - tie_tol)
            tied[int(j)] = sorted(int(f) for f in feats)
        labels[is_tie] = TIE
    # Dense and inactive override everything: they describe what the component is, whatever its
    # argmax happens to be.
    labels[n_served > dense_fraction * F] = DENSE
    if dense_module is not None:
        dense_module = np.asarray(dense_module, dtype=bool)
        if dense_module.shape != (n,):
            raise ValueError(f"dense_module has shape {dense_module.shape}, expected ({n},) "
                             f"like the columns of onehot_ci")
        labels[dense_module & (n_served > 0)] = DENSE
    labels[n_served == 0] = INACTIVE
    for node in list(tied):
        if labels[node] != TIE:
            del tied[node]
    return FeatureAssignment(labels, best_ci, n_served.astype(np.int64), tied, F)


def truth_labels(labels: np.ndarray) -> np.ndarray:
    """Ground-truth partition for ARI/purity: one class per feature, one for all dense nodes, and
    every INACTIVE/TIE node its own class (they belong to no mechanism).

    labels: (n,) from `FeatureAssignment.labels`. Returns (n,) int class ids.
    """
    out = np.asarray(labels, dtype=np.int64).copy()
    loners = np.flatnonzero(out < DENSE)  # INACTIVE, TIE
    base = max(int(out.max(initial=-1)) + 1, 0)
    out[loners] = base + np.arange(len(loners))
    return out


def _complete_clusters(clusters: np.ndarray) -> np.ndarray:
    """Cluster ids with every unclustered (-1) node made its own singleton."""
    c = np.asarray(clusters, dtype=np.int64).copy()
    missing = np.flatnonzero(c < 0)
    c[missing] = max(int(c.max(initial=-1)) + 1, 0) + np.arange(len(missing))
    return c


def purity(clusters: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean over non-singleton clusters of the majority-class share (None: no such cluster).

    clusters, truth: (n,) ints; nodes with cluster -1 are ignored."""
    from scalespd.report.stats import group_members  # noqa: PLC0415

    truth = np.asarray(truth)
    shares = []
    for idx in group_members(clusters).values():
        members = truth[idx]
        if len(members) < 2:
            continue
        _, counts = np.unique(members, return_counts=True)
        shares.append(counts.max() / len(members))
    return float(np.mean(shares)) if shares else None


def score_clustering(
    assignment: FeatureAssignment,
    clusters: np.ndarray,
    layers: np.ndarray,
    feature_layers: set[int] | None = None,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Score a clustering of n alive subcomponents against the one-hot ground truth.

    clusters: (n,) cluster id per node (-1: not clustered, counted as its own singleton).
    layers: (n,) layer of each node.
    feature_layers: layers every mechanism must cover (e.g. {0, L} for TMS encoder/decoder,
        {0, 1} for ResidMLP-2L mlp_in); None: no coverage requirement.
    names: (n,) node names for the per-feature table (default: node indices).
    Returns a JSON-able dict (see `summary.json` in the README).
    """
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415  (keep import light)

    labels = assignment.labels
    clusters = np.asarray(clusters, dtype=np.int64)
    layers = np.asarray(layers, dtype=np.int64)
    n = len(labels)
    if clusters.shape != (n,) or layers.shape != (n,):
        raise ValueError(
            f"clusters {clusters.shape} and layers {layers.shape} must both have shape ({n},) "
            f"like the one-hot assignment"
        )
    names = names if names is not None else [str(i) for i in range(n)]
    full = _complete_clusters(clusters)
    sizes = dict(zip(*np.unique(full, return_counts=True), strict=True))

    features = []
    recovered = 0
    # A mechanism the decomposition itself left whole (a member in every required layer) is the
    # most any clustering can recover: this separates SPD failures from clustering failures.
    recoverable = 0
    for f in range(assignment.n_features):
        members = np.flatnonzero(labels == f)
        member_clusters = sorted({int(full[j]) for j in members})
        covers = feature_layers is None or feature_layers <= {int(layers[j]) for j in members}
        if len(members) == 0:
            status = "missing"  # no alive subcomponent serves f
        elif len(member_clusters) > 1:
            status = "split"
        elif sizes[member_clusters[0]] > len(members):
            status = "merged"  # its cluster also holds other subcomponents
        elif not covers:
            status = "incomplete"  # exact cluster, but a feature-serving layer is missing
        else:
            status = "recovered"
        recovered += status == "recovered"
        recoverable += len(members) > 0 and covers
        features.append({
            "feature": f,
            "members": [names[j] for j in members],
            "layers": sorted({int(layers[j]) for j in members}),
            "clusters": [int(clusters[j]) for j in members],
            "status": status,
        })
    statuses = [r["status"] for r in features]

    truth = truth_labels(labels)
    out: dict[str, Any] = {
        "mechanisms_total": assignment.n_features,
        "mechanisms_recovered": int(recovered),
        "mechanisms_recoverable": int(recoverable),
        "mechanism_status_counts": {s: statuses.count(s) for s in sorted(set(map(str, statuses)))},
        "purity": purity(clusters, truth),
        "ari": float(adjusted_rand_score(truth, full)) if n else None,
        "n_nodes": int(n),
        "n_feature_serving": int((labels >= 0).sum()),
        "n_dense": int((labels == DENSE).sum()),
        "n_inactive": int((labels == INACTIVE).sum()),
        "n_ties": int((labels == TIE).sum()),
        "ties": {names[j]: fs for j, fs in assignment.tied.items()},
        "feature_layers": sorted(feature_layers) if feature_layers is not None else None,
        "dense": dense_cluster_info(labels, clusters, names),
        "features": features,
    }
    return out


def dense_cluster_info(
    labels: np.ndarray, clusters: np.ndarray, names: list[str]
) -> dict[str, Any] | None:
    """Where the dense subcomponents ended up: the cluster holding most of them, its size and
    dense share, whether it holds exactly the dense set, and how many clusters they spread over
    (the TMS 5-2+ID failure: identity spread over every feature cluster). None if no node is
    dense."""
    dense = np.flatnonzero(labels == DENSE)
    if len(dense) == 0:
        return None
    full = _complete_clusters(clusters)
    ids, counts = np.unique(full[dense], return_counts=True)
    best = int(ids[np.argmax(counts)])
    in_best = np.flatnonzero(full == best)
    n_dense_in = int(counts.max())
    exact = n_dense_in == len(dense) == len(in_best)
    return {
        "n_dense": int(len(dense)),
        "n_clusters_holding_dense": int(len(ids)),
        "cluster": int(clusters[in_best[0]]) if clusters[in_best[0]] >= 0 else None,
        "size": int(len(in_best)),
        "n_dense_in_cluster": n_dense_in,
        "purity": n_dense_in / len(in_best),
        "recovered": bool(exact),
        "members": [names[j] for j in dense],
    }
