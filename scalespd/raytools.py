"""Connecting to Ray: the cluster of a `ray job submit`, an explicit address, or a local Ray.

Stage code never calls `ray.init` itself; the CLI calls `ensure_ray` once, and stage functions
that schedule Ray tasks call it too so that they also work when used as a library.
"""

from __future__ import annotations

import logging
import os
import socket

from scalespd.config import RayConfig
from scalespd.errors import ConfigError

log = logging.getLogger(__name__)


# Seconds to wait for a Ray head's port to answer before calling its address unreachable.
_CONNECT_TIMEOUT_S = 5.0


def cluster_address(cfg: RayConfig | None = None) -> tuple[str | None, str]:
    """(the Ray address to connect to or None for a local Ray, where it came from)."""
    cfg = cfg or RayConfig()
    if cfg.address:
        return cfg.address, "ray.address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "$RAY_ADDRESS") if env else (None, "")


def check_reachable(cfg: RayConfig | None = None) -> None:
    """Fail fast, naming the setting, when a `host:port` Ray address does not answer (Ray
    itself waits ~25 s and then raises a ConnectionError that names no setting). "auto" and
    `ray://` client addresses are left to Ray."""
    address, source = cluster_address(cfg)
    if address is None or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{source} {address!r}: expected host:port (e.g. 10.0.0.1:6379), "
                          "'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"{source} {address!r}: no Ray head answers there ({err}); start "
                          "the cluster, fix the address, or unset it to run locally") from None


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process.

    Inside a Ray job (or with $RAY_ADDRESS set) this connects to that cluster; otherwise it
    starts Ray in-process on this node with the configured resources."""
    import ray  # noqa: PLC0415  (keep `import scalespd` light)

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address, _ = cluster_address(cfg)
    # Quiet the per-worker log forwarding of library warnings; stage logs go through logging.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        log.info("connecting to Ray at %s", address)
        check_reachable(cfg)
        ctx = ray.init(address=address, log_to_driver=True)
        url = getattr(ctx, "dashboard_url", None)
        if url:
            log.info("Ray dashboard: http://%s", url.removeprefix("http://"))
    else:
        log.info("starting a local Ray (num_cpus=%s)", cfg.num_cpus)
        if not log.isEnabledFor(logging.DEBUG):
            # A Ray we start on this node for this process: its token-authentication notice
            # ("Set RAY_AUTH_MODE=disabled to opt out") is no news to the user; shown with -v.
            logging.getLogger(_AUTH_NOTICE).setLevel(logging.ERROR)
        # address="local": never join a cluster some earlier `ray start` left registered on
        # this machine (it would also reject num_cpus).
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={
                "worker_process_setup_hook": "scalespd.raytools.quiet_local_workers",
                "env_vars": {TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV,
                                                             LOCAL_TRAIN_POLL_S)},
            },
        )


_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"

# How often Ray Train's controller polls its workers on a local Ray (Ray's default: 2 s). Each
# fit waits for a few polls to start the worker group and one to see it finish; on one machine
# a poll costs nothing, and 0.2 s makes a short decomposition ~6 s faster (the default run:
# 22 s -> 16 s for its decompose stage). On a cluster Ray's own setting stays.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.2"

# Without a dashboard (a local Ray) the State API is off, and Ray Train's placement-group
# cleaner logs a warning about it every few seconds of training (47 lines in the default run).
_NOISY_WITHOUT_DASHBOARD = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_workers() -> None:
    """Setup hook of every worker process of a local Ray: silence the warnings that only say
    the (deliberately absent) dashboard's State API is unavailable.

    That cleaner finds its cluster by auto-detection (no address), which raises "Found multiple
    active Ray instances" and prints a traceback when another Ray runs on this machine (two runs
    at once, or a `ray start` head); pointing RAY_ADDRESS at this worker's own cluster makes it
    take the quiet path above."""
    import ray  # noqa: PLC0415

    logging.getLogger(_NOISY_WITHOUT_DASHBOARD).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def cluster_cpus() -> int:
    """CPUs Ray can schedule on (at least 1)."""
    import ray  # noqa: PLC0415

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray  # noqa: PLC0415

    return int(ray.cluster_resources().get("GPU", 0))
