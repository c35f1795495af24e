"""Streaming column statistics: Chan merges over any split equal numpy on the whole matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scalespd.profiles.stats import ColumnStats, atomic_write_npz, merge_all


def _matrix(rng: np.random.Generator, m: int, n: int, dtype: str) -> np.ndarray:
    x = np.clip(rng.normal(0.1, 0.4, size=(m, n)), 0, 1)
    x[:, 0] = 0.0  # dead column
    x[:, 1] = 1.0  # always on
    x[:, 2] = 0.5 + 1e-4 * rng.normal(size=m)  # large mean, tiny variance (cancellation risk)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merged_block_stats_equal_numpy(dtype: str) -> None:
    rng = np.random.default_rng(0)
    x = _matrix(rng, 1013, 9, dtype)
    tau = 0.1
    cuts = [0, 1, 200, 201, 640, 1013]  # uneven blocks, including a single-row one
    # slab=4 so that the column slabs (4, 4, 1 columns) are exercised too.
    parts = [ColumnStats.of(x[a:b], tau, slab=4) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    s = merge_all(parts, x.shape[1], tau)
    x64 = x.astype(np.float64)
    assert s.n == x.shape[0]
    np.testing.assert_array_equal(s.max, x64.max(axis=0))
    np.testing.assert_allclose(s.mean, x64.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.std, x64.std(axis=0, ddof=0), rtol=1e-9, atol=1e-13)
    np.testing.assert_array_equal(s.frac_active, (x64 > tau).mean(axis=0))
    assert s.std[0] == 0.0 and s.std[1] == 0.0 and s.max[0] == 0.0


def test_merge_is_order_sensitive_only_by_rounding_and_rejects_mismatch() -> None:
    rng = np.random.default_rng(1)
    x = _matrix(rng, 300, 4, "float32")
    a, b = ColumnStats.of(x[:100], 0.1), ColumnStats.of(x[100:], 0.1)
    np.testing.assert_allclose(a.merge(b).mean, b.merge(a).mean, rtol=1e-14)
    with pytest.raises(ValueError, match="tau"):
        a.merge(ColumnStats.of(x[100:], 0.2))
    with pytest.raises(ValueError, match="columns"):
        a.merge(ColumnStats.of(x[100:, :3], 0.1))


def test_record_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    s = ColumnStats.of(_matrix(rng, 50, 6, "float32"), 0.3)
    path = tmp_path / "rec.npz"
    atomic_write_npz(path, s.to_arrays())
    with np.load(path) as rec:
        t = ColumnStats.from_arrays(dict(rec))
    assert t.n == s.n and t.tau == s.tau
    for f in ("mean", "m2", "max", "n_active"):
        np.testing.assert_array_equal(getattr(t, f), getattr(s, f))
    assert [p.name for p in tmp_path.iterdir()] == ["rec.npz"]  # no temp file left behind
