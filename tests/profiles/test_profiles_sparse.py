"""The sparse layout of ci.zarr (profiles.storage: sparse): the same matrix as the dense layout,
read back as CSR row blocks, statistics in O(nnz), never overwriting what is not its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from profiles_testlib import SIZES, direct_ci, direct_inputs, small_cfg, snapshot, tiny_model

from scalespd.config import GraphConfig, ProfilesConfig
from scalespd.graph.build import build_graph
from scalespd.graph.source import SourceSpec, describe, row_subset
from scalespd.profiles import ColumnStats, ProfilesError, open_profiles, read_components
from scalespd.profiles.harvest import harvest
from scalespd.profiles.sources import RandomRowSource
from scalespd.profiles.sparse_store import CSRBlock, SparseProfiles

N = sum(c for _, c in SIZES)


def _matrix(rng: np.random.Generator, m: int, n: int, density: float) -> np.ndarray:
    x = rng.random((m, n)).astype(np.float32) * (rng.random((m, n)) < density)
    x[3] = 0  # an all-zero row
    x[:, 1] = 0  # an all-zero column
    x[:, 2] = 0.5  # a constant column
    x[:, 4] = 1.0  # always on
    return x


def test_csr_block_round_trip_and_concat() -> None:
    x = _matrix(np.random.default_rng(0), 50, 9, 0.3)
    block = CSRBlock.from_dense(x)
    assert block.nnz == np.count_nonzero(x)
    got = block.to_scipy(9)
    assert got.has_sorted_indices and np.array_equal(got.toarray(), x)
    parts = [CSRBlock.from_dense(x[a:b]) for a, b in [(0, 7), (7, 7), (7, 50)]]
    joined = CSRBlock.concat(parts)
    for name in ("indptr", "indices", "values"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(block, name))
    empty = CSRBlock.from_dense(np.zeros((4, 9), np.float32))
    assert empty.nnz == 0 and empty.to_scipy(9).shape == (4, 9)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_stats_from_entries_equal_dense_stats(tau: float) -> None:
    x = _matrix(np.random.default_rng(1), 300, 12, 0.2)
    x[7, 5] = tau  # exactly tau is not active (> tau)
    block = CSRBlock.from_dense(x)
    got = ColumnStats.of_csr(block.indices, block.values, 300, 12, tau)
    want = ColumnStats.of(x, tau)
    np.testing.assert_array_equal(got.max, want.max)
    np.testing.assert_array_equal(got.n_active, want.n_active)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-10, atol=1e-13)
    assert got.std[2] == 0 and got.std[4] == 0 and got.max[1] == 0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sparse_harvest_holds_the_dense_matrix(tmp_path: Path, dtype: str) -> None:
    """Both layouts store the CI with the floor applied, bit for bit, with the same table."""
    model, src = tiny_model(), RandomRowSource(301, 6, seed=4, p=0.5)  # 5 blocks, last short
    floor = 0.05
    sparse = harvest(model, src, tmp_path / "s", small_cfg(storage="sparse", zero_below=floor,
                                                           dtype=dtype, batch_rows=20))
    harvest(model, src, tmp_path / "d", small_cfg(storage="dense", zero_below=floor, dtype=dtype))
    S, D = open_profiles(tmp_path / "s"), open_profiles(tmp_path / "d")
    assert isinstance(S, SparseProfiles) and S.shape == (301, N) and S.dtype == np.dtype(dtype)
    dense = np.asarray(D[:])
    np.testing.assert_array_equal(S[:], dense)
    want = direct_ci(model, direct_inputs(src, small_cfg(), N)).astype(dtype)
    assert ((want > 0) & (want < floor)).any()
    want[want < floor] = 0
    np.testing.assert_array_equal(dense, want)
    # Row blocks across harvest-block boundaries, and the dense reads other stages use.
    for r0, r1 in [(0, 301), (60, 130), (64, 128), (300, 301), (5, 5)]:
        block = S.csr_rows(r0, r1)
        assert isinstance(block, sp.csr_matrix) and block.has_sorted_indices
        np.testing.assert_array_equal(block.toarray(), dense[r0:r1])
    cols = np.array([9, 0, 15])
    np.testing.assert_array_equal(S[10:200, cols], dense[10:200][:, cols])
    np.testing.assert_array_equal(S.get_orthogonal_selection((slice(100, 250), cols)),
                                  dense[100:250][:, cols])
    ts, td = read_components(tmp_path / "s"), read_components(tmp_path / "d")
    for col in ("max", "frac_active", "alive", "name"):
        np.testing.assert_array_equal(ts[col], td[col])
    np.testing.assert_allclose(ts["std"], td["std"], rtol=1e-9, atol=1e-12)
    assert sparse.stats.n == 301


def test_sparse_store_reopens_in_other_processes_and_subsets(tmp_path: Path) -> None:
    harvest(tiny_model(), RandomRowSource(200, 6, seed=1), tmp_path / "p",
            small_cfg(storage="sparse"))
    X = open_profiles(tmp_path / "p")
    spec = describe(X)
    assert spec is not None and spec.kind == "csr"
    again = SourceSpec(**spec.__dict__).open()
    np.testing.assert_array_equal(again[:], X[:])
    sub = row_subset(X, ((0, 64), (128, 192)))
    assert sub.shape == (128, N)
    np.testing.assert_array_equal(sub.csr_rows(0, 128).toarray(),
                                  np.concatenate([X[0:64], X[128:192]]))
    assert describe(sub) is not None and describe(sub).open().shape == (128, N)


def test_graph_of_sparse_store_equals_graph_of_dense_store(tmp_path: Path) -> None:
    model = tiny_model(sizes=[("a", 20), ("b", 20)])
    src = RandomRowSource(600, 6, seed=3, p=0.3)
    for storage in ("sparse", "dense"):
        harvest(model, src, tmp_path / storage, small_cfg(storage=storage, zero_below=0.01))
    alive = np.flatnonzero(read_components(tmp_path / "dense")["alive"].to_numpy())
    got = build_graph(open_profiles(tmp_path / "sparse"), GraphConfig(k=4, correlation="sparse"),
                      alive)
    want = build_graph(open_profiles(tmp_path / "dense"), GraphConfig(k=4, correlation="dense"),
                       alive)
    np.testing.assert_array_equal(got.topk_idx, want.topk_idx)
    # float32 GEMM tiles vs float64 sparse sums: equal to float32 rounding.
    np.testing.assert_allclose(got.topk_val, want.topk_val, rtol=0, atol=2e-5)
    same_edges = ((got.graph != 0) != (want.graph != 0)).nnz == 0
    assert got.graph.nnz > 0 and same_edges and abs(got.graph - want.graph).max() < 2e-5


def test_an_unfinished_block_group_is_rewritten_and_temporaries_removed(tmp_path: Path) -> None:
    """A block group without a completion record (killed before the record) and a half-built
    temporary group are replaced by a re-run; the result equals an undisturbed harvest."""
    model, src = tiny_model(), RandomRowSource(200, 6, seed=7)
    cfg = small_cfg(storage="sparse")
    harvest(model, src, tmp_path / "full", cfg)
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", out)
    (out / "harvest.json").unlink()
    (out / "blocks" / "block_0000002.npz").unlink()
    values = out / "ci.zarr" / "rows" / "0000002" / "values" / "c" / "0"
    values.write_bytes(b"garbage")  # the block's data, never recorded as finished
    (out / "ci.zarr" / "rows" / ".0000003.999.tmp").mkdir()
    res = harvest(model, src, out, cfg)
    assert res.n_computed == 1
    a, b = snapshot(out), snapshot(tmp_path / "full")
    a.pop("harvest.json"), b.pop("harvest.json")
    assert a == b


@pytest.mark.parametrize(("first", "second", "match"), [
    ({"storage": "dense"}, {"storage": "sparse"}, "not a sparse profiles store"),
    ({"storage": "sparse"}, {"storage": "dense"}, "holds sparse profiles"),
    ({"storage": "sparse"}, {"storage": "sparse", "zero_below": 0.01}, "zero_below"),
    ({"storage": "sparse"}, {"storage": "sparse", "dtype": "float16"}, "dtype"),
])
def test_a_different_layout_or_floor_is_refused_and_changes_nothing(
        tmp_path: Path, first: dict, second: dict, match: str) -> None:
    model, src = tiny_model(), RandomRowSource(200, 6, seed=1)
    harvest(model, src, tmp_path / "p", small_cfg(**first))
    (tmp_path / "p" / "harvest.json").unlink()  # unfinished: a re-run would resume it
    before = snapshot(tmp_path / "p")
    with pytest.raises(ProfilesError, match=match) as err:
        harvest(model, src, tmp_path / "p", small_cfg(**second))
    assert str(tmp_path / "p" / "ci.zarr") in str(err.value)
    assert snapshot(tmp_path / "p") == before


def test_floor_above_tau_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="zero_below"):
        ProfilesConfig(zero_below=0.2, tau=0.1)
    assert ProfilesConfig().storage == "sparse" and ProfilesConfig().zero_below == 1e-3
