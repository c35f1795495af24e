"""`python -m scalespd.cluster` with Ray reads the .npy from disk in its tasks (issue 16): the
same output as the in-process path, no task argument holding the matrix, and the peak RSS of
the driver and of the Ray workers recorded next to the wall time in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray_spy import RaySpy
from synthetic_spectral import planted_profiles

from scalespd.cluster import main

OUTPUT_FILES = ("clusters.csv", "components.csv")
GRAPH_ARRAYS = {"stats.npz": ("columns", "mean", "std", "min", "max", "zero_var"),
                "topk.npz": ("idx", "val")}


@pytest.fixture(scope="module")
def npy(tmp_path_factory) -> Path:
    """(3000, ~150) float32 planted profiles saved as .npy (1.8 MB)."""
    rng = np.random.default_rng(5)
    X, _ = planted_profiles(rng.integers(1, 8, size=35), 3000, n_dead=10, n_constant=1,
                            seed=5)
    path = tmp_path_factory.mktemp("mem") / "P.npy"
    np.save(path, X)
    return path


def test_ray_path_reads_the_file_and_matches_the_in_process_path(npy, tmp_path, ray_local,
                                                                 monkeypatch):
    X = np.load(npy)
    assert main([str(npy), "--out", str(tmp_path / "local"), "--executor", "local"]) == 0
    spy = RaySpy(monkeypatch)
    assert main([str(npy), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0

    local, remote = tmp_path / "local", tmp_path / "ray"
    for name in OUTPUT_FILES:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    spectra = [json.loads((d / "spectra.json").read_text()) for d in (local, remote)]
    assert spectra[0]["pieces"] == spectra[1]["pieces"]  # (their "info" holds timings)
    for name, keys in GRAPH_ARRAYS.items():
        with np.load(local / "graph" / name) as a, np.load(remote / "graph" / name) as b:
            for key in keys:
                np.testing.assert_array_equal(a[key], b[key])
    assert pd.read_csv(local / "clusters.csv")["cluster"].max() > 10  # real clusters

    # No task argument and nothing put into the object store is (or pickles to anything near)
    # the matrix: the tasks got a descriptor of the file and read their blocks themselves.
    specs = spy.assert_no_matrix(X.size, X.nbytes, fraction=1 / 20)
    assert specs and {(s.kind, Path(s.path)) for s in specs} == {("npy", npy.resolve())}

    # Peak RSS next to the wall time: the driver's always, the Ray workers' with Ray only.
    t_local = json.loads((local / "summary.json").read_text())["timings"]
    t_ray = json.loads((remote / "summary.json").read_text())["timings"]
    assert t_local["peak_rss_mb"] > 0 and t_local["ray_worker_peak_rss_mb"] is None
    assert t_ray["peak_rss_mb"] > 0 and t_ray["ray_worker_peak_rss_mb"] > 0
    assert t_ray["total_s"] > 0
    graph = json.loads((remote / "graph" / "summary.json").read_text())
    assert graph["ray_source"] == {"kind": "npy", "path": str(npy.resolve()),
                                   "converted": False}
