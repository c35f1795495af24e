"""The graph stage on run directories at fsspec URLs (memory://, s3:// on a local moto server):
the same output files, byte for byte, as on a local run directory; a memory:// run keeps its
work in this process even when Ray is asked for; the pass-2 checkpoint and the Ray tasks'
source descriptors work at a URL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from upath import UPath

from scalespd import storage
from scalespd.config import GraphConfig, RayConfig, RunConfig
from scalespd.executor import Executor
from scalespd.graph import GraphResult
from scalespd.graph import stage as graph_stage
from scalespd.graph.build import _Checkpoint, _ray_block_task
from scalespd.graph.source import NpyFile, SourceSpec, describe
from scalespd.graph.topk import TileSource, row_block_topk
from scalespd.profiles.reader import CI_FILE, COMPONENTS_FILE, SUMMARY_FILE
from scalespd.profiles.store import ATTR_KEY

GRAPH_FILES = ["graph.npz", "labels.npy", "stats.npz", "topk.npz"]
TAU = 0.1


def _dense_profiles(run_dir: Path, seed: int = 0) -> np.ndarray:
    """A dense-layout profiles/ folder (ci.zarr, components.csv, harvest.json) of a small
    planted matrix, as the profiles stage leaves it."""
    import pandas as pd
    from synthetic_spectral import planted_profiles

    rng = np.random.default_rng(seed)
    X, _ = planted_profiles(rng.integers(1, 8, size=16), 400, n_dead=6, n_constant=1, seed=seed)
    N = X.shape[1]
    pdir = run_dir / "profiles"
    pdir.mkdir(parents=True)
    arr = zarr.create_array(str(pdir / CI_FILE), shape=X.shape, chunks=(200, 32), dtype="float32")
    arr[:] = X
    arr.attrs[ATTR_KEY] = {"modules": [{"module": "a", "C": N}]}
    pd.DataFrame({
        "component": np.arange(N), "name": [f"a:{i}" for i in range(N)], "layer": 0,
        "module": "a", "module_type": "mlp_in", "max": X.max(0), "mean": X.mean(0),
        "std": X.std(0), "frac_active": (X > TAU).mean(0), "alive": X.max(0) > TAU,
    }).to_csv(pdir / COMPONENTS_FILE, index=False)
    (pdir / SUMMARY_FILE).write_text("{}")
    return X


def _cfg(executor: Executor = "local") -> RunConfig:
    """Several column tiles (the Ray path would run under "auto"); in this process."""
    return RunConfig(graph=GraphConfig(k=4, tile_cols=16, row_chunk=128, device="cpu",
                                       null_model="bennett"),
                     ray=RayConfig(executor=executor))


def _same_graph_output(local: Path, remote: UPath) -> None:
    """Every array file equal byte for byte; summary.json equal apart from timings, the
    profiles' location and how the work ran (in this process or as Ray tasks)."""
    for name in GRAPH_FILES:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    a = json.loads((local / "summary.json").read_text())
    b = json.loads((remote / "summary.json").read_text())
    for s in (a, b):
        s.pop("timings")
        s["source"].pop("path")
        for key in ("ray", "ray_worker_peak_rss_mb", "ray_source"):
            s.pop(key, None)
    assert a == b
    assert not (remote / graph_stage.CHECKPOINT).exists()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """A local run directory with dense profiles and the graph stage's output."""
    run = tmp_path_factory.mktemp("graph-local")
    _dense_profiles(run)
    graph_stage.run(_cfg(), run)
    return run


@pytest.mark.parametrize("where", ["memory_dir", "s3_dir"])
def test_graph_stage_on_a_url_writes_the_local_bytes(where, local_run, request) -> None:
    remote: UPath = request.getfixturevalue(where)
    storage.upload_dir(local_run / "profiles", remote / "profiles")
    info = graph_stage.run(_cfg(), remote)
    _same_graph_output(local_run / "graph", remote / "graph")
    res = GraphResult.load(remote / "graph")
    assert res.summary["source"]["path"] == storage.url(remote / "profiles")
    assert info["n_edges"] == res.summary["n_edges"] > 0
    # A complete output made with the same config is reused, not rewritten.
    before = (remote / "graph" / "summary.json").read_bytes()
    assert graph_stage.run(_cfg(), remote) == info
    assert (remote / "graph" / "summary.json").read_bytes() == before


def test_graph_stage_on_memory_runs_here_even_with_ray(local_run, memory_dir,
                                                       monkeypatch) -> None:
    """Ray workers cannot see a memory:// run directory: the stage keeps the work in this
    process (Ray is never started) and the output equals the local one."""
    import scalespd.raytools

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not be started for a memory:// run directory")

    monkeypatch.setattr(scalespd.raytools, "ensure_ray", no_ray)
    storage.upload_dir(local_run / "profiles", memory_dir / "profiles")
    graph_stage.run(_cfg("ray"), memory_dir)
    res = GraphResult.load(memory_dir / "graph")
    assert res.summary["ray"] is False
    for name in GRAPH_FILES:
        assert (memory_dir / "graph" / name).read_bytes() == \
            (local_run / "graph" / name).read_bytes()


def test_graph_stage_as_ray_tasks_on_s3(local_run, s3_dir, ray_local) -> None:
    """Real Ray tasks (other processes) open the profiles on s3:// by URL themselves, as on a
    cluster whose only shared storage is a bucket; the output equals the local run's."""
    storage.upload_dir(local_run / "profiles", s3_dir / "profiles")
    graph_stage.run(_cfg("ray"), s3_dir)
    res = GraphResult.load(s3_dir / "graph")
    assert res.summary["ray"] is True
    assert res.summary["ray_source"]["path"] == storage.url(s3_dir / "profiles" / CI_FILE)
    assert not res.summary["ray_source"]["converted"]  # read in place, not copied
    _same_graph_output(local_run / "graph", s3_dir / "graph")


def test_missing_graph_output_named_by_url(memory_dir) -> None:
    with pytest.raises(FileNotFoundError, match=r"memory://.*graph.*summary\.json"):
        GraphResult.load(memory_dir / "graph")


def test_pass2_checkpoint_at_a_url_saves_and_resumes(memory_dir) -> None:
    path = memory_dir / "graph" / "pass2_checkpoint.npz"
    ck = _Checkpoint(path, "key", n=5, k=3, n_blocks=4, every_s=0.0)
    ck.vals[:] = np.arange(15, dtype=np.float32).reshape(5, 3)
    ck.block_done(2)  # every_s 0: saved now
    again = _Checkpoint(path, "key", n=5, k=3, n_blocks=4, every_s=60.0)
    np.testing.assert_array_equal(again.vals, ck.vals)
    assert again.done.tolist() == [False, False, True, False]
    other = _Checkpoint(path, "another input", n=5, k=3, n_blocks=4, every_s=60.0)
    assert not other.done.any()  # a checkpoint of other inputs is ignored


def test_ray_task_reads_a_zarr_at_an_s3_url(local_run, s3_dir) -> None:
    """What a Ray worker does with the descriptor of s3 profiles (run here): opens the zarr at
    its URL and computes the same row block as from the local array."""
    from scalespd.profiles import open_profiles

    storage.upload_dir(local_run / "profiles", s3_dir / "profiles")
    X = open_profiles(s3_dir / "profiles")
    spec = describe(X)
    assert spec is not None and spec.kind == "zarr"
    assert spec.path == storage.url(s3_dir / "profiles" / CI_FILE)
    local = np.asarray(open_profiles(local_run / "profiles")[:])
    np.testing.assert_array_equal(np.asarray(spec.open()[:]), local)

    cols = np.arange(local.shape[1], dtype=np.int64)[local.std(0) > 0]
    mean = local[:, cols].mean(0).astype(np.float32)
    scale = (1 / (local[:, cols].std(0) * np.sqrt(local.shape[0]))).astype(np.float32)
    a, v, i, _ = _ray_block_task(spec, cols, mean, scale, (local.shape[0], 16, 128), 0, 3, 0.1,
                                 "cpu")
    src = TileSource(local, cols, mean, scale, local.shape[0], 16, 128)
    v0, i0 = row_block_topk(src, 0, 3, 0.1, np)
    assert a == 0
    np.testing.assert_array_equal(v, v0)
    np.testing.assert_array_equal(i, i0)


def test_memory_zarr_is_not_described_for_other_processes(local_run, memory_dir) -> None:
    from scalespd.profiles import open_profiles

    storage.upload_dir(local_run / "profiles", memory_dir / "profiles")
    assert describe(open_profiles(memory_dir / "profiles")) is None


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("where", ["memory_dir", "s3_dir"])
def test_npy_at_a_url_reads_like_the_local_file(where, order, tmp_path, request) -> None:
    """Reads fetch byte ranges: of whole rows (C order) or of the columns read (F order)."""
    remote: UPath = request.getfixturevalue(where)
    X = np.asarray(np.arange(7 * 5, dtype=np.float32).reshape(7, 5), order=order)
    np.save(tmp_path / "X.npy", X)
    (remote / "X.npy").write_bytes((tmp_path / "X.npy").read_bytes())
    f = NpyFile.open(remote / "X.npy")
    assert f.shape == (7, 5) and f.dtype == np.float32 and f.path == storage.url(remote / "X.npy")
    cols = np.array([4, 0, 2])
    np.testing.assert_array_equal(f[2:6], X[2:6])
    np.testing.assert_array_equal(f[1:4, 3], X[1:4, 3])
    np.testing.assert_array_equal(f[3], X[3])
    np.testing.assert_array_equal(f[np.array([5, 1])], X[[5, 1]])
    np.testing.assert_array_equal(f[np.array([5, 1]), np.array([0, 3])], X[[5, 1], [0, 3]])
    np.testing.assert_array_equal(f[:, 1:4], X[:, 1:4])
    np.testing.assert_array_equal(f.get_orthogonal_selection((slice(2, 7), cols)), X[2:7][:, cols])
    spec = describe(f)
    if where == "memory_dir":
        assert spec is None  # other processes cannot open it
    else:
        assert spec == SourceSpec("npy", f.path, (7, 5), f.dtype.str, f.offset, order == "F")
        np.testing.assert_array_equal(spec.open()[0:7], X)


def test_graph_stage_on_sparse_profiles_at_a_url(tmp_path, memory_dir) -> None:
    """The sparse layout of ci.zarr (a harvest's default) read from a URL gives the local
    graph, byte for byte."""
    from test_graph_build import _harvest_profiles

    from scalespd.profiles.sparse_store import is_sparse_store

    _harvest_profiles(tmp_path)
    assert is_sparse_store(tmp_path / "profiles" / CI_FILE)
    graph_stage.run(_cfg(), tmp_path)
    storage.upload_dir(tmp_path / "profiles", memory_dir / "profiles")
    graph_stage.run(_cfg(), memory_dir)
    _same_graph_output(tmp_path / "graph", memory_dir / "graph")


@pytest.mark.parametrize("where", ["memory_dir", "s3_dir"])
def test_ray_source_scratch_at_a_url(where, request) -> None:
    """An in-memory matrix converted for Ray tasks: into the scratch folder at an s3:// URL
    (removed afterwards); a memory:// scratch, which workers cannot see, falls back to a local
    temporary folder."""
    from scalespd.graph.source import ray_source

    remote: UPath = request.getfixturevalue(where)
    X = np.arange(30, dtype=np.float32).reshape(6, 5)
    with ray_source(X, scratch_dir=remote / "scratch") as spec:
        assert spec.kind == "zarr"
        assert storage.is_local(spec.path) == (where == "memory_dir")
        np.testing.assert_array_equal(np.asarray(spec.open()[:]), X)
        path = spec.path
    assert not storage.as_path(path).exists()
    scratch = remote / "scratch"
    assert not scratch.exists() or not list(scratch.iterdir())
