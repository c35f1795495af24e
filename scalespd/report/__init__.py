"""Report stage: ground-truth scoring (toys), cluster statistics, plots, summary.json and an
offline index.html.

Public API:
  groundtruth.assign_features, groundtruth.score_clustering   one-hot CI -> features -> scores
  stats.cluster_table, stats.cluster_stats, stats.edge_stats, stats.correlation_stats
  stage.run(cfg, run_dir), stage.build_report(cfg, artifacts, out_dir, ...)
  inputs.load_run(run_dir)                                     read the earlier stages' outputs
"""
