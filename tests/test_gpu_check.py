"""bench/gpu_check.py: runs on a machine without a GPU (and without ray, zarr, dask, like the
GPU machines), records its GPU paths as skipped and writes its JSON; its GPU branches run
end to end when NumPy stands in for CuPy and torch's CPU for CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
CHECKS = {"correlation_tiles", "topk_dense", "topk_sparse", "eigen_dense", "eigen_sparse",
          "kmeans", "spectral_piece", "spd_step_tms", "harvest_forward_tms", "spd_step_lm",
          "harvest_forward_lm"}


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _missing_heavy_packages(root: Path) -> Path:
    """Packages named ray, zarr and dask that fail to import like absent ones (first on the
    path, they hide the installed ones): the GPU machine has none of them."""
    return _write(root, {f"{name}/__init__.py": f"raise ModuleNotFoundError("
                         f"'No module named {name!r}', name={name!r})\n"
                         for name in ("ray", "zarr", "dask")})


# NumPy and SciPy behind CuPy's names: enough of the API for scalespd's GPU code paths, so the
# script's GPU branches (device copies, comparisons, solver choice) run without a GPU.
FAKE_CUPY = {
    "cupy/__init__.py": """
        import types as _types

        import numpy as _np
        from numpy import *  # noqa: F403
        from numpy import linalg  # noqa: F401

        __version__ = "0+numpy"

        def asnumpy(a):
            return _np.asarray(a)

        def __getattr__(name):
            return getattr(_np, name)

        class _Device:
            def synchronize(self):
                pass

        cuda = _types.SimpleNamespace(
            Device=lambda *a: _Device(),
            runtime=_types.SimpleNamespace(
                getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 0,
                driverGetVersion=lambda: 0, getDeviceProperties=lambda i: {"name": b"fake"}))
        """,
    "cupyx/__init__.py": "",
    "cupyx/scipy/__init__.py": "",
    "cupyx/scipy/sparse/__init__.py": "from scipy.sparse import *  # noqa: F403\n",
    "cupyx/scipy/sparse/linalg/__init__.py": "from scipy.sparse.linalg import eigsh  # noqa\n",
}

DRY_RUN = """
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    gc.TORCH_GPU = "cpu"


    class Devices(gc.Devices):
        def __init__(self):
            super().__init__()
            assert self.cupy, "the fake CuPy should count as a GPU"
            self.torch, self.torch_reason = True, None

        def record(self):
            return {"torch_cuda": True, "cupy_cuda": True, "name": "dry run"}


    gc.Devices = Devices
    sys.exit(gc.main(sys.argv[2:]))
"""


def _run(args: list[str], pythonpath: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_quick_run_on_cpu_without_ray_zarr_dask(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = _run([str(SCRIPT), "--quick", "--out", str(out)],
                [_missing_heavy_packages(tmp_path / "missing")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["imported_heavy_modules"] == []
    assert doc["device"]["torch_cuda"] is False and doc["device"]["reason"] == "no CUDA device"
    assert {"python", "numpy", "torch", "cupy", "scalespd"} <= set(doc["versions"])
    assert set(doc["checks"]) == CHECKS
    for name, rec in doc["checks"].items():
        assert rec["status"] == "gpu_skipped", (name, rec)
        assert rec["gpu"]["skipped"].startswith("no CUDA device"), name
        assert rec["cpu"]["seconds"] > 0 and rec["tolerance"], name
    assert doc["checks"]["spd_step_tms"]["cpu"]["steps_per_s"] > 0
    assert doc["checks"]["spd_step_lm"]["info"]["ci_fn"] == "global_shared_mlp"
    assert doc["checks"]["spd_step_lm"]["info"]["output_loss"] == "kl"
    assert doc["checks"]["topk_sparse"]["info"]["path"] == "sparse"
    assert "gpu_skipped" in proc.stdout and "wrote" in proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the fake CuPy is only checked on Linux")
def test_gpu_branches_run_with_numpy_for_cupy_and_cpu_for_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    driver = tmp_path / "dry_run.py"
    driver.write_text(textwrap.dedent(DRY_RUN))
    fakes = _write(tmp_path / "fakes", FAKE_CUPY)
    proc = _run([str(driver), str(SCRIPT), "--quick", "--out", str(out)],
                [fakes, _missing_heavy_packages(tmp_path / "missing")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["imported_heavy_modules"] == []
    for name, rec in doc["checks"].items():
        assert rec["status"] == "ok", (name, rec)
        assert rec["gpu"]["seconds"] > 0 and rec["diff"], name
    assert doc["checks"]["eigen_sparse"]["gpu"]["solver"] == "gpu_sparse"
    assert doc["checks"]["eigen_dense"]["gpu"]["solver"] == "gpu_dense"
    assert doc["summary"] == {"ok": len(CHECKS)}
