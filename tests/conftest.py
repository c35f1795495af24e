"""Shared fixtures. One in-process Ray per test session: starting Ray costs ~6 s."""

from __future__ import annotations

import os

import pytest

# Two cores: keep torch from oversubscribing them when Ray workers also run.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with the machine's 2 CPUs, shared by every test that schedules Ray work."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500_000_000,
                 log_to_driver=False)
    yield ray
    ray.shutdown()
