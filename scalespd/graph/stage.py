"""The graph stage: run_dir/profiles (ci.zarr + components.csv) -> run_dir/graph/.

Only alive columns enter the graph (node i = the i-th alive component in global order). The
work runs as Ray tasks when the alive columns span more than one tile; a single tile runs in
this process. The output is written completely before summary.json, so an interrupted stage
leaves no summary; re-running it redoes the cheap passes and resumes the correlation pass from
its checkpoint (graph/pass2_checkpoint.npz, saved every minute). A complete output made with
the same graph config on the same profiles is reused.

run_dir may be a local path or an fsspec URL (`scalespd.storage`); Ray tasks open the profiles
by path or URL, so a run directory only this process sees (memory://) keeps the work here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from upath import UPath

from scalespd import storage
from scalespd.backend import resolve_device
from scalespd.config import RunConfig
from scalespd.errors import StageInputError
from scalespd.executor import choose_graph
from scalespd.graph.build import SUMMARY, GraphResult, build_graph

log = logging.getLogger(__name__)

GRAPH_DIR = "graph"
# Pass 2's merged lists, saved every minute while it runs; an interrupted stage resumes there.
CHECKPOINT = "pass2_checkpoint.npz"


def _manifest_info(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("n_columns", "n_zero_var", "threshold", "n_edges", "n_components", "n_isolated",
            "device", "ray")
    out = {k: summary[k] for k in keys}
    # "dense" | "sparse": how pass 2 ran (absent from outputs written before it existed).
    out["correlation"] = summary.get("correlation", {}).get("path")
    out["largest_components"] = summary["largest_components"][:5]
    out["seconds"] = summary["timings"]["total_s"]
    return out


def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    from scalespd.profiles import open_profiles, read_components  # noqa: PLC0415

    run_dir = storage.as_path(run_dir)
    profiles_dir = run_dir / "profiles"
    out = run_dir / GRAPH_DIR
    X = open_profiles(profiles_dir)
    table = read_components(profiles_dir)
    components_csv = storage.url(profiles_dir / "components.csv")
    if len(table) != X.shape[1]:
        raise StageInputError(
            f"{components_csv} has {len(table)} rows but the profiles array "
            f"has {X.shape[1]} columns; re-run the profiles stage"
        )
    columns = np.sort(table.loc[table["alive"], "component"].to_numpy(dtype=np.int64))
    if columns.size == 0:
        raise StageInputError(
            f"graph: no alive subcomponents in {components_csv} (all "
            f"{len(table)} have max CI <= profiles.tau = {cfg.profiles.tau}); lower "
            "profiles.tau or train the decomposition longer"
        )
    source = {"path": storage.url(profiles_dir), "shape": list(X.shape),
              "n_alive": int(columns.size)}

    if (out / SUMMARY).exists():
        old = json.loads((out / SUMMARY).read_text())
        if old.get("config") == cfg.graph.model_dump(mode="json") and old.get("source") == source:
            log.info("graph: reusing the complete output in %s", storage.url(out))
            return _manifest_info(old)

    device = resolve_device(cfg.graph.device)
    use_ray = choose_graph(cfg.ray.executor, columns.size, cfg.graph.tile_cols, cfg.ray,
                           data=run_dir) == "ray"
    if use_ray:
        from scalespd.raytools import ensure_ray  # noqa: PLC0415

        ensure_ray(cfg.ray)
    checkpoint = out / CHECKPOINT
    result: GraphResult = build_graph(X, cfg.graph, columns, device=device, use_ray=use_ray,
                                      checkpoint=checkpoint,
                                      gpus_per_task=cfg.ray.gpus_per_task)
    result.summary["source"] = source
    result.save(out)
    checkpoint.unlink(missing_ok=True)
    log.info("graph: %d nodes, %d edges, %d components (largest %s), threshold %.4f",
             columns.size, result.summary["n_edges"], result.summary["n_components"],
             result.summary["largest_components"][:3], result.threshold)
    return _manifest_info(result.summary)
