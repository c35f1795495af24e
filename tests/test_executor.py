"""The one executor policy (scalespd/executor.py) every stage asks."""

from __future__ import annotations

import pytest

from scalespd.config import RayConfig
from scalespd.executor import choose


def test_fixed_settings_are_obeyed() -> None:
    assert choose("graph", "local", work=1e9, minimum=1, pieces=100) == "local"
    assert choose("graph", "ray", work=0, minimum=1, pieces=1) == "ray"


def test_auto_uses_ray_for_large_work_with_pieces_to_share(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose("spectral", "auto", work=10.0, minimum=2.0, pieces=4) == "ray"
    assert choose("spectral", "auto", work=1.0, minimum=2.0, pieces=4) == "local"
    assert choose("spectral", "auto", work=1e9, minimum=2.0, pieces=1) == "local"


def test_auto_uses_a_configured_cluster_even_for_small_work(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = RayConfig(address="10.0.0.1:6379")
    assert choose("graph", "auto", work=1, minimum=2, pieces=2, ray_cfg=cluster) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # as inside `ray job submit`
    assert choose("graph", "auto", work=1, minimum=2, pieces=2) == "ray"
    assert choose("graph", "auto", work=1, minimum=2, pieces=1) == "local"


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(ValueError, match="auto, local or ray"):
        choose("graph", "gpu", work=1, minimum=1, pieces=2)  # type: ignore[arg-type]


def test_files_only_this_process_sees_keep_the_work_local(monkeypatch) -> None:
    """Ray workers are other processes: a memory:// run directory is invisible to them, while a
    local or s3:// one is shared."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    for setting in ("auto", "ray"):
        assert choose("graph", setting, work=9, minimum=2, pieces=4,
                      data="memory://r/run") == "local"
        assert choose("graph", setting, work=9, minimum=2, pieces=4,
                      data="s3://bucket/run") == "ray"
        assert choose("graph", setting, work=9, minimum=2, pieces=4, data="/tmp/run") == "ray"
