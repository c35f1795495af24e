"""What the containment test (spectral.edge_mass_ratio, README "Clustering default" step 3) adds
to the spectral stage, on the graphs of bench/spectral_bench.py, against the per-component
clustering of the same graph timed in the same run.

The test drops edges whose endpoints' E[x^2] differ by more than the ratio and recomputes the
connected components; node masses are drawn so that ~10% of the edges are dropped.

    python bench/containment_cost.py [--out bench/results/containment_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from spectral_bench import CASES, build_case

from scalespd.config import SpectralConfig
from scalespd.graph.build import components
from scalespd.spectral.clustering import drop_containment_edges
from scalespd.spectral.tasks import cluster_graph_detailed

OUT = Path(__file__).resolve().parent / "results" / "containment_cost.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    cfg = SpectralConfig()
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "load_avg_at_start": list(os.getloadavg())},
                 "ratio": cfg.edge_mass_ratio, "cases": {}}
    for name, params in CASES.items():
        W, _, _ = build_case(**params)
        rng = np.random.default_rng(0)
        n = W.shape[0]
        mean, std = rng.uniform(0.01, 0.2, n), rng.uniform(0.05, 0.3, n)
        t = time.perf_counter()
        W2, dropped = drop_containment_edges(W, mean, std, cfg.edge_mass_ratio)
        components(W2)
        t_test = time.perf_counter() - t
        t = time.perf_counter()
        cluster_graph_detailed(W, None, cfg, executor="local")
        t_cluster = time.perf_counter() - t
        out["cases"][name] = {"n_nodes": n, "nnz": int(W.nnz), "edges_dropped": dropped,
                              "containment_s": round(t_test, 4),
                              "clustering_s": round(t_cluster, 4),
                              "ratio_with_test": round((t_cluster + t_test) / t_cluster, 4)}
        print(name, out["cases"][name])
    args.out.write_text(json.dumps(out, indent=1))
    print("->", args.out)


if __name__ == "__main__":
    main()
