"""The harvest writes exactly the CI values and statistics of the in-memory computation, and an
interrupted harvest resumes to a bit-identical result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from profiles_testlib import (
    ALWAYS_ON,
    DEAD,
    SIZES,
    direct_ci,
    direct_inputs,
    small_cfg,
    snapshot,
    tiny_model,
)

from scalespd.profiles import ProfilesError, column_names, open_profiles, read_components
from scalespd.profiles.harvest import BlockResult, harvest
from scalespd.profiles.sources import RandomRowSource

N = sum(c for _, c in SIZES)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_zarr_equals_direct_ci_and_stats_equal_numpy(tmp_path: Path, dtype: str) -> None:
    model = tiny_model()
    src = RandomRowSource(301, 6, seed=4, p=0.5, save_inputs=True)  # 5 blocks, last one short
    cfg = small_cfg(dtype=dtype)
    res = harvest(model, src, tmp_path / "p", cfg)
    assert (res.n_blocks, res.n_computed, res.shape) == (5, 5, (301, N))

    arr = open_profiles(tmp_path / "p")
    assert arr.shape == (301, N) and arr.dtype == np.dtype(dtype)
    assert arr.chunks == (32, 6)
    assert arr.metadata.codecs[-1].to_dict()["name"] == "zstd"
    got = arr[:]
    x = direct_inputs(src, cfg, N)
    want = direct_ci(model, x)
    atol = 1e-6 if dtype == "float32" else 5e-4  # float16 spacing near 1 is 2^-10
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=atol)
    assert np.all(got[:, DEAD] == 0) and np.all(got[:, ALWAYS_ON] == 1)
    # The stored inputs are the ones the CI was computed from.
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "p" / "inputs.zarr"))["x"][:],
                                  x.numpy())

    df = read_components(tmp_path / "p")
    assert list(df.columns) == ["component", "name", "layer", "module", "module_type", "max",
                                "mean", "std", "frac_active", "alive"]
    g64 = got.astype(np.float64)  # stats describe the values as stored
    np.testing.assert_array_equal(df["component"], np.arange(N))
    assert list(df["name"]) == column_names(arr)
    assert df["name"][7] == "mid.0:0" and df["module"][15] == "dec" and df["layer"][15] == 2
    np.testing.assert_array_equal(df["max"], g64.max(axis=0))
    np.testing.assert_allclose(df["mean"], g64.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(df["std"], g64.std(axis=0, ddof=0), rtol=1e-9, atol=1e-13)
    np.testing.assert_array_equal(df["frac_active"], (g64 > cfg.tau).mean(axis=0))
    np.testing.assert_array_equal(df["alive"], g64.max(axis=0) > cfg.tau)
    assert not df["alive"][DEAD[0]] and df["alive"][ALWAYS_ON[0]]
    assert df["frac_active"][ALWAYS_ON[0]] == 1.0 and df["std"][ALWAYS_ON[0]] == 0.0


def test_completed_harvest_rerun_computes_nothing(tmp_path: Path) -> None:
    model, src, cfg = tiny_model(), RandomRowSource(200, 6, seed=1), small_cfg()
    harvest(model, src, tmp_path / "p", cfg)
    before = snapshot(tmp_path / "p" / "ci.zarr")
    res = harvest(model, src, tmp_path / "p", cfg)
    assert res.n_computed == 0
    assert snapshot(tmp_path / "p" / "ci.zarr") == before


class _Stop(Exception):
    pass


def _stop_after(k: int):
    seen: list[int] = []

    def cb(r: BlockResult) -> None:
        seen.append(r.block)
        if len(seen) == k:
            raise _Stop

    return cb


@pytest.mark.parametrize("storage", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interrupted_harvest_resumes_bit_identical(tmp_path: Path, dtype: str,
                                                   storage: str) -> None:
    model, src = tiny_model(), RandomRowSource(400, 6, seed=2, p=0.4, save_inputs=True)
    cfg = small_cfg(dtype=dtype, storage=storage, zero_below=0.05)
    harvest(model, src, tmp_path / "full", cfg)

    with pytest.raises(_Stop):
        harvest(model, src, tmp_path / "resumed", cfg, on_block=_stop_after(3))
    assert not (tmp_path / "resumed" / "harvest.json").exists()
    with pytest.raises(ProfilesError, match="unfinished"):
        open_profiles(tmp_path / "resumed")
    # 3 blocks reported; the one being written in the background at that moment may finish too.
    n_done = len(list((tmp_path / "resumed" / "blocks").glob("block_*.npz")))
    assert n_done in (3, 4)
    res = harvest(model, src, tmp_path / "resumed", cfg)
    assert res.n_computed == 7 - n_done

    full, resumed = snapshot(tmp_path / "full"), snapshot(tmp_path / "resumed")
    full.pop("harvest.json"), resumed.pop("harvest.json")  # holds timings
    assert full.keys() == resumed.keys()
    diff = [k for k in full if full[k] != resumed[k]]
    assert diff == []  # every chunk, block record and components.csv byte-identical


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_sigkilled_harvest_resumes_bit_identical(tmp_path: Path, storage: str) -> None:
    """A separate process is SIGKILLed in the middle of a harvest; the resumed result matches
    an uninterrupted one byte for byte."""
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from profiles_testlib import tiny_model, small_cfg
        from scalespd.profiles.harvest import harvest
        from scalespd.profiles.sources import RandomRowSource
        harvest(tiny_model(), RandomRowSource(640, 6, seed=5), {str(out)!r},
                small_cfg(storage={storage!r}), on_block=lambda r: time.sleep(0.3))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if len(list((out / "blocks").glob("block_*.npz"))) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"harvest subprocess exited early with {proc.returncode}")
            time.sleep(0.05)
        else:
            pytest.fail("harvest subprocess wrote no block records in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_done = len(list((out / "blocks").glob("block_*.npz")))
    assert 3 <= n_done < 10

    cfg = small_cfg(storage=storage)
    res = harvest(tiny_model(), RandomRowSource(640, 6, seed=5), out, cfg)
    assert res.n_computed == 10 - n_done
    harvest(tiny_model(), RandomRowSource(640, 6, seed=5), tmp_path / "full", cfg)
    a, b = snapshot(out), snapshot(tmp_path / "full")
    a.pop("harvest.json"), b.pop("harvest.json")
    assert a == b


def test_harvest_summary_and_attributes(tmp_path: Path) -> None:
    model, src = tiny_model(), RandomRowSource(100, 6, seed=0)
    res = harvest(model, src, tmp_path / "p", small_cfg())
    summary = json.loads((tmp_path / "p" / "harvest.json").read_text())
    assert summary["shape"] == [100, N] and summary["n_alive"] == res.n_alive
    attrs = open_profiles(tmp_path / "p").attrs["scalespd_profiles"]
    assert [m["module"] for m in attrs["modules"]] == [p for p, _ in SIZES]
    assert [m["offset"] for m in attrs["modules"]] == [0, 7, 12]
    assert attrs["input_set"] == src.describe() and len(attrs["model_hash"]) == 32
    df = read_components(tmp_path / "p")
    assert df["alive"].dtype == bool and int(df["alive"].sum()) == res.n_alive


def test_row_source_without_fields_writes_no_inputs(tmp_path: Path) -> None:
    harvest(tiny_model(), RandomRowSource(50, 6, save_inputs=False), tmp_path / "p", small_cfg())
    assert not (tmp_path / "p" / "inputs.zarr").exists()
    assert isinstance(read_components(tmp_path / "p"), pd.DataFrame)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_matches_cpu(tmp_path: Path) -> None:
    """The same harvest with the forward on CUDA (the CPU path is tested above)."""
    src = RandomRowSource(300, 6, seed=4, p=0.5)
    harvest(tiny_model(), src, tmp_path / "cpu", small_cfg())
    res = harvest(tiny_model(), src, tmp_path / "gpu", small_cfg(device="cuda"))
    assert res.device == "cuda"
    np.testing.assert_allclose(open_profiles(tmp_path / "gpu")[:],
                               open_profiles(tmp_path / "cpu")[:], rtol=0, atol=1e-5)


class _TokenRows(RandomRowSource):
    """A source with language-model-style row metadata (what an LM source adds)."""

    def row_fields(self):
        return {"token_ids": ("int32", ()), "seq_ids": ("int64", ()), "positions": ("int32", ()),
                "x": ("float32", (self.dim,))}

    def row_metadata(self, block, start, stop, inputs):
        rows = np.arange(start, stop)
        return {"token_ids": (rows * 7 % 50).astype(np.int32), "seq_ids": rows // 16,
                "positions": (rows % 16).astype(np.int32), "x": inputs.numpy()}


def test_row_metadata_fields_go_to_inputs_zarr(tmp_path: Path) -> None:
    src = _TokenRows(150, 6, seed=3)
    harvest(tiny_model(), src, tmp_path / "p", small_cfg())
    g = zarr.open_group(str(tmp_path / "p" / "inputs.zarr"), mode="r")
    rows = np.arange(150)
    np.testing.assert_array_equal(g["seq_ids"][:], rows // 16)
    np.testing.assert_array_equal(g["positions"][:], rows % 16)
    np.testing.assert_array_equal(g["token_ids"][:], rows * 7 % 50)
    assert g["token_ids"].dtype == np.int32 and g["token_ids"].chunks == (32,)
    assert g["x"].shape == (150, 6) and g["x"].chunks == (32, 6)
