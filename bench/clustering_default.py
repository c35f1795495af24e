"""The measurements behind the clustering default (README "Clustering default", issue 13).

Re-clusters every regression-corpus entry (real SPD profiles of the toy reproductions,
tests/data/corpus) and a set of planted profiles (tests/planted_profiles.py: hubs, always-on
groups, mechanisms of 1 to 60 members, power-law firing rates) with several graph + spectral
procedures, in the same run:

- paper:    mutual k-NN, edge threshold 0, no always-on group, k-means labels (the clustering
            paper's method);
- union:    union k-NN, one data-derived threshold, no always-on group, k-means (scalespd's
            previous default);
- mutual:   as union but mutual k-NN (the previous toy configs);
- relative: the default (per-pair thresholds, relative-strength edges, containment edges
            dropped, always-on group joined, cluster_qr labels);
- relative, all edges: the default without the containment test (edge_mass_ratio None) and
            with every always-on pair linked (join_all): the default before issue 13's
            lone+hubs / many-small fix.

Per entry: mechanisms recovered / ARI against the ground truth, the dense subcomponents' cluster,
seed stability (min ARI between 5 seeds) and the graph + spectral wall time.

    python bench/clustering_default.py [--seeds 5] [--out bench/results/clustering_default.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from corpus import corpus_names, load  # noqa: E402
from planted_profiles import PLANTED_SETS, hub_profiles  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from scalespd.config import GraphConfig, SpectralConfig  # noqa: E402
from scalespd.graph import build_graph  # noqa: E402
from scalespd.report.groundtruth import FeatureAssignment, score_clustering  # noqa: E402
from scalespd.spectral.clustering import cluster_alive  # noqa: E402

OLD = {"always_on_fraction": None, "assign_labels": "kmeans", "edge_mass_ratio": None}
PROCEDURES: dict[str, tuple[dict, dict]] = {
    "paper": ({"neighbours": "mutual", "edge_threshold": 0.0}, OLD),
    "union": ({"neighbours": "union", "null_model": "bennett"}, OLD),
    "mutual": ({"neighbours": "mutual", "null_model": "bennett"}, OLD),
    "relative, all edges": ({}, {"edge_mass_ratio": None, "always_on_grouping": "join_all"}),
    "relative": ({}, {}),
}

def cluster(X: np.ndarray, frac: np.ndarray, graph: dict, spectral: dict,
            seed: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    g = build_graph(X, GraphConfig(**graph))
    labels = cluster_alive(g, SpectralConfig(**spectral, seed=seed), frac_active=frac,
                           executor="local").labels
    return labels, time.perf_counter() - t0


def seed_stability(X: np.ndarray, frac: np.ndarray, graph: dict, spectral: dict,
                   seeds: int) -> float:
    runs = [cluster(X, frac, graph, spectral, s)[0] for s in range(seeds)]
    return min((adjusted_rand_score(a, b) for a, b in itertools.combinations(runs, 2)),
               default=1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/clustering_default.json")
    args = ap.parse_args()
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                 "procedures": {k: {"graph": g, "spectral": s} for k, (g, s) in
                                PROCEDURES.items()},
                 "corpus": {}, "planted": {}}
    for name in corpus_names():
        e = load(name)
        n = e.labels.size
        assignment = FeatureAssignment(e.labels, np.zeros(n), np.zeros(n, dtype=np.int64), {},
                                       e.n_features)
        rec = out["corpus"][name] = {"rows": int(e.X.shape[0]), "alive": n}
        for proc, (g, s) in PROCEDURES.items():
            labels, sec = cluster(e.X, e.frac_active, g, s, 0)
            score = score_clustering(assignment, labels, e.layers, e.feature_layers, e.names)
            dense = score["dense"]
            rec[proc] = {
                "recovered": score["mechanisms_recovered"], "total": score["mechanisms_total"],
                "ari": round(score["ari"], 4),
                "purity": None if score["purity"] is None else round(score["purity"], 4),
                "dense_in_one": None if dense is None else
                f"{dense['n_dense_in_cluster']}/{dense['n_dense']} (cluster of {dense['size']})",
                "n_clusters": int(labels.max()) + 1, "seconds": round(sec, 3),
                "seed_min_ari": round(seed_stability(e.X, e.frac_active, g, s, args.seeds), 4),
            }
            print(name, proc, rec[proc], flush=True)
    for name, (spec, seed) in PLANTED_SETS.items():
        X, truth = hub_profiles(spec, seed=seed)
        frac = (X > 0.1).mean(axis=0)
        rec = out["planted"][name] = {"rows": int(X.shape[0]), "columns": int(X.shape[1])}
        for proc, (g, s) in PROCEDURES.items():
            labels, sec = cluster(X, frac, g, s, 0)
            rec[proc] = {"ari": round(adjusted_rand_score(truth, labels), 4),
                         "seconds": round(sec, 3),
                         "seed_min_ari": round(seed_stability(X, frac, g, s, args.seeds), 4)}
            print(name, proc, rec[proc], flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    print("->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
