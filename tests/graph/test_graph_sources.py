"""Ray tasks read the profiles from their file or store, never from a whole-matrix object
(issue 16): a memory-mapped .npy used to be `ray.put` whole, copied into the object store and
spilled to disk (13 GB peak for a 3.8 GB file)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from ray_spy import RaySpy
from synthetic_spectral import planted_profiles

from scalespd.config import GraphConfig
from scalespd.graph import GraphResult, build_graph
from scalespd.graph.source import NpyFile, RowSubset, describe, ray_source

# Several panels and row chunks, so that both passes run several tasks.
CFG = GraphConfig(k=4, tile_cols=16, row_chunk=256)


def _X() -> np.ndarray:
    """(1200, ~60) float32 CI-like profiles with planted mechanisms."""
    rng = np.random.default_rng(3)
    X, _ = planted_profiles(rng.integers(2, 6, size=14), 1200, n_dead=4, seed=3)
    return X


def _same(a: GraphResult, b: GraphResult) -> None:
    np.testing.assert_array_equal(a.topk_idx, b.topk_idx)
    np.testing.assert_array_equal(a.topk_val, b.topk_val)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.mean, b.mean)
    assert a.threshold == b.threshold


ROWS = ((0, 300), (500, 1000), (1100, 1200))


def _inputs(kind: str, X: np.ndarray, d: Path):
    """(the object handed to build_graph, the in-memory matrix it stands for)."""
    if kind in ("npy", "npy_fortran", "npyfile"):
        np.save(d / "X.npy", np.asfortranarray(X) if kind == "npy_fortran" else X)
        if kind == "npyfile":
            return NpyFile.open(d / "X.npy"), X
        return np.load(d / "X.npy", mmap_mode="r"), X
    z = zarr.create_array(str(d / "X.zarr"), shape=X.shape, chunks=(100, 16), dtype=X.dtype)
    z[:] = X
    z = zarr.open_array(str(d / "X.zarr"), mode="r")
    if kind == "zarr":
        return z, X
    assert kind == "row_subset"
    return RowSubset(z, ROWS), np.concatenate([X[a:b] for a, b in ROWS])


@pytest.mark.parametrize("kind", ["npy", "npy_fortran", "npyfile", "zarr", "row_subset"])
def test_ray_tasks_open_the_source_and_match_the_in_process_graph(kind, tmp_path, ray_local,
                                                                  monkeypatch):
    X = _X()
    source, dense = _inputs(kind, X, tmp_path)
    local = build_graph(dense, CFG)
    spy = RaySpy(monkeypatch)
    scratch = tmp_path / "scratch"
    result = build_graph(source, CFG, use_ray=True, scratch_dir=scratch)
    _same(result, local)
    _same(build_graph(source, CFG), local)  # the in-process path reads these inputs as well
    specs = spy.assert_no_matrix(dense.size, dense.nbytes)
    # Pass 1 (one task per panel) and pass 2 (one per row block) all got the descriptor.
    n_panels = -(-X.shape[1] // CFG.tile_cols)
    assert len(specs) == 2 * n_panels
    assert {s.kind for s in specs} == {"zarr" if "zarr" in kind or kind == "row_subset"
                                       else "npy"}
    assert all(s.rows == (ROWS if kind == "row_subset" else None) for s in specs)
    assert result.summary["ray_source"]["converted"] is False
    assert result.summary["ray_worker_peak_rss_mb"] > 0
    assert not scratch.exists()  # nothing needed converting


def test_in_memory_array_is_converted_once_streaming_and_removed(tmp_path, ray_local,
                                                                 monkeypatch, caplog):
    X = _X()
    before = X.copy()
    local = build_graph(X, CFG)
    spy = RaySpy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="scalespd.graph.source"):
        result = build_graph(X, CFG, use_ray=True, scratch_dir=tmp_path / "scratch")
    _same(result, local)
    assert X.tobytes() == before.tobytes()
    specs = spy.assert_no_matrix(X.size, X.nbytes)
    assert {s.kind for s in specs} == {"zarr"}
    assert all(str(tmp_path / "scratch") in s.path for s in specs)
    assert "cannot be opened by path in Ray workers" in caplog.text
    assert result.summary["ray_source"]["converted"] is True
    assert list((tmp_path / "scratch").iterdir()) == []  # the conversion is gone


def test_ray_source_removes_its_conversion_on_failure(tmp_path):
    X = _X()
    with pytest.raises(RuntimeError, match="boom"), ray_source(X, tmp_path) as spec:
        assert np.array_equal(spec.open()[:], X)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_describe_only_what_another_process_can_reopen(tmp_path):
    X = _X()
    np.save(tmp_path / "X.npy", X)
    mm = np.load(tmp_path / "X.npy", mmap_mode="r")
    spec = describe(mm)
    assert spec is not None and spec.kind == "npy" and spec.shape == X.shape
    assert np.array_equal(spec.open()[:], X)
    # A view of the map carries its parent's offset: it cannot be described by path.
    assert describe(mm[10:]) is None and describe(mm[:, :5]) is None
    # A copy-on-write map may hold changes that are not in the file.
    assert describe(np.load(tmp_path / "X.npy", mmap_mode="c")) is None
    assert describe(X) is None
    assert describe(zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 4),
                                      dtype="float32")) is None


def test_npy_file_reads_blocks_and_keeps_no_mapping(tmp_path):
    X = _X()
    np.save(tmp_path / "X.npy", X)
    f = NpyFile.open(tmp_path / "X.npy")
    assert f.shape == X.shape and f.dtype == X.dtype and f.nbytes == X.nbytes
    cols = np.array([7, 2, 30])
    for got, want in ((f[5:90], X[5:90]), (f[5:90, 3:20], X[5:90, 3:20]),
                      (f.get_orthogonal_selection((slice(0, 400), cols)), X[:400][:, cols])):
        assert type(got) is np.ndarray and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    if sys.platform.startswith("linux"):
        # Each read unmapped the file again: its pages do not stay in the resident set.
        maps = Path("/proc/self/maps").read_text()
        assert str(tmp_path / "X.npy") not in maps
