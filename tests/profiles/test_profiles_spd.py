"""Harvest on a real (untrained) SPD ComponentModel of a TMS target with the target's own input
distributions: the zarr content equals the CI computed directly in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scalespd.config import DecomposeConfig, ModuleSpec, ProfilesConfig, RunConfig, TMSTargetConfig
from scalespd.profiles import ProfilesError, open_profiles, read_components
from scalespd.profiles.harvest import harvest
from scalespd.profiles.sources import ToyRowSource, block_generator
from scalespd.profiles.stage import check_model_matches_config
from scalespd.targets import build_target, make_dataset, module_info, module_paths
from scalespd.targets import structured_eval_inputs as structured
from scalespd.train.components import ComponentModel, match_modules

TARGET = TMSTargetConfig(n_features=5, n_hidden=2, n_identity_layers=1)
DECOMPOSE = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=8),
                                     ModuleSpec(pattern="hidden_layers.*", C=3)])


def spd_model(decompose: DecomposeConfig = DECOMPOSE) -> ComponentModel:
    specs = [(m.pattern, m.C) for m in decompose.modules]
    return ComponentModel(build_target(TARGET), match_modules(specs, module_paths(TARGET)),
                          module_info(TARGET), decompose,
                          generator=torch.Generator().manual_seed(3))


def _direct(model: ComponentModel, x: torch.Tensor, cfg: ProfilesConfig | None = None
            ) -> np.ndarray:
    """(M, N) CI in one forward; with `cfg`, values below its zero_below floor set to 0."""
    ci = model.causal_importances(x)
    out = torch.cat([ci[p] for p in model.module_paths], dim=1).numpy()
    if cfg is not None:
        out[out < cfg.zero_below] = 0
    return out


@pytest.mark.parametrize("storage", ["sparse", "dense"])
def test_train_distribution_harvest_equals_direct(tmp_path: Path, storage: str) -> None:
    model = spd_model()
    cfg = ProfilesConfig(n_samples=700, chunk_rows=128, block_rows=256, chunk_cols=8, seed=11,
                         executor="local", device="cpu", batch_rows=100, storage=storage)
    res = harvest(model, ToyRowSource(TARGET, cfg), tmp_path / "p", cfg)
    assert res.shape == (700, 8 + 3 + 8)
    # Inputs drawn independently here from the target's distribution, block by block.
    data = make_dataset(TARGET)
    x = torch.cat([data.sample(n, block_generator(11, b)) for b, n in enumerate([256, 256, 188])])
    want = _direct(model, x)
    assert ((want > 0) & (want < cfg.zero_below)).any()  # the floor has work to do here
    want[want < cfg.zero_below] = 0
    got = open_profiles(tmp_path / "p")[:]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    df = read_components(tmp_path / "p")
    assert list(df["module"].unique()) == ["linear1", "hidden_layers.0", "linear2"]
    assert list(df["layer"].unique()) == [0, 1, 2]
    assert list(df["module_type"].unique()) == ["encoder", "identity", "decoder"]
    np.testing.assert_allclose(df["std"], got.astype(np.float64).std(axis=0), rtol=1e-9,
                               atol=1e-13)


def test_structured_eval_set_harvest_equals_direct(tmp_path: Path) -> None:
    model = spd_model()
    cfg = ProfilesConfig(dataset="structured", samples_per_feature=40, chunk_rows=64,
                         block_rows=64, seed=5, executor="local", device="cpu")
    res = harvest(model, ToyRowSource(TARGET, cfg), tmp_path / "p", cfg)
    assert res.shape[0] == 5 * 40
    x = structured(TARGET, 40, torch.Generator().manual_seed(5))
    np.testing.assert_allclose(open_profiles(tmp_path / "p")[:], _direct(model, x, cfg), rtol=0,
                               atol=1e-6)


def test_spd_model_on_ray_actors(tmp_path: Path, ray_local) -> None:
    """The real ComponentModel (with its forward hooks) ships to Ray actors and gives the same
    array as the in-process harvest."""
    cfg = ProfilesConfig(n_samples=512, chunk_rows=128, block_rows=128, executor="ray",
                         max_concurrency=2, device="cpu")
    res = harvest(spd_model(), ToyRowSource(TARGET, cfg), tmp_path / "ray", cfg)
    assert res.executor == "ray"
    local_cfg = cfg.model_copy(update={"executor": "local"})
    harvest(spd_model(), ToyRowSource(TARGET, local_cfg), tmp_path / "local", local_cfg)
    np.testing.assert_allclose(open_profiles(tmp_path / "ray")[:],
                               open_profiles(tmp_path / "local")[:], rtol=0, atol=1e-6)


def test_checkpoint_that_does_not_match_config_is_refused() -> None:
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE)
    check_model_matches_config(spd_model(), cfg, Path("run/decompose"))  # matches: no error
    other = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=8),
                                     ModuleSpec(pattern="hidden_layers.*", C=4)])
    with pytest.raises(ProfilesError, match=r"hidden_layers.0: checkpoint C=4, config C=3"):
        check_model_matches_config(spd_model(other), cfg, Path("run/decompose"))
    fewer = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=8)])
    with pytest.raises(ProfilesError, match=r"hidden_layers.0: checkpoint C=absent"):
        check_model_matches_config(spd_model(fewer), cfg, Path("run/decompose"))
