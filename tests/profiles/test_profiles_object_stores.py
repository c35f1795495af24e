"""The profiles harvest with its output on an fsspec filesystem (memory://, and s3:// on the
session's moto server): the same arrays, bytes and table as a local run, for the sparse and the
dense layout; a resumed harvest rewrites a block that has no completion record whole; Ray actors
reach an s3:// folder by URL, and a memory:// folder keeps the harvest in this process."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr
from profiles_testlib import SIZES, direct_ci, direct_inputs, small_cfg, snapshot, tiny_model
from upath import UPath

from scalespd import storage
from scalespd.profiles import open_profiles, read_components
from scalespd.profiles.harvest import BlockResult, harvest
from scalespd.profiles.reader import BLOCKS_DIR, CI_FILE, COMPONENTS_FILE, INPUTS_FILE, open_ci
from scalespd.profiles.sources import RandomRowSource
from scalespd.profiles.sparse_store import ROWS_GROUP, SparseProfiles, block_name
from scalespd.profiles.store import block_record_path

N = sum(c for _, c in SIZES)
STORES = ["memory_dir", "s3_dir"]


def _source() -> RandomRowSource:
    return RandomRowSource(300, 6, seed=3, p=0.5, save_inputs=True)  # 5 blocks of 64 rows


def _cfg(layout: str, **kw: Any) -> Any:
    # A floor makes the sparse store really sparse (and the dense one hold the same matrix).
    return small_cfg(storage=layout, zero_below=0.05, **kw)


def remote_snapshot(root: UPath) -> dict[str, bytes]:
    """relative path -> bytes of every object under root (as `snapshot` does for a folder)."""
    root = storage.as_path(root)
    root.fs.invalidate_cache()
    base = root.path.rstrip("/") + "/"
    return {name[len(base):]: root.fs.cat_file(name)
            for name in sorted(root.fs.find(root.path)) if name.startswith(base)}


def _outputs(snap: dict[str, bytes]) -> dict[str, bytes]:
    """The files a harvest's result is: arrays and table (block records hold zip timestamps,
    harvest.json timings)."""
    return {k: v for k, v in snap.items()
            if k.startswith((f"{CI_FILE}/", f"{INPUTS_FILE}/")) or k == COMPONENTS_FILE}


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference: each layout harvested into a local folder (once for this module)."""
    root = tmp_path_factory.mktemp("local")
    for layout in ("sparse", "dense"):
        harvest(tiny_model(), _source(), root / layout, _cfg(layout))
    return {layout: root / layout for layout in ("sparse", "dense")}


@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize("store", STORES)
def test_harvest_on_an_object_store_equals_the_local_one(
        store: str, layout: str, request: pytest.FixtureRequest,
        local_runs: dict[str, Path]) -> None:
    run_dir: UPath = request.getfixturevalue(store)
    out = run_dir / "profiles"
    res = harvest(tiny_model(), _source(), out, _cfg(layout))
    assert res.n_computed == res.n_blocks == 5 and res.executor == "local"

    ref = local_runs[layout]
    got = open_profiles(out)
    assert isinstance(got, SparseProfiles) == (layout == "sparse")
    np.testing.assert_array_equal(got[:], open_profiles(ref)[:])
    want = direct_ci(tiny_model(), direct_inputs(_source(), _cfg(layout), N))
    want[want < 0.05] = 0
    np.testing.assert_allclose(got[:], want, rtol=0, atol=1e-6)
    if layout == "sparse":
        assert isinstance(got, SparseProfiles)
        np.testing.assert_array_equal(got.csr_rows(50, 200).toarray(),
                                      open_profiles(ref).csr_rows(50, 200).toarray())
        # What a graph Ray task gets: the store by URL string, or the reader pickled.
        by_url = SparseProfiles(storage.url(out / CI_FILE))
        assert str(by_url.path) == storage.url(out / CI_FILE)
        np.testing.assert_array_equal(by_url[100:300], got[100:300])
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(got))[:], got[:])
    np.testing.assert_array_equal(open_ci(storage.url(out / CI_FILE))[:], got[:])
    pd.testing.assert_frame_equal(read_components(out), read_components(ref))
    inputs = zarr.open_group(store=storage.zarr_store(out / INPUTS_FILE, read_only=True),
                             mode="r")
    np.testing.assert_array_equal(inputs["x"][:],  # type: ignore[index]
                                  zarr.open_group(str(ref / INPUTS_FILE), mode="r")["x"][:])
    # Not just equal values: the same objects, byte for byte, as the local files.
    assert _outputs(remote_snapshot(out)) == _outputs(snapshot(ref))
    assert (out / "harvest.json").is_file()

    # Finished: a re-run computes nothing and changes nothing.
    before = remote_snapshot(out)
    assert harvest(tiny_model(), _source(), out, _cfg(layout)).n_computed == 0
    assert _outputs(remote_snapshot(out)) == _outputs(before)


class Stop(Exception):
    pass


def _stop_after_block_1(r: BlockResult) -> None:
    if r.block == 1:
        raise Stop


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_resume_on_s3_rewrites_a_block_without_its_record(
        s3_dir: UPath, layout: str, local_runs: dict[str, Path]) -> None:
    """An interrupted harvest on s3 resumes: finished blocks are kept, and a block whose data
    was written but whose completion record was not (the harvest died in between) is rewritten
    whole, stale objects of the earlier attempt included."""
    out = s3_dir / "profiles"
    with pytest.raises(Stop):
        harvest(tiny_model(), _source(), out, _cfg(layout), on_block=_stop_after_block_1)
    blocks = out / BLOCKS_DIR
    done = sorted(int(p.stem.split("_")[1]) for p in storage.as_path(blocks).glob("block_*.npz"))
    assert done[:2] == [0, 1] and len(done) in (2, 3)  # block 2 may have been in the writer

    # Block 1's data stays but its record goes: as if the harvest died before writing it. Its
    # data is made wrong too, so that only a rewrite gives the right array.
    block_record_path(blocks, 1).unlink()
    if layout == "sparse":
        rows = out / CI_FILE / ROWS_GROUP
        g = zarr.open_group(store=storage.zarr_store(rows / block_name(1)), mode="r+")
        g["values"][:] = 1  # type: ignore[index]
        stale = rows / block_name(1) / "values" / "c" / "99"  # beyond the rewritten arrays
        stale.write_bytes(b"left by the earlier attempt")
        # A half-built temporary group of a local-disk writer's naming: removed on resume.
        junk = rows / f".{block_name(3)}.12345.tmp" / "zarr.json"
        junk.write_bytes(b"{}")
    else:
        arr = zarr.open_array(store=storage.zarr_store(out / CI_FILE), mode="r+")
        arr[64:128] = 1
        stale = junk = None
    (out / f".{COMPONENTS_FILE}.12345.tmp").write_bytes(b"partial")

    res = harvest(tiny_model(), _source(), out, _cfg(layout))
    assert {r.block for r in res.block_results} == {1, *range(len(done), 5)}
    ref = local_runs[layout]
    np.testing.assert_array_equal(open_profiles(out)[:], open_profiles(ref)[:])
    assert _outputs(remote_snapshot(out)) == _outputs(snapshot(ref))
    assert stale is None or not stale.exists()
    assert junk is None or not junk.parent.exists()
    assert not (out / f".{COMPONENTS_FILE}.12345.tmp").exists()


def test_ray_on_a_memory_folder_runs_in_process(memory_dir: UPath) -> None:
    """Ray actors cannot see this process's memory://: the harvest runs here, without Ray."""
    res = harvest(tiny_model(), _source(), memory_dir / "p",
                  _cfg("sparse", executor="ray", max_concurrency=2))
    assert res.executor == "local" and res.n_computed == 5
    assert {r.pid for r in res.block_results} == {os.getpid()}


def test_ray_actors_resume_an_s3_folder(s3_dir: UPath, ray_local: Any,
                                        local_runs: dict[str, Path]) -> None:
    """A harvest interrupted in this process is resumed by Ray actors, which get the folder as
    an s3:// URL and reopen it there; the driver then sees the records and objects they wrote
    (its filesystem's cached listing of the folder from the first run is not trusted), and the
    result equals the local harvest."""
    out = s3_dir / "profiles"
    with pytest.raises(Stop):
        harvest(tiny_model(), _source(), out, _cfg("sparse"), on_block=_stop_after_block_1)
    res = harvest(tiny_model(), _source(), out, _cfg("sparse", executor="ray", max_concurrency=2))
    assert res.executor == "ray" and res.n_computed in (2, 3)
    assert os.getpid() not in {r.pid for r in res.block_results}
    np.testing.assert_array_equal(open_profiles(out)[:], open_profiles(local_runs["sparse"])[:])
    assert _outputs(remote_snapshot(out)) == _outputs(snapshot(local_runs["sparse"]))
