"""Connecting to Ray: the cluster of a `ray job submit`, an explicit address, or a local Ray.

Stage code never calls `ray.init` itself; the CLI calls `ensure_ray` once, and stage functions
that schedule Ray tasks call it too so that they also work when used as a library.
"""

from __future__ import annotations

import logging
import os

from scalespd.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process.

    Inside a Ray job (or with $RAY_ADDRESS set) this connects to that cluster; otherwise it
    starts Ray in-process on this node with the configured resources."""
    import ray  # noqa: PLC0415  (keep `import scalespd` light)

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Quiet the per-worker log forwarding of library warnings; stage logs go through logging.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray (num_cpus=%s)", cfg.num_cpus)
        # address="local": never join a cluster some earlier `ray start` left registered on
        # this machine (it would also reject num_cpus).
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
        )


def cluster_cpus() -> int:
    """CPUs Ray can schedule on (at least 1)."""
    import ray  # noqa: PLC0415

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray  # noqa: PLC0415

    return int(ray.cluster_resources().get("GPU", 0))
