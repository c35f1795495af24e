"""Evaluate stage: the work that needs the trained model again after clustering, written to
run_dir/evaluate/ so that the report only reads files (and runs without torch).

Toy targets: the causal importances of every subcomponent on one-hot inputs
(`onehot_ci.npy`) and the target's known mechanisms (`ground_truth.json`).
"""
