"""index.html: one self-contained page (inline CSS, PNGs referenced relatively next to it),
readable offline by opening the file. No JavaScript, except the inline cluster filter of the
language-model sections (`scalespd.report.lm_html`)."""

from __future__ import annotations

import html
from typing import Any

from scalespd import storage
from scalespd.config import RunConfig, config_to_yaml

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1, h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.members { font-family: monospace; font-size: 11px; max-width: 600px; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: .5em 1em; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, dict):
        return ", ".join(f"{k}: {_num(v)}" for k, v in x.items())
    if isinstance(x, list):
        return ", ".join(_num(v) for v in x)
    return str(x)


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """rows hold already-escaped HTML when raw, else plain values."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _status(s: str) -> str:
    cls = "ok" if s == "recovered" else "bad"
    return f'<span class="{cls}">{_e(s)}</span>'


def _key_numbers(summary: dict[str, Any]) -> str:
    keys = [
        ("n_components", "subcomponents"), ("n_alive", "alive"), ("n_dead", "dead"),
        ("n_edges", "k-NN edges"), ("graph_threshold", "edge threshold"),
        ("n_connected_components", "connected components"), ("n_isolated", "isolated nodes"),
        ("largest_connected_component", "largest connected component"),
        ("n_clusters", "clusters"), ("n_singletons", "singleton clusters"),
        ("n_non_singleton", "non-singleton clusters"),
        ("largest_cluster_sizes", "largest cluster sizes"),
        ("frac_multi_layer", "fraction of non-singleton clusters spanning ≥ 2 layers"),
        ("n_span_all_layers", "non-singleton clusters spanning every layer"),
        ("layer_span_counts", "layer span → non-singleton clusters"),
        ("composition_counts", "composition of non-singleton clusters"),
        ("n_unclustered_alive", "alive but unclustered"),
        ("n_zero_variance", "zero-variance (constant) alive columns"),
    ]
    rows = [[label, _num(summary.get(k))] for k, label in keys if k in summary]
    for section, label in (("spectral", "spectral"), ("edges", "k-NN graph"),
                           ("correlation", "profile correlation")):
        for k, v in (summary.get(section) or {}).items():
            rows.append([f"{label}: {k}", _num(v)])
    return _table(["quantity", "value"], rows)


def _gt_overview(tables: list[dict[str, Any]]) -> str:
    """Scores of every clustering side by side (configured first)."""
    fields = [
        ("mechanisms recovered", lambda s: f"{s['mechanisms_recovered']} / "
                                           f"{s['mechanisms_total']}"),
        ("recoverable from this decomposition", lambda s: s["mechanisms_recoverable"]),
        ("mechanism status counts", lambda s: _num(s["mechanism_status_counts"])),
        ("purity", lambda s: _num(s["purity"])),
        ("ARI", lambda s: _num(s["ari"])),
        ("clusters", lambda s: s.get("n_clusters")),
        ("feature-serving / dense / inactive / tied", lambda s: f"{s['n_feature_serving']} / "
                                                                f"{s['n_dense']} / "
                                                                f"{s['n_inactive']} / "
                                                                f"{s['n_ties']}"),
        ("expected alive / expected dense", lambda s: f"{s.get('expected_alive')} / "
                                                      f"{s.get('expected_dense')}"),
        ("dense: clusters holding them", lambda s: (s["dense"] or {}).get(
            "n_clusters_holding_dense", "–")),
        ("dense: best cluster (size, dense share)", lambda s: "–" if not s["dense"] else
            f"#{s['dense']['cluster']} (size {s['dense']['size']}, "
            f"{s['dense']['n_dense_in_cluster']} dense, purity {s['dense']['purity']:.3g})"),
        ("dense cluster recovered exactly", lambda s: "–" if not s["dense"] else
            ("yes" if s["dense"]["recovered"] else "no")),
    ]
    header = ["", *[t["title"] for t in tables]]
    rows = [[name, *[str(f(t["score"])) for t in tables]] for name, f in fields]
    return _table(header, rows)


def _gt_features(tables: list[dict[str, Any]]) -> str:
    """feature -> its subcomponents -> cluster(s) -> recovered, one column pair per clustering."""
    first = tables[0]["score"]
    header = ["feature", "subcomponents (one-hot argmax)", "layers"]
    for t in tables:
        header += [f"cluster(s): {t['title']}", "status"]
    rows = []
    for i, feat in enumerate(first["features"]):
        row = [_e(feat["feature"]), f'<span class="members">{_e(", ".join(feat["members"]))}'
                                    f"</span>", _e(feat["layers"])]
        for t in tables:
            f2 = t["score"]["features"][i]
            row += [_e(sorted(set(f2["clusters"]))), _status(f2["status"])]
        rows.append(row)
    if first["dense"]:
        row = ["dense", f'<span class="members">{_e(", ".join(first["dense"]["members"]))}'
                        f"</span>", ""]
        for t in tables:
            d = t["score"]["dense"]
            row += [_e(f"{d['n_clusters_holding_dense']} cluster(s), best #{d['cluster']}"),
                    _status("recovered" if d["recovered"] else "spread" if
                            d["n_clusters_holding_dense"] > 1 else "merged")]
        rows.append(row)
    return _table(header, rows, raw=True)


def _cluster_rows(table: list[dict[str, Any]], max_rows: int, max_members: int) -> str:
    rows = []
    for r in table[:max_rows]:
        members = r["members"][:max_members]
        more = len(r["members"]) - len(members)
        text = ", ".join(members) + (f" … (+{more})" if more > 0 else "")
        rows.append([_e(r["cluster"]), _e(r["size"]), _e(r["layers"]), _e(r["composition"]),
                     _e(", ".join(f"{k}×{v}" for k, v in r["modules"].items())),
                     f'<span class="members">{_e(text)}</span>'])
    note = ""
    if len(table) > max_rows:
        note = (f"<p>Showing the {max_rows} largest of {len(table)} clusters; all are in "
                f'<a href="clusters.json">clusters.json</a>.</p>')
    return note + _table(["cluster", "size", "layers", "composition", "modules", "members"],
                         rows, raw=True)


def _quality(q: dict[str, Any], max_rows: int) -> str:
    """The "Cluster quality (no ground truth)" section from summary["quality"]."""
    res, seeds = q["resample_ari"], q["seed_ari"]
    rows = [
        ["non-singleton clusters scored", _num(q["n_clusters_scored"])],
        ["coherence: median / mean (mean pairwise Pearson r of members, first "
         f"{_num(q.get('n_rows_sample'))} rows)",
         f"{_num(q['median_coherence'])} / {_num(q['mean_coherence'])}"],
        ["margin: median (coherence − strongest outside link in the top-k lists)",
         _num(q["median_margin"])],
        ["stability: median (best Jaccard overlap with a cluster of a row half, mean over "
         "halves)", _num(q.get("median_stability"))],
        [f"ARI between random row halves: mean / min (repeats: {_num(res.get('repeats'))})",
         "off" if not res.get("repeats") else f"{_num(res['mean'])} / {_num(res['min'])}"],
        [f"ARI between seeds: mean / min (clusterings: {_num(seeds.get('n_clusterings'))})",
         "off" if seeds.get("mean") is None else f"{_num(seeds['mean'])} / "
                                                 f"{_num(seeds['min'])}"],
    ]
    per = q["per_cluster"]
    note = ""
    if len(per) > max_rows:
        note = (f"<p>Showing the {max_rows} largest of {len(per)} non-singleton clusters; all "
                "are in <a href='summary.json'>summary.json</a>.</p>")
    table = _table(["cluster", "size", "coherence", "nearest outside", "margin", "stability"],
                   [[r["cluster"], r["size"], _num(r["coherence"]), _num(r["nearest"]),
                     _num(r["margin"]), _num(r["stability"])] for r in per[:max_rows]])
    return ("<h2>Cluster quality (no ground truth)</h2>"
            "<p>How tight, separated and reproducible the clusters are, from the profiles "
            "alone (spectral/quality.json). Stability ≥ 0.75 is commonly read as a stable "
            "cluster, ≤ 0.5 as one that dissolves.</p>"
            + _table(["quantity", "value"], rows) + note + table)


def render_html(
    cfg: RunConfig,
    summary: dict[str, Any],
    table: list[dict[str, Any]],
    figures: list[dict[str, str]],
    gt_tables: list[dict[str, Any]],
    lm: dict[str, Any] | None = None,
) -> str:
    """lm: the language-model sections' data (`scalespd.report.lm.lm_report`), or None."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>scalespd report: {_e(cfg.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>scalespd report: {_e(cfg.name)}</h1>",
        f"<p>Target: <b>{_e(cfg.target.kind)}</b>. Files: <a href='summary.json'>summary.json"
        "</a>, <a href='clusters.json'>clusters.json</a>.</p>",
        "<h2>Stage timings</h2>",
        _table(["stage", "seconds"],
               [[s, _num(v)] for s, v in summary["timings"].items()]
               + [["report", _num(summary.get("report_seconds"))]]),
        "<h2>Summary</h2>", _key_numbers(summary),
    ]
    if summary.get("quality"):
        parts.append(_quality(summary["quality"], cfg.report.max_table_rows))
    if gt_tables:
        parts += ["<h2>Ground truth</h2>",
                  "<p>Each alive subcomponent is mapped to the input feature with its largest "
                  "causal importance on one-hot inputs; <i>dense</i> ones (important on more "
                  f"than {cfg.report.dense_fraction:.0%} of one-hot inputs, or on any of them "
                  "in a matrix that is one dense mechanism by construction: TMS identity, "
                  "ResidMLP mlp_out) form one expected mechanism. A feature mechanism is "
                  "<i>recovered</i> when its subcomponents form exactly one cluster with nothing "
                  "else in it and cover every feature-serving layer.</p>"]
        dense = gt_tables[0]["score"]["dense"]
        if dense and dense["n_clusters_holding_dense"] > 1:
            parts.append(
                f"<p class='note'>The {dense['n_dense']} dense subcomponents are spread over "
                f"{dense['n_clusters_holding_dense']} clusters in the configured clustering "
                "(the clustering paper's TMS 5-2+ID failure: identity distributed over the "
                "feature clusters).</p>")
        parts += [_gt_overview(gt_tables), "<h3>Per feature</h3>", _gt_features(gt_tables)]
    if lm is not None:
        from scalespd.report.lm_html import render_lm  # noqa: PLC0415  (it imports this)

        parts.append(render_lm(cfg, lm))
    parts.append("<h2>Plots</h2>")
    for f in figures:
        parts.append(f"<figure><img src='{_e(f['file'])}' alt='{_e(f['caption'])}'>"
                     f"<figcaption>{_e(f['caption'])}</figcaption></figure>")
    if lm is None:  # for LMs the LM cluster table above has these columns and more
        parts += ["<h2>Clusters</h2>",
                  _cluster_rows(table, cfg.report.max_table_rows, cfg.report.max_members_listed)]
    parts += ["<h2>Alive subcomponents per module</h2>",
              _table(["module", "alive", "dead"],
                     [[m, v["alive"], v["dead"]] for m, v in summary["alive_per_module"].items()]),
              "<h2>Configuration</h2>", f"<pre>{_e(config_to_yaml(cfg))}</pre>",
              "</body></html>"]
    return "\n".join(parts)


def write_html(
    path: storage.PathLike,
    cfg: RunConfig,
    summary: dict[str, Any],
    table: list[dict[str, Any]],
    figures: list[dict[str, str]],
    gt_tables: list[dict[str, Any]],
    lm: dict[str, Any] | None = None,
) -> None:
    storage.write_text_atomic(path, render_html(cfg, summary, table, figures, gt_tables, lm))
