"""One-hot CI from a real (untrained) SPD ComponentModel: column order and names match the
profiles' global order, and the values are the model's own causal importances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalespd.config import DecomposeConfig, ModuleSpec, RunConfig, TMSTargetConfig
from scalespd.evaluate import onehot
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
