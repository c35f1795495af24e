"""build_graph end to end: constant columns, bad input, zarr input, save/load, the Ray path,
the GPU path (skipped without a GPU; the CPU path of the same function is tested here), and the
stage on a real profiles directory."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr
from graph_reference import assert_topk_matches, brute_corr
from pydantic import ValidationError
from synthetic_graph import block_profiles, planted_profiles

from scalespd.backend import cupy_gpu_available
from scalespd.config import GraphConfig
from scalespd.graph import GraphResult, build_graph
from scalespd.graph.stats import column_stats


def _assert_same_result(a: GraphResult, b: GraphResult, atol: float = 1e-6) -> None:
    np.testing.assert_array_equal(a.topk_idx, b.topk_idx)
    np.testing.assert_allclose(a.topk_val, b.topk_val, atol=atol, rtol=0)
    assert (a.graph != b.graph).nnz == 0 or np.allclose(a.graph.toarray(), b.graph.toarray(),
                                                        atol=atol)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.threshold == pytest.approx(b.threshold, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Column statistics
# --------------------------------------------------------------------------------------------


def test_column_stats_stable_with_large_offset() -> None:
    """Chan merges over row chunks match a two-pass float64 computation even when |mean| is
    10^4 × std (where the naive sum-of-squares formula loses every digit)."""
    rng = np.random.default_rng(0)
    X = (1000.0 + 0.1 * rng.standard_normal((1001, 37))).astype(np.float32)
    st = column_stats(X, np.arange(37), tile_cols=10, row_chunk=97)
    ref = X.astype(np.float64)
    np.testing.assert_allclose(st.mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.std, ref.std(0), rtol=1e-9)
    np.testing.assert_array_equal(st.min, ref.min(0))
    np.testing.assert_array_equal(st.max, ref.max(0))
    assert not st.zero_var.any()


# --------------------------------------------------------------------------------------------
# Constant columns
# --------------------------------------------------------------------------------------------


def test_zero_variance_columns_isolated_counted_no_nan() -> None:
    X, _ = block_profiles(n_rows=500, n_cols=120, n_blocks=8, signal=1.0, seed=3)
    const = np.array([0, 17, 64, 65, 119])
    X[:, 0] = 0.0  # all zero
    X[:, 17] = 0.7  # constant, not exactly representable
    X[:, 64] = 1.0
    X[:, 65] = -3.25
    X[:, 119] = 1e-30
    res = build_graph(X, GraphConfig(k=6, edge_threshold=0.0, tile_cols=32, row_chunk=128))
    np.testing.assert_array_equal(np.flatnonzero(res.zero_var), const)
    assert res.summary["n_zero_var"] == const.size
    assert res.summary["zero_var_columns"] == const.tolist()
    for arr in (res.topk_val, res.graph.data, res.mean, res.std):
        assert np.all(np.isfinite(arr))
    assert np.all(res.topk_idx[const] == -1)
    assert not np.isin(res.topk_idx, const).any()
    deg = np.diff(res.graph.indptr)
    assert np.all(deg[const] == 0)
    # Each constant column is its own component.
    assert len(set(res.labels[const].tolist())) == const.size
    assert all(np.sum(res.labels == res.labels[c]) == 1 for c in const)
    # The others match brute force on the non-constant columns.
    keep = np.setdiff1d(np.arange(120), const)
    sub = build_graph(X[:, keep], GraphConfig(k=6, edge_threshold=0.0, tile_cols=32,
                                              row_chunk=128))
    np.testing.assert_array_equal(keep[sub.topk_idx[sub.topk_idx >= 0]],
                                  res.topk_idx[keep][sub.topk_idx >= 0])
    assert_topk_matches(brute_corr(X[:, keep]), 6, 0.0, sub.topk_idx, sub.topk_val)


def test_all_columns_constant_gives_an_empty_graph() -> None:
    X = np.ones((50, 8), dtype=np.float32) * np.arange(8, dtype=np.float32)
    res = build_graph(X, GraphConfig(k=3))
    assert res.summary["n_zero_var"] == 8 and res.graph.nnz == 0
    assert res.summary["n_components"] == 8


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_profiles_is_an_error_naming_the_column(bad: float) -> None:
    X = np.random.default_rng(0).standard_normal((300, 40)).astype(np.float32)
    X[123, 29] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*\[29\]"):
        build_graph(X, GraphConfig(k=3, tile_cols=16, row_chunk=100))
    # A bad value in a column that is not selected is never read.
    res = build_graph(X, GraphConfig(k=3, edge_threshold=0.0), columns=np.arange(29))
    assert res.topk_idx.shape == (29, 3)


def test_bad_shapes_and_selections() -> None:
    X = np.random.default_rng(0).standard_normal((50, 10)).astype(np.float32)
    cfg = GraphConfig(k=3)
    with pytest.raises(ValueError, match="no alive columns"):
        build_graph(X, cfg, columns=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        build_graph(X[:, 0], cfg)
    with pytest.raises(ValueError, match="at least 2 rows"):
        build_graph(X[:1], cfg)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        build_graph(X, cfg, columns=np.array([0, 10]))
    with pytest.raises(ValueError, match="repeat"):
        build_graph(X, cfg, columns=np.array([1, 1]))
    with pytest.raises(ValueError, match="numeric"):
        build_graph(X.astype(str), cfg)
    for k in (0, -1):
        with pytest.raises(ValidationError, match="k"):
            GraphConfig(k=k)


def test_k_not_smaller_than_alive_count_keeps_all_candidates(caplog) -> None:
    """Documented outcome: a log line (not a warning: the toys meet it routinely), and every
    node keeps all candidates above the threshold (with k ≥ n the mutual or union k-NN graph is
    the thresholded correlation graph)."""
    X, _ = block_profiles(n_rows=400, n_cols=6, n_blocks=2, signal=1.0, seed=1)
    with caplog.at_level("INFO", logger="scalespd.graph.build"):
        res = build_graph(X, GraphConfig(k=10, edge_threshold=0.0, neighbours="mutual"))
    assert "is not smaller than the 6 non-constant columns" in caplog.text
    C = brute_corr(X)
    assert res.topk_idx.shape == (6, 10)
    assert_topk_matches(C, 10, 0.0, res.topk_idx, res.topk_val)
    dense = np.where(C > 0, C, 0)
    np.fill_diagonal(dense, 0)
    np.testing.assert_allclose(res.graph.toarray(), dense, atol=1e-5)
    # A single column: no neighbours, one component.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = build_graph(X[:, :1], GraphConfig(k=3))
    assert one.graph.nnz == 0 and one.summary["n_components"] == 1


# --------------------------------------------------------------------------------------------
# zarr input, float16, save / load
# --------------------------------------------------------------------------------------------


def test_zarr_input_equals_numpy_input(tmp_path) -> None:
    X, _ = planted_profiles(n_mechanisms=40, n_rows=900, seed=2)
    Z = zarr.create_array(tmp_path / "ci.zarr", shape=X.shape, chunks=(256, 50), dtype="float32")
    Z[:] = X
    cols = np.arange(3, X.shape[1], 2)
    cfg = GraphConfig(k=5, tile_cols=40, row_chunk=300)
    _assert_same_result(build_graph(Z, cfg, columns=cols), build_graph(X, cfg, columns=cols),
                        atol=0)


def test_float16_profiles() -> None:
    X, _ = block_profiles(n_rows=300, n_cols=50, n_blocks=5, seed=0)
    X16 = X.astype(np.float16)
    res = build_graph(X16, GraphConfig(k=4, edge_threshold=0.0, tile_cols=16))
    assert_topk_matches(brute_corr(X16.astype(np.float32)), 4, 0.0, res.topk_idx, res.topk_val)


def test_save_load_roundtrip(tmp_path) -> None:
    X, _ = planted_profiles(n_mechanisms=30, n_rows=600, seed=1)
    X[:, 5] = 0.0
    res = build_graph(X, GraphConfig(k=4, tile_cols=32))
    res.save(tmp_path / "graph")
    names = sorted(p.name for p in (tmp_path / "graph").iterdir())
    assert names == ["graph.npz", "labels.npy", "stats.npz", "summary.json", "topk.npz"]
    back = GraphResult.load(tmp_path / "graph")
    _assert_same_result(back, res, atol=0)
    for f in ("columns", "mean", "std", "min", "max", "zero_var"):
        np.testing.assert_array_equal(getattr(back, f), getattr(res, f))
    summary = json.loads((tmp_path / "graph" / "summary.json").read_text())
    assert summary["threshold"] == res.threshold
    assert summary["threshold_info"]["method"] == "auto"
    assert summary["n_zero_var"] == 1
    assert summary["n_edges"] == res.graph.nnz // 2
    assert sum(k * v for k, v in map(lambda kv: (int(kv[0]), kv[1]),
                                     summary["component_size_counts"].items())) == X.shape[1]
    (tmp_path / "graph" / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="summary.json"):
        GraphResult.load(tmp_path / "graph")


# --------------------------------------------------------------------------------------------
# Ray tasks = in-process; GPU = CPU
# --------------------------------------------------------------------------------------------


def test_ray_tasks_equal_in_process(ray_local, tmp_path) -> None:
    X, _ = planted_profiles(n_mechanisms=80, n_rows=1100, seed=3)
    Z = zarr.create_array(tmp_path / "ci.zarr", shape=X.shape, chunks=(512, 64), dtype="float32")
    Z[:] = X
    cfg = GraphConfig(k=6, tile_cols=64, row_chunk=400)
    local = build_graph(X, cfg)
    assert len(range(0, X.shape[1], 64)) >= 5
    _assert_same_result(build_graph(X, cfg, use_ray=True), local)
    _assert_same_result(build_graph(Z, cfg, use_ray=True), local)
    # Errors inside tasks reach the caller as the same ValueError.
    X[5, 77] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf.*\[77\]"):
        build_graph(X, cfg, use_ray=True)


def test_ray_path_requires_ray_initialised(monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ensure_ray"):
        build_graph(np.ones((5, 3), np.float32), GraphConfig(k=1), use_ray=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_gpu_available(), reason="no CUDA GPU visible to CuPy"),
])])
def test_device_path_matches_brute_force(device: str) -> None:
    """The same tile functions on NumPy (CPU) and CuPy (GPU) match brute force."""
    X, _ = planted_profiles(n_mechanisms=60, n_rows=1300, seed=6)
    for thr in (0.0, "auto"):
        cfg = GraphConfig(k=5, edge_threshold=thr, null_model="bennett", tile_cols=48,
                          row_chunk=500)
        res = build_graph(X, cfg, device=device)
        assert_topk_matches(brute_corr(X), 5, res.threshold, res.topk_idx, res.topk_val)
        if device == "cuda":
            _assert_same_result(res, build_graph(X, cfg, device="cpu"), atol=1e-5)


# --------------------------------------------------------------------------------------------
# The stage on a real profiles directory
# --------------------------------------------------------------------------------------------


def _harvest_profiles(run_dir, tau: float = 0.1) -> None:
    from scalespd.config import ProfilesConfig
    from scalespd.profiles.harvest import harvest
    from scalespd.profiles.sources import RandomRowSource
    from scalespd.profiles.synthetic import SyntheticCIModel

    model = SyntheticCIModel(8, [("a", 30), ("b", 25)], seed=0, dead=(3, 40), always_on=(7,))
    pcfg = ProfilesConfig(n_samples=600, chunk_rows=200, chunk_cols=16, block_rows=200,
                          tau=tau, executor="local", device="cpu", save_inputs=False)
    harvest(model, RandomRowSource(600, 8, seed=1, p=0.3), run_dir / "profiles", pcfg)


def test_stage_writes_alive_graph_and_reuses_it(tmp_path, ray_local) -> None:
    from scalespd.config import RunConfig
    from scalespd.graph import stage
    from scalespd.profiles import open_profiles, read_components

    _harvest_profiles(tmp_path)
    table = read_components(tmp_path / "profiles")
    alive = table.loc[table["alive"], "component"].to_numpy()
    assert 3 not in alive and 40 not in alive and 7 in alive
    # tile_cols 16 < alive count: the Ray path runs.
    cfg = RunConfig(graph=GraphConfig(k=4, tile_cols=16, row_chunk=128, device="cpu",
                                    null_model="bennett"))
    info = stage.run(cfg, tmp_path)
    out = tmp_path / "graph"
    res = GraphResult.load(out)
    np.testing.assert_array_equal(res.columns, alive)
    assert res.summary["ray"] is True
    assert info["n_edges"] == res.summary["n_edges"] and info["n_columns"] == alive.size
    # Column 7 is always on (constant 1): isolated and counted.
    assert res.zero_var[np.flatnonzero(alive == 7)[0]] and info["n_zero_var"] >= 1
    X = np.asarray(open_profiles(tmp_path / "profiles")[:])[:, alive]
    assert_topk_matches(brute_corr(X), 4, res.threshold, res.topk_idx, res.topk_val)
    # Re-running with the same config reuses the output; another config recomputes it.
    mtime = (out / "topk.npz").stat().st_mtime_ns
    assert stage.run(cfg, tmp_path) == info
    assert (out / "topk.npz").stat().st_mtime_ns == mtime
    cfg2 = RunConfig(graph=GraphConfig(k=3, edge_threshold=0.0, device="cpu"))
    info2 = stage.run(cfg2, tmp_path)
    assert GraphResult.load(out).topk_idx.shape[1] == 3 and info2["threshold"] == 0.0


def test_stage_with_no_alive_columns_is_a_clear_error(tmp_path) -> None:
    from scalespd.config import RunConfig
    from scalespd.errors import UserError
    from scalespd.graph import stage

    _harvest_profiles(tmp_path, tau=1.0)
    # A UserError: the CLI prints it as one `error:` line (exit 2), not a traceback.
    with pytest.raises(UserError, match="no alive subcomponents"):
        stage.run(RunConfig(), tmp_path)
    assert not (tmp_path / "graph").exists()


def test_interrupted_pass2_resumes_from_checkpoint(tmp_path, monkeypatch) -> None:
    """A crash after some row blocks leaves a checkpoint; the re-run computes only the missing
    blocks and gives the uninterrupted result. A checkpoint of other inputs is ignored."""
    import scalespd.graph.build as gb

    X, _ = planted_profiles(n_mechanisms=70, n_rows=700, seed=8)
    cfg = GraphConfig(k=5, tile_cols=40, row_chunk=256)
    ref = build_graph(X, cfg)
    n_blocks = -(-X.shape[1] // 40)
    calls: list[int] = []
    real = gb.row_block_topk

    def crashing(src, a, *args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        calls.append(a)
        return real(src, a, *args, **kw)

    ck = tmp_path / "ck.npz"
    monkeypatch.setattr(gb, "row_block_topk", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_graph(X, cfg, checkpoint=ck, checkpoint_every_s=0.0)
    assert ck.exists()
    calls.clear()
    monkeypatch.setattr(gb, "row_block_topk", lambda src, a, *args, **kw: (
        calls.append(a), real(src, a, *args, **kw))[1])
    resumed = build_graph(X, cfg, checkpoint=ck, checkpoint_every_s=0.0)
    assert sorted(calls) == list(range(3, n_blocks))
    _assert_same_result(resumed, ref, atol=0)
    # Another threshold = other inputs: the checkpoint is not used.
    calls.clear()
    other = build_graph(X, cfg.model_copy(update={"edge_threshold": 0.0}), checkpoint=ck)
    assert sorted(calls) == list(range(n_blocks))
    _assert_same_result(other, build_graph(X, cfg.model_copy(update={"edge_threshold": 0.0})))
