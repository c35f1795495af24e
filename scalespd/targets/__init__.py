"""Toy targets (TMS, ResidMLP): models, sparse-feature data, training recipes, saving/loading.
Language-model targets (Hugging Face causal LMs, their text data, the offline default model):
the subpackage scalespd.targets.lm; module_info / build_target / load_target dispatch to it.

Public API (the contract other stages use, see the brief/DESIGN):
  ModuleInfo, module_info, module_paths   decomposable nn.Linear modules in forward order
  build_target, train_target              seeded construction and training
  save_target, load_target                run_dir/target/{model.pt, meta.json}
  make_dataset, structured_eval_inputs, one_hot_inputs   input distributions
  ground_truth                            expected mechanisms for scoring
"""

from scalespd.targets.data import (
    SparseFeatureDataset,
    make_dataset,
    one_hot_inputs,
    resid_mlp_labels,
    structured_eval_inputs,
)
from scalespd.targets.io import load_target, read_meta, save_target
from scalespd.targets.models import (
    ModuleInfo,
    build_target,
    ground_truth,
    module_info,
    module_paths,
)
from scalespd.targets.training import eval_loss, train_target

__all__ = [
    "ModuleInfo",
    "SparseFeatureDataset",
    "build_target",
    "eval_loss",
    "ground_truth",
    "load_target",
    "make_dataset",
    "module_info",
    "module_paths",
    "one_hot_inputs",
    "read_meta",
    "resid_mlp_labels",
    "save_target",
    "structured_eval_inputs",
    "train_target",
]
