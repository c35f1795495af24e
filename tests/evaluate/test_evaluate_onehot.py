"""One-hot CI from a real (untrained) SPD ComponentModel: column order and names match the
profiles' global order, and the values are the model's own causal importances. The evaluate
stage writes the same files, byte for byte, with its run directory on memory:// and s3:// (a
local S3-compatible server, tests/object_stores.py) as on a local disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from object_stores import files_under
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


def test_onehot_ci_matches_model(tmp_path, model):
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE)
    ci, names = onehot.onehot_ci(cfg, tmp_path)
    # forward order of the target: linear1, hidden_layers.0, linear2
    assert names == [f"linear1:{c}" for c in range(4)] + \
        [f"hidden_layers.0:{c}" for c in range(3)] + [f"linear2:{c}" for c in range(4)]
    assert ci.shape == (5, 11)
    direct = model.causal_importances(torch.eye(5) * cfg.evaluate.onehot_value)
    np.testing.assert_allclose(ci[:, 4:7], direct["hidden_layers.0"].numpy(), rtol=0, atol=0)
    assert ((ci >= 0) & (ci <= 1)).all()

    # Reordering to a components.csv order, and a clear error for an unknown name.
    order = names[::-1]
    np.testing.assert_array_equal(onehot.align_to_components(ci, names, order), ci[:, ::-1])
    with pytest.raises(ValueError, match="linear3:0"):
        onehot.align_to_components(ci, names, ["linear3:0"])


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


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_evaluate_on_an_fsspec_run_dir(store, request, tmp_path, model):
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE)
    local_dir = UPath(tmp_path / "run")
    _write_components(local_dir, model)
    local_summary = stage.run(cfg, local_dir)
    local = files_under(local_dir)

    run_dir = request.getfixturevalue(f"{store}_dir")
    names = _write_components(run_dir, model)
    summary = stage.run(cfg, run_dir)
    remote = files_under(run_dir)

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
