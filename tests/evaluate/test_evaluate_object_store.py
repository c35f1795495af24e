"""The evaluate stage (toy target) with its run directory on memory:// and s3:// (a local
S3-compatible server on loopback, tests/object_stores.py): the same files, byte for byte, as
with a local run directory, and no temporary files left behind."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from upath import UPath

from scalespd.config import DecomposeConfig, ModuleSpec, RunConfig, TMSTargetConfig
from scalespd.evaluate import onehot, stage
from scalespd.targets import build_target, module_info, module_paths
from scalespd.train.components import ComponentModel, match_modules

TARGET = TMSTargetConfig(n_features=5, n_hidden=2, n_identity_layers=1)
DECOMPOSE = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=4),
                                     ModuleSpec(pattern="hidden_layers.*", C=3)])


@pytest.fixture
def model(monkeypatch):
    specs = [(m.pattern, m.C) for m in DECOMPOSE.modules]
    m = ComponentModel(build_target(TARGET), match_modules(specs, module_paths(TARGET)),
                       module_info(TARGET), DECOMPOSE, generator=torch.Generator().manual_seed(0))
    m.eval()
    monkeypatch.setattr(onehot, "_load_model", lambda run_dir: m)
    return m


def _write_components(run_dir: UPath, model: ComponentModel) -> list[str]:
    """profiles/components.csv with the model's subcomponents in reverse order (so the stage's
    reordering is exercised); returns the names in that order."""
    names = [f"{p}:{c}" for p in model.module_paths for c in range(model.C[p])][::-1]
    info = {i.path: i for i in model.module_info}
    df = pd.DataFrame([{"component": j, "name": n, "layer": info[n.split(":")[0]].layer,
                        "module": n.split(":")[0],
                        "module_type": info[n.split(":")[0]].module_type, "alive": True}
                       for j, n in enumerate(names)])
    (run_dir / "profiles").mkdir(parents=True, exist_ok=True)
    with (run_dir / "profiles" / "components.csv").open("w") as f:
        df.to_csv(f, index=False)
    return names


def _files(root: UPath) -> dict[str, bytes]:
    fs, base = root.fs, root.path.rstrip("/")
    return {full[len(base) + 1:]: fs.cat_file(full) for full in fs.find(base)}


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_evaluate_on_an_fsspec_run_dir(store, request, tmp_path, model):
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE)
    local_dir = UPath(tmp_path / "run")
    _write_components(local_dir, model)
    local_summary = stage.run(cfg, local_dir)
    local = _files(local_dir)

    run_dir = request.getfixturevalue(f"{store}_dir")
    names = _write_components(run_dir, model)
    summary = stage.run(cfg, run_dir)
    remote = _files(run_dir)

    assert summary == local_summary
    assert sorted(remote) == sorted(local) == [
        "evaluate/ground_truth.json", "evaluate/onehot_ci.npy", "evaluate/summary.json",
        "profiles/components.csv"]
    for name in local:
        assert remote[name] == local[name], name
    with (run_dir / "evaluate" / "onehot_ci.npy").open("rb") as f:
        ci = np.load(f)
    direct, direct_names = onehot.onehot_ci(cfg, run_dir)
    np.testing.assert_array_equal(ci, onehot.align_to_components(direct, direct_names, names))
