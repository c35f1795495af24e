"""`python -m scalespd.cluster PROFILES.npz`: a scipy sparse matrix (scipy.sparse.save_npz) is
read sparse, takes the sparse correlation path, and gives the clusters of the same matrix saved
dense; bad sparse files are refused with one error line and no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from synthetic_spectral import planted_profiles

from scalespd.cluster import main


@pytest.fixture(scope="module")
def planted_sparse(tmp_path_factory) -> dict:
    """A planted matrix without background noise (mostly exact zeros), saved dense (.npy) and
    sparse (.npz as CSR, CSC and COO)."""
    d = tmp_path_factory.mktemp("cli_sparse")
    rng = np.random.default_rng(1)
    X, truth = planted_profiles(rng.integers(2, 9, size=30), 2500, n_dead=15, n_constant=1,
                                noise=0.0, active_prob=(0.02, 0.08), seed=1)
    np.save(d / "X.npy", X)
    for fmt in ("csr", "csc", "coo"):
        sp.save_npz(d / f"X_{fmt}.npz", getattr(sp, f"{fmt}_matrix")(X))
    return {"dir": d, "X": X, "truth": truth}


def _run(args: list[object]) -> int:
    return main([str(a) for a in args])


def _refused(args: list[object], capsys, *needles: str) -> None:
    assert _run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_npz_takes_the_sparse_path_and_equals_the_dense_file(planted_sparse, tmp_path):
    d, X, truth = planted_sparse["dir"], planted_sparse["X"], planted_sparse["truth"]
    assert (X == 0).mean() > 0.8
    assert _run([d / "X_csr.npz", "--out", tmp_path / "sparse"]) == 0
    assert _run([d / "X.npy", "--out", tmp_path / "dense", "--set",
                 "graph.correlation=dense"]) == 0
    s = json.loads((tmp_path / "sparse" / "summary.json").read_text())
    assert s["correlation"] == "sparse"
    assert s["inputs"]["shape"] == list(X.shape)
    assert json.loads((tmp_path / "dense" / "summary.json").read_text())["correlation"] == "dense"
    g = json.loads((tmp_path / "sparse" / "graph" / "summary.json").read_text())
    assert g["correlation"]["path"] == "sparse" and g["correlation"]["setting"] == "auto"
    # The same alive filter, graph and clusters as the dense file through the dense path.
    a = pd.read_csv(tmp_path / "sparse" / "clusters.csv")
    b = pd.read_csv(tmp_path / "dense" / "clusters.csv")
    pd.testing.assert_frame_equal(a, b)
    ca = pd.read_csv(tmp_path / "sparse" / "components.csv")
    cb = pd.read_csv(tmp_path / "dense" / "components.csv")
    pd.testing.assert_frame_equal(ca, cb, rtol=1e-9)
    with np.load(tmp_path / "sparse" / "graph" / "topk.npz") as ta, \
            np.load(tmp_path / "dense" / "graph" / "topk.npz") as tb:
        np.testing.assert_array_equal(ta["idx"], tb["idx"])
        np.testing.assert_allclose(ta["val"], tb["val"], atol=1e-5, rtol=0)
    alive = a["alive"].to_numpy()
    assert adjusted_rand_score(truth[alive], a.loc[alive, "cluster"]) >= 0.95


def test_any_sparse_format_and_largest_component_mode(planted_sparse, tmp_path):
    """CSC and COO files give the CSR file's clusters; largest_component mode reads the sparse
    profiles again to assign the other nodes by correlation."""
    d = planted_sparse["dir"]
    ref = None
    for fmt in ("csr", "csc", "coo"):
        out = tmp_path / fmt
        assert _run([d / f"X_{fmt}.npz", "--out", out, "--mode", "largest_component",
                     "--edge-threshold", "0.1"]) == 0
        clusters = (out / "clusters.csv").read_bytes()
        ref = clusters if ref is None else ref
        assert clusters == ref
    assert _run([d / "X.npy", "--out", tmp_path / "npy", "--mode", "largest_component",
                 "--edge-threshold", "0.1"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "npy" / "clusters.csv"),
                                  pd.read_csv(tmp_path / "csr" / "clusters.csv"))


def test_bad_sparse_files_are_refused(planted_sparse, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty.npz").write_bytes(b"")
    _refused([tmp_path / "empty.npz", "--out", out], capsys, "empty.npz", "0 bytes")
    (tmp_path / "junk.npz").write_text("not a zip")
    _refused([tmp_path / "junk.npz", "--out", out], capsys, "junk.npz", "save_npz")
    np.savez(tmp_path / "dense.npz", a=np.ones((30, 4)))  # an .npz, but not a sparse matrix
    _refused([tmp_path / "dense.npz", "--out", out], capsys, "dense.npz", "save_npz")
    X = sp.csr_matrix(planted_sparse["X"])
    bad = X.tolil()  # lil: setting entries that were zeros is cheap (and silent)
    bad[1234, 7] = np.nan
    sp.save_npz(tmp_path / "nan.npz", bad.tocsr())
    _refused([tmp_path / "nan.npz", "--out", out], capsys, "NaN", "row 1234", "column 7")
    bad = X.tolil()
    bad[99, 5] = -0.25
    bad[120, 3] = -0.5
    sp.save_npz(tmp_path / "neg.npz", bad.tocsr())
    _refused([tmp_path / "neg.npz", "--out", out], capsys, "negative", "row 99", "column 5")
    sp.save_npz(tmp_path / "short.npz", X[:10])
    _refused([tmp_path / "short.npz", "--out", out], capsys, "at least 20 rows")
    sp.save_npz(tmp_path / "dead.npz", sp.csr_matrix((50, 8), dtype=np.float32))
    _refused([tmp_path / "dead.npz", "--out", out], capsys, "exceeds --tau")
    _no_output(out)
