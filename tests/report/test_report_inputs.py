"""Reading earlier stages' outputs: formats the report accepts and clear errors for bad ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from report_toyrun import write_profiles

from scalespd.errors import StageInputError
from scalespd.report.inputs import (
    ReportInputError,
    load_run,
    read_profile_columns,
    read_spectra,
)


def _clusters_csv(run_dir, comps: pd.DataFrame, cluster=None) -> None:
    (run_dir / "spectral").mkdir(parents=True, exist_ok=True)
    df = comps[["component", "name", "layer", "module", "alive"]].copy()
    df["connected_component"] = np.where(df["alive"], 0, -1)
    df["cluster"] = np.where(df["alive"], 0, -1) if cluster is None else cluster
    df.to_csv(run_dir / "spectral" / "clusters.csv", index=False)


def test_load_run_without_graph(tmp_path):
    comps = write_profiles(tmp_path / "profiles", n_per_feature=10)
    _clusters_csv(tmp_path, comps)
    art = load_run(tmp_path)
    assert art.graph is None and art.spectra == [] and art.manifest == {}
    assert art.alive_ids.tolist() == comps.index[comps["alive"]].tolist()
    assert (art.clusters == 0).all() and len(art.clusters) == comps["alive"].sum()


def test_missing_and_malformed_inputs(tmp_path):
    # components.csv is read by the profiles stage's own reader (a StageInputError too).
    with pytest.raises(StageInputError, match="components.csv does not exist"):
        load_run(tmp_path)
    comps = write_profiles(tmp_path / "profiles", n_per_feature=10)
    with pytest.raises(ReportInputError, match="clusters.csv is missing"):
        load_run(tmp_path)
    # a clusters.csv for a different set of components
    _clusters_csv(tmp_path, comps.iloc[:-1])
    with pytest.raises(ReportInputError, match="one row per component"):
        load_run(tmp_path)
    # a column missing
    _clusters_csv(tmp_path, comps)
    df = pd.read_csv(tmp_path / "spectral" / "clusters.csv").drop(columns=["cluster"])
    df.to_csv(tmp_path / "spectral" / "clusters.csv", index=False)
    with pytest.raises(ReportInputError, match=r"missing columns \['cluster'\]"):
        load_run(tmp_path)
    # alive flags disagree
    bad = comps.copy()
    bad.loc[0, "alive"] = not bad.loc[0, "alive"]
    _clusters_csv(tmp_path, bad)
    with pytest.raises(ReportInputError, match="'alive' differs"):
        load_run(tmp_path)
    # duplicate component ids
    dup = comps.copy()
    dup.loc[1, "component"] = 0
    dup.to_csv(tmp_path / "profiles" / "components.csv", index=False)
    with pytest.raises(StageInputError, match="exactly once"):
        load_run(tmp_path)


def test_read_spectra_formats(tmp_path):
    d = tmp_path / "spectral"
    d.mkdir()
    # the spectral stage's document
    (d / "spectra.json").write_text(json.dumps({
        "info": {"n_always_on": 2},
        "pieces": [{"key": 3, "size": 7, "depth": 0, "k": 2, "solver": "dense",
                    "eigenvalues": [0, 0.1, 0.9]}]}))
    assert read_spectra(d) == [{"component": 3, "depth": 0, "size": 7,
                                "eigenvalues": [0.0, 0.1, 0.9], "k": 2}]
    # a mapping component -> record with "K"
    (d / "spectra.json").write_text(json.dumps({"5": {"size": 4, "eigenvalues": [0, 1],
                                                      "K": 1}}))
    assert read_spectra(d)[0]["component"] == "5" and read_spectra(d)[0]["k"] == 1
    (d / "spectra.json").write_text(json.dumps([{"size": 4}]))
    with pytest.raises(ReportInputError, match="eigenvalues"):
        read_spectra(d)


def test_read_profile_columns_any_order(tmp_path):
    write_profiles(tmp_path / "profiles", n_per_feature=10)
    import zarr

    full = zarr.open_array(str(tmp_path / "profiles" / "ci.zarr"), mode="r")[:]
    cols = np.array([7, 0, 12, 3])
    got = read_profile_columns(tmp_path / "profiles" / "ci.zarr", cols, max_rows=25)
    np.testing.assert_array_equal(got, full[:25][:, cols])
