"""The spectral stage on run directories at fsspec URLs (memory://, s3:// on a local moto
server): the same clusters, spectra and quality as on a local run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr
from synthetic_spectral import planted_profiles
from upath import UPath

from scalespd import storage
from scalespd.config import GraphConfig, RayConfig, RunConfig
from scalespd.errors import StageInputError
from scalespd.graph import stage as graph_stage
from scalespd.profiles.reader import CI_FILE, COMPONENTS_FILE, SUMMARY_FILE
from scalespd.profiles.store import ATTR_KEY
from scalespd.spectral import stage as spectral_stage
from scalespd.spectral.quality import QUALITY_FILE

TAU = 0.1
CSV_FILES = [spectral_stage.CLUSTERS_FILE, spectral_stage.ALTERNATIVE_FILE]


def _profiles(run_dir: Path) -> None:
    """A dense-layout profiles/ folder of planted mechanisms over two modules (some columns
    always on, so the "report both" alternative clustering is written too)."""
    rng = np.random.default_rng(3)
    X, _ = planted_profiles(rng.integers(1, 8, size=18), 500, n_dead=8, n_constant=2, seed=3)
    N = X.shape[1]
    half = N // 2
    pdir = run_dir / "profiles"
    pdir.mkdir(parents=True)
    arr = zarr.create_array(str(pdir / CI_FILE), shape=X.shape, chunks=(250, 32), dtype="float32")
    arr[:] = X
    arr.attrs[ATTR_KEY] = {"modules": [{"module": "a", "C": half}, {"module": "b", "C": N - half}]}
    module = np.where(np.arange(N) < half, "a", "b")
    pd.DataFrame({
        "component": np.arange(N), "name": [f"{m}:{i}" for i, m in enumerate(module)],
        "layer": (np.arange(N) >= half).astype(int), "module": module, "module_type": "mlp_in",
        "max": X.max(0), "mean": X.mean(0), "std": X.std(0),
        "frac_active": (X > TAU).mean(0), "alive": X.max(0) > TAU,
    }).to_csv(pdir / COMPONENTS_FILE, index=False)
    (pdir / SUMMARY_FILE).write_text("{}")


def _cfg() -> RunConfig:
    return RunConfig(graph=GraphConfig(device="cpu"), ray=RayConfig(executor="local"))


def _untimed(doc: Any) -> Any:
    """A JSON document without its wall-clock fields (timings, seconds, *_s)."""
    if isinstance(doc, dict):
        return {k: _untimed(v) for k, v in doc.items()
                if k not in ("timings", "seconds") and not k.endswith("_s")}
    if isinstance(doc, list):
        return [_untimed(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A local run directory with profiles, graph and spectral output, and the stage's info."""
    run = tmp_path_factory.mktemp("spectral-local")
    _profiles(run)
    graph_stage.run(_cfg(), run)
    return run, spectral_stage.run(_cfg(), run)


@pytest.mark.parametrize("where", ["memory_dir", "s3_dir"])
def test_spectral_stage_on_a_url_equals_the_local_run(where, local_run, request) -> None:
    remote: UPath = request.getfixturevalue(where)
    run, info = local_run
    for part in ("profiles", "graph"):
        storage.upload_dir(run / part, remote / part)
    assert _untimed(spectral_stage.run(_cfg(), remote)) == _untimed(info)

    local_out, out = run / "spectral", remote / "spectral"
    assert (local_out / spectral_stage.ALTERNATIVE_FILE).exists()  # both CSVs are compared
    for name in CSV_FILES:
        assert (out / name).read_bytes() == (local_out / name).read_bytes(), name
    for name in (spectral_stage.SPECTRA_FILE, QUALITY_FILE):
        a = json.loads((local_out / name).read_text())
        b = json.loads((out / name).read_text())
        assert _untimed(a) == _untimed(b), name


def test_spectral_stage_without_graph_names_the_url(local_run, memory_dir) -> None:
    run, _ = local_run
    storage.upload_dir(run / "profiles", memory_dir / "profiles")
    with pytest.raises(FileNotFoundError, match=r"memory://\S*/graph"):
        spectral_stage.run(_cfg(), memory_dir)


def test_graph_of_other_profiles_is_refused_naming_the_url(local_run, memory_dir) -> None:
    run, _ = local_run
    storage.upload_dir(run / "profiles", memory_dir / "profiles")
    storage.upload_dir(run / "graph", memory_dir / "graph")
    table = pd.read_csv(run / "profiles" / COMPONENTS_FILE)
    table.loc[table["alive"].idxmax(), "alive"] = False
    with (memory_dir / "profiles" / COMPONENTS_FILE).open("w") as f:
        table.to_csv(f, index=False)
    with pytest.raises(StageInputError, match=r"memory://\S*/graph: the graph's"):
        spectral_stage.run(_cfg(), memory_dir)
