"""The spectral pipeline stage on a run directory whose profiles hold planted mechanisms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from sklearn.metrics import adjusted_rand_score
from synthetic_spectral import planted_profiles

from scalespd.config import RunConfig, SpectralConfig
from scalespd.graph import stage as graph_stage
from scalespd.profiles.reader import CI_FILE, COMPONENTS_FILE, SUMMARY_FILE
from scalespd.profiles.store import ATTR_KEY
from scalespd.spectral import stage as spectral_stage
from scalespd.spectral.clustering import CLUSTER_COLUMNS

TAU = 0.1


def _profiles_dir(run_dir: Path, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """A profiles/ directory as the profiles stage writes it: ci.zarr, components.csv and the
    completion summary, for a planted (M, N) matrix over two "layers"."""
    rng = np.random.default_rng(seed)
    X, truth = planted_profiles(rng.integers(1, 10, size=40), 1200, n_dead=25, n_constant=2,
                                seed=seed)
    N = X.shape[1]
    half = N // 2
    pdir = run_dir / "profiles"
    pdir.mkdir(parents=True)
    arr = zarr.create_array(str(pdir / CI_FILE), shape=X.shape, chunks=(500, 64),
                            dtype="float32")
    arr[:] = X
    arr.attrs[ATTR_KEY] = {"modules": [{"module": "a", "C": half}, {"module": "b", "C": N - half}]}
    module = np.where(np.arange(N) < half, "a", "b")
    c = np.where(np.arange(N) < half, np.arange(N), np.arange(N) - half)
    table = pd.DataFrame({
        "component": np.arange(N), "name": [f"{m}:{i}" for m, i in zip(module, c, strict=True)],
        "layer": (np.arange(N) >= half).astype(int), "module": module, "module_type": "mlp_in",
        "max": X.max(0), "mean": X.mean(0), "std": X.std(0),
        "frac_active": (X > TAU).mean(0), "alive": X.max(0) > TAU,
    })
    table.to_csv(pdir / COMPONENTS_FILE, index=False)
    (pdir / SUMMARY_FILE).write_text("{}")
    table["truth"] = truth
    return X, table


def test_stage_writes_clusters_and_spectra(tmp_path, ray_local):
    _, table = _profiles_dir(tmp_path)
    cfg = RunConfig()
    graph_stage.run(cfg, tmp_path)
    info = spectral_stage.run(cfg, tmp_path)

    out = tmp_path / "spectral"
    clusters = pd.read_csv(out / "clusters.csv")
    assert list(clusters.columns) == CLUSTER_COLUMNS
    assert len(clusters) == len(table)
    dead = ~table["alive"].to_numpy()
    assert np.all(clusters.loc[dead, "cluster"] == -1)
    assert np.all(clusters.loc[dead, "connected_component"] == -1)
    alive = ~dead
    assert np.all(clusters.loc[alive, "cluster"] >= 0)
    assert adjusted_rand_score(table.loc[alive, "truth"], clusters.loc[alive, "cluster"]) >= 0.95
    assert info["n_clusters"] == clusters["cluster"].max() + 1

    spectra = json.loads((out / "spectra.json").read_text())
    assert spectra["k_max"] == cfg.spectral.k_max and spectra["pieces"]
    for rec in spectra["pieces"]:
        assert {"key", "size", "depth", "k", "eigenvalues", "solver"} <= set(rec)
        assert 1 <= rec["k"] <= cfg.spectral.k_max
        assert abs(rec["eigenvalues"][0]) < 1e-8  # λ_1 = 0 on a connected piece

    # Cluster quality without ground truth, written before spectra.json (completion marker).
    q = json.loads((out / "quality.json").read_text())
    for k in ("n_clusters_scored", "median_coherence", "median_margin", "resample", "seeds",
              "clusters", "definitions"):
        assert k in q, k
    assert (out / "quality.json").stat().st_mtime_ns <= (out / "spectra.json").stat().st_mtime_ns
    assert q["n_clusters_scored"] > 0 and q["median_margin"] > 0
    assert q["resample"]["ari_mean"] > 0.9 and q["seeds"]["ari_min"] > 0.9
    assert {"cluster", "size", "coherence", "nearest", "margin", "stability"} <= set(
        q["clusters"][0])
    assert info["resample_ari"] == q["resample"]["ari_mean"]

    # Re-running gives byte-identical output (same seed).
    before = (out / "clusters.csv").read_bytes()
    spectral_stage.run(cfg, tmp_path)
    assert (out / "clusters.csv").read_bytes() == before


def test_stage_largest_component_mode(tmp_path, ray_local):
    _profiles_dir(tmp_path, seed=1)
    cfg = RunConfig(spectral=SpectralConfig(mode="largest_component"))
    graph_stage.run(cfg, tmp_path)
    spectral_stage.run(cfg, tmp_path)
    clusters = pd.read_csv(tmp_path / "spectral" / "clusters.csv")
    alive = clusters["alive"].to_numpy()
    # Every alive non-constant column is clustered or assigned; only the 2 constant ones are out.
    assert (clusters.loc[alive, "cluster"] == -1).sum() == 2


def test_stage_refuses_a_graph_of_other_profiles(tmp_path, ray_local):
    _profiles_dir(tmp_path, seed=2)
    cfg = RunConfig()
    graph_stage.run(cfg, tmp_path)
    comp = pd.read_csv(tmp_path / "profiles" / COMPONENTS_FILE)
    comp.loc[comp["alive"].idxmax(), "alive"] = False  # profiles changed after the graph
    comp.to_csv(tmp_path / "profiles" / COMPONENTS_FILE, index=False)
    with pytest.raises(ValueError, match="not the .* alive components"):
        spectral_stage.run(cfg, tmp_path)
    assert not (tmp_path / "spectral" / "spectra.json").exists()


def test_small_run_stays_in_process_without_starting_ray(tmp_path, monkeypatch):
    """ray.executor auto (the default): a toy-sized graph and clustering never start Ray (the
    spectral stage used to start it unconditionally, ~6-8 s per run)."""
    import scalespd.raytools

    def no_ray(*_: object) -> None:
        raise AssertionError("Ray was started for a toy-sized stage")

    monkeypatch.setattr(scalespd.raytools, "ensure_ray", no_ray)  # how every stage starts Ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _profiles_dir(tmp_path)
    cfg = RunConfig()
    graph_stage.run(cfg, tmp_path)
    spectral_stage.run(cfg, tmp_path)
    info = json.loads((tmp_path / "spectral" / "spectra.json").read_text())["info"]
    assert info["executor"] == "local" and info["n_tasks"] >= 1
