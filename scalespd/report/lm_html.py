"""The language-model sections of index.html (`scalespd.report.lm` results).

Token texts come from the tokenizer and can hold anything (markup, spaces, newlines, control
characters): every one is made visible (`visible`) and then HTML-escaped. The cluster table has
a plain inline-JS text filter (no external script: the report must work offline).
"""

from __future__ import annotations

import unicodedata
from typing import Any

from scalespd.config import RunConfig
from scalespd.report.html import _e, _num, _table

# Whitespace shown as visible marks; other control / format characters as \\uXXXX.
_VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥"}

_FILTER_JS = """<script>
function lmFilter(q) {
  q = q.toLowerCase();
  for (const r of document.querySelectorAll('#lm-clusters tbody tr')) {
    r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none';
  }
}
</script>"""

_CSS = """<style>
.tok { font-family: monospace; background: #f1f3f5; padding: 0 2px; white-space: pre; }
.ctx { font-family: monospace; font-size: 12px; white-space: pre-wrap; display: block; }
.ctx mark { background: #ffd54f; }
#lm-filter { width: 30em; padding: 4px; margin: .5em 0; }
</style>"""


def visible(text: str, spaces: bool = False, empty: str = "∅") -> str:
    """A token's text with newlines/tabs as marks, other control or invisible characters as
    \\uXXXX, and (spaces=True) spaces as ␣ so that " the" and "the" differ; `empty` for "".
    Not escaped."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ch == " " and spaces:
            out.append("␣")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or empty


def _tok(text: str) -> str:
    return f'<span class="tok">{_e(visible(text, spaces=True))}</span>'


def _context(c: dict[str, Any]) -> str:
    before = _e(visible("".join(c["before"]), empty=""))
    after = _e(visible("".join(c["after"]), empty=""))
    return (f'<span class="ctx">{before}<mark>{_e(visible(c["token"]))}</mark>{after} '
            f'<small>({c["activation"]:.2f}; seq {c["seq_id"]}, pos {c["position"]})</small>'
            "</span>")


def _ablation_line(ab: dict[str, Any]) -> str:
    return (f"{ab['n_beats_95']} of {ab['n_tested']} clusters beat ≥ 95% of random same-size "
            "sets")


def _overview(lm: dict[str, Any]) -> str:
    rows = [
        ["profile rows (token positions)", lm["n_rows"]],
        ["sequences", lm["n_sequences"]],
        ["distinct tokens", lm["n_distinct_tokens"]],
        ["non-singleton clusters", lm["n_non_singleton"]],
        ["spanning ≥ 2 layers", f"{lm['n_multi_layer']} ({_pct(lm['frac_multi_layer'])})"],
        ["attention-only / MLP-only / mixed",
         f"{lm['n_attention_only']} / {lm['n_mlp_only']} / {lm['n_mixed']}"],
    ]
    other = {k: v for k, v in lm["composition_counts"].items()
             if k not in ("attention-only", "mlp-only", "mixed") and v}
    if other:
        rows.append(["other compositions", _num(other)])
    if "ablation" in lm:
        rows.append(["ablation", _ablation_line(lm["ablation"])])
    return _table(["quantity", "value"], [[k, _num(v)] for k, v in rows])


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _metrics(metrics: dict[str, Any]) -> str:
    """Decomposition quality; CE rows also show the increase over the target's CE."""
    base = metrics.get("ce/target")
    rows = []
    for k, v in metrics.items():
        delta = ""
        if (k.startswith("ce/") and k != "ce/target" and isinstance(base, int | float)
                and isinstance(v, int | float)):
            delta = f"{v - base:+.4g}"
        rows.append([k, _num(v), delta])
    return _table(["metric", "value", "Δ vs ce/target"], rows)


def _modules(modules: dict[str, dict[str, Any]]) -> str:
    header = ["module", "layer", "type", "C", "alive", "survival", "dead", "rare", "regular",
              "frequent", "CI-L0 per token", "median distinct tokens",
              "median token entropy (bits)"]
    rows = [[m, r["layer"], r["module_type"], r["C"], r["alive"], _pct(r["survival"]), r["dead"],
             *[_num(r.get(k)) for k in ("rare", "regular", "frequent", "l0",
                                        "median_distinct_tokens",
                                        "median_token_entropy_bits")]]
            for m, r in modules.items()]
    return _table(header, rows)


def _beats(a: dict[str, Any]) -> str:
    """yes / no, or "untested" (no active positions or no random sets: percentile null)."""
    if a.get("percentile") is None:
        return "untested"
    return "yes" if a.get("beats_95") else "no"


def _ablation(cfg: RunConfig, ab: dict[str, Any], tested: list[dict[str, Any]]) -> str:
    """The summary line and one row per tested cluster (evaluate/ablation.json records)."""
    head = (f"<p><b>{_e(_ablation_line(ab))}</b> (each cluster's ablation effect on the "
            f"positions where it is active, against {_num(ab.get('n_random'))} random sets of "
            f"the same size; baseline KL {_num(ab.get('baseline_kl'))}, "
            f"{_num(ab.get('n_positions'))} positions).</p>")
    header = ["cluster", "size", "layers", "active / inactive positions", "effect active",
              "effect inactive", "specificity", "random mean", "random p95", "percentile",
              "beats 95%"]
    rows = []
    for a in tested[: cfg.report.max_table_rows]:
        layers = a.get("layers") or {}
        rows.append([_num(a.get("cluster")), _num(a.get("size")),
                     ", ".join(f"{k}×{v}" for k, v in layers.items()),
                     f"{_num(a.get('n_active'))} / {_num(a.get('n_inactive'))}",
                     *[_num(a.get(k)) for k in ("effect_active", "effect_inactive",
                                                "specificity", "random_effect_mean",
                                                "random_effect_p95", "percentile")],
                     _beats(a)])
    return head + _table(header, rows)


def _cluster_table(cfg: RunConfig, records: list[dict[str, Any]]) -> str:
    header = ["cluster", "size", "layers", "composition", "modules", "active rows",
              "top tokens (mean activation, active rows / rows)", "top contexts", "ablation",
              "coherence / margin / stability"]
    body = []
    for r in records[: cfg.report.max_table_rows]:
        toks = "<br>".join(f"{_tok(t['text'])} {t['mean_activation']:.2f} "
                           f"({t['n_active']}/{t['n_rows']})" for t in r.get("top_tokens", []))
        ctxs = "".join(_context(c) for c in r.get("contexts", []))
        a = r.get("ablation")
        ab = "" if not a else f"{_num(a.get('percentile'))} pct ({_beats(a)})"
        cells = [_e(r["cluster"]), _e(r["size"]),
                 _e(f"{r['layer_span']}: {_num(r['layers'])}"), _e(r["composition"]),
                 _e(", ".join(f"{k}×{v}" for k, v in r["modules"].items())),
                 _e(_num(r.get("n_active"))), toks, ctxs, _e(ab),
                 _e(" / ".join(_num(r.get(k)) for k in ("coherence", "margin", "stability")))]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = ""
    if len(records) > cfg.report.max_table_rows:
        note = (f"<p>Showing the {cfg.report.max_table_rows} largest of {len(records)} "
                "clusters; all are in <a href='clusters_lm.json'>clusters_lm.json</a>.</p>")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return (note + "<input id='lm-filter' type='search' placeholder='filter clusters: token, "
            "module, composition, id …' oninput='lmFilter(this.value)'>"
            f"<table id='lm-clusters'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def render_lm(cfg: RunConfig, lm: dict[str, Any]) -> str:
    """The LM sections. lm: `scalespd.report.lm.lm_report`'s {"summary", "clusters"}."""
    s, records = lm["summary"], lm["clusters"]
    d = s["definitions"]
    parts = [_CSS, _FILTER_JS, "<h2>Language model</h2>",
             "<p>Cluster activation on a token = the largest CI of its members; active = "
             f"above τ = {d['tau']:g}. Top tokens: largest mean activation over the token's "
             f"rows, among tokens seen in ≥ {d['min_token_rows']} rows on which the cluster is "
             f"active at least once. Rare: active on &lt; {d['rare_below']:.1%} of rows; "
             f"frequent: on &gt; {d['frequent_above']:.0%}. Machine-readable: "
             "<a href='clusters_lm.json'>clusters_lm.json</a>.</p>"]
    if not s["tokens_decoded"]:
        parts.append("<p class='note'>evaluate/tokens.json is missing: tokens are shown as "
                     "[id].</p>")
    parts.append(_overview(s))
    if s["decomposition"]:
        parts += ["<h3>Decomposition quality</h3>", _metrics(s["decomposition"])]
    parts += ["<h3>Decomposed modules</h3>", _modules(s["modules"])]
    if "ablation" in s:
        parts += ["<h3>Ablation</h3>", _ablation(cfg, s["ablation"], lm["ablation_clusters"])]
    parts += ["<h3>Clusters: top tokens and contexts</h3>", _cluster_table(cfg, records)]
    return "\n".join(parts)
