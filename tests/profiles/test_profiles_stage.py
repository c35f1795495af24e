"""The profiles stage on a run directory holding a (untrained) decomposition: it harvests what
load_decomposition gives, resumes, and refuses a checkpoint that does not match the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from profiles_testlib import snapshot, write_decomposed_run_dir

from scalespd.config import DecomposeConfig, ModuleSpec, ProfilesConfig, RunConfig, TMSTargetConfig
from scalespd.profiles import ProfilesError, open_profiles, read_components
from scalespd.profiles import stage as profiles_stage
from scalespd.profiles.sources import block_generator
from scalespd.targets import make_dataset
from scalespd.train import load_decomposition

TARGET = TMSTargetConfig(n_features=5, n_hidden=2)
# TMS weights are tied, so linear1 and linear2 need the same C.
DECOMPOSE = DecomposeConfig(modules=[ModuleSpec(pattern="linear1", C=6),
                                     ModuleSpec(pattern="linear2", C=6)])
PROFILES = ProfilesConfig(n_samples=300, chunk_rows=64, block_rows=128, seed=4,
                          executor="local", device="cpu")


def _write_run_dir(run_dir: Path, decompose: DecomposeConfig) -> None:
    write_decomposed_run_dir(run_dir, TARGET, decompose)


def test_stage_harvests_the_run_decomposition_and_resumes(tmp_path: Path) -> None:
    _write_run_dir(tmp_path, DECOMPOSE)
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE, profiles=PROFILES)
    info = profiles_stage.run(cfg, tmp_path)
    assert info["shape"] == [300, 12] and info["n_computed"] == 3
    json.dumps(info)  # goes into the manifest

    model = load_decomposition(tmp_path)
    data = make_dataset(TARGET)
    x = torch.cat([data.sample(n, block_generator(4, b)) for b, n in enumerate([128, 128, 44])])
    ci = model.causal_importances(x)
    want = torch.cat([ci["linear1"], ci["linear2"]], dim=1).numpy()
    want[want < PROFILES.zero_below] = 0  # the stored floor (default profiles.zero_below)
    np.testing.assert_allclose(open_profiles(tmp_path / "profiles")[:], want, rtol=0, atol=1e-6)
    df = read_components(tmp_path / "profiles")
    assert list(df["name"][:2]) == ["linear1:0", "linear1:1"] and df["name"][11] == "linear2:5"

    before = snapshot(tmp_path / "profiles" / "ci.zarr")
    assert profiles_stage.run(cfg, tmp_path)["n_computed"] == 0
    assert snapshot(tmp_path / "profiles" / "ci.zarr") == before


def test_stage_refuses_checkpoint_that_does_not_match_config(tmp_path: Path) -> None:
    _write_run_dir(tmp_path, DECOMPOSE)
    other = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=7)])
    cfg = RunConfig(target=TARGET, decompose=other, profiles=PROFILES)
    msg = r"linear1: checkpoint C=6, config C=7\n  linear2: checkpoint C=6, config C=7"
    with pytest.raises(ProfilesError, match=msg) as err:
        profiles_stage.run(cfg, tmp_path)
    assert str(tmp_path / "decompose") in str(err.value)
    assert not (tmp_path / "profiles").exists()


@pytest.mark.parametrize("store", ["memory_dir", "s3_dir"])
def test_stage_on_an_object_store_equals_the_local_run(
        store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same run directory, uploaded to memory:// or s3://: the stage harvests the same
    matrix and table there, and names the URL when the checkpoint does not match."""
    from scalespd import storage

    run_dir = request.getfixturevalue(store)
    _write_run_dir(tmp_path / "local", DECOMPOSE)
    storage.upload_dir(tmp_path / "local", run_dir)
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE, profiles=PROFILES)
    info = profiles_stage.run(cfg, run_dir)
    assert info["shape"] == [300, 12] and info["n_computed"] == 3
    profiles_stage.run(cfg, tmp_path / "local")
    np.testing.assert_array_equal(open_profiles(run_dir / "profiles")[:],
                                  open_profiles(tmp_path / "local" / "profiles")[:])
    assert read_components(run_dir / "profiles").equals(
        read_components(tmp_path / "local" / "profiles"))
    assert profiles_stage.run(cfg, run_dir)["n_computed"] == 0

    other = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=7)])
    with pytest.raises(ProfilesError) as err:
        profiles_stage.run(RunConfig(target=TARGET, decompose=other, profiles=PROFILES), run_dir)
    assert f"{storage.url(run_dir / 'decompose')} does not match" in str(err.value)
