"""`python -m scalespd.cluster PROFILES --out DIR`: end to end on .npy / zarr / profiles-dir
inputs, and every kind of bad input refused with a clear message and no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from sklearn.metrics import adjusted_rand_score
from synthetic_spectral import planted_profiles

from scalespd.backend import cupy_gpu_available
from scalespd.cluster import main
from scalespd.config import SpectralConfig
from scalespd.spectral.clustering import CLUSTER_COLUMNS

SUMMARY_KEYS = {"n_components", "n_alive", "n_edges", "n_connected_components", "n_clusters",
                "cluster_sizes", "layer_span_counts", "timings"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A planted (M, N) matrix saved as .npy and as a zarr array, its truth and a metadata CSV
    placing each mechanism's members on alternating layers."""
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    X, truth = planted_profiles(rng.integers(1, 10, size=40), 1500, n_dead=20, n_constant=2,
                                seed=0)
    np.save(d / "X.npy", X)
    z = zarr.create_array(str(d / "X.zarr"), shape=X.shape, chunks=(400, 50), dtype="float32")
    z[:] = X
    N = X.shape[1]
    meta = pd.DataFrame({"name": [f"m{i % 3}:{i}" for i in range(N)], "layer": np.arange(N) % 3,
                         "module": [f"m{i % 3}" for i in range(N)]})
    meta.to_csv(d / "meta.csv", index=False)
    return {"dir": d, "X": X, "truth": truth, "meta": meta}


def _ok(args: list[str]) -> None:
    assert main([str(a) for a in args]) == 0


def _refused(args: list[str], capsys, *needles: str) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_end_to_end_npy_and_zarr(planted, tmp_path):
    d = planted["dir"]
    _ok([d / "X.npy", "--out", tmp_path / "a", "--components", d / "meta.csv"])
    _ok([d / "X.zarr", "--out", tmp_path / "b", "--components", d / "meta.csv"])
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("clusters.csv", "summary.json", "components.csv", "spectra.json",
                 "graph/summary.json"):
        assert (a / name).exists(), name
    assert (a / "clusters.csv").read_bytes() == (b / "clusters.csv").read_bytes()

    clusters = pd.read_csv(a / "clusters.csv")
    assert list(clusters.columns) == CLUSTER_COLUMNS
    truth, X = planted["truth"], planted["X"]
    alive = X.max(0) > 0.1
    np.testing.assert_array_equal(clusters["alive"], alive)
    assert np.all(clusters.loc[~alive, "cluster"] == -1)
    assert adjusted_rand_score(truth[alive], clusters.loc[alive, "cluster"]) >= 0.95
    assert clusters["name"].tolist() == planted["meta"]["name"].tolist()

    s = json.loads((a / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s)
    assert s["n_components"] == X.shape[1] and s["n_alive"] == int(alive.sum())
    assert sum(s["cluster_sizes"]) == s["n_alive"]
    assert s["n_clusters"] == len(s["cluster_sizes"]) == clusters["cluster"].max() + 1
    # Members sit on layers i % 3, so multi-member clusters span 2–3 layers.
    spans = {int(k): v for k, v in s["layer_span_counts"].items()}
    assert sum(spans.values()) == s["n_nonsingleton"] and set(spans) <= {1, 2, 3}
    assert {"alive_filter_s", "graph_s", "spectral_s", "total_s"} <= set(s["timings"])


def test_profiles_directory_and_options(planted, tmp_path):
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    z = zarr.create_array(str(pdir / "ci.zarr"), shape=planted["X"].shape, chunks=(512, 64),
                          dtype="float32")
    z[:] = planted["X"]
    _ok([pdir, "--out", tmp_path / "o", "--k", 6, "--k-max", 5, "--seed", 3, "--mode",
         "largest_component", "--edge-threshold", "0.2", "--tau", "0.2"])
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["params"]["k"] == 6 and s["params"]["k_max"] == 5 and s["params"]["seed"] == 3
    assert s["params"]["mode"] == "largest_component" and s["edge_threshold"] == 0.2
    assert s["n_alive"] == int((planted["X"].max(0) > 0.2).sum())
    names = pd.read_csv(tmp_path / "o" / "clusters.csv")["name"]
    assert names.iloc[5] == "col:5"  # generic metadata without --components


def test_ray_executor_gives_the_same_clusters(planted, tmp_path, ray_local):
    d = planted["dir"]
    _ok([d / "X.npy", "--out", tmp_path / "local", "--executor", "local"])
    _ok([d / "X.npy", "--out", tmp_path / "ray", "--executor", "ray"])
    assert ((tmp_path / "local" / "clusters.csv").read_bytes()
            == (tmp_path / "ray" / "clusters.csv").read_bytes())


def test_bad_profiles_are_refused(planted, tmp_path, capsys):
    out = tmp_path / "out"
    _refused([tmp_path / "missing.npy", "--out", out], capsys, "missing.npy", "does not exist")
    np.save(tmp_path / "one_d.npy", np.ones(10, dtype=np.float32))
    _refused([tmp_path / "one_d.npy", "--out", out], capsys, "2-D", "(10,)")
    np.save(tmp_path / "three_d.npy", np.ones((2, 3, 4), dtype=np.float32))
    _refused([tmp_path / "three_d.npy", "--out", out], capsys, "2-D")
    (tmp_path / "junk.npy").write_text("not an array")
    _refused([tmp_path / "junk.npy", "--out", out], capsys, "not a readable .npy")
    np.save(tmp_path / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    _refused([tmp_path / "strings.npy", "--out", out], capsys, "numbers")
    X = planted["X"].copy()
    X[1234, 7] = np.nan
    np.save(tmp_path / "nan.npy", X)
    _refused([tmp_path / "nan.npy", "--out", out], capsys, "NaN", "row 1234", "column 7")
    X[1234, 7] = np.inf
    z = zarr.create_array(str(tmp_path / "inf.zarr"), shape=X.shape, chunks=(300, 50),
                          dtype="float32")
    z[:] = X
    _refused([tmp_path / "inf.zarr", "--out", out], capsys, "inf", "row 1234")
    np.save(tmp_path / "dead.npy", np.zeros((50, 8), dtype=np.float32))
    _refused([tmp_path / "dead.npy", "--out", out], capsys, "exceeds --tau")
    _no_output(out)


def test_bad_metadata_is_refused(planted, tmp_path, capsys):
    d, out = planted["dir"], tmp_path / "out"
    meta = planted["meta"]
    meta.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    _refused([d / "X.npy", "--out", out, "--components", tmp_path / "short.csv"], capsys,
             "short.csv", f"{len(meta) - 1} rows", f"{len(meta)} columns")
    meta.drop(columns=["layer"]).to_csv(tmp_path / "nolayer.csv", index=False)
    _refused([d / "X.npy", "--out", out, "--components", tmp_path / "nolayer.csv"], capsys,
             "lacks column", "layer")
    bad = meta.astype({"layer": object})
    bad.loc[3, "layer"] = "two"
    bad.to_csv(tmp_path / "badlayer.csv", index=False)
    _refused([d / "X.npy", "--out", out, "--components", tmp_path / "badlayer.csv"], capsys,
             "'layer' must be an integer", "row 3")
    _refused([d / "X.npy", "--out", out, "--components", tmp_path / "nope.csv"], capsys,
             "nope.csv", "does not exist")
    _no_output(out)


def test_bad_flags_and_existing_output(planted, tmp_path, capsys):
    d, out = planted["dir"], tmp_path / "out"
    _refused([d / "X.npy", "--out", out, "--k", 0], capsys, "--k")
    _refused([d / "X.npy", "--out", out, "--k-max", 0], capsys, "--k-max")
    _refused([d / "X.npy", "--out", out, "--edge-threshold", "high"], capsys, "--edge-threshold")
    _refused([d / "X.npy", "--out", out, "--tau", 1.5], capsys, "--tau")
    if not cupy_gpu_available():
        _refused([d / "X.npy", "--out", out, "--device", "cuda"], capsys, "--device", "CuPy")
    _no_output(out)
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _refused([d / "X.npy", "--out", out], capsys, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only a directory scalespd.cluster wrote (issue 17).
    _refused([d / "X.npy", "--out", out, "--overwrite"], capsys, "no record")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    _ok([d / "X.npy", "--out", out])
    _ok([d / "X.npy", "--out", out, "--overwrite"])
    assert (out / "clusters.csv").exists()


def test_failure_midway_leaves_no_output(planted, tmp_path, monkeypatch):
    import scalespd.graph

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the graph stage")

    monkeypatch.setattr(scalespd.graph, "build_graph", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        main([str(planted["dir"] / "X.npy"), "--out", str(out)])
    _no_output(out)


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scalespd.cluster", str(tmp_path / "nothing.npy"), "--out",
         str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "nothing.npy does not exist" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_set_changes_graph_and_spectral_fields(planted, tmp_path, capsys):
    """--set reaches every graph/spectral field (not only those with a flag), validated like
    the pipeline's YAML; the summary records the values used."""
    d = planted["dir"]
    out = tmp_path / "set"
    _ok([d / "X.npy", "--out", out, "--set", "graph.neighbours=mutual", "--set",
         "spectral.kmeans_n_init=3", "--set", "graph.edge_threshold=0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["edge_threshold"] == 0.0
    graph = json.loads((out / "graph" / "summary.json").read_text())
    assert graph["config"]["neighbours"] == "mutual"
    for bad, needle in [("graph.kk=1", "--set graph.kk: unknown key"),
                        ("graph.neighbours=maybe", "--set graph.neighbours"),
                        ("profiles.tau=0.2", "only graph.* and spectral.*"),
                        ("graph.k", "expected section.field=VALUE")]:
        _refused([d / "X.npy", "--out", tmp_path / "bad", "--set", bad], capsys, needle)
        _no_output(tmp_path / "bad")


def test_always_on_defaults_to_the_config_and_can_be_switched_off(planted, tmp_path, capsys):
    """--always-on follows SpectralConfig's default; `none` is the paper's setting (no group);
    anything else that is not a fraction is refused."""
    d = planted["dir"]
    _ok([d / "X.npy", "--out", tmp_path / "a"])
    params = json.loads((tmp_path / "a" / "summary.json").read_text())["params"]
    assert params["always_on_fraction"] == SpectralConfig().always_on_fraction
    _ok([d / "X.npy", "--out", tmp_path / "b", "--always-on", "none"])
    params = json.loads((tmp_path / "b" / "summary.json").read_text())["params"]
    assert params["always_on_fraction"] is None
    with pytest.raises(SystemExit):
        main([str(d / "X.npy"), "--out", str(tmp_path / "c"), "--always-on", "often"])
    assert "expected a fraction or 'none'" in capsys.readouterr().err
