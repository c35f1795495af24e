"""The sparse (co-activation) correlation path: equal to the dense path and to brute force,
ties included, on language-model-like data with hubs, an always-on column, constant and
all-zero columns, all-zero rows and duplicate columns; its statistics pass, its plan (several
tiles, passes, row blocks and both kernels), NaN / negative-value handling, the automatic
choice, resume from a checkpoint, sparse inputs everywhere the graph reads X, and the stage."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from graph_reference import assert_topk_matches, brute_corr, brute_topk, reference_edges
from sparse_profiles import lm_like_profiles
from synthetic_graph import block_profiles

from scalespd.backend import cupy_gpu_available
from scalespd.config import GraphConfig
from scalespd.graph import GraphResult, build_graph
from scalespd.graph.panels import read_block
from scalespd.graph.sparse import sparse_topk
from scalespd.graph.sparse_io import SparseBlocks
from scalespd.graph.sparse_plan import (
    SparsePlan,
    choose_path,
    crossover_density,
    dense_estimate_s,
    make_plan,
)
from scalespd.graph.sparse_stats import sparse_column_stats
from scalespd.graph.stats import column_stats


def _cfg(path: str, **kw: object) -> GraphConfig:
    # One threshold for all pairs: the brute-force reference applies a single threshold.
    base: dict[str, object] = {"k": 5, "tile_cols": 48, "row_chunk": 700, "correlation": path,
                               "null_model": "bennett"}
    return GraphConfig(**{**base, **kw})


def _edges(res: GraphResult) -> set[tuple[int, int]]:
    W = sp.triu(res.graph, k=1).tocoo()
    return set(zip(W.row.tolist(), W.col.tolist(), strict=True))


def _assert_same_graph(a: GraphResult, b: GraphResult) -> None:
    """Same top-k lists (ids exactly, values to float32 rounding), same edges, same labels."""
    np.testing.assert_array_equal(a.topk_idx, b.topk_idx)
    np.testing.assert_allclose(a.topk_val, b.topk_val, atol=1e-5, rtol=0)
    assert _edges(a) == _edges(b)
    np.testing.assert_allclose(a.graph.toarray(), b.graph.toarray(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.zero_var, b.zero_var)
    assert a.threshold == pytest.approx(b.threshold, abs=1e-12)


# --------------------------------------------------------------------------------------------
# sparse == dense == brute force
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("constant_column", [True, False])
@pytest.mark.parametrize("threshold", [0.0, "auto"])
def test_sparse_equals_dense_equals_brute_force(seed: int, constant_column: bool,
                                                threshold: float | str) -> None:
    X = lm_like_profiles(seed=seed, constant_column=constant_column)
    dense = build_graph(X, _cfg("dense", edge_threshold=threshold))
    sparse = build_graph(X, _cfg("sparse", edge_threshold=threshold))
    assert dense.summary["correlation"]["path"] == "dense"
    assert sparse.summary["correlation"]["path"] == "sparse"
    _assert_same_graph(sparse, dense)
    # Both against brute force; the duplicate columns 3 and 4 tie exactly, and the tie goes to
    # the smaller id in both paths, as in brute force.
    C = brute_corr(X)
    for res in (dense, sparse):
        assert_topk_matches(C, 5, res.threshold, res.topk_idx, res.topk_val)
    ref_v, ref_i = brute_topk(C, 5, sparse.threshold)
    np.testing.assert_array_equal(sparse.topk_idx, ref_i)
    assert sparse.summary["n_edges"] > 20  # a graph worth comparing
    assert reference_edges(C, sparse.topk_idx, sparse.summary["neighbours"]) == _edges(sparse)
    # Edge cases: all-zero column 0 (and constant column 2) isolated; the duplicate pair is an
    # edge of correlation 1.
    assert sparse.zero_var[0] and (sparse.zero_var[2] == constant_column)
    assert np.all(sparse.topk_idx[0] == -1)
    assert sparse.graph[3, 4] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["csr", "csc", "coo", "zarr"])
def test_every_input_kind_gives_the_same_graph(kind: str, tmp_path) -> None:
    X = lm_like_profiles(seed=2)
    cols = np.arange(1, X.shape[1], 2)[::-1]  # a selection in a non-sorted node order
    if kind == "zarr":
        src = zarr.create_array(tmp_path / "ci.zarr", shape=X.shape, chunks=(512, 40),
                                dtype="float32")
        src[:] = X
    else:
        src = getattr(sp, f"{kind}_matrix")(X)
    ref = build_graph(X, _cfg("dense"), columns=cols)
    for path in ("sparse", "dense"):
        _assert_same_graph(build_graph(src, _cfg(path), columns=cols), ref)


def test_exact_ties_follow_the_dense_rule() -> None:
    """Many exact duplicates: every tie at the k-th place goes to the smaller node id."""
    base = lm_like_profiles(n_cols=40, seed=4, edge_cases=False)
    X = np.repeat(base, 3, axis=1)  # columns 3c, 3c+1, 3c+2 identical
    res = build_graph(X, _cfg("sparse", k=4, edge_threshold=0.0))
    _, ref_i = brute_topk(brute_corr(X), 4, 0.0)
    np.testing.assert_array_equal(res.topk_idx, ref_i)
    _assert_same_graph(res, build_graph(X, _cfg("dense", k=4, edge_threshold=0.0)))


# --------------------------------------------------------------------------------------------
# The pieces: statistics, plan, passes
# --------------------------------------------------------------------------------------------


def test_sparse_statistics_equal_the_dense_pass() -> None:
    X = lm_like_profiles(seed=5)
    X[:, 7] = 1000.0 + 0.01 * (np.arange(X.shape[0]) % 3)  # |mean| >> std
    cols = np.array([7, 0, 2, 1, 9, 3, 4, 150])
    ref = column_stats(X, cols, tile_cols=3, row_chunk=256)
    for block_rows in (97, 1000, 5000):
        st = sparse_column_stats(SparseBlocks(sp.csr_matrix(X), cols, block_rows, 256))
        for f in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(getattr(st, f), getattr(ref, f), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(st.nnz, np.count_nonzero(X[:, cols], axis=0))
        np.testing.assert_array_equal(st.nnz, ref.nnz)
        np.testing.assert_array_equal(st.zero_var, ref.zero_var)


@pytest.mark.parametrize(("acc_entries", "block_nnz"), [(10**9, 1 << 23), (2500, 400),
                                                        (300, 60)])
def test_plans_of_any_size_give_the_brute_force_lists(acc_entries: int, block_nnz: int) -> None:
    """One pass or many, one row block or many, spmm and spgemm tiles: the same lists."""
    X = lm_like_profiles(n_rows=2000, n_cols=120, seed=6, edge_cases=False)
    cols = np.arange(X.shape[1])
    st = sparse_column_stats(SparseBlocks(X, cols, 512, 256))
    plan = make_plan(st.nnz, X.shape[0], acc_entries=acc_entries, row_chunk=128,
                     block_nnz=block_nnz)
    kernels = {t.kernel for t in plan.tiles}
    assert kernels == {"spmm", "spgemm"}  # the hubs and the always-on column are spmm
    assert {t.kernel for t in plan.tiles if t.start < 3} == {"spmm"}
    assert (st.nnz[plan.order[:3]] / X.shape[0] >= crossover_density()).all()
    if acc_entries < 10**9:
        assert len(plan.groups) > 2 and plan.block_rows < X.shape[0]
    C = brute_corr(X)
    for thr in (0.0, 0.2):
        v, i = sparse_topk(sp.csr_matrix(X), cols, st.mean, st.std, plan, thr, 6, 128)
        assert v.dtype == np.float64
        ref_v, ref_i = brute_topk(C, 6, thr)
        np.testing.assert_array_equal(i, ref_i)
        ok = ref_i >= 0
        np.testing.assert_allclose(v[ok], ref_v[ok], atol=1e-5, rtol=0)


def test_interrupted_sparse_pass_resumes_from_checkpoint(tmp_path, monkeypatch) -> None:
    import scalespd.graph.sparse as gs

    X = lm_like_profiles(seed=7)
    cfg = _cfg("sparse", tile_cols=12)  # 4·12² accumulator values per pass: many passes
    ref = build_graph(X, cfg)
    n_passes = ref.summary["correlation"]["plan"]["n_passes"]
    assert n_passes >= 4
    calls: list[int] = []
    real = gs.group_topk

    def crashing(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(args[5])
        return real(*args, **kw)

    ck = tmp_path / "ck.npz"
    monkeypatch.setattr(gs, "group_topk", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_graph(X, cfg, checkpoint=ck, checkpoint_every_s=0.0)
    assert ck.exists()
    calls.clear()
    monkeypatch.setattr(gs, "group_topk", lambda *a, **kw: (calls.append(a[5]), real(*a, **kw))[1])
    resumed = build_graph(X, cfg, checkpoint=ck, checkpoint_every_s=0.0)
    assert calls == list(range(2, n_passes))
    _assert_same_graph(resumed, ref)
    np.testing.assert_array_equal(resumed.topk_val, ref.topk_val)
    # The dense path does not take the sparse checkpoint for its own.
    _assert_same_graph(build_graph(X, _cfg("dense", tile_cols=12), checkpoint=ck), ref)


# --------------------------------------------------------------------------------------------
# Bad input, the automatic choice
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_an_error_naming_the_column(bad: float) -> None:
    X = lm_like_profiles(seed=8)
    X[123, 29] = bad
    # A dense input is checked by the dense statistics pass (it names the row slab), a sparse
    # one by the sparse pass (it names the rows of the bad values).
    with pytest.raises(ValueError, match=r"NaN or inf.*\[29\]"):
        build_graph(X, _cfg("sparse"))
    with pytest.raises(ValueError, match=r"NaN or inf.*\[29\], rows 123\.\.123\)"):
        build_graph(sp.csr_matrix(X), _cfg("sparse"))
    # A bad value in a column that is not selected is never read.
    res = build_graph(sp.csr_matrix(X), _cfg("sparse"), columns=np.arange(29))
    assert res.topk_idx.shape == (29, 5)


def test_negative_values_refused_by_sparse_and_sent_to_dense_by_auto() -> None:
    X, _ = block_profiles(n_rows=400, n_cols=30, n_blocks=3, seed=0)  # Gaussian: signed
    with pytest.raises(ValueError, match="non-negative"):
        build_graph(X, _cfg("sparse"))
    res = build_graph(X, _cfg("auto"))
    assert res.summary["correlation"]["path"] == "dense"
    assert "negative" in res.summary["correlation"]["reason"]


def test_auto_picks_sparse_for_sparse_profiles_and_dense_for_dense_ones() -> None:
    """The modelled costs decide; a sparse input stays sparse unless dense is clearly cheaper."""
    sparse_X = lm_like_profiles(n_rows=20000, n_cols=400, rates=(0.0005, 0.02), seed=9)
    res = build_graph(sparse_X, _cfg("auto", tile_cols=128))  # stored dense, used sparse
    info = res.summary["correlation"]
    assert info["path"] == "sparse", info
    assert info["sparse_estimate_s"] * 2 < info["dense_estimate_s"]
    assert info["plan"]["spmm_columns"] >= 4  # hubs + always-on
    rng = np.random.default_rng(0)
    dense_X = rng.random((3000, 300), dtype=np.float32)  # non-negative but never zero
    for src in (dense_X, sp.csr_matrix(dense_X)):
        info = build_graph(src, _cfg("auto", tile_cols=128)).summary["correlation"]
        assert info["path"] == "dense", info
        assert info["sparse_estimate_s"] > 2 * info["dense_estimate_s"]



def test_auto_leaves_the_storage_path_only_for_a_clear_gain() -> None:
    n, m, tile = 300, 5000, 128
    dense_s = dense_estimate_s(n, m, tile)

    def path(ratio: float, sparse_input: bool) -> str:
        plan = SparsePlan(np.arange(n), (), (), m, dense_s * ratio)
        return choose_path("auto", n, m, 0.0, plan, tile, sparse_input)[0]

    assert [path(r, False) for r in (0.3, 0.7, 1.5, 3.0)] == ["sparse", "dense", "dense",
                                                               "dense"]
    assert [path(r, True) for r in (0.3, 0.7, 1.5, 3.0)] == ["sparse", "sparse", "sparse",
                                                              "dense"]
    plan = SparsePlan(np.arange(n), (), (), m, 0.0)
    assert choose_path("dense", n, m, 0.0, plan, tile)[0] == "dense"
    assert choose_path("auto", n, m, -1.0, plan, tile, True)[0] == "dense"
    assert choose_path("auto", 1, m, 0.0, None, tile, True)[0] == "dense"


def test_sparse_inputs_are_read_dense_where_dense_blocks_are_needed() -> None:
    """read_block (threshold floor, spectral assignment, dense tiles) accepts sparse X."""
    X = lm_like_profiles(seed=10)
    cols = np.array([9, 3, 150, 4])
    for src in (sp.csr_matrix(X), sp.csc_matrix(X)):
        block = read_block(src, 100, 400, cols)
        np.testing.assert_array_equal(block, X[100:400][:, cols])
        assert block.dtype == np.float32 and block.flags.writeable


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_gpu_available(), reason="no CUDA GPU visible to CuPy")
def test_gpu_sparse_path_equals_the_cpu_one() -> None:
    """cupyx.scipy.sparse products (several passes, both kernels) give the CPU lists."""
    X = lm_like_profiles(seed=11)
    cfg = _cfg("sparse", tile_cols=16)
    gpu = build_graph(sp.csr_matrix(X), cfg, device="cuda")
    assert gpu.summary["device"] == "cuda"
    assert gpu.summary["correlation"]["plan"]["n_passes"] > 1
    _assert_same_graph(gpu, build_graph(X, cfg, device="cpu"))


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def test_stage_sparse_equals_dense(tmp_path) -> None:
    from scalespd.config import ProfilesConfig, RunConfig
    from scalespd.graph import stage
    from scalespd.profiles.harvest import harvest
    from scalespd.profiles.sources import RandomRowSource
    from scalespd.profiles.synthetic import SyntheticCIModel

    model = SyntheticCIModel(8, [("a", 30), ("b", 25)], seed=0, dead=(3, 40), always_on=(7,))
    pcfg = ProfilesConfig(n_samples=800, chunk_rows=200, chunk_cols=16, block_rows=200,
                          tau=0.1, executor="local", device="cpu", save_inputs=False)
    harvest(model, RandomRowSource(800, 8, seed=1, p=0.3), tmp_path / "profiles", pcfg)
    results = {}
    for path in ("dense", "sparse"):
        # tile_cols above the alive count: the stage runs in this process (no Ray).
        cfg = RunConfig(graph=GraphConfig(k=4, tile_cols=64, device="cpu", correlation=path))
        info = stage.run(cfg, tmp_path)
        results[path] = GraphResult.load(tmp_path / "graph")
        assert results[path].summary["correlation"]["path"] == path
        assert info["n_edges"] == results[path].summary["n_edges"]
    _assert_same_graph(results["sparse"], results["dense"])
    assert results["sparse"].summary["n_edges"] > 0


def test_sparse_passes_as_ray_tasks_equal_in_process(ray_local, tmp_path) -> None:
    """One Ray task per pass, reading X from the object store (an in-memory matrix) or opening
    it by path (a zarr store): the same lists, edges and components as one process."""
    X = lm_like_profiles(n_rows=1500, n_cols=90, seed=8)
    Z = zarr.create_array(tmp_path / "ci.zarr", shape=X.shape, chunks=(512, 40), dtype="float32")
    Z[:] = X
    cfg = _cfg("sparse", tile_cols=8)  # a small accumulator budget: many passes
    local = build_graph(sp.csr_matrix(X), cfg)
    assert local.summary["correlation"]["plan"]["n_passes"] > 3
    for source in (sp.csr_matrix(X), Z):
        got = build_graph(source, cfg, use_ray=True)
        assert got.summary["ray"]
        _assert_same_graph(got, local)


@pytest.mark.parametrize("share", ["wide", "narrow"])
def test_sparse_blocks_select_columns_in_their_order(share: str) -> None:
    """Both ways a sparse row block is built (whole conversion, or selection first when the
    columns hold few of its entries) give X[r0:r1, cols], columns in the order asked for."""
    X = lm_like_profiles(n_rows=600, n_cols=200, seed=9)
    csr = sp.csr_matrix(X)
    rng = np.random.default_rng(0)
    nnz = (X != 0).sum(axis=0)
    if share == "wide":
        cols = rng.permutation(X.shape[1])
    else:  # a few sparse columns: far below the whole-conversion share
        cols = rng.permutation(np.argsort(nnz)[:12])
    assert (nnz[cols].sum() >= 0.3 * nnz.sum()) == (share == "wide")
    blocks = SparseBlocks(csr, cols, 256, 256)
    for r0, r1, B in blocks:
        assert B.format == "csc" and B.has_sorted_indices and B.dtype == np.float32
        np.testing.assert_array_equal(B.toarray(), X[r0:r1][:, cols])
