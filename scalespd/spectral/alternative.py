"""The second clustering of "report both": the saved graph clustered again with the other
always-on setting, through the spectral stage's own public function (`cluster_alive`), so both
clusterings differ only in that one option."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from scalespd.config import RunConfig, SpectralConfig
from scalespd.report.inputs import RunArtifacts


def alternative_config(cfg: RunConfig) -> SpectralConfig:
    """cfg.spectral with always_on_fraction flipped: None -> report.always_on_fraction_alt,
    set -> None (the paper's setting)."""
    alt = cfg.report.always_on_fraction_alt if cfg.spectral.always_on_fraction is None else None
    return SpectralConfig.model_validate({**cfg.spectral.model_dump(),
                                          "always_on_fraction": alt})


def describe(scfg: SpectralConfig) -> str:
    if scfg.always_on_fraction is None:
        return "paper setting: no always-on group (always_on_fraction=None)"
    return (f"always-on grouped: active on > {scfg.always_on_fraction:g} of inputs -> own group "
            f"({scfg.always_on_grouping})")


def alternative_clustering(cfg: RunConfig, run_dir: Path, art: RunArtifacts) -> dict[str, Any]:
    """Cluster run_dir/graph with the alternative spectral config.

    Returns {"label", "always_on_fraction", "n_always_on", "clusters": (n,) in art.alive_ids
    order}."""
    from scalespd.backend import resolve_device  # noqa: PLC0415
    from scalespd.graph import GraphResult  # noqa: PLC0415
    from scalespd.spectral.clustering import cluster_alive  # noqa: PLC0415

    scfg = alternative_config(cfg)
    graph = GraphResult.load(Path(run_dir) / "graph")
    frac = art.components.loc[graph.columns, "frac_active"].to_numpy(np.float64)
    profiles = None
    if scfg.mode == "largest_component":
        from scalespd.profiles import open_profiles  # noqa: PLC0415

        profiles = open_profiles(Path(run_dir) / "profiles")
    # Use Ray only if the pipeline already started it (the spectral stage does); toys are
    # clustered in-process in well under a second.
    use_ray = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    res = cluster_alive(graph, scfg, frac_active=frac, profiles=profiles, use_ray=use_ray,
                        device=resolve_device(scfg.device))
    clusters = np.full(len(art.alive_ids), -1, dtype=np.int64)
    clusters[np.searchsorted(art.alive_ids, np.asarray(graph.columns))] = res.labels
    return {
        "label": f"alternative: {describe(scfg)}",
        "always_on_fraction": scfg.always_on_fraction,
        "n_always_on": int(res.info.get("n_always_on", 0)),
        "clusters": clusters,
    }
