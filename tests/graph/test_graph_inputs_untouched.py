"""The graph and spectral code only read the profile matrix (issue 17, bug 1).

A float32 C-order matrix whose selected columns form one contiguous span is read as plain
slices, which are views of the caller's array; z-scoring such a view in place used to change
the caller's data (or fail on a read-only memory map or Ray object-store array)."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_graph import planted_profiles

from scalespd.config import GraphConfig
from scalespd.graph import GraphResult, build_graph
from scalespd.graph.panels import read_block
from scalespd.spectral.assign import mean_correlation_to_clusters


def _profiles() -> np.ndarray:
    """(400, ~30) float32 C-order profiles with planted mechanisms (small and fast)."""
    X, _ = planted_profiles(n_mechanisms=8, sizes=(2, 5), n_rows=400, seed=1)
    assert X.dtype == np.float32 and X.flags.c_contiguous
    return X


def _same(a: GraphResult, b: GraphResult) -> None:
    np.testing.assert_array_equal(a.topk_idx, b.topk_idx)
    np.testing.assert_array_equal(a.topk_val, b.topk_val)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.threshold == b.threshold


# Whole panel in one read (row_chunk >= M), streamed row chunks, several panels, and the
# paper's threshold 0 next to the data-derived one: every read path of both passes.
CONFIGS = [
    GraphConfig(k=4),
    GraphConfig(k=4, edge_threshold=0.0, row_chunk=64, tile_cols=7),
    GraphConfig(k=3, tile_cols=5, row_chunk=1000),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["one_tile", "streamed", "panels"])
def test_build_graph_leaves_the_callers_array_bit_identical(cfg: GraphConfig) -> None:
    X = _profiles()
    before = X.copy()
    result = build_graph(X, cfg)
    assert X.tobytes() == before.tobytes()
    assert result.graph.nnz > 0  # the run did real work on these columns
    # A column selection that is one contiguous span is the sliced (view) path as well.
    build_graph(X, cfg, columns=np.arange(3, X.shape[1] - 2))
    assert X.tobytes() == before.tobytes()


def test_read_only_arrays_and_memory_maps_work(tmp_path) -> None:
    X = _profiles()
    ref = build_graph(X.copy(), GraphConfig(k=4))
    ro = X.copy()
    ro.setflags(write=False)
    _same(build_graph(ro, GraphConfig(k=4)), ref)
    np.save(tmp_path / "ci.npy", X)
    mm = np.load(tmp_path / "ci.npy", mmap_mode="r")
    _same(build_graph(mm, GraphConfig(k=4)), ref)
    assert np.array_equal(np.load(tmp_path / "ci.npy"), X)
    # largest_component mode's assignment pass reads the same matrix; any write would raise.
    mean, std = X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64)
    corr = mean_correlation_to_clusters(mm, np.arange(6), np.array([0, 0, 1, 1, 2, 2]),
                                        mean[:6], std[:6], np.arange(6, 12), mean[6:12],
                                        std[6:12], row_chunk=64)
    assert corr.shape == (6, 3) and np.all(np.isfinite(corr))


def test_read_block_never_returns_a_view() -> None:
    X = _profiles()
    for cols in (np.arange(X.shape[1]), np.arange(2, 9), np.array([5, 1, 3])):
        block = read_block(X, 10, 50, cols)
        assert block.flags.writeable and block.flags.c_contiguous
        assert not np.may_share_memory(block, X)
        np.testing.assert_array_equal(block, X[10:50][:, cols])


def test_ray_tasks_read_in_memory_arrays_without_writing(ray_local) -> None:
    """Ray tasks read an in-memory array from the temporary zarr copy it is converted to
    (issue 16; tests/graph/test_graph_sources.py); the caller's array stays as it was."""
    X = _profiles()
    before = X.copy()
    # One full-width panel: the tasks read plain row slices.
    cfg = GraphConfig(k=4)
    local = build_graph(X, cfg)
    _same(build_graph(X, cfg, use_ray=True), local)
    assert X.tobytes() == before.tobytes()
