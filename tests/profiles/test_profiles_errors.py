"""Bad input gives a clear error and leaves every existing file byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from profiles_testlib import small_cfg, snapshot, tiny_model
from pydantic import ValidationError

from scalespd.config import ProfilesConfig
from scalespd.profiles import ProfilesError
from scalespd.profiles.harvest import harvest
from scalespd.profiles.sources import RandomRowSource
from scalespd.profiles.synthetic import SyntheticCIModel


@pytest.fixture
def done(tmp_path: Path) -> Path:
    """A finished harvest to be protected."""
    out = tmp_path / "p"
    harvest(tiny_model(), RandomRowSource(200, 6, seed=0, save_inputs=True), out, small_cfg())
    return out


@pytest.mark.parametrize(
    ("model", "src", "cfg", "match"),
    [
        # Different module list / C (a checkpoint that does not match).
        (lambda: tiny_model(sizes=[("enc", 7), ("mid.0", 6), ("dec", 4)]), None, None,
         r"shape: existing \[200, 16\], this harvest \[200, 17\]"),
        (lambda: tiny_model(sizes=[("enc", 7), ("mid.1", 5), ("dec", 4)]), None, None,
         "modules"),
        # Same shapes, other weights: the array belongs to another model.
        (lambda: tiny_model(seed=1), None, None, "model_hash"),
        (None, None, lambda: small_cfg(dtype="float16"), "dtype: existing"),
        (None, None, lambda: small_cfg(chunk_cols=4), "chunks: existing"),
        (None, lambda: RandomRowSource(200, 6, seed=1, save_inputs=True), None, "input_set"),
        (None, lambda: RandomRowSource(264, 6, seed=0, save_inputs=True), None, "shape"),
        # Completion record computed with another tau.
        (None, None, lambda: small_cfg(tau=0.2), "tau=0.1"),
    ],
)
def test_incompatible_rerun_is_refused_and_changes_nothing(
    done: Path, model, src, cfg, match: str
) -> None:
    before = snapshot(done)
    m = model() if model else tiny_model()
    s = src() if src else RandomRowSource(200, 6, seed=0, save_inputs=True)
    c = cfg() if cfg else small_cfg()
    with pytest.raises(ProfilesError, match=match) as err:
        harvest(m, s, done, c)
    assert str(done) in str(err.value)  # names the file or folder
    assert snapshot(done) == before


def test_error_names_the_array_file(done: Path) -> None:
    with pytest.raises(ProfilesError) as err:
        harvest(tiny_model(), RandomRowSource(200, 6, seed=0, save_inputs=True), done,
                small_cfg(dtype="float16"))
    msg = str(err.value)
    assert str(done / "ci.zarr") in msg and "refusing to overwrite" in msg


def test_non_zarr_file_in_the_way(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "ci.zarr").write_text("not an array")
    before = snapshot(out)
    with pytest.raises(ProfilesError, match="not a readable zarr array"):
        harvest(tiny_model(), RandomRowSource(50, 6), out, small_cfg())
    assert snapshot(out) == before


def test_incompatible_inputs_store_is_refused_before_anything_is_created(tmp_path: Path,
                                                                         done: Path) -> None:
    # Keep only inputs.zarr of a finished harvest, then harvest another input set there.
    import shutil

    out = tmp_path / "q"
    out.mkdir()
    shutil.copytree(done / "inputs.zarr", out / "inputs.zarr")
    before = snapshot(out)
    with pytest.raises(ProfilesError, match="inputs.zarr"):
        harvest(tiny_model(), RandomRowSource(200, 6, seed=9, save_inputs=True), out, small_cfg())
    assert snapshot(out) == before and not (out / "ci.zarr").exists()


def test_chunk_guard_errors_before_writing(tmp_path: Path) -> None:
    model = SyntheticCIModel(4, [("a", 3000)])
    cfg = ProfilesConfig(chunk_rows=131072, block_rows=131072, chunk_cols=4096, executor="local",
                         device="cpu", n_samples=200_000)
    with pytest.raises(ProfilesError, match="chunk"):
        harvest(model, RandomRowSource(200_000, 4), tmp_path / "p", cfg)
    assert not (tmp_path / "p").exists()


def test_block_rows_must_hold_whole_chunks() -> None:
    with pytest.raises(ValidationError, match="multiple of chunk_rows"):
        ProfilesConfig(chunk_rows=64, block_rows=100)


def test_block_record_from_another_layout(done: Path) -> None:
    # A record whose row range does not fit this layout (e.g. copied from another run).
    (done / "blocks" / "block_0000002.npz").rename(done / "blocks" / "block_0000009.npz")
    before = snapshot(done)
    with pytest.raises(ProfilesError, match="does not fit"):
        harvest(tiny_model(), RandomRowSource(200, 6, seed=0, save_inputs=True), done, small_cfg())
    assert snapshot(done) == before


class _BadModel(torch.nn.Module):
    def __init__(self, shape_error: bool) -> None:
        super().__init__()
        self.module_paths, self.C = ["a"], {"a": 3}
        self.module_info = [("a", 0, "x")]
        self.shape_error = shape_error

    def causal_importances(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.shape_error:
            return {"a": torch.zeros(x.shape[0], 4)}
        g = torch.full((x.shape[0], 3), 0.5)
        g[0, 2] = float("nan")
        return {"a": g}


@pytest.mark.parametrize(("shape_error", "match"),
                         [(True, r"shape \(\d+, 4\), expected \(\d+, 3\)"), (False, "a:2")])
def test_bad_model_output_is_an_error(tmp_path: Path, shape_error: bool, match: str) -> None:
    with pytest.raises(ProfilesError, match=match):
        harvest(_BadModel(shape_error), RandomRowSource(50, 6), tmp_path / "p", small_cfg())
    assert not list((tmp_path / "p" / "blocks").glob("*.npz"))


def test_model_info_must_match_module_paths(tmp_path: Path) -> None:
    m = _BadModel(False)
    m.module_info = [("b", 0, "x")]
    with pytest.raises(ProfilesError, match="module_info"):
        harvest(m, RandomRowSource(50, 6), tmp_path / "p", small_cfg())
