"""GPU package detection: a missing package is quiet, a broken one says so once; asking for
CUDA without a usable GPU is a config error, not a silent CPU fallback."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from scalespd import backend
from scalespd.errors import ConfigError


@pytest.fixture
def fresh_cache():
    backend.cupy_gpu_available.cache_clear()
    backend.cuml_available.cache_clear()
    yield
    backend.cupy_gpu_available.cache_clear()
    backend.cuml_available.cache_clear()


def _broken_cupy() -> types.ModuleType:
    mod = types.ModuleType("cupy")

    def no_driver() -> int:
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver))
    return mod


def test_broken_cupy_is_logged_once(fresh_cache, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _broken_cupy())
    with caplog.at_level(logging.WARNING, logger="scalespd.backend"):
        assert backend.cupy_gpu_available() is False
        assert backend.resolve_device("auto") == "cpu"
        assert backend.cupy_gpu_available() is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "cupy is installed but cannot be used" in warnings[0]
    assert "CUDA driver version is insufficient" in warnings[0]


def test_missing_cupy_is_quiet(fresh_cache, monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with caplog.at_level(logging.WARNING, logger="scalespd.backend"):
        assert backend.cupy_gpu_available() is False
    # ModuleNotFoundError for a None entry names the package: a normal CPU install.
    assert not caplog.records


def test_cuda_without_gpu_is_a_config_error(fresh_cache,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _broken_cupy())
    with pytest.raises(ConfigError, match="'cuda' was requested"):
        backend.resolve_device("cuda")


def test_torch_device_for_model_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profiles stage resolves its device through torch (the model runs there), with the
    same rules and an error naming its field."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.resolve_device("auto", "torch") == "cpu"
    assert backend.resolve_device("cpu", "torch") == "cpu"
    with pytest.raises(ConfigError, match="profiles.device: 'cuda' was requested but torch"):
        backend.resolve_device("cuda", "torch", field="profiles.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.resolve_device("auto", "torch") == "cuda"
