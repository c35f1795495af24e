"""The profiles stage on a disk that fills up: the failure names the file, only finished blocks
keep their completion records, nothing half-written is left that a re-run would refuse, and the
re-run (once space is freed) completes the harvest with exactly the files of an undisturbed one.

The disk is a real small tmpfs when this process may mount one (root); otherwise the output
folders are made read-only (EACCES instead of ENOSPC), which exercises the same paths."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from faults import fill_until_full
from profiles_testlib import SIZES, small_cfg, snapshot, tiny_model, write_decomposed_run_dir

from scalespd.config import DecomposeConfig, ModuleSpec, ProfilesConfig, RunConfig, TMSTargetConfig
from scalespd.errors import storage_error
from scalespd.profiles import stage as profiles_stage
from scalespd.profiles.harvest import harvest
from scalespd.profiles.reader import BLOCKS_DIR, CI_FILE, COMPONENTS_FILE, INPUTS_FILE, open_ci
from scalespd.profiles.sources import RandomRowSource
from scalespd.profiles.store import BlockLayout, finished_blocks

N = sum(c for _, c in SIZES)


class SmallDisk:
    """A folder whose writes can be made to fail: `fill()` (a full tmpfs, or read-only folders
    when this process cannot mount one) and `free()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
                           capture_output=True, text=True)
        self.full = r.returncode == 0
        if not self.full and os.geteuid() == 0:
            pytest.skip(f"cannot mount a tmpfs to fill ({r.stderr.strip()}), and as root a "
                        "read-only folder does not fail writes")
        self.ballast = root / "ballast"
        self.locked: list[Path] = []

    @property
    def errno(self) -> int:
        return errno.ENOSPC if self.full else errno.EACCES

    def fill(self) -> None:
        if self.full:
            fill_until_full(self.ballast)
        else:
            self.locked = [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]
            for p in self.locked:
                p.chmod(0o555)

    def free(self) -> None:
        if self.full:
            self.ballast.unlink(missing_ok=True)
        for p in self.locked:
            p.chmod(0o755)
        self.locked = []

    def close(self) -> None:
        self.free()
        if self.full:
            subprocess.run(["umount", str(self.root)], capture_output=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    d = SmallDisk(tmp_path / "disk")
    try:
        yield d
    finally:
        d.close()


def _fill_after_first_block(disk: SmallDisk) -> Callable[[object], None]:
    """An `on_block` hook: the disk fills up once the first block is finished."""
    state = {"filled": False}

    def hook(_result: object) -> None:
        if not state["filled"]:
            state["filled"] = True
            disk.fill()

    return hook


def _no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


def _assert_storage_error(err: BaseException, under: Path, disk: SmallDisk) -> None:
    user = storage_error(err)
    assert user is not None, f"not reported as a storage problem: {err!r}"
    assert user.errno == disk.errno and user.filename is not None, user
    assert Path(user.filename).is_relative_to(under), user
    assert str(user).startswith(user.filename) and "\n" not in str(user)


# --------------------------------------------------------------------------------------------
# The profiles stage (executor: local), as `python -m scalespd.run` runs it
# --------------------------------------------------------------------------------------------

TARGET = TMSTargetConfig(n_features=5, n_hidden=2)
DECOMPOSE = DecomposeConfig(modules=[ModuleSpec(pattern="linear1", C=6),
                                     ModuleSpec(pattern="linear2", C=6)])
PROFILES = ProfilesConfig(n_samples=1000, chunk_rows=64, block_rows=128, seed=4,
                          executor="local", device="cpu")


def _write_run_dir(run_dir: Path) -> None:
    write_decomposed_run_dir(run_dir, TARGET, DECOMPOSE)


def test_disk_full_during_the_profiles_stage_then_rerun_equals_undisturbed(
        tmp_path: Path, disk: SmallDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(target=TARGET, decompose=DECOMPOSE, profiles=PROFILES)
    ref_dir = tmp_path / "ref"
    _write_run_dir(ref_dir)
    profiles_stage.run(cfg, ref_dir)

    run_dir = disk.root / "run"
    _write_run_dir(run_dir)
    out = run_dir / "profiles"
    monkeypatch.setattr(profiles_stage, "harvest",
                        functools.partial(harvest, on_block=_fill_after_first_block(disk)))
    with pytest.raises(OSError) as failed:
        profiles_stage.run(cfg, run_dir)
    _assert_storage_error(failed.value, out, disk)

    # Only finished blocks are recorded, and their rows are those of the undisturbed harvest.
    # The default layout: sparse CSR row blocks.
    ref_ci = open_ci(ref_dir / "profiles" / CI_FILE)
    layout = BlockLayout.make(1000, 12, PROFILES.chunk_rows, PROFILES.chunk_cols,
                              PROFILES.block_rows, np.dtype(PROFILES.dtype).itemsize)
    done = finished_blocks(out / BLOCKS_DIR, layout)
    assert 0 < len(done) < layout.n_blocks, done
    ci = open_ci(out / CI_FILE)
    for b in done:
        start, stop = layout.block_range(b)
        np.testing.assert_array_equal(ci[start:stop], ref_ci[start:stop])
    assert not _no_temporaries(out)

    disk.free()
    monkeypatch.undo()
    info = profiles_stage.run(cfg, run_dir)
    assert info["n_computed"] == layout.n_blocks - len(done)
    assert snapshot(out / CI_FILE) == snapshot(ref_dir / "profiles" / CI_FILE)
    assert snapshot(out / INPUTS_FILE) == snapshot(ref_dir / "profiles" / INPUTS_FILE)
    assert (out / COMPONENTS_FILE).read_bytes() == \
        (ref_dir / "profiles" / COMPONENTS_FILE).read_bytes()


# --------------------------------------------------------------------------------------------
# The harvest itself: a disk full before anything is written, and Ray actors
# --------------------------------------------------------------------------------------------


def test_disk_full_when_creating_the_arrays_leaves_nothing_a_rerun_refuses(
        tmp_path: Path, disk: SmallDisk) -> None:
    model, src = tiny_model(), RandomRowSource(301, 6, seed=4, p=0.5, save_inputs=True)
    cfg = small_cfg()
    harvest(model, src, tmp_path / "ref", cfg)

    out = disk.root / "p"
    out.mkdir()
    disk.fill()
    with pytest.raises(OSError) as failed:
        harvest(model, src, out, cfg)
    _assert_storage_error(failed.value, out, disk)
    # ci.zarr appears complete or not at all (a cut zarr.json made every re-run fail).
    assert not (out / CI_FILE).exists() and not _no_temporaries(out)

    disk.free()
    res = harvest(model, src, out, cfg)
    assert res.n_computed == res.n_blocks
    assert snapshot(out / CI_FILE) == snapshot(tmp_path / "ref" / CI_FILE)
    assert snapshot(out / INPUTS_FILE) == snapshot(tmp_path / "ref" / INPUTS_FILE)


def test_disk_full_in_ray_actors_is_the_oserror_naming_the_file(
        ray_local, tmp_path: Path, disk: SmallDisk) -> None:
    model, src = tiny_model(), RandomRowSource(640, 6, seed=4, p=0.5)
    cfg = small_cfg(executor="ray", max_concurrency=2)
    harvest(model, src, tmp_path / "ref", small_cfg())

    out = disk.root / "p"
    with pytest.raises(OSError) as failed:
        harvest(model, src, out, cfg, on_block=_fill_after_first_block(disk))
    _assert_storage_error(failed.value, out, disk)
    layout = BlockLayout.make(640, N, 32, 6, 64, 4)
    done = finished_blocks(out / BLOCKS_DIR, layout)
    assert 0 < len(done) < layout.n_blocks, done

    disk.free()
    res = harvest(model, src, out, cfg)
    assert res.n_computed == layout.n_blocks - len(done)
    assert snapshot(out / CI_FILE) == snapshot(tmp_path / "ref" / CI_FILE)
