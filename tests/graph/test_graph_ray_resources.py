"""What the graph stage's Ray tasks reserve: one CPU, or ray.gpus_per_task GPUs when the tile
math runs on CUDA (checked on the task options, so no GPU is needed)."""

from __future__ import annotations

from typing import Any

import pytest

from scalespd.graph import build, sparse


class _Stop(Exception):
    pass


@pytest.fixture
def task_options(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records the options each Ray task gets and stops before anything is submitted."""
    import ray

    seen: list[dict[str, Any]] = []

    class _Task:
        def options(self, **kw: Any) -> None:
            seen.append(kw)
            raise _Stop

    monkeypatch.setattr(ray, "remote", lambda fn: _Task())
    return seen


@pytest.mark.parametrize(("device", "gpus"), [("cuda", 0.25), ("cuda", 1.0), ("cpu", 0.5)])
def test_row_block_and_sparse_pass_tasks_reserve_gpus_per_task(
        task_options: list[dict[str, Any]], device: str, gpus: float) -> None:
    with pytest.raises(_Stop):
        next(build._ray_blocks(None, None, 5, 0.0, device, [0],  # type: ignore[arg-type]
                               gpus_per_task=gpus))
    with pytest.raises(_Stop):
        next(sparse._ray_groups(None, None, None, None, None, [0], 0.0, 5,  # type: ignore[arg-type]
                                10, device, gpus_per_task=gpus))  # type: ignore[arg-type]
    want = gpus if device == "cuda" else 0
    assert task_options == [{"num_cpus": 1, "num_gpus": want}] * 2
