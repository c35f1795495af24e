"""Pipeline stage `spectral`: run_dir/graph + run_dir/profiles → run_dir/spectral.

Writes `spectral/clusters.csv` (DESIGN §4 "Clusters") and `spectral/spectra.json` (per solved
piece: key = smallest global column id, size, depth, eigenvalues, chosen K, solver; plus the
clustering info), and `spectral/clusters_alternative.csv` when the "report both" clustering with
the other always-on setting can differ (see `scalespd.spectral.alternative`), and
`spectral/quality.json`: the clustering's quality without ground truth (coherence, separation,
stability under row resampling and under other seeds; `scalespd.spectral.quality`). spectra.json
is written last, each file atomically, so its presence marks a complete output; a re-run simply
recomputes them (the stage takes seconds). run_dir may be a local path or an fsspec URL
(`scalespd.storage`); the Ray tasks of this stage receive subgraphs, never paths.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from upath import UPath

from scalespd import storage
from scalespd.backend import resolve_device
from scalespd.config import RunConfig
from scalespd.errors import StageInputError
from scalespd.graph import GraphResult
from scalespd.jsonio import write_json_atomic
from scalespd.spectral.alternative import alternative_config, describe, needs_alternative
from scalespd.spectral.clustering import (
    AliveClustering,
    cluster_alive,
    cluster_summary,
    clusters_table,
)
from scalespd.spectral.quality import QUALITY_FILE, cluster_quality, headline

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.csv"
SPECTRA_FILE = "spectra.json"
# The "report both" clustering (see scalespd.spectral.alternative), same columns as clusters.csv.
ALTERNATIVE_FILE = "clusters_alternative.csv"


def check_graph_matches(graph: GraphResult, meta: pd.DataFrame, source: str) -> None:
    """The graph's nodes must be exactly the alive rows of the component table."""
    alive = np.sort(meta.loc[meta["alive"].astype(bool), "component"].to_numpy(np.int64))
    if not np.array_equal(np.sort(graph.columns), alive):
        raise StageInputError(
            f"{source}: the graph's {graph.columns.size} nodes are not the {alive.size} alive "
            "components of profiles/components.csv (re-run the graph stage)"
        )


def _write_csv_atomic(table: pd.DataFrame, path: UPath) -> None:
    with storage.atomic_writer(path, "w") as f:
        table.to_csv(f, index=False)


def write_outputs(
    out_dir: storage.PathLike, table: pd.DataFrame, result: AliveClustering,
    extra: dict[str, Any],
) -> None:
    """clusters.csv then spectra.json, each all or nothing (`scalespd.storage.atomic_writer`).
    out_dir: a local path or a URL."""
    out_dir = storage.as_path(out_dir)
    storage.makedirs(out_dir)
    (out_dir / SPECTRA_FILE).unlink(missing_ok=True)
    _write_csv_atomic(table, out_dir / CLUSTERS_FILE)
    doc = {"info": result.info, **extra, "pieces": result.spectra}
    write_json_atomic(out_dir / SPECTRA_FILE, doc, indent=1)


def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    from scalespd.profiles import open_profiles, read_components  # noqa: PLC0415

    run_dir = storage.as_path(run_dir)
    scfg = cfg.spectral
    graph = GraphResult.load(run_dir / "graph")
    meta = read_components(run_dir / "profiles")
    check_graph_matches(graph, meta, storage.url(run_dir / "graph"))
    by_id = meta.set_index("component")
    frac = by_id.loc[graph.columns, "frac_active"].to_numpy(np.float64)
    X = open_profiles(run_dir / "profiles")
    profiles = X if scfg.mode == "largest_component" else None

    device = resolve_device(scfg.device)
    # Ray only if the policy picks it for the pieces there are (a toy graph stays in-process).
    result = cluster_alive(graph, scfg, frac_active=frac, profiles=profiles, device=device,
                           executor=cfg.ray.executor, ray_cfg=cfg.ray)
    table = clusters_table(meta, graph.columns, graph.labels, result.labels)
    summary = cluster_summary(table)
    extra: dict[str, Any] = {"k_max": scfg.k_max, "seed": scfg.seed, "device": device,
                             "n_clusters": summary["n_clusters"], "label": describe(scfg)}
    out_dir = run_dir / "spectral"
    (out_dir / ALTERNATIVE_FILE).unlink(missing_ok=True)
    alt_cfg = alternative_config(scfg)
    if alt_cfg is not None and needs_alternative(scfg, frac):
        # "Report both": the same graph with the other always-on setting.
        alt = cluster_alive(graph, alt_cfg, frac_active=frac, profiles=profiles, device=device,
                            executor=cfg.ray.executor, ray_cfg=cfg.ray)
        alt_table = clusters_table(meta, graph.columns, graph.labels, alt.labels)
        storage.makedirs(out_dir)
        _write_csv_atomic(alt_table, out_dir / ALTERNATIVE_FILE)
        extra["alternative"] = {"label": describe(alt_cfg),
                                "always_on_fraction": alt_cfg.always_on_fraction,
                                "n_always_on": alt.info["n_always_on"],
                                "n_clusters": cluster_summary(alt_table)["n_clusters"]}
    # Quality without ground truth, written before spectra.json (which marks completion).
    (out_dir / SPECTRA_FILE).unlink(missing_ok=True)
    (out_dir / QUALITY_FILE).unlink(missing_ok=True)
    quality = cluster_quality(X, graph, result.labels, cfg.graph, scfg, frac_active=frac,
                              graph_device=resolve_device(cfg.graph.device), device=device,
                              executor=cfg.ray.executor, ray_cfg=cfg.ray)
    storage.makedirs(out_dir)
    write_json_atomic(out_dir / QUALITY_FILE, quality, indent=1)
    log.info("spectral quality: %s (%.1f s)", headline(quality),
             quality["timings"]["total_s"])
    write_outputs(out_dir, table, result, extra)
    log.info("spectral: %d clusters (%d singletons) from %d alive nodes in %.1f s",
             summary["n_clusters"], summary["n_singletons"], graph.columns.size,
             result.info["seconds"])
    sizes = summary.pop("cluster_sizes")
    return {**summary, "largest_clusters": sizes[:10], "n_always_on": result.info["n_always_on"],
            "n_pieces": result.info["n_pieces"], "n_tasks": result.info["n_tasks"],
            "seconds": round(result.info["seconds"], 3),
            "resample_ari": (quality["resample"] or {}).get("ari_mean"),
            "seed_ari": (quality["seeds"] or {}).get("ari_mean")}
