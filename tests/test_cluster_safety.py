"""`python -m scalespd.cluster`: data-loss and wrong-result bugs of issue 17.

The input is never written; --overwrite replaces only a directory holding exactly what an
earlier run recorded; an unfinished harvest is refused (or clustered on its finished blocks
with --allow-partial); stale temporary directories of killed runs are cleaned up; user errors
(including a full or read-only disk) are one `error:` line with exit status 2, Ctrl-C is 130,
and internal bugs keep their traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from synthetic_graph import planted_profiles

import scalespd.cluster as cluster
from scalespd.cluster import MANIFEST, MIN_ROWS, InputError, main
from scalespd.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError


@pytest.fixture(scope="module")
def ci(tmp_path_factory) -> np.ndarray:
    """(300, 12) float32 C-order profiles, every column alive (a contiguous selection)."""
    X, _ = planted_profiles(n_mechanisms=4, sizes=(3, 3), n_rows=300, seed=0)
    assert X.dtype == np.float32 and X.flags.c_contiguous and (X.max(0) > 0.1).all()
    return X


def _run(args: list, capsys) -> tuple[int, str]:
    """Exit status and stderr of main(args)."""
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _one_error_line(err: str, *needles: str) -> str:
    """The single `error:` line of stderr (log lines aside), which must contain `needles`."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _refused(args: list, capsys, *needles: str) -> str:
    rc, err = _run(args, capsys)
    assert rc == EXIT_USER_ERROR, err
    return _one_error_line(err, *needles)


def _siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. The input is only read
# --------------------------------------------------------------------------------------------


def test_np_saved_matrix_with_all_columns_alive_is_clustered_and_left_intact(ci, tmp_path,
                                                                             capsys):
    np.save(tmp_path / "ci.npy", ci)
    before = (tmp_path / "ci.npy").read_bytes()
    rc, err = _run([tmp_path / "ci.npy", "--out", tmp_path / "out"], capsys)
    assert rc == 0, err  # was: "error: output array is read-only" (in-place on the memmap)
    assert (tmp_path / "ci.npy").read_bytes() == before
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["n_alive"] == 12 and s["n_edges"] > 0


# --------------------------------------------------------------------------------------------
# 2. --overwrite replaces only scalespd's own output
# --------------------------------------------------------------------------------------------


def test_out_holding_the_inputs_is_refused_even_with_overwrite(ci, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "ci.npy", ci)
    pd.DataFrame({"name": [f"c{i}" for i in range(12)], "layer": 0, "module": "m"}).to_csv(
        data / "meta.csv", index=False)
    (data / "NOTES.txt").write_text("unrelated notes")
    before = _tree(data)
    for extra in ([], ["--overwrite"]):
        _refused([data / "ci.npy", "--components", data / "meta.csv", "--out", data, *extra],
                 capsys, f"--out {data}", "ci.npy")
    # --components alone inside --out.
    np.save(tmp_path / "elsewhere.npy", ci)
    _refused([tmp_path / "elsewhere.npy", "--components", data / "meta.csv", "--out", data,
              "--overwrite"], capsys, "--components", "meta.csv")
    assert _tree(data) == before and _siblings(data) == []

    # --out equal to or inside a profiles directory (zarr) is refused as well.
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    zarr.create_array(str(pdir / "ci.zarr"), shape=ci.shape, chunks=(100, 12),
                      dtype="float32")[:] = ci
    _refused([pdir, "--out", pdir / "clusters"], capsys, "inside", str(pdir))
    _refused([pdir, "--out", pdir, "--overwrite"], capsys, str(pdir))
    assert not (pdir / "clusters").exists()


def test_overwrite_replaces_only_what_an_earlier_run_recorded(ci, tmp_path, capsys):
    np.save(tmp_path / "ci.npy", ci)
    out = tmp_path / "out"
    assert _run([tmp_path / "ci.npy", "--out", out], capsys)[0] == 0
    record = json.loads((out / MANIFEST).read_text())
    assert record["written_by"] == "scalespd.cluster"
    assert set(record["files"]) == set(_tree(out)) - {MANIFEST}
    assert {"clusters.csv", "summary.json", "graph/summary.json"} <= set(record["files"])

    _refused([tmp_path / "ci.npy", "--out", out], capsys, "--overwrite")
    assert _run([tmp_path / "ci.npy", "--out", out, "--overwrite"], capsys)[0] == 0

    # A file (or a folder) scalespd did not write: refused even with --overwrite, untouched.
    (out / "my_notes.txt").write_text("precious")
    _refused([tmp_path / "ci.npy", "--out", out, "--overwrite"], capsys, "my_notes.txt",
             "did not write")
    assert (out / "my_notes.txt").read_text() == "precious"
    (out / "my_notes.txt").unlink()
    (out / "graph" / "plots").mkdir()
    _refused([tmp_path / "ci.npy", "--out", out, "--overwrite"], capsys, "graph/plots")
    assert (out / "graph" / "plots").is_dir()

    # No record of scalespd's outputs (e.g. a directory the user made): refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    _refused([tmp_path / "ci.npy", "--out", other, "--overwrite"], capsys, MANIFEST)
    assert (other / "summary.json").read_text() == "{}"
    # A file where the directory should be.
    (tmp_path / "afile").write_text("x")
    _refused([tmp_path / "ci.npy", "--out", tmp_path / "afile", "--overwrite"], capsys,
             "not a directory")
    assert (tmp_path / "afile").read_text() == "x"
    # An existing empty directory is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    assert _run([tmp_path / "ci.npy", "--out", tmp_path / "empty"], capsys)[0] == 0
    assert _siblings(out) == [] and _siblings(tmp_path / "empty") == []


# --------------------------------------------------------------------------------------------
# 3. Unfinished harvests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["dense", "sparse"])
def harvests(tmp_path_factory, request) -> dict:
    """A finished harvest (400 rows in 7 blocks of 64) and a copy made unfinished: blocks 3, 5
    and 6 have no completion record and zero rows (dense) or no block group (sparse), as after
    a kill (with Ray, blocks finish out of order, so the finished ones need not be a
    prefix)."""
    from scalespd.config import ProfilesConfig
    from scalespd.profiles.harvest import harvest
    from scalespd.profiles.reader import open_ci
    from scalespd.profiles.sources import RandomRowSource
    from scalespd.profiles.synthetic import SyntheticCIModel

    d = tmp_path_factory.mktemp("harvest")
    model = SyntheticCIModel(6, [("enc", 7), ("mid", 5), ("dec", 4)], seed=0)
    cfg = ProfilesConfig(chunk_rows=32, block_rows=64, chunk_cols=6, batch_rows=64,
                         executor="local", device="cpu", tau=0.1, dtype="float32",
                         storage=request.param)
    harvest(model, RandomRowSource(400, 6, seed=2, p=0.4), d / "full", cfg)
    part = d / "partial"
    shutil.copytree(d / "full", part)
    (part / "harvest.json").unlink()
    full = open_ci(d / "full" / "ci.zarr")
    for b in (3, 5, 6):
        (part / "blocks" / f"block_{b:07d}.npz").unlink()
        if request.param == "dense":
            zarr.open_array(str(part / "ci.zarr"), mode="r+")[b * 64:min((b + 1) * 64, 400)] = 0
        else:
            shutil.rmtree(part / "ci.zarr" / "rows" / f"{b:07d}")
    rows = np.asarray(full[:])[np.r_[0:192, 256:320]]
    # The reference in the same form, so that it takes the same (dense or sparse) path.
    ref = d / ("finished_rows.npy" if request.param == "dense" else "finished_rows.npz")
    if request.param == "dense":
        np.save(ref, rows)
    else:
        sp.save_npz(ref, sp.csr_matrix(rows))
    return {"full": d / "full", "partial": part, "finished_rows": ref}


def test_unfinished_harvest_is_refused_naming_the_blocks_done(harvests, tmp_path, capsys):
    part = harvests["partial"]
    _refused([part, "--out", tmp_path / "o"], capsys, str(part), "unfinished harvest",
             "4 of 7 row blocks", "--allow-partial")
    # Its ci.zarr passed directly gets the same check.
    _refused([part / "ci.zarr", "--out", tmp_path / "o"], capsys, "4 of 7 row blocks")
    assert not (tmp_path / "o").exists() and _siblings(tmp_path / "o") == []
    # The finished harvest is accepted as before.
    assert _run([harvests["full"], "--out", tmp_path / "full"], capsys)[0] == 0


def test_allow_partial_clusters_only_the_finished_rows(harvests, tmp_path, capsys, caplog):
    caplog.set_level("WARNING", logger="scalespd.cluster")
    rc, err = _run([harvests["partial"], "--out", tmp_path / "p", "--allow-partial"], capsys)
    assert rc == 0, err
    assert "only the 256 rows of its 4 finished row blocks" in caplog.text
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["n_rows"] == 256
    assert s["partial"] == {"finished_blocks": 4, "n_blocks": 7, "rows_used": 256,
                            "rows_total": 400, "row_ranges": [[0, 192], [256, 320]]}
    # The same clusters as the finished rows alone: no zero-filled row took part.
    assert _run([harvests["finished_rows"], "--out", tmp_path / "ref"], capsys)[0] == 0
    for name in ("clusters.csv", "components.csv", "graph/topk.npz"):
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    # largest_component mode reads the profiles again (assignment by correlation).
    assert _run([harvests["partial"], "--out", tmp_path / "lc", "--allow-partial", "--mode",
                 "largest_component"], capsys)[0] == 0


def test_allow_partial_with_no_finished_block_is_refused(harvests, tmp_path, capsys):
    empty = tmp_path / "none"
    shutil.copytree(harvests["partial"], empty)
    for p in (empty / "blocks").glob("block_*.npz"):
        p.unlink()
    _refused([empty, "--out", tmp_path / "o", "--allow-partial"], capsys, "0 of 7")


# --------------------------------------------------------------------------------------------
# 4. Temporary directories of killed runs
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_dirs_of_dead_runs_are_removed(ci, tmp_path, capsys):
    np.save(tmp_path / "ci.npy", ci)
    out = tmp_path / "out"
    dead = _dead_pid()
    host = cluster._HOST
    stale = [tmp_path / f".out.partial-{dead}-{host}", tmp_path / f".out.partial-{dead}",
             tmp_path / f".out.old-{dead}-{host}"]
    keep = [tmp_path / f".out.partial-{os.getppid()}-{host}",  # its process is alive
            tmp_path / f".out.partial-{dead}-some.other.host",  # pid means nothing here
            tmp_path / f".other.partial-{dead}-{host}"]  # another --out
    for d in stale + keep:
        d.mkdir()
        (d / "clusters.csv").write_text("half written")
    out.mkdir()  # an --out exists, so the stale .old is deleted, not restored
    assert _run([tmp_path / "ci.npy", "--out", out], capsys)[0] == 0
    assert not any(d.exists() for d in stale)
    assert all(d.exists() for d in keep)
    assert (out / "summary.json").exists()


def test_output_moved_aside_by_a_killed_overwrite_is_restored(ci, tmp_path, capsys):
    """Killed between renaming the old DIR aside and renaming the new one into place."""
    np.save(tmp_path / "ci.npy", ci)
    out = tmp_path / "out"
    assert _run([tmp_path / "ci.npy", "--out", out], capsys)[0] == 0
    before = _tree(out)
    dead = _dead_pid()
    out.rename(tmp_path / f".out.old-{dead}-{cluster._HOST}")
    cluster.remove_stale_siblings(out)
    assert _tree(out) == before and _siblings(out) == []


def _slow_run(npy: Path, out: Path, **kwargs) -> subprocess.Popen:
    """`scalespd.cluster npy --out out` in a new process whose graph step hangs for a minute."""
    script = textwrap.dedent(f"""
        import sys, time
        import scalespd.graph
        from scalespd.cluster import main
        def slow(*args, **kwargs):
            time.sleep(60)
        scalespd.graph.build_graph = slow
        sys.exit(main([{str(npy)!r}, "--out", {str(out)!r}]))
    """)
    return subprocess.Popen([sys.executable, "-c", script], **kwargs)


def _wait_for_partial(out: Path) -> None:
    deadline = time.monotonic() + 60
    while not _siblings(out) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_sigkilled_run_leaves_a_partial_dir_that_the_next_run_removes(ci, tmp_path, capsys):
    np.save(tmp_path / "ci.npy", ci)
    out = tmp_path / "out"
    proc = _slow_run(tmp_path / "ci.npy", out, stderr=subprocess.DEVNULL)
    try:
        _wait_for_partial(out)
        assert [p.name for p in _siblings(out)] == [f".out.partial-{proc.pid}-{cluster._HOST}"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _siblings(out) and not out.exists()  # what SIGKILL leaves behind
    assert _run([tmp_path / "ci.npy", "--out", out], capsys)[0] == 0
    assert _siblings(out) == [] and (out / MANIFEST).exists()

    # SIGTERM (kill, ray job stop, schedulers) is handled like Ctrl-C: cleaned up, status 130.
    out2 = tmp_path / "out2"
    proc = _slow_run(tmp_path / "ci.npy", out2, stderr=subprocess.PIPE, text=True)
    _wait_for_partial(out2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in err and _siblings(out2) == [] and not out2.exists()


# --------------------------------------------------------------------------------------------
# 5. One error line instead of a traceback or a silent wrong result
# --------------------------------------------------------------------------------------------


def test_bad_inputs_and_flags_are_one_error_line(ci, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty.npy").write_bytes(b"")
    _refused([tmp_path / "empty.npy", "--out", out], capsys, "empty.npy", "0 bytes")
    neg = ci.copy()
    neg[123, 7] = -0.25
    np.save(tmp_path / "neg.npy", neg)
    _refused([tmp_path / "neg.npy", "--out", out], capsys, "neg.npy", "negative",
             "row 123", "column 7", "-0.25")
    np.save(tmp_path / "m2.npy", ci[:2])
    _refused([tmp_path / "m2.npy", "--out", out], capsys, "m2.npy", f"at least {MIN_ROWS} rows",
             "(2, 12)")
    np.save(tmp_path / "few.npy", ci[:MIN_ROWS - 1])
    _refused([tmp_path / "few.npy", "--out", out], capsys, f"at least {MIN_ROWS} rows")
    for bad in ("2", "1", "-0.1", "nan"):
        _refused([tmp_path / "few.npy", "--out", out, "--edge-threshold", bad], capsys,
                 "--edge-threshold", "[0, 1)")
    assert not out.exists() and _siblings(out) == []
    # MIN_ROWS rows are accepted.
    np.save(tmp_path / "enough.npy", ci[:MIN_ROWS])
    assert _run([tmp_path / "enough.npy", "--out", out, "--k", 3], capsys)[0] == 0
    assert issubclass(InputError, UserError) and issubclass(InputError, ValueError)


def test_full_disk_while_writing_is_one_error_line(ci, tmp_path, capsys, monkeypatch):
    from scalespd.graph.build import GraphResult

    np.save(tmp_path / "ci.npy", ci)

    def full(self, out_dir) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(out_dir) / "topk.npz"))

    monkeypatch.setattr(GraphResult, "save", full)
    out = tmp_path / "out"
    _refused([tmp_path / "ci.npy", "--out", out], capsys, "topk.npz", "disk is full")
    assert not out.exists() and _siblings(out) == []


def test_read_only_out_location_is_one_error_line(ci, tmp_path, capsys, monkeypatch):
    """Simulated: tests may run as root, where chmod does not stop writes."""
    np.save(tmp_path / "ci.npy", ci)
    ro = tmp_path / "ro"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    _refused([tmp_path / "ci.npy", "--out", ro / "out"], capsys, f"--out {ro / 'out'}",
             "read-only")
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    ro.mkdir()
    monkeypatch.setattr(os, "mkdir", mkdir)
    _refused([tmp_path / "ci.npy", "--out", ro / "out"], capsys, "read-only")
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the same "
                    "path is covered by test_read_only_out_location_is_one_error_line")
def test_unwritable_out_parent_is_one_error_line(ci, tmp_path, capsys):
    np.save(tmp_path / "ci.npy", ci)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused([tmp_path / "ci.npy", "--out", ro / "out"], capsys, f"--out {ro / 'out'}",
                 "permission denied")
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------------------------
# 6. Internal bugs keep their traceback; Ctrl-C is 130
# --------------------------------------------------------------------------------------------


def test_internal_value_error_keeps_its_traceback(ci, tmp_path, monkeypatch):
    import scalespd.graph

    def bug(*args, **kwargs):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(scalespd.graph, "build_graph", bug)
    np.save(tmp_path / "ci.npy", ci)
    with pytest.raises(ValueError, match="internal bug"):
        main([str(tmp_path / "ci.npy"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


def test_ctrl_c_exits_130_and_leaves_no_partial_output(ci, tmp_path, capsys, monkeypatch):
    import scalespd.graph

    np.save(tmp_path / "ci.npy", ci)
    out = tmp_path / "out"
    assert _run([tmp_path / "ci.npy", "--out", out], capsys)[0] == 0
    before = _tree(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scalespd.graph, "build_graph", interrupted)
    rc, err = _run([tmp_path / "ci.npy", "--out", out, "--overwrite"], capsys)
    assert rc == EXIT_INTERRUPTED == 130
    assert "interrupted; re-run the same command" in err and "Traceback" not in err
    assert _siblings(out) == [] and _tree(out) == before  # the old output is untouched
    rc, err = _run([tmp_path / "ci.npy", "--out", tmp_path / "new"], capsys)
    assert rc == 130 and not (tmp_path / "new").exists() and _siblings(tmp_path / "new") == []
