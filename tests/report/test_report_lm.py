"""The report's language-model sections on a hand-made LM run (report_lmrun): top tokens,
contexts, layer span and composition, module statistics, ablation, HTML escaping; toy runs keep
their report."""

from __future__ import annotations

import html.parser
import json

import numpy as np
import pytest
import scipy.sparse as sp
from report_lmrun import (
    ABLATION,
    FREQUENT,
    HTML_TOKEN,
    METRICS,
    MODULES,
    PLANTED,
    RARE,
    RARE_TOKEN,
    SEQ_LEN,
    TOKENS,
    lm_config,
    write_lm_run,
)

from scalespd.report import lm as lm_mod
from scalespd.report.inputs import load_run
from scalespd.report.lm_html import visible
from scalespd.report.lm_scan import SparseSum, merge_top
from scalespd.report.stage import build_report, run


class MarkCollector(html.parser.HTMLParser):
    """The text inside every <mark> (unescaped by the parser), and every <script> body."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[str] = []
        self.scripts: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag in ("mark", "script"):
            self._in, self._buf = tag, ""

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag == self._in:
            (self.marks if tag == "mark" else self.scripts).append(self._buf)
            self._in = None

    def handle_data(self, data):  # noqa: ANN001
        if self._in:
            self._buf += data


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """The fake LM run and its report (stage.run: the production path from the run dir)."""
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    data = write_lm_run(run_dir)
    info = run(lm_config(), run_dir)
    out = run_dir / "report"
    return {"dir": run_dir, "data": data, "info": info,
            "summary": json.loads((out / "summary.json").read_text()),
            "clusters": {r["cluster"]: r for r in json.loads(
                (out / "clusters_lm.json").read_text())},
            "html": (out / "index.html").read_text(encoding="utf-8")}


def test_top_tokens_are_the_planted_ones(lm_run):
    clusters = lm_run["clusters"]
    assert set(clusters) == {0, 1, 2}  # non-singleton clusters only
    tokens = lm_run["data"]["token_ids"]
    assert clusters[0]["top_tokens"][0]["token_id"] == HTML_TOKEN
    assert clusters[0]["top_tokens"][0]["text"] == "<b>&"
    # RARE_TOKEN has a higher mean (1.0) but only 2 rows: below MIN_TOKEN_ROWS, not ranked.
    assert RARE_TOKEN not in [t["token_id"] for t in clusters[0]["top_tokens"]]
    assert [t["token_id"] for t in clusters[1]["top_tokens"]] == [3]
    top2 = clusters[2]["top_tokens"]
    assert [t["token_id"] for t in top2] == [5, 6]  # strong token first, weak one second
    for t in top2:
        assert t["n_rows"] == t["n_active"] == int((tokens == t["token_id"]).sum())
    ci = lm_run["data"]["ci"]
    members = PLANTED[2][0]
    mean5 = ci[tokens == 5][:, members].max(axis=1).mean()
    assert top2[0]["mean_activation"] == pytest.approx(mean5, rel=1e-6)
    # n_active of a cluster: rows where any member is > tau.
    assert clusters[2]["n_active"] == int(np.isin(tokens, [5, 6]).sum())


def test_contexts_highlight_the_token_within_its_sequence(lm_run):
    c0 = lm_run["clusters"][0]["contexts"]
    assert len(c0) == lm_mod.N_CONTEXTS
    # Largest activation first: the two RARE_TOKEN rows (1.0), then HTML_TOKEN rows.
    assert sorted(c["row"] for c in c0[:2]) == [100, 700]
    assert [c["token"] for c in c0[2:]] == ["<b>&", "<b>&"]
    assert [c["activation"] for c in c0] == sorted((c["activation"] for c in c0), reverse=True)
    tokens = lm_run["data"]["token_ids"]
    for c in c0:
        r, pos = c["row"], c["position"]
        assert c["before"] == [TOKENS[t] for t in tokens[r - min(pos, 10):r]]
        assert c["after"] == [TOKENS[t] for t in tokens[r + 1:r + 1 + min(3, SEQ_LEN - 1 - pos)]]
        assert c["seq_id"] == r // SEQ_LEN
    for c in lm_run["clusters"][2]["contexts"]:
        assert c["token"] == TOKENS[5]  # the strong token's rows outrank the weak token's


def test_context_window_stops_at_sequence_edges(lm_run):
    art = load_run(lm_run["dir"])
    assert art.lm is not None
    first = lm_mod.context_window(art.lm, SEQ_LEN)  # position 0 of sequence 1
    assert first["before"] == [] and first["position"] == 0 and len(first["after"]) == 3
    last = lm_mod.context_window(art.lm, 2 * SEQ_LEN - 1)  # last position of sequence 1
    assert last["after"] == [] and len(last["before"]) == 10


def test_span_composition_and_summary(lm_run):
    s = lm_run["summary"]["lm"]
    assert s["n_non_singleton"] == 3 and s["n_multi_layer"] == 2
    assert s["frac_multi_layer"] == pytest.approx(2 / 3)
    assert (s["n_attention_only"], s["n_mlp_only"], s["n_mixed"]) == (1, 1, 1)
    assert s["composition_counts"] == {"attention-only": 1, "mlp-only": 1, "mixed": 1}
    c = lm_run["clusters"]
    assert (c[0]["layer_span"], c[0]["composition"], c[0]["layers"]) == (2, "mixed", [0, 1])
    assert (c[1]["layer_span"], c[1]["composition"]) == (1, "attention-only")
    assert c[1]["modules"] == {MODULES[0][0]: 2}
    assert s["n_rows"] == len(lm_run["data"]["token_ids"]) and s["n_sequences"] == 40
    # Model-level metrics as they are; per-module families summed, and shown per module.
    assert s["decomposition"] == {
        **{k: v for k, v in METRICS.items() if k.startswith(("ce/", "kl/"))},
        "l0/total": 1.5, "alive_data/total": 2.0}
    assert s["modules"]["model.layers.0.mlp.down_proj"]["l0"] == 1.5


def test_module_statistics(lm_run):
    mods = lm_run["summary"]["lm"]["modules"]
    assert list(mods) == [m[0] for m in MODULES]
    q1 = mods[MODULES[2][0]]  # layer-1 q_proj: cluster 3 (token 9), FREQUENT, RARE, one dead
    assert (q1["C"], q1["alive"], q1["dead"], q1["survival"]) == (4, 3, 1, 0.75)
    assert (q1["rare"], q1["regular"], q1["frequent"]) == (1, 1, 1)
    assert q1["median_distinct_tokens"] == 1.0  # token 9 -> 1, RARE -> 1, FREQUENT -> ~19
    down0 = mods[MODULES[1][0]]  # layer-0 down_proj:1 fires on tokens 5 and 6 only
    assert (down0["alive"], down0["median_distinct_tokens"]) == (1, 2.0)
    tokens = lm_run["data"]["token_ids"]
    n5, n6 = (tokens == 5).sum(), (tokens == 6).sum()
    p = np.array([n5, n6]) / (n5 + n6)
    assert down0["median_token_entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert FREQUENT != RARE


def test_ablation_section_matches_the_json(lm_run):
    ab = lm_run["summary"]["lm"]["ablation"]
    assert (ab["n_tested"], ab["n_beats_95"], ab["n_random"]) == (2, 1, 50)
    assert lm_run["info"]["ablation_beats_95"] == "1/2"
    assert lm_run["clusters"][0]["ablation"] == ABLATION["clusters"][0]
    assert lm_run["clusters"][1]["ablation"] == ABLATION["clusters"][2]
    page = lm_run["html"]
    assert "1 of 2 clusters beat ≥ 95% of random same-size sets" in page
    assert "42" in page and "Ablation" in page
    assert "100 pct (yes)" in page and "30 pct (no)" in page and "– pct (untested)" in page


def test_html_escapes_tokens_and_stays_offline(lm_run):
    page = lm_run["html"]
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page
    p = MarkCollector()
    p.feed(page)
    assert "<b>&" in p.marks and TOKENS[5] in p.marks
    assert len(p.scripts) == 1 and "src" not in p.scripts[0] and "http" not in page.lower()
    assert "id='lm-clusters'" in page and "Decomposition quality" in page
    assert "ce/ci_masked" in page and "+0.5" in page  # CE increase over the target
    assert visible(" the\n", spaces=True) == "␣the⏎" and visible("a\x00") == "a\\u0000"


def test_block_size_does_not_change_results(tmp_path, lm_run):
    art = load_run(lm_run["dir"])
    from scalespd.report.stats import cluster_table  # noqa: PLC0415

    alive = art.alive
    table = cluster_table(art.clusters, alive["layer"].to_numpy(), alive["module_type"].to_numpy(),
                          alive["module"].to_numpy(), alive["name"].to_numpy())
    small = lm_mod.lm_report(lm_config(), art, table, tmp_path, block_rows=37)
    assert small["summary"] == lm_run["summary"]["lm"]
    assert json.loads(json.dumps(small["clusters"])) == list(lm_run["clusters"].values())


def test_sparse_sum_and_merge_top():
    rng = np.random.default_rng(0)
    parts = [sp.random(30, 7, density=0.2, format="csr", random_state=i) for i in range(25)]
    acc = SparseSum((30, 7), np.float64, merge_nnz=5)
    for m in parts:
        acc.add(m)
    np.testing.assert_allclose(acc.result().toarray(), sum(m.toarray() for m in parts))
    data = rng.random((100, 3))
    data[[10, 40], 1] = 2.0  # a tie: the earlier row wins
    vals, rows = np.full((3, 3), -np.inf), np.full((3, 3), -1)
    for r0 in range(0, 100, 9):
        vals, rows = merge_top(vals, rows, data[r0:r0 + 9], r0)
    want = np.argsort(-data, axis=0, kind="stable")[:3]
    np.testing.assert_array_equal(rows, want)
    assert rows[:2, 1].tolist() == [10, 40]


def test_missing_tokens_json_and_ablation(tmp_path):
    write_lm_run(tmp_path, ablation=False, tokens=False, metrics=False)
    summary = run(lm_config(), tmp_path)
    s = json.loads((tmp_path / "report" / "summary.json").read_text())["lm"]
    assert "ablation" not in s and s["decomposition"] == {} and not s["tokens_decoded"]
    assert "ablation_beats_95" not in summary
    top = json.loads((tmp_path / "report" / "clusters_lm.json").read_text())
    assert top[0]["top_tokens"][0]["text"].startswith("[")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "tokens are shown as [id]" in page and "Decomposition quality" not in page


def test_toy_inputs_zarr_is_not_an_lm_run(tmp_path):
    """inputs.zarr with the toys' `x` array: no LM sections, the report as before."""
    import zarr  # noqa: PLC0415

    write_lm_run(tmp_path)
    zarr.open_group(str(tmp_path / "profiles" / "inputs.zarr"), mode="w").create_array(
        "x", shape=(4, 2), dtype="float32")
    art = load_run(tmp_path)
    assert art.lm is None
    summary = build_report(lm_config(), art, tmp_path / "report")
    assert "lm" not in summary
    assert not (tmp_path / "report" / "clusters_lm.json").exists()
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<script" not in page and "<h2>Clusters</h2>" in page


def test_inputs_that_do_not_match_the_profiles_are_refused(tmp_path):
    import zarr  # noqa: PLC0415

    from scalespd.report.inputs import ReportInputError  # noqa: PLC0415

    write_lm_run(tmp_path)
    group = zarr.open_group(str(tmp_path / "profiles" / "inputs.zarr"), mode="r+")
    del group["positions"]
    with pytest.raises(ReportInputError, match=r"not \['positions'\]"):
        load_run(tmp_path)
    group.create_array("positions", shape=(10,), dtype="int32")
    with pytest.raises(ReportInputError, match="three 1-D arrays of equal length"):
        load_run(tmp_path)
    for name in ("token_ids", "seq_ids", "positions"):
        del group[name]
        group.create_array(name, shape=(10,), dtype="int32")
    art = load_run(tmp_path)
    with pytest.raises(ReportInputError, match="inputs.zarr has 10 rows"):
        build_report(lm_config(), art, tmp_path / "report")


def test_cluster_quality_joins_the_lm_records(tmp_path):
    """spectral/quality.json (the spectral stage's, hand-made here) reaches summary["quality"],
    the quality section and each LM cluster record; a cluster it lacks gets nulls."""
    write_lm_run(tmp_path, ablation=False)
    recs = [{"cluster": 0, "size": 2, "n_scored": 2, "coherence": 0.8, "nearest": 0.1,
             "margin": 0.7, "stability": 1.0},
            {"cluster": 1, "size": 2, "n_scored": 2, "coherence": 0.6, "nearest": 0.0,
             "margin": 0.6, "stability": 0.5}]
    doc = {"n_rows_sample": 100, "n_clusters_scored": 2, "median_coherence": 0.7,
           "mean_coherence": 0.7, "median_margin": 0.65, "median_stability": 0.75,
           "resample": {"repeats": 1, "ari_mean": 0.9, "ari_min": 0.9},
           "seeds": {"seeds": [0, 1], "ari_mean": 1.0, "ari_min": 1.0}, "clusters": recs}
    (tmp_path / "spectral" / "quality.json").write_text(json.dumps(doc))
    run(lm_config(), tmp_path)
    q = json.loads((tmp_path / "report" / "summary.json").read_text())["quality"]
    assert q["resample_ari"]["mean"] == 0.9 and q["seed_ari"]["min"] == 1.0
    assert [r["cluster"] for r in q["per_cluster"]] == [0, 1]
    lm = {r["cluster"]: r for r in json.loads(
        (tmp_path / "report" / "clusters_lm.json").read_text())}
    assert (lm[0]["coherence"], lm[0]["margin"], lm[0]["stability"]) == (0.8, 0.7, 1.0)
    assert lm[2]["coherence"] is None and lm[2]["stability"] is None
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Cluster quality (no ground truth)" in page and "0.8 / 0.7 / 1" in page
