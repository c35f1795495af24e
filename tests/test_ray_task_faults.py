"""A Ray worker killed in the middle of a graph or spectral task, or a harvest actor's process
killed in the middle of a block: Ray retries the work and the result equals an undisturbed
run's (issue 15)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from object_stores import files_under
from ray_faults import marker
from synthetic_graph import planted_profiles
from synthetic_spectral import planted_graph

from scalespd.config import GraphConfig, ProfilesConfig, SpectralConfig
from scalespd.graph.build import build_graph
from scalespd.profiles.harvest import harvest
from scalespd.profiles.sources import RandomRowSource
from scalespd.profiles.synthetic import SyntheticCIModel
from scalespd.spectral.tasks import cluster_graph_detailed

TESTS = Path(__file__).resolve().parent
GRAPH_TASK = "scalespd.graph.build:_ray_block_task"
SPECTRAL_TASK = "scalespd.spectral.tasks:solve_batch"
HARVEST_BLOCK = "scalespd.profiles.harvest:run_block"  # what a harvest actor runs per block
KILLED = (GRAPH_TASK, SPECTRAL_TASK, HARVEST_BLOCK)


@pytest.fixture(scope="module")
def killing_ray(tmp_path_factory):
    """A local Ray whose workers die in the first call of each task function above (one Ray for
    both tests: starting one costs seconds)."""
    import ray

    was_running = ray.is_initialized()  # the session's ray_local: its workers lack the hook
    if was_running:
        ray.shutdown()
    prefix = tmp_path_factory.mktemp("faults") / "killed"
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000,
             log_to_driver=False, runtime_env={
                 "env_vars": {"PYTHONPATH": path, "SCALESPD_KILL_MARKER": str(prefix),
                              "SCALESPD_KILL_TASKS": ",".join(KILLED)},
                 "worker_process_setup_hook": "ray_faults.setup"})
    yield prefix
    ray.shutdown()
    if was_running:
        from conftest import start_test_ray

        start_test_ray()


def test_killed_graph_task_is_retried_and_the_graph_is_unchanged(killing_ray) -> None:
    X, _ = planted_profiles(n_mechanisms=60, n_rows=900, seed=5)
    cfg = GraphConfig(k=6, tile_cols=64, row_chunk=300, correlation="dense")
    undisturbed = build_graph(X, cfg)
    got = build_graph(X, cfg, use_ray=True)
    assert marker(killing_ray, GRAPH_TASK).exists()  # a worker really died mid-task
    np.testing.assert_array_equal(got.topk_idx, undisturbed.topk_idx)
    np.testing.assert_array_equal(got.topk_val, undisturbed.topk_val)
    assert (got.graph != undisturbed.graph).nnz == 0
    np.testing.assert_array_equal(got.labels, undisturbed.labels)


def test_killed_spectral_task_is_retried_and_the_clusters_are_unchanged(killing_ray) -> None:
    rng = np.random.default_rng(4)
    comps = [list(rng.integers(5, 25, size=rng.integers(2, 6))) for _ in range(30)]
    W, _, comp = planted_graph(comps, bridges=2, weight_between=(0.05, 0.3), seed=4)
    cfg = SpectralConfig(min_task_seconds=1e-9)  # one task per piece: many tasks
    undisturbed = cluster_graph_detailed(W, comp, cfg, executor="local")
    got = cluster_graph_detailed(W, comp, cfg, executor="ray")
    assert got.executor == "ray" and got.n_tasks > 2
    assert marker(killing_ray, SPECTRAL_TASK).exists()
    np.testing.assert_array_equal(got.labels, undisturbed.labels)
    assert got.spectra == undisturbed.spectra


def test_killed_harvest_actor_is_restarted_and_the_profiles_are_unchanged(
        killing_ray, tmp_path: Path) -> None:
    model = SyntheticCIModel(6, [("enc", 7), ("mid.0", 5), ("dec", 4)], seed=0)
    source = RandomRowSource(300, 6, seed=3, p=0.5, save_inputs=True)  # 5 blocks of 64 rows
    cfg = ProfilesConfig(chunk_rows=32, block_rows=64, chunk_cols=6, batch_rows=24,
                         device="cpu", zero_below=0.05, max_concurrency=2)
    undisturbed = harvest(model, source, tmp_path / "local", cfg.model_copy(
        update={"executor": "local"}))
    got = harvest(model, source, tmp_path / "ray", cfg.model_copy(update={"executor": "ray"}))
    assert got.executor == "ray" and got.n_computed == undisturbed.n_computed == 5
    assert marker(killing_ray, HARVEST_BLOCK).exists()  # an actor's process really died
    # The matrix, the inputs and the table, byte for byte, and nothing half-written left over.
    for name in ("ci.zarr", "inputs.zarr"):
        assert files_under(tmp_path / "ray" / name) == files_under(tmp_path / "local" / name), name
    assert (tmp_path / "ray" / "components.csv").read_bytes() == \
        (tmp_path / "local" / "components.csv").read_bytes()
