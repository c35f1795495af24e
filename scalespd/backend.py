"""Array and k-means backend: NumPy/SciPy/scikit-learn on CPU, CuPy (+ cuML when installed) on GPU.

GPU packages are imported lazily and only when a GPU path is asked for, so the CPU install never
needs them. Functions here are plain functions (no Ray), so GPU kernels can be tested on a bare
GPU machine.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Literal

import numpy as np

Device = Literal["cpu", "cuda"]


@functools.cache
def cupy_gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError, missing driver, ...
        return False


@functools.cache
def torch_gpu_available() -> bool:
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.is_available()
    except Exception:
        return False


def resolve_device(device: str) -> Device:
    """Map a config's "auto" | "cpu" | "cuda" to the device that will actually be used.

    "cuda" when no GPU array library is usable is an error rather than a silent CPU fallback."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not cupy_gpu_available():
            raise RuntimeError(
                "device: 'cuda' was requested but CuPy cannot see a CUDA GPU "
                "(install the 'gpu' extra on a GPU machine, or use device: auto/cpu)"
            )
        return "cuda"
    if device == "auto":
        return "cuda" if cupy_gpu_available() else "cpu"
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def array_module(device: Device) -> ModuleType:
    """numpy on CPU, cupy on CUDA."""
    if device == "cuda":
        import cupy  # noqa: PLC0415

        return cupy
    return np


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy/CuPy/torch array to host NumPy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # cupy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cuml_available() -> bool:
    try:
        import cuml  # noqa: F401, PLC0415

        return True
    except Exception:
        return False
