"""The report stage on a real (small) pipeline run: the fake TMS+ID-like decomposition goes
through the real profiles, graph and spectral stages, then the report stage scores it.

The fake decomposition stands in for `load_decomposition` (SPD training is not what is tested
here); everything after it is the production code path, manifest timings included."""

from __future__ import annotations

import json

import pytest
from report_toyrun import F, FakeToyDecomposition, LinkCollector, expected_truth, run_config

import scalespd.train
from scalespd.run import Manifest, run_pipeline

STAGES = ["profiles", "graph", "spectral", "evaluate", "report"]


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(scalespd.train, "load_decomposition",
                        lambda run_dir: FakeToyDecomposition())


def _upstream_done(cfg, run_dir):
    """Record target and decompose as complete: the fake decomposition stands in for them."""
    run_dir.mkdir(parents=True)
    manifest = Manifest(run_dir / "manifest.json")
    for stage in ("target", "decompose"):
        manifest.mark(stage, cfg, "complete", files=[], seconds=0.5)


def _cfg(graph=None, **spectral):
    cfg = run_config()
    data = cfg.model_dump(mode="json")
    data["profiles"]["executor"] = "local"  # the fake model lives in the tests directory
    data["graph"].update(graph or {})
    data["spectral"].update(spectral)
    from scalespd.config import parse_config  # noqa: PLC0415

    return parse_config(data)


def test_stage_paper_setting_shows_failure_and_alternative(tmp_path, ray_local, fake_model):
    # The paper's setting (no always-on group); the alternative groups by frequency alone (the
    # fake identity pieces track feature pathways at correlations > 0.5) and takes them out.
    cfg = _cfg(graph={"neighbours": "mutual", "edge_threshold": 0.0}, always_on_fraction=None,
               always_on_max_corr=1.0, always_on_grouping="single", assign_labels="kmeans")
    run_dir = tmp_path / "run"
    _upstream_done(cfg, run_dir)
    manifest = run_pipeline(cfg, run_dir, stages=STAGES)
    info = manifest.data["stages"]["report"]["info"]
    assert manifest.data["stages"]["report"]["status"] == "complete"

    out = run_dir / "report"
    s = json.loads((out / "summary.json").read_text())
    for k in ("n_components", "n_alive", "n_edges", "n_connected_components", "n_clusters",
              "cluster_sizes", "layer_span_counts", "timings", "ground_truth"):
        assert k in s, k
    assert s["n_components"] == 15 and s["n_alive"] == 2 * F + 2
    assert set(s["timings"]) == {"target", "decompose", "profiles", "graph", "spectral",
                                 "evaluate"}
    assert all(v > 0 for v in s["timings"].values())
    assert info["n_alive"] == s["n_alive"] and info["mechanisms_recovered"].endswith(f"/{F}")

    # Cluster quality without ground truth (spectral/quality.json, read by the report).
    q = s["quality"]
    for k in ("n_clusters_scored", "median_coherence", "mean_coherence", "median_margin",
              "resample_ari", "seed_ari", "per_cluster"):
        assert k in q, k
    assert set(q["resample_ari"]) >= {"mean", "min"} and set(q["seed_ari"]) >= {"mean", "min"}
    assert q["n_clusters_scored"] == len(q["per_cluster"]) > 0
    assert set(q["per_cluster"][0]) == {"cluster", "size", "coherence", "nearest", "margin",
                                        "stability"}
    assert "Cluster quality (no ground truth)" in (out / "index.html").read_text()

    truth = expected_truth()
    g = s["ground_truth"]
    assert g["mechanisms_total"] == F and g["n_feature_serving"] == 2 * F
    assert sorted(g["dense"]["members"]) == truth["dense"]
    for feat in g["features"]:  # one-hot argmax finds each feature's encoder-decoder pair
        assert sorted(feat["members"]) == sorted(
            n for n, f in truth["serve"].items() if f == feat["feature"])
    # Paper setting: the identity pieces correlate with feature pathways and are not one
    # cluster of their own; the always-on grouped alternative repairs that.
    assert not g["dense"]["recovered"]
    assert g["mechanisms_recovered"] < F
    a = s["ground_truth_alternative"]
    assert a["always_on_fraction"] == cfg.spectral.alternative_always_on_fraction
    # The spectral stage wrote the second clustering; the report only read it.
    assert (run_dir / "spectral" / "clusters_alternative.csv").is_file()
    assert a["n_always_on"] == 2
    assert a["dense"]["recovered"] and a["mechanisms_recovered"] == F
    assert a["purity"] == 1.0 and a["ari"] == pytest.approx(1.0)

    parser = LinkCollector()
    parser.feed((out / "index.html").read_text())
    for link in parser.links:
        assert (out / link).is_file() and (out / link).stat().st_size > 0, link
    assert "onehot_ci.png" in parser.links and "correlation.png" in parser.links


def test_stage_always_on_setting_alternative_is_paper(tmp_path, ray_local, fake_model):
    # The fake identity pieces track feature pathways (correlation > 0.5), so only the
    # frequency rule, taking them out of the graph, makes them their own group here.
    cfg = _cfg(always_on_fraction=0.5, always_on_max_corr=1.0, always_on_grouping="single")
    run_dir = tmp_path / "run"
    _upstream_done(cfg, run_dir)
    run_pipeline(cfg, run_dir, stages=STAGES)
    s = json.loads((run_dir / "report" / "summary.json").read_text())
    assert s["spectral"]["n_always_on"] == 2
    assert s["ground_truth"]["mechanisms_recovered"] == F
    assert s["ground_truth"]["dense"]["recovered"]
    alt = s["ground_truth_alternative"]
    assert alt["always_on_fraction"] is None and "paper" in alt["label"]
    assert not alt["dense"]["recovered"]
    # Re-running the report alone rewrites the same numbers.
    before = dict(s)
    run_pipeline(cfg, run_dir, stages=["report"], force=["report"])
    after = json.loads((run_dir / "report" / "summary.json").read_text())
    before.pop("report_seconds"), after.pop("report_seconds")
    assert after == before


def test_report_rebuilds_without_torch(tmp_path, ray_local, fake_model):
    """The report only reads the run directory: it runs in a process where torch cannot be
    imported and writes the same summary."""
    import subprocess
    import sys

    cfg = _cfg()
    run_dir = tmp_path / "run"
    _upstream_done(cfg, run_dir)
    run_pipeline(cfg, run_dir, stages=STAGES)
    before = json.loads((run_dir / "report" / "summary.json").read_text())
    code = (
        "import sys\n"
        "class NoTorch:  # any `import torch` raises ImportError, as on a machine without it\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is not installed')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from pathlib import Path\n"
        "from scalespd.config import load_config\n"
        "from scalespd.report import stage\n"
        f"run_dir = Path({str(run_dir)!r})\n"
        "stage.run(load_config(run_dir / 'config.yaml'), run_dir)\n"
        "assert 'torch' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    after = json.loads((run_dir / "report" / "summary.json").read_text())
    before.pop("report_seconds"), after.pop("report_seconds")
    assert after == before
