"""build_report on hand-made artifacts: summary.json keys and values, plots, a parseable
index.html that references only files that exist."""

from __future__ import annotations

import json

import numpy as np
import pytest
from report_toyrun import (
    DEC_OF,
    F,
    LinkCollector,
    fake_onehot_ci,
    knn_graph,
    run_config,
    write_profiles,
)

from scalespd.report.inputs import RunArtifacts, read_profile_columns
from scalespd.report.stage import build_report, heatmap_sample
from scalespd.targets import ground_truth

REQUIRED = ("n_components", "n_alive", "n_edges", "n_connected_components", "n_clusters",
            "cluster_sizes", "layer_span_counts", "timings")
GT_KEYS = ("mechanisms_total", "mechanisms_recovered", "purity", "ari", "dense")


def _clusters_for(names: list[str], identity_spread: bool) -> np.ndarray:
    """Feature f -> cluster f (encoder f + its decoder); identity pieces either spread over the
    clusters of features 0 and 3 (the paper's failure) or together in cluster F."""
    out = []
    for n in names:
        path, c = n.split(":")
        c = int(c)
        if path == "linear1":
            out.append(c)
        elif path == "linear2":
            out.append(DEC_OF.index(c))
        else:
            out.append((0 if c == 0 else 3) if identity_spread else F)
    return np.array(out)


@pytest.fixture
def artifacts(tmp_path):
    comps = write_profiles(tmp_path / "profiles")
    comps = comps.set_index("component", drop=False)
    alive_ids = comps.index[comps["alive"]].to_numpy()
    names = comps.loc[alive_ids, "name"].tolist()
    X = read_profile_columns(tmp_path / "profiles" / "ci.zarr", alive_ids, 10_000)
    art = RunArtifacts(
        components=comps,
        alive_ids=alive_ids,
        clusters=_clusters_for(names, identity_spread=True),
        connected=np.zeros(len(alive_ids), dtype=np.int64),
        graph=knn_graph(X, k=3),
        spectra=[{"component": 0, "size": len(alive_ids), "depth": 0, "k": 4,
                  "eigenvalues": [0.0, 0.01, 0.02, 0.03, 0.6, 0.7, 0.8]},
                 {"component": 0, "size": 3, "depth": 1, "k": 1, "eigenvalues": [0.0, 0.9, 1]}],
        profiles_path=tmp_path / "profiles" / "ci.zarr",
        manifest={"stages": {"graph": {"status": "complete", "seconds": 1.5},
                             "spectral": {"status": "complete", "seconds": 0.25}}},
        graph_threshold=0.1,
    )
    return art, names


def test_build_report_with_ground_truth_and_alternative(tmp_path, artifacts):
    art, names = artifacts
    cfg = run_config()
    onehot, _ = fake_onehot_ci()
    art.truth = ground_truth(cfg.target)  # what the evaluate stage writes
    alt = {"label": "always-on grouped", "always_on_fraction": 0.5,
           "clusters": _clusters_for(names, identity_spread=False)}
    out = tmp_path / "report"
    summary = build_report(cfg, art, out, onehot=onehot, alternative=alt)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for k in REQUIRED:
        assert k in on_disk, k
    assert on_disk["n_components"] == 15 and on_disk["n_alive"] == 2 * F + 2
    assert on_disk["n_clusters"] == F
    assert on_disk["cluster_sizes"] == [3, 3, 2, 2]
    assert on_disk["layer_span_counts"] == {"2": 2, "3": 2}
    assert on_disk["timings"] == {"graph": 1.5, "spectral": 0.25}
    assert on_disk["n_edges"] == art.graph.nnz // 2
    assert on_disk["correlation"]["n_columns_sampled"] == 2 * F + 2
    assert on_disk["correlation"]["mean_corr_within"] > on_disk["correlation"][
        "mean_corr_between"]

    g = on_disk["ground_truth"]
    for k in GT_KEYS:
        assert k in g, k
    # Paper-style clustering: identity spread over 2 feature clusters -> those 2 not recovered.
    assert g["mechanisms_total"] == F and g["mechanisms_recovered"] == F - 2
    assert g["dense"]["n_clusters_holding_dense"] == 2 and not g["dense"]["recovered"]
    assert g["feature_layers"] == [0, 2]
    assert g["expected_dense"] == 2 and g["expected_alive"] == 2 * F + 2
    a = on_disk["ground_truth_alternative"]
    assert a["mechanisms_recovered"] == F and a["purity"] == 1.0
    assert a["ari"] == pytest.approx(1.0) and a["dense"]["recovered"]
    assert a["always_on_fraction"] == 0.5 and a["n_clusters"] == F + 1

    # index.html parses and references only files that exist (and are non-empty).
    page = (out / "index.html").read_text()
    parser = LinkCollector()
    parser.feed(page)
    assert parser.links
    for link in parser.links:
        assert "://" not in link, link  # offline: no external resources
        assert (out / link).is_file() and (out / link).stat().st_size > 0, link
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"correlation.png", "spectra.png", "cluster_sizes.png", "layer_span.png",
                    "composition.png", "onehot_ci.png"}
    assert all(link in parser.links for link in pngs)
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Both ground-truth tables appear, the failure note too.
    assert "always-on grouped" in page and "spread over 2 clusters" in page
    assert "hidden_layers.0:1" in page


def test_build_report_without_ground_truth_or_profiles(tmp_path, artifacts):
    """A non-toy run: no one-hot CI; no ci.zarr -> no correlation section; still complete."""
    art, _ = artifacts
    art.profiles_path = None
    art.graph = None
    art.spectra = []
    out = tmp_path / "report"
    summary = build_report(run_config(), art, out)
    assert "ground_truth" not in summary and "correlation" not in summary
    assert summary["n_edges"] is None
    parser = LinkCollector()
    parser.feed((out / "index.html").read_text())
    for link in parser.links:
        assert (out / link).is_file(), link
    assert not (out / "correlation.png").exists() and not (out / "spectra.png").exists()


def test_table_caps(tmp_path, artifacts):
    art, _ = artifacts
    out = tmp_path / "report"
    build_report(run_config(max_table_rows=2, max_members_listed=1), art, out)
    page = (out / "index.html").read_text()
    assert "Showing the 2 largest of 4 clusters" in page
    assert "(+2)" in page  # a 3-member cluster lists 1 name and the count of the rest
    assert len(json.loads((out / "clusters.json").read_text())) == 4


def test_heatmap_sample_takes_whole_clusters_largest_first():
    clusters = np.array([0, 1, 1, 2, 2, 2, -1, 3])
    assert heatmap_sample(clusters, 100).tolist() == [3, 4, 5, 1, 2, 0, 7, 6]
    assert heatmap_sample(clusters, 5).tolist() == [3, 4, 5, 1, 2]
    assert heatmap_sample(clusters, 4).tolist() == [3, 4, 5, 0]  # size 2 does not fit, 1 does
    assert heatmap_sample(clusters, 2).tolist() == [3, 4]  # part of the largest cluster
