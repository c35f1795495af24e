"""Writers own disjoint whole chunks: checked on the block -> chunk map, and by running Ray
actors that write disjoint blocks of one array concurrently."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from profiles_testlib import SIZES, direct_ci, direct_inputs, small_cfg, snapshot, tiny_model

from scalespd.profiles import BlockLayout, ProfilesError, open_profiles
from scalespd.profiles.harvest import BlockResult, harvest
from scalespd.profiles.sources import RandomRowSource

N = sum(c for _, c in SIZES)


@pytest.mark.parametrize(
    ("m", "n", "chunk_rows", "chunk_cols", "block_rows"),
    [(1000, 37, 64, 8, 192), (64, 5, 64, 8, 64), (10, 300, 64, 128, 128), (4097, 2, 1024, 1, 2048),
     (1, 1, 4096, 1024, 4096)],
)
def test_every_chunk_written_by_exactly_one_block(
    m: int, n: int, chunk_rows: int, chunk_cols: int, block_rows: int
) -> None:
    lay = BlockLayout.make(m, n, chunk_rows, chunk_cols, block_rows, 4)
    grid = {(r, c) for r in range(math.ceil(m / lay.chunk_rows))
            for c in range(math.ceil(n / lay.chunk_cols))}
    owners: dict[tuple[int, int], int] = {}
    rows_seen = np.zeros(m, dtype=int)
    for b in range(lay.n_blocks):
        start, stop = lay.block_range(b)
        rows_seen[start:stop] += 1
        # Block boundaries fall on chunk boundaries (or the array's end).
        assert start % lay.chunk_rows == 0 and (stop % lay.chunk_rows == 0 or stop == m)
        for ch in lay.chunks_of_block(b):
            assert ch not in owners, f"chunk {ch} written by blocks {owners[ch]} and {b}"
            owners[ch] = b
    assert set(owners) == grid  # every chunk has exactly one writer
    assert np.all(rows_seen == 1)  # every row in exactly one block
    for b, b2 in itertools.combinations(range(lay.n_blocks), 2):
        (s1, e1), (s2, e2) = lay.block_range(b), lay.block_range(b2)
        assert e1 <= s2 or e2 <= s1


def test_layout_rejects_blocks_that_split_chunks_and_absurd_chunks() -> None:
    with pytest.raises(ProfilesError, match="multiple of profiles.chunk_rows"):
        BlockLayout.make(1000, 10, 64, 8, 100, 4)
    with pytest.raises(ProfilesError, match="MiB"):
        BlockLayout.make(10**6, 10**5, 65536, 65536, 65536, 4)
    with pytest.raises(ProfilesError, match="chunks"):
        BlockLayout.make(10**8, 10**4, 1, 1, 1, 4)


def test_concurrent_ray_writers_on_disjoint_blocks(tmp_path: Path, ray_local) -> None:
    """Two Ray actors write interleaved blocks of one array at the same time; the array equals
    the in-memory CI and the in-process harvest, and the stats match."""
    model = tiny_model()
    src = RandomRowSource(1000, 6, seed=7, p=0.5, save_inputs=True)
    cfg = small_cfg(executor="ray", max_concurrency=2)
    res = harvest(model, src, tmp_path / "ray", cfg)
    assert res.executor == "ray" and res.n_computed == res.n_blocks == 16
    assert len({r.pid for r in res.block_results}) == 2  # both actors wrote blocks
    got = open_profiles(tmp_path / "ray")[:]
    np.testing.assert_allclose(got, direct_ci(model, direct_inputs(src, cfg, N)), rtol=0,
                               atol=1e-6)

    local = harvest(tiny_model(), src, tmp_path / "local", small_cfg())
    np.testing.assert_array_equal(got, open_profiles(tmp_path / "local")[:])
    np.testing.assert_array_equal(res.stats.max, local.stats.max)
    np.testing.assert_allclose(res.stats.mean, local.stats.mean, rtol=1e-14)


def test_local_interrupt_then_ray_resume(tmp_path: Path, ray_local) -> None:
    """Blocks finished in-process are kept; Ray actors fill in only the missing ones."""
    model, src = tiny_model(), RandomRowSource(512, 6, seed=8)

    class Stop(Exception):
        pass

    def stop_after_two(r: BlockResult) -> None:
        if r.block == 1:
            raise Stop

    with pytest.raises(Stop):
        harvest(model, src, tmp_path / "p", small_cfg(), on_block=stop_after_two)
    n_done = len(list((tmp_path / "p" / "blocks").glob("block_*.npz")))
    assert n_done in (2, 3)  # block 2 may have been in the background writer
    res = harvest(model, src, tmp_path / "p", small_cfg(executor="ray", max_concurrency=2))
    assert res.n_computed == 8 - n_done
    assert {r.block for r in res.block_results} == set(range(n_done, 8))
    harvest(model, src, tmp_path / "full", small_cfg())
    a, b = snapshot(tmp_path / "p" / "ci.zarr"), snapshot(tmp_path / "full" / "ci.zarr")
    assert a == b


def test_auto_executor_uses_ray_only_for_big_harvests() -> None:
    from scalespd.config import RayConfig
    from scalespd.executor import AUTO_MIN_PROFILES_VALUES as AUTO_RAY_MIN_VALUES
    from scalespd.profiles.harvest import _resolve_executor

    cfg = small_cfg(executor="auto")
    small = BlockLayout.make(1000, 16, 32, 6, 64, 4)
    assert _resolve_executor("auto", list(range(small.n_blocks)), small, cfg) == "local"
    big = BlockLayout.make(AUTO_RAY_MIN_VALUES // 1000 + 64, 1000, 64, 256, 64, 4)
    assert _resolve_executor("auto", list(range(big.n_blocks)), big, cfg) == "ray"
    assert _resolve_executor("auto", [0], big, cfg) == "local"  # one block: nothing to share
    assert _resolve_executor("auto", list(range(big.n_blocks)), big,
                             small_cfg(executor="auto", max_concurrency=1)) == "local"
    assert _resolve_executor("ray", [0], small, cfg) == "ray"
    # A configured cluster: the user asked for Ray, however small the harvest.
    on_cluster = RayConfig(address="10.0.0.1:6379")
    assert _resolve_executor("auto", list(range(small.n_blocks)), small, cfg, on_cluster) == "ray"
