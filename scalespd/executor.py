"""Where a stage's work runs, in this process or as Ray tasks: the one policy every stage asks.

The setting is `ray.executor` (a stage may override it: `profiles.executor`,
`scalespd.cluster --executor`):

    local   in this process, never Ray
    ray     Ray tasks / actors (the local Ray this process starts, or the cluster at ray.address
            / $RAY_ADDRESS)
    auto    Ray when a cluster is configured (ray.address or $RAY_ADDRESS: the user asked for
            it) or when the stage's work is large enough to repay starting Ray workers; in
            either case only when there is more than one piece of work to share

Work on a run directory that only this process can see (memory://) always stays local: Ray
workers are other processes.

Ray itself is started (or joined, `scalespd.raytools.ensure_ray`) only once some stage has
chosen it, so a toy run
whose stages all stay local never starts Ray outside SPD training (which is Ray Train).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from scalespd.config import RayConfig
    from scalespd.storage import PathLike

log = logging.getLogger(__name__)

Executor = Literal["auto", "local", "ray"]
Where = Literal["local", "ray"]

# The work from which "auto" uses Ray on a single machine. Starting a local Ray costs ~6-8 s and
# every new worker process ~1 s on the 2-core development machine; below these sizes the work
# itself takes less than that.
AUTO_MIN_PROFILES_VALUES = 1 << 26  # CI values still to compute (a 2^26 float32 harvest ~ 10 s)
AUTO_MIN_GRAPH_TILES = 2  # column tiles (graph.tile_cols wide): one tile is one task anyway
AUTO_MIN_SPECTRAL_SECONDS = 2.0  # estimated eigensolver seconds over all connected pieces


def choose(stage: str, setting: Executor, *, work: float, minimum: float, pieces: int,
           ray_cfg: RayConfig | None = None, data: PathLike | None = None) -> Where:
    """"local" or "ray" for a stage with `pieces` independent pieces of work of total size
    `work` (in the stage's own unit; `minimum` of them make Ray worth starting) whose files lie
    at `data` (a run directory or a file in it)."""
    from scalespd.raytools import cluster_address  # noqa: PLC0415
    from scalespd.storage import shared_across_processes, url  # noqa: PLC0415

    if setting not in ("auto", "local", "ray"):
        raise ValueError(f"executor must be auto, local or ray, got {setting!r}")
    where: Where
    if data is not None and not shared_across_processes(data):
        if setting == "ray":
            log.warning("%s: running in this process: Ray workers cannot see %s", stage,
                        url(data))
        where, why = "local", "files only this process sees"
    elif setting != "auto":
        where, why = setting, "as configured"
    elif pieces < 2:
        where, why = "local", "one piece of work"
    elif cluster_address(ray_cfg)[0]:
        where, why = "ray", "a Ray cluster is configured"
    elif work >= minimum:
        where, why = "ray", f"{work:.3g} >= {minimum:.3g}"
    else:
        where, why = "local", f"{work:.3g} < {minimum:.3g}, below what Ray workers repay"
    log.debug("%s: executor %s (%s: %s)", stage, where, setting, why)
    return where


def choose_graph(setting: Executor, n_columns: int, tile_cols: int,
                 ray_cfg: RayConfig | None = None, data: PathLike | None = None) -> Where:
    """The graph stage's choice: its pieces are the column tiles (graph.tile_cols wide)."""
    tiles = -(-n_columns // tile_cols)
    return choose("graph", setting, work=tiles, minimum=AUTO_MIN_GRAPH_TILES, pieces=tiles,
                  ray_cfg=ray_cfg, data=data)
