"""Language-model sections of the report: what each cluster responds to (top tokens, top
contexts), where it lives (layer span, attention / MLP composition), how the decomposed modules
fare (survival, dead / rare / frequent, token diversity), and the ablation test.

Definitions (also in summary.json under lm.definitions):
  cluster activation of a row   max of the members' CI (see `scalespd.report.lm_scan`)
  active                        CI (or cluster activation) > profiles.tau
  top tokens                    the TOP_TOKENS tokens with the largest mean cluster activation
                                over their rows, among tokens that occur in at least
                                MIN_TOKEN_ROWS profile rows and on which the cluster is active at
                                least once (a token seen twice would otherwise top every list)
  top contexts                  the N_CONTEXTS rows with the largest cluster activation (> tau):
                                CONTEXT_BEFORE tokens before and CONTEXT_AFTER after, same sequence
  dead / rare / frequent        per subcomponent: never active (not alive) / alive and active on
                                < RARE_BELOW of the rows / active on > FREQUENT_ABOVE of the rows;
                                "regular" in between
  token diversity               per alive subcomponent: distinct tokens among its active rows and
                                the entropy (bits) of their distribution; per module the median
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from scalespd import storage
from scalespd.config import RunConfig
from scalespd.jsonio import write_json_atomic
from scalespd.report.inputs import RunArtifacts
from scalespd.report.lm_inputs import LMInputs
from scalespd.report.lm_scan import (
    TokenScan,
    column_diversity,
    column_entries,
    scan_profiles,
)
from scalespd.report.stats import group_members

TOP_TOKENS = 10
MIN_TOKEN_ROWS = 5
N_CONTEXTS = 4
CONTEXT_BEFORE, CONTEXT_AFTER = 10, 3
RARE_BELOW = 1e-3
FREQUENT_ABOVE = 0.1
CLUSTERS_LM_FILE = "clusters_lm.json"
COMPOSITIONS = ("attention-only", "mlp-only", "mixed")


def lm_report(cfg: RunConfig, art: RunArtifacts, table: list[dict[str, Any]],
              out_dir: storage.PathLike, block_rows: int | None = None) -> dict[str, Any]:
    """Compute the LM sections, write out_dir/clusters_lm.json and return the summary's "lm"
    record, "clusters" (the per-cluster records) and "ablation_clusters" (the ablation.json
    records) for the HTML.

    table: `stats.cluster_table` rows of the configured clustering (largest cluster first)."""
    lm = art.lm
    assert lm is not None, "lm_report needs a run with LM inputs"
    tau = cfg.profiles.tau
    multi = [r for r in table if r["size"] > 1]
    groups = group_members(art.clusters)
    vocab, tok_idx = np.unique(lm.token_ids, return_inverse=True)
    token_rows = np.bincount(tok_idx, minlength=len(vocab))
    scan = None
    if art.profiles_path is not None:
        scan = scan_profiles(art.profiles_path, art.alive_ids,
                             [groups[r["cluster"]] for r in multi], tok_idx, len(vocab), tau,
                             N_CONTEXTS, block_rows)
    ablation = _ablation_by_cluster(lm.ablation)
    # Cluster quality without ground truth (spectral/quality.json), when the stage wrote it.
    quality = {int(r["cluster"]): r for r in (art.quality or {}).get("clusters", [])}
    records = []
    for k, row in enumerate(multi):
        rec: dict[str, Any] = {key: row[key] for key in (
            "cluster", "size", "layers", "layer_span", "composition", "modules",
            "module_types", "members")}
        if scan is not None:
            rec.update(_cluster_tokens(scan, k, vocab, token_rows, lm))
            rec["contexts"] = _contexts(scan, k, lm, tau)
        rec["ablation"] = ablation.get(row["cluster"])
        q = quality.get(int(row["cluster"]), {})
        rec.update({k: q.get(k) for k in ("coherence", "margin", "stability")})
        records.append(rec)
    write_json_atomic(storage.as_path(out_dir) / CLUSTERS_LM_FILE, records)

    summary: dict[str, Any] = {
        "n_rows": int(len(lm.token_ids)),
        "n_sequences": int(len(np.unique(lm.seq_ids))),
        "n_distinct_tokens": int(len(vocab)),
        "tokens_decoded": lm.tokens is not None,
        "definitions": {"cluster_activation": "max of members' CI", "tau": tau,
                        "top_tokens": TOP_TOKENS, "min_token_rows": MIN_TOKEN_ROWS,
                        "rare_below": RARE_BELOW, "frequent_above": FREQUENT_ABOVE},
        **_span_and_composition(multi),
        "modules": _module_stats(art, scan, len(lm.token_ids), lm.metrics),
        "decomposition": _model_metrics(lm.metrics),
    }
    if lm.ablation is not None:
        summary["ablation"] = _ablation_summary(lm.ablation)
    return {"summary": summary, "clusters": records,
            "ablation_clusters": list((lm.ablation or {}).get("clusters", []) or [])}


def _span_and_composition(multi: list[dict[str, Any]]) -> dict[str, Any]:
    """Layer span and attention / MLP composition counts of the non-singleton clusters."""
    n = len(multi)
    n_cross = sum(r["layer_span"] >= 2 for r in multi)
    comp = Counter(r["composition"] for r in multi)
    return {
        "n_non_singleton": n,
        "n_multi_layer": n_cross,
        "frac_multi_layer": n_cross / n if n else None,
        "n_attention_only": comp["attention-only"],
        "n_mlp_only": comp["mlp-only"],
        "n_mixed": comp["mixed"],
        # Other labels only when a module type is neither attention nor MLP.
        "composition_counts": {c: comp[c] for c in (*COMPOSITIONS, *sorted(
            set(comp) - set(COMPOSITIONS)))},
    }


def _cluster_tokens(scan: TokenScan, k: int, vocab: np.ndarray, token_rows: np.ndarray,
                    lm: LMInputs) -> dict[str, Any]:
    """n_active (rows with cluster activation > tau) and the top tokens of cluster k."""
    idx, sums = column_entries(scan.cluster_sum, k)
    a_idx, a_cnt = column_entries(scan.cluster_active, k)
    # The active-count entries are a subset of the sum entries (active implies > 0).
    counts = np.zeros(len(idx), dtype=np.int64)
    counts[np.searchsorted(idx, a_idx)] = a_cnt
    rows = token_rows[idx]
    mean = sums / rows
    ok = (rows >= MIN_TOKEN_ROWS) & (counts > 0)
    idx, mean, counts, rows = idx[ok], mean[ok], counts[ok], rows[ok]
    order = np.lexsort((vocab[idx], -counts, -mean))[:TOP_TOKENS]
    top = [{"token_id": int(vocab[idx[i]]), "text": lm.token_text(int(vocab[idx[i]])),
            "mean_activation": float(mean[i]), "n_active": int(counts[i]),
            "n_rows": int(rows[i])} for i in order]
    n_active = int(a_cnt.sum())
    return {"n_active": n_active, "frac_active": n_active / len(lm.token_ids),
            "top_tokens": top}


def _contexts(scan: TokenScan, k: int, lm: LMInputs, tau: float) -> list[dict[str, Any]]:
    """The top rows of cluster k (activation > tau) with their surrounding tokens."""
    out = []
    for row, value in zip(scan.top_rows[:, k], scan.top_values[:, k], strict=True):
        if row < 0 or not value > tau:
            continue
        out.append({**context_window(lm, int(row)), "activation": float(value)})
    return out


def context_window(lm: LMInputs, row: int) -> dict[str, Any]:
    """Row `row` with up to CONTEXT_BEFORE / CONTEXT_AFTER rows of the same sequence around it
    (rows of one sequence are contiguous, so a window filtered by seq_id is contiguous)."""
    lo = max(0, row - CONTEXT_BEFORE)
    hi = min(len(lm.token_ids), row + CONTEXT_AFTER + 1)
    window = np.arange(lo, hi)
    window = window[lm.seq_ids[window] == lm.seq_ids[row]]
    text = [lm.token_text(int(t)) for t in lm.token_ids[window]]
    at = int(np.searchsorted(window, row))
    return {"row": row, "seq_id": int(lm.seq_ids[row]), "position": int(lm.positions[row]),
            "token_id": int(lm.token_ids[row]), "before": text[:at], "token": text[at],
            "after": text[at + 1:]}


# Per-module metric families of the decomposition (`<family>/<module path>`): shown in the
# module table, summed into `<family>/total` in the model-level table.
PER_MODULE_METRICS = ("l0", "alive_data")


def _model_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The decomposition's model-level metrics: ce/*, kl/*, loss/* as they are, and the
    per-module families summed (`l0/total`: subcomponents with CI > tau per token)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        family, _, rest = k.partition("/")
        if family not in PER_MODULE_METRICS:
            out[k] = v
    for family in PER_MODULE_METRICS:
        vals = [v for k, v in metrics.items() if k.startswith(f"{family}/")
                and k != f"{family}/total" and isinstance(v, int | float)]
        if vals:
            out[f"{family}/total"] = float(sum(vals))
    return out


def _module_stats(art: RunArtifacts, scan: TokenScan | None, n_rows: int,
                  metrics: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per decomposed module (components.csv order): C, alive, survival, dead / rare / regular /
    frequent counts, the median token diversity of its alive subcomponents and, from the
    decomposition's metrics, its CI-L0 per token (`l0`) on the evaluation batch."""
    metrics = metrics or {}
    comps = art.components
    modules = comps["module"].astype(str).to_numpy()
    alive_module = modules[art.alive_ids]
    if scan is not None:
        n_active, distinct, entropy = column_diversity(scan.component_active)
        frac = n_active / max(n_rows, 1)
    out: dict[str, dict[str, Any]] = {}
    for module in dict.fromkeys(modules):  # first-seen order = column order
        in_module = modules == module
        C = int(in_module.sum())
        n_alive = int(comps["alive"].to_numpy()[in_module].sum())
        rec: dict[str, Any] = {
            "layer": int(comps["layer"].to_numpy()[in_module][0]),
            "module_type": str(comps["module_type"].to_numpy()[in_module][0]),
            "C": C, "alive": n_alive, "survival": n_alive / C, "dead": C - n_alive,
            "l0": metrics.get(f"l0/{module}"),
        }
        if scan is not None:
            sel = alive_module == module
            f = frac[sel]
            rec.update(
                rare=int((f < RARE_BELOW).sum()),
                frequent=int((f > FREQUENT_ABOVE).sum()),
                regular=int(((f >= RARE_BELOW) & (f <= FREQUENT_ABOVE)).sum()),
                median_distinct_tokens=float(np.median(distinct[sel])) if sel.any() else None,
                median_token_entropy_bits=float(np.median(entropy[sel])) if sel.any() else None,
            )
        out[module] = rec
    return out


def _ablation_by_cluster(ablation: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    if not ablation:
        return {}
    return {int(r["cluster"]): r for r in ablation.get("clusters", []) if "cluster" in r}


def _ablation_summary(ablation: dict[str, Any]) -> dict[str, Any]:
    """{n_tested, n_beats_95, ...}: the json's own counts, else counted from its records."""
    recs = ablation.get("clusters", []) or []
    n_tested = ablation.get("n_tested", len(recs))
    n_beats = ablation.get("n_beats_95", sum(bool(r.get("beats_95")) for r in recs))
    return {"n_tested": n_tested, "n_beats_95": n_beats,
            "frac_beats_95": n_beats / n_tested if n_tested else None,
            **{k: ablation.get(k) for k in ("n_random", "tau", "seed", "n_positions",
                                            "baseline_kl")}}
