"""Report stage: ground-truth scoring (toys), cluster statistics, plots, summary.json and an
offline index.html.

Public API:
  groundtruth.assign_features, groundtruth.score_clustering   one-hot CI -> features -> scores
  stats.cluster_table, stats.cluster_stats, stats.edge_stats, stats.correlation_stats
  stage.run(cfg, run_dir), stage.build_report(cfg, artifacts, out_dir, ...)
  inputs.load_run(run_dir)                                     read the earlier stages' outputs
  lm.lm_report(cfg, artifacts, table, out_dir)                 the language-model sections

run_dir/report/summary.json (DESIGN §4 keys first):
  n_components, n_alive, n_dead, n_edges, n_connected_components, n_isolated,
  largest_connected_component, graph_threshold, n_zero_variance,
  n_clusters, cluster_sizes (descending), n_singletons, n_non_singleton,
  layer_span_counts {"span": count of non-singleton clusters}, frac_multi_layer,
  n_span_all_layers, composition_counts ("attention-only" / "mlp-only" / "mixed", or
  module types joined by "+"), module_type_set_counts, n_unclustered_alive,
  alive_per_module {module: {alive, dead}}, spectral {mode, always_on_fraction, ...},
  timings {stage: seconds from manifest.json}, report_seconds,
  edges {n_edges, frac_edges_within, mean_edge_weight_within/between},
  correlation {mean_corr_within/between, n_pairs_*, n_columns_sampled, n_rows_used},
  ground_truth (toys): {mechanisms_total, mechanisms_recovered, mechanisms_recoverable
    (features whose alive members cover every required layer: the most a clustering of this
    decomposition can recover), mechanism_status_counts
    (recovered / merged / split / incomplete / missing), purity, ari, n_feature_serving,
    n_dense, n_inactive, n_ties, ties, feature_layers, expected_alive, expected_dense,
    dense {n_dense, n_clusters_holding_dense, cluster, size, n_dense_in_cluster, purity,
    recovered, members}, features [{feature, members, layers, clusters, status}], label,
    always_on_fraction, n_clusters},
  ground_truth_alternative: the same for the spectral stage's second clustering with the other
    always-on setting (spectral/clusters_alternative.csv; present when some alive node is
    always-on under either setting), plus n_always_on.
  lm (language-model targets: profiles/inputs.zarr holds token_ids; `scalespd.report.lm`):
    {n_rows, n_sequences, n_distinct_tokens, tokens_decoded, definitions {cluster_activation,
    tau, top_tokens, min_token_rows, rare_below, frequent_above}, n_non_singleton,
    n_multi_layer, frac_multi_layer, n_attention_only, n_mlp_only, n_mixed,
    composition_counts, modules {module: {layer, module_type, C, alive, survival, dead, rare,
    regular, frequent, l0, median_distinct_tokens, median_token_entropy_bits}}, decomposition
    {ce/*, kl/*, loss/* final metrics, l0/total, alive_data/total}, ablation {n_tested,
    n_beats_95, frac_beats_95, n_random, tau, seed, n_positions, baseline_kl} (when
    evaluate/ablation.json exists)}.
run_dir/report/clusters.json: one record per cluster (largest first): cluster, size, layers,
  layer_span, module_types, modules, composition, members.
run_dir/report/clusters_lm.json (LMs): one record per non-singleton cluster (largest first): the
  clusters.json fields plus n_active, frac_active, top_tokens [{token_id, text, mean_activation,
  n_active, n_rows}], contexts [{row, seq_id, position, token_id, before, token, after,
  activation}], ablation (its evaluate/ablation.json record or null).
"""
