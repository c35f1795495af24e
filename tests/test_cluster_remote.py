"""`python -m scalespd.cluster` with PROFILES, --components and --out at fsspec URLs
(memory://, s3:// on a local moto server): the same output files as with local paths, the
overwrite rules, and a failed run leaves no output behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from synthetic_spectral import planted_profiles
from upath import UPath

from scalespd import storage
from scalespd.cluster import MANIFEST, main

# Output files compared byte for byte (summary.json holds timings and the input locations).
SAME_FILES = ["clusters.csv", "components.csv", "graph/graph.npz", "graph/labels.npy",
              "graph/stats.npz", "graph/topk.npz"]
FAST = ["--executor", "local", "--device", "cpu"]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict[str, Any]:
    """A planted matrix as .npy and sparse .npz with a metadata CSV, and the local output."""
    import scipy.sparse as sp

    d = tmp_path_factory.mktemp("cluster-remote")
    rng = np.random.default_rng(1)
    X, _ = planted_profiles(rng.integers(1, 8, size=15), 300, n_dead=5, n_constant=1, seed=1)
    np.save(d / "X.npy", X)
    sp.save_npz(d / "X.npz", sp.csr_matrix(X))
    N = X.shape[1]
    pd.DataFrame({"name": [f"m:{i}" for i in range(N)], "layer": np.arange(N) % 2,
                  "module": "m"}).to_csv(d / "meta.csv", index=False)
    assert main([str(d / "X.npy"), "--out", str(d / "out"), "--components",
                 str(d / "meta.csv"), *FAST]) == 0
    return {"dir": d, "out": d / "out"}


def _upload(local: dict[str, Any], remote: UPath) -> None:
    for name in ("X.npy", "X.npz", "meta.csv"):
        (remote / "in" / name).write_bytes((local["dir"] / name).read_bytes())


def _same_output(local_out: Path, out: UPath) -> None:
    for name in SAME_FILES:
        assert (out / name).read_bytes() == (local_out / name).read_bytes(), name
    a = json.loads((local_out / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    for s in (a, b):
        s.pop("timings")
        s.pop("inputs")
    assert a == b
    rec_a = json.loads((local_out / MANIFEST).read_text())
    rec_b = json.loads((out / MANIFEST).read_text())
    assert rec_a["files"] == rec_b["files"]


@pytest.mark.parametrize("where", ["memory_dir", "s3_dir"])
def test_cluster_with_urls_writes_the_local_output(where, local, request) -> None:
    remote: UPath = request.getfixturevalue(where)
    _upload(local, remote)
    out = remote / "out"
    args = [storage.url(remote / "in" / "X.npy"), "--out", storage.url(out), "--components",
            storage.url(remote / "in" / "meta.csv"), *FAST]
    assert main(args) == 0
    _same_output(local["out"], out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["profiles"] == storage.url(remote / "in" / "X.npy")
    # An existing output is refused without --overwrite and replaced with it.
    assert main(args) == 2
    (out / "clusters.csv").write_bytes(b"stale")
    assert main([*args, "--overwrite"]) == 0
    _same_output(local["out"], out)
    # A file the run did not write is never overwritten.
    (out / "mine.txt").write_text("keep")
    assert main([*args, "--overwrite"]) == 2
    assert (out / "mine.txt").read_text() == "keep"


def test_sparse_npz_at_a_url_and_local_out(local, memory_dir, tmp_path) -> None:
    _upload(local, memory_dir)
    out = tmp_path / "out"
    assert main([storage.url(memory_dir / "in" / "X.npz"), "--out", str(out),
                 "--components", str(local["dir"] / "meta.csv"), *FAST]) == 0
    # The same matrix, read sparse: the same clusters.
    assert (out / "clusters.csv").read_bytes() == (local["out"] / "clusters.csv").read_bytes()


def test_failed_run_leaves_no_output_at_a_url(local, memory_dir, capsys, monkeypatch) -> None:
    _upload(local, memory_dir)
    out = memory_dir / "out"
    bad = pd.read_csv(local["dir"] / "meta.csv").iloc[:-1]
    with (memory_dir / "in" / "short.csv").open("w") as f:
        bad.to_csv(f, index=False)
    # Refused before anything is written, and named by its URL.
    assert main([storage.url(memory_dir / "in" / "X.npy"), "--out", storage.url(out),
                 "--components", storage.url(memory_dir / "in" / "short.csv"), *FAST]) == 2
    assert storage.url(memory_dir / "in" / "short.csv") in capsys.readouterr().err
    # Interrupted after every other file was written (just before the manifest that marks
    # the output complete): what was written is removed.
    import scalespd.cluster

    def interrupted(*args, **kwargs):
        assert (out / "clusters.csv").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(scalespd.cluster, "write_manifest", interrupted)
    assert main([storage.url(memory_dir / "in" / "X.npy"), "--out", storage.url(out),
                 *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


def test_out_inside_a_url_input_is_refused(local, memory_dir, capsys) -> None:
    _upload(local, memory_dir)
    assert main([storage.url(memory_dir / "in" / "X.npy"), "--out",
                 storage.url(memory_dir / "in"), "--overwrite", *FAST]) == 2
    assert "holds the input PROFILES" in capsys.readouterr().err
    assert (memory_dir / "in" / "X.npy").exists()
