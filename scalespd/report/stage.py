"""Report stage: summary.json, index.html and PNG plots from every earlier stage's output.

`run(cfg, run_dir)` reads profiles/, graph/, spectral/, evaluate/ and manifest.json, and scores
toy targets against their known mechanisms (the evaluate stage's CI on one-hot inputs and
ground truth). It only reads files: no model, no torch. When the
spectral stage also clustered the graph with the other always-on setting
(spectral/clusters_alternative.csv), both scorings are in the report (the TMS 5-2+ID failure
case). The spectral stage's cluster quality without ground truth (spectral/quality.json:
coherence, separation, stability) becomes summary["quality"] and its own HTML section. For
language models (profiles/inputs.zarr holds token ids) it adds what each cluster
responds to, per-module statistics and the ablation test (`scalespd.report.lm`).
`build_report` does the work and is what tests drive.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from upath import UPath

from scalespd import storage
from scalespd.config import RunConfig
from scalespd.jsonio import write_json_atomic
from scalespd.report import groundtruth as gt
from scalespd.report import plots
from scalespd.report.inputs import (
    ReportInputError,
    RunArtifacts,
    load_run,
    read_profile_columns,
)
from scalespd.report.lm import lm_report
from scalespd.report.stats import (
    cluster_stats,
    cluster_table,
    correlation_stats,
    edge_stats,
    group_members,
    pearson,
)
from scalespd.spectral.alternative import describe

log = logging.getLogger(__name__)

def run(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    """Write run_dir/report/{summary.json, index.html, clusters.json, *.png} (and, for language
    models, clusters_lm.json); return a small summary for the manifest."""
    t0 = time.perf_counter()
    run_dir = storage.as_path(run_dir)
    art = load_run(run_dir)
    summary = build_report(cfg, art, run_dir / "report", onehot=art.onehot,
                           alternative=art.alternative, started=t0)
    keys = ("n_alive", "n_clusters", "n_edges")
    out = {k: summary[k] for k in keys}
    if "ground_truth" in summary:
        g = summary["ground_truth"]
        out["mechanisms_recovered"] = f"{g['mechanisms_recovered']}/{g['mechanisms_total']}"
    if "ablation" in summary.get("lm", {}):
        a = summary["lm"]["ablation"]
        out["ablation_beats_95"] = f"{a['n_beats_95']}/{a['n_tested']}"
    return out


# --------------------------------------------------------------------------------------------
# Ground-truth assignment
# --------------------------------------------------------------------------------------------


def _assign(cfg: RunConfig, onehot_alive: np.ndarray, art: RunArtifacts
            ) -> gt.FeatureAssignment:
    tau = cfg.report.gt_tau if cfg.report.gt_tau is not None else cfg.profiles.tau
    dense_module = art.alive["module_type"].astype(str).isin(gt.DENSE_MODULE_TYPES).to_numpy()
    return gt.assign_features(onehot_alive, tau, cfg.report.dense_fraction, cfg.report.tie_tol,
                              dense_module=dense_module)


# --------------------------------------------------------------------------------------------
# The report proper
# --------------------------------------------------------------------------------------------


def build_report(
    cfg: RunConfig,
    art: RunArtifacts,
    out_dir: storage.PathLike,
    onehot: np.ndarray | None = None,
    alternative: dict[str, Any] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Compute every statistic, draw the plots, write summary.json, clusters.json, index.html.

    onehot: (F, N) CI on one-hot inputs over all N subcomponents (toys), or None.
    alternative: {"label": str, "always_on_fraction": float | None, "clusters": (n,) ints} —
        a second clustering of the alive nodes to score next to the configured one.
    Returns the summary dict."""
    from scalespd.report.html import write_html  # noqa: PLC0415

    started = time.perf_counter() if started is None else started
    out_dir = storage.as_path(out_dir)
    storage.makedirs(out_dir)
    alive = art.alive
    names = alive["name"].astype(str).to_numpy()
    layers = alive["layer"].to_numpy(dtype=np.int64)
    module_types = alive["module_type"].astype(str).to_numpy()
    modules = alive["module"].astype(str).to_numpy()

    table = cluster_table(art.clusters, layers, module_types, modules, names)
    cstats = cluster_stats(table, {int(v) for v in layers})
    summary: dict[str, Any] = {
        "name": cfg.name,
        "target": cfg.target.kind,
        "n_components": int(len(art.components)),
        "n_alive": int(len(art.alive_ids)),
        "n_dead": int(len(art.components) - len(art.alive_ids)),
        **_graph_summary(art),
        **cstats,
        "n_unclustered_alive": int((art.clusters < 0).sum()),
        "alive_per_module": _alive_per_module(art),
        "spectral": {"mode": cfg.spectral.mode,
                     "always_on_fraction": cfg.spectral.always_on_fraction,
                     "always_on_grouping": cfg.spectral.always_on_grouping,
                     "n_always_on": art.spectral_info.get("n_always_on"),
                     "k_max": cfg.spectral.k_max},
        "timings": _timings(art.manifest),
    }
    if art.graph is not None:
        summary["edges"] = edge_stats(art.graph, art.clusters)
    if art.quality is not None:
        summary["quality"] = quality_summary(art.quality)

    figures: list[dict[str, str]] = []
    sample = heatmap_sample(art.clusters, cfg.report.max_heatmap_nodes)
    if art.profiles_path is not None and len(sample):
        X = read_profile_columns(art.profiles_path, art.alive_ids[sample],
                                 cfg.report.max_profile_rows)
        corr = pearson(X)
        summary["correlation"] = {
            **correlation_stats(corr, art.clusters[sample]),
            "n_columns_sampled": int(len(sample)),
            "n_rows_used": int(X.shape[0]),
        }
        figures.append(_fig(plots.correlation_heatmap(
            corr, art.clusters[sample], out_dir / "correlation.png",
            labels=[f"{names[j]} (c{art.clusters[j]})" for j in sample]),
            "Pearson correlation of activation profiles, alive subcomponents ordered by cluster"
            + ("" if len(sample) == len(art.alive_ids)
               else f" (the {len(sample)} members of the largest clusters)")))

    # Top-level spectra (depth 0) of the largest connected components; recursive splits later.
    spectra = sorted((s for s in art.spectra if len(s["eigenvalues"]) > 1),
                     key=lambda s: (s["depth"], -(s["size"] or 0)))[: cfg.report.n_spectra]
    if spectra:
        figures.append(_fig(plots.spectra_plot(spectra, out_dir / "spectra.png"),
                            "Eigenvalues of L v = λ D v for the largest connected components; "
                            "shaded: the eigengap that chose K"))
    figures.append(_fig(plots.size_histogram(cstats["cluster_sizes"],
                                             out_dir / "cluster_sizes.png"), "Cluster sizes"))
    if cstats["layer_span_counts"]:
        figures.append(_fig(plots.layer_span_plot(cstats["layer_span_counts"],
                                                  out_dir / "layer_span.png"),
                            "Layer span of non-singleton clusters"))
        figures.append(_fig(plots.composition_plot(
            cstats["composition_counts"], out_dir / "composition.png",
            "Module-type composition of non-singleton clusters"),
            "Module-type composition (attention-only / MLP-only / mixed; other module types "
            "named)"))

    gt_tables: list[dict[str, Any]] = []
    if onehot is not None:
        gt_tables = _ground_truth(cfg, art, onehot, alternative, summary, figures, out_dir)
    lm_data = None
    if art.lm is not None:  # a language model: tokens, contexts, modules, ablation
        lm_data = lm_report(cfg, art, table, out_dir)
        summary["lm"] = lm_data["summary"]

    summary["report_seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(out_dir / "summary.json", summary)
    write_json_atomic(out_dir / "clusters.json", table)
    write_html(out_dir / "index.html", cfg, summary, table, figures, gt_tables, lm_data)
    log.info("report written to %s", storage.url(out_dir / "index.html"))
    return summary


def _ground_truth(
    cfg: RunConfig,
    art: RunArtifacts,
    onehot: np.ndarray,
    alternative: dict[str, Any] | None,
    summary: dict[str, Any],
    figures: list[dict[str, str]],
    out_dir: UPath,
) -> list[dict[str, Any]]:
    """Score the configured clustering (and the alternative), add the one-hot CI heatmap.
    Returns the ground-truth tables for the HTML, configured clustering first."""
    alive = art.alive
    names = alive["name"].astype(str).tolist()
    layers = alive["layer"].to_numpy(dtype=np.int64)
    onehot_alive = onehot[:, art.alive_ids]
    assignment = _assign(cfg, onehot_alive, art)
    feature_layers, expected = _expected_structure(cfg, art)

    score = gt.score_clustering(assignment, art.clusters, layers, feature_layers, names)
    score.update(expected)
    score["label"] = f"configured: {describe(cfg.spectral)}"
    score["always_on_fraction"] = cfg.spectral.always_on_fraction
    score["n_clusters"] = summary["n_clusters"]
    summary["ground_truth"] = score
    tables = [{"title": score["label"], "score": score}]
    if alternative is not None:
        alt = gt.score_clustering(assignment, np.asarray(alternative["clusters"]), layers,
                                  feature_layers, names)
        alt.update(expected)
        alt["label"] = alternative["label"]
        alt["always_on_fraction"] = alternative["always_on_fraction"]
        alt["n_always_on"] = alternative.get("n_always_on")
        alt["n_clusters"] = int(len(np.unique(np.asarray(alternative["clusters"])[
            np.asarray(alternative["clusters"]) >= 0])))
        summary["ground_truth_alternative"] = alt
        tables.append({"title": alt["label"], "score": alt})

    # One-hot CI heatmap, columns ordered by cluster then by assigned feature.
    order = np.lexsort((assignment.labels, art.clusters))
    sorted_c = art.clusters[order]
    figures.append(_fig(plots.onehot_ci_heatmap(
        onehot_alive[:, order], [names[j] for j in order], out_dir / "onehot_ci.png",
        boundaries=np.flatnonzero(np.diff(sorted_c) != 0) + 1),
        "Causal importance on one-hot inputs (x_f = "
        f"{cfg.evaluate.onehot_value}), alive subcomponents ordered by cluster"))
    return tables


def _expected_structure(cfg: RunConfig, art: RunArtifacts) -> tuple[set[int] | None,
                                                                   dict[str, Any]]:
    """Layers every feature mechanism must cover (decomposed feature-serving modules) and the
    target's expected counts, from `scalespd.targets.ground_truth`."""
    truth = art.truth
    if truth is None:
        raise ReportInputError("the evaluate stage wrote one-hot CI without ground_truth.json; "
                               "re-run the evaluate stage")
    decomposed = art.components.groupby("module")["layer"].first().to_dict()
    feature_layers = {int(decomposed[p]) for p, m in truth["modules"].items()
                      if p in decomposed and m["ci_pattern"] == "identity"}
    expected_alive = sum(m["expected_alive"] for p, m in truth["modules"].items()
                         if p in decomposed)
    expected_dense = sum(m.get("k", 0) for p, m in truth["modules"].items()
                         if p in decomposed and m["ci_pattern"] == "dense")
    return (feature_layers or None), {"expected_alive": int(expected_alive),
                                      "expected_dense": int(expected_dense)}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def heatmap_sample(clusters: np.ndarray, cap: int) -> np.ndarray:
    """Alive node indices to show in the correlation heatmap, ordered by cluster (largest
    first): whole clusters, each that still fits under `cap`, then unclustered nodes if room is
    left.
    clusters: (n,). Returns (s,) with s <= cap."""
    clusters = np.asarray(clusters)
    groups = group_members(clusters)
    picked: list[np.ndarray] = []
    total = 0
    for cid in sorted(groups, key=lambda c: (-groups[c].size, c)):
        size = groups[cid].size
        if total + size > cap:
            if total == 0:  # the largest cluster alone exceeds the cap: show part of it
                picked.append(groups[cid][:cap])
                total = cap
            continue  # a smaller cluster may still fit
        picked.append(groups[cid])
        total += size
    if total < cap:
        picked.append(np.flatnonzero(clusters < 0)[: cap - total])
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


QUALITY_FIELDS = ("cluster", "size", "coherence", "nearest", "margin", "stability")


def quality_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """summary["quality"] from spectral/quality.json (`scalespd.spectral.quality`): headline
    numbers and every non-singleton cluster's record (largest first; the HTML shows the first
    report.max_table_rows)."""
    res, seeds = doc.get("resample") or {}, doc.get("seeds") or {}
    return {
        "n_clusters_scored": doc.get("n_clusters_scored"),
        "n_rows_sample": doc.get("n_rows_sample"),
        "median_coherence": doc.get("median_coherence"),
        "mean_coherence": doc.get("mean_coherence"),
        "median_margin": doc.get("median_margin"),
        "median_stability": doc.get("median_stability"),
        "resample_ari": {"mean": res.get("ari_mean"), "min": res.get("ari_min"),
                         "repeats": res.get("repeats", 0)},
        "seed_ari": {"mean": seeds.get("ari_mean"), "min": seeds.get("ari_min"),
                     "n_clusterings": len(seeds.get("seeds", []))},
        "per_cluster": [{k: r.get(k) for k in QUALITY_FIELDS} for r in doc["clusters"]],
    }


def _graph_summary(art: RunArtifacts) -> dict[str, Any]:
    cc = art.connected[art.connected >= 0]
    _, cc_sizes = np.unique(cc, return_counts=True)
    return {
        "n_edges": None if art.graph is None else int(art.graph.nnz // 2),
        "n_connected_components": int(len(cc_sizes)),
        "n_isolated": int((cc_sizes == 1).sum()),
        "largest_connected_component": int(cc_sizes.max()) if len(cc_sizes) else 0,
        "graph_threshold": art.graph_threshold,
        "n_zero_variance": art.graph_summary.get("n_zero_var"),
    }


def _alive_per_module(art: RunArtifacts) -> dict[str, dict[str, int]]:
    comp = art.components
    out = {}
    for module, grp in comp.groupby("module", sort=False):
        n_alive = int(grp["alive"].sum())
        out[str(module)] = {"alive": n_alive, "dead": int(len(grp) - n_alive)}
    return out


def _timings(manifest: dict[str, Any]) -> dict[str, float | None]:
    return {s: rec.get("seconds") for s, rec in manifest.get("stages", {}).items()
            if s != "report"}


def _fig(path: UPath, caption: str) -> dict[str, str]:
    return {"file": path.name, "caption": caption}
