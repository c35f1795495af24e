"""GPU check: every GPU code path of scalespd against its CPU path on the same data.

    python bench/gpu_check.py [--quick] [--out bench/results/gpu_check.json] [--only NAME ...]

Meant for a machine with one NVIDIA GPU, torch and CuPy but without Ray, zarr or dask (the GPU
machines of ../shared/spec/environment.md). It runs from the repository (no install needed) and
needs numpy, scipy, pydantic, pyyaml and tqdm; transformers for the language-model checks;
scikit-learn for the CPU k-means of `backend.kmeans` (without it the GPU k-means is compared
with the NumPy one). Full size is meant to take under 5 minutes there (most of it the CPU
paths); `--quick` uses small sizes (seconds on a laptop CPU; tests/test_gpu_check.py runs it).
Without a CUDA device every check still runs its CPU path and records its GPU path as skipped.

Checks (each runs the CPU path, then the GPU path on the same data, and compares):

graph (CuPy, `graph.device`)
  correlation_tiles   every Pearson tile of a planted profile matrix, `correlation_tile` with
                      xp = numpy vs cupy: max |difference|.
  topk_dense          `build_graph(correlation="dense")`: the production pass 2 (tiles, running
                      top-k, candidate selection on the device): top-k values and ids.
  topk_sparse         `build_graph(correlation="sparse")` (scipy.sparse vs cupyx.scipy.sparse
                      co-activation products) on sparse profiles: top-k values and ids.
spectral (CuPy, `spectral.device`)
  eigen_dense         `smallest_eigenpairs`: scipy eigh vs cupy eigh (≤ 4096 nodes).
  eigen_sparse        ARPACK shift-invert vs CuPy Lanczos on the normalised adjacency (> 4096
                      nodes): eigenvalues and the angle between the eigenvector subspaces.
  kmeans              `backend.kmeans` (scikit-learn vs cuML / CuPy) and `kmeans_xp` (numpy vs
                      cupy, same seeding) on separated blobs: label agreement.
  spectral_piece      `cluster_piece` (eigengap, k-means, recursive split) on a planted graph.
profiles (torch, `profiles.device`)
  harvest_forward_tms, harvest_forward_lm
                      the harvest forward (`ComponentModel.causal_importances` in batches, cast
                      to float32 on the host, as `profiles.harvest.compute_block_ci` does) on
                      the default TMS decomposition and a LLaMA decomposition.
train (torch, `decompose.use_gpu`)
  spd_step_tms, spd_step_lm
                      `SPDTrainer.train_step` steps/s on each device (the default run's TMS 5-2
                      settings; configs/lm_tiny.yaml's language-model settings: global shared CI
                      MLP, KL output loss, subset stochastic reconstruction, on a random
                      LlamaForCausalLM of the default shape), and on identical weights and data:
                      `spd_loss` with its deterministic terms (value and gradients) and the
                      masked forward of the stochastic losses with identical masks drawn on the
                      host (all modules masked; subset routing for the LM).

Why the imports below are unusual: `scalespd.graph`, `scalespd.profiles` and `scalespd.spectral`
are package __init__ files that import their whole stage, and `scalespd.graph`'s reaches
`scalespd.profiles`, whose reader imports zarr at module top. The leaf modules with the GPU code
(graph.topk, graph.build, graph.stats, spectral.eigen, spectral.core, profiles.stats) import
none of zarr, ray or dask, so the packages are registered as bare namespaces and only those
leaf modules are loaded. `profiles.harvest` imports zarr at module top; its forward is therefore
mirrored here (`_harvest_forward`) rather than imported. The JSON records which of ray, zarr and
dask ended up imported (none, on a correct run).

Output: bench/results/gpu_check.json with the device, versions, and per check the CPU and GPU
timings, the differences and their tolerances, and a status: ok, mismatch (a difference over
its tolerance), gpu_skipped (with the reason) or error. Exit status 1 on any mismatch or error.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "tests"):  # scalespd without an install; synthetic data from tests/
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

HEAVY = ("ray", "zarr", "dask")
NO_CUDA = "no CUDA device"
# The torch device of the GPU paths. tests/test_gpu_check.py sets it to "cpu" (with NumPy
# standing in for CuPy) to run every GPU branch of this script on a machine without a GPU.
TORCH_GPU = "cuda"


def _bare_packages(*names: str) -> None:
    """Register scalespd subpackages as bare namespaces so that importing one of their leaf
    modules does not run the package __init__ (which pulls in zarr; see the module docstring).
    A package already imported is left as it is."""
    import scalespd  # noqa: PLC0415

    root = Path(scalespd.__file__).parent
    for name in names:
        if name in sys.modules:
            continue
        short = name.rsplit(".", 1)[1]
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(root / short)]
        mod = types.ModuleType(name)
        mod.__spec__ = spec
        mod.__path__ = [str(root / short)]
        mod.__package__ = name
        sys.modules[name] = mod
        setattr(scalespd, short, mod)


_bare_packages("scalespd.graph", "scalespd.profiles", "scalespd.spectral")

import torch  # noqa: E402

from scalespd import backend  # noqa: E402

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

FULL: dict[str, Any] = {
    "tiles": {"n_mechanisms": 800, "n_rows": 16384, "tile_cols": 1024},
    "topk": {"n_mechanisms": 800, "n_rows": 16384, "tile_cols": 1024, "k": 10},
    "sparse": {"n_mechanisms": 1000, "n_rows": 16384, "tile_cols": 4096, "k": 10},
    "eigen_dense": {"blocks": [250] * 8},
    "eigen_sparse": {"blocks": [2500] * 8},
    "kmeans": {"n": 100_000, "d": 16, "k": 16},
    "piece": {"blocks": [160] * 30},
    "tms": {"harvest_rows": 65536, "steps_cpu": 100, "warmup_cpu": 1, "steps_gpu": 100},
    "lm": {"harvest_sequences": 64, "steps_cpu": 2, "warmup_cpu": 0, "steps_gpu": 20},
}
QUICK: dict[str, Any] = {
    "tiles": {"n_mechanisms": 60, "n_rows": 1500, "tile_cols": 128},
    "topk": {"n_mechanisms": 60, "n_rows": 1500, "tile_cols": 128, "k": 5},
    "sparse": {"n_mechanisms": 60, "n_rows": 2000, "tile_cols": 128, "k": 5},
    "eigen_dense": {"blocks": [40] * 5},
    "eigen_sparse": {"blocks": [830] * 5},
    "kmeans": {"n": 3000, "d": 8, "k": 6},
    "piece": {"blocks": [30] * 8},
    "tms": {"harvest_rows": 4096, "steps_cpu": 3, "warmup_cpu": 1, "steps_gpu": 3},
    "lm": {"harvest_sequences": 4, "steps_cpu": 2, "warmup_cpu": 1, "steps_gpu": 2},
}

# --------------------------------------------------------------------------------------------
# Devices, timing, comparisons
# --------------------------------------------------------------------------------------------


class Devices:
    """Which GPU paths can run here, and why not when they cannot."""

    def __init__(self) -> None:
        self.torch = bool(torch.cuda.is_available())
        self.cupy = backend.cupy_gpu_available()
        if self.torch:
            self.torch_reason = None
        elif torch.version.cuda is None:
            self.torch_reason = f"{NO_CUDA} (torch {torch.__version__} is a CPU build)"
        else:
            self.torch_reason = NO_CUDA
        if self.cupy:
            self.cupy_reason = None
        else:
            try:
                import cupy  # noqa: F401, PLC0415

                self.cupy_reason = f"{NO_CUDA} (CuPy sees none)"
            except Exception as err:
                self.cupy_reason = f"{NO_CUDA} (CuPy unusable: {type(err).__name__}: {err})"

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"torch_cuda": self.torch, "cupy_cuda": self.cupy}
        if self.torch:
            p = torch.cuda.get_device_properties(0)
            rec.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                       memory_gib=round(p.total_memory / 2**30, 1),
                       capability=f"{p.major}.{p.minor}")
        elif self.cupy:
            import cupy  # noqa: PLC0415

            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            rec["name"] = name.decode() if isinstance(name, bytes) else str(name)
        else:
            rec["name"] = None
            rec["reason"] = NO_CUDA
        return rec


def _sync() -> None:
    """Wait for queued GPU work, so that timings cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if backend.cupy_gpu_available():
        import cupy  # noqa: PLC0415

        cupy.cuda.Device().synchronize()


@contextmanager
def _timer(into: dict[str, Any], key: str = "seconds") -> Iterator[None]:
    _sync()
    t0 = time.perf_counter()
    yield
    _sync()
    into[key] = round(time.perf_counter() - t0, 4)


def max_abs(a: Any, b: Any) -> float:
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(backend.to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1 = the same partition), without scikit-learn
    (which the GPU machine may lack)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    n = a.size
    total = n * (n - 1) / 2
    s_ij, s_a, s_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = s_a * s_b / total if total else 0.0
    top = (s_a + s_b) / 2
    return 1.0 if top == expected else (s_ij - expected) / (top - expected)


def subspace_sin(V1: np.ndarray, V2: np.ndarray, d: np.ndarray) -> float:
    """sin of the largest principal angle between span(V1) and span(V2), both D-orthonormal
    (Vᵀ D V = I, d the degrees): 0 when the two solvers found the same eigenspace, whatever
    rotation they chose inside near-degenerate eigenvalues."""
    s = np.sqrt(d)[:, None]
    q1, _ = np.linalg.qr(V1 * s)
    q2, _ = np.linalg.qr(V2 * s)
    cos = np.linalg.svd(q1.T @ q2, compute_uv=False)
    return float(math.sqrt(max(0.0, 1.0 - float(cos.min()) ** 2)))


def grads_rel(grads_a: list[torch.Tensor], grads_b: list[torch.Tensor]) -> float:
    """max |a - b| / max |a| over two lists of gradients (the first is the reference)."""
    diff, scale = 0.0, 0.0
    for ga, gb in zip(grads_a, grads_b, strict=True):
        ga, gb = ga.detach().double().cpu(), gb.detach().double().cpu()
        if ga.numel():
            diff = max(diff, float((ga - gb).abs().max()))
            scale = max(scale, float(ga.abs().max()))
    return diff / scale if scale > 0 else diff


class Check:
    """One CPU-vs-GPU comparison. `run(gpu)` fills `cpu`, `gpu` (when gpu is True), `diff`
    (metric -> value) and `info`; `tolerance` maps a metric to ("<=" | ">=", bound)."""

    def __init__(self, name: str, library: str, summary: str) -> None:
        self.name, self.library, self.summary = name, library, summary
        self.cpu: dict[str, Any] = {}
        self.gpu: dict[str, Any] = {}
        self.diff: dict[str, float] = {}
        self.tolerance: dict[str, tuple[str, float]] = {}
        self.info: dict[str, Any] = {}

    def within(self) -> dict[str, bool]:
        out = {}
        for metric, (op, bound) in self.tolerance.items():
            v = self.diff.get(metric)
            out[metric] = v is not None and math.isfinite(v) and (
                v <= bound if op == "<=" else v >= bound)
        return out


CheckFn = Callable[[Check, bool, dict[str, Any]], None]
CHECKS: list[tuple[str, str, str, CheckFn]] = []


def check(name: str, library: str, summary: str) -> Callable[[CheckFn], CheckFn]:
    def register(fn: CheckFn) -> CheckFn:
        CHECKS.append((name, library, summary, fn))
        return fn
    return register


# --------------------------------------------------------------------------------------------
# graph
# --------------------------------------------------------------------------------------------


@functools.cache  # tiles and topk_dense share one matrix (generating it costs seconds)
def _profiles(n_mechanisms: int, n_rows: int, noise: float = 0.03) -> np.ndarray:
    from synthetic_graph import planted_profiles  # noqa: PLC0415 (tests/, numpy only)

    return planted_profiles(n_mechanisms=n_mechanisms, n_rows=n_rows, noise=noise, seed=0)[0]


@check("correlation_tiles", "cupy", "graph.topk.correlation_tile, numpy vs cupy")
def check_tiles(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    from scalespd.graph.stats import column_stats  # noqa: PLC0415
    from scalespd.graph.topk import TileSource, correlation_tile  # noqa: PLC0415

    X = _profiles(size["n_mechanisms"], size["n_rows"])
    M, N = X.shape
    cols = np.arange(N)
    st = column_stats(X, cols, size["tile_cols"], M)
    keep = cols[~st.zero_var]
    src = TileSource(X, keep, st.mean[~st.zero_var].astype(np.float32),
                     (1.0 / (st.std[~st.zero_var] * math.sqrt(M))).astype(np.float32),
                     M, size["tile_cols"], M)
    n_panels = len(src.panels)
    widths = [e - s for s, e in src.panels]
    flops = sum(2.0 * M * widths[a] * widths[b]
                for a in range(n_panels) for b in range(a, n_panels))

    def tiles(xp: Any) -> list[Any]:
        out: list[Any] = []
        for a in range(n_panels):
            za = src.z(a, 0, M, xp)
            out.extend(correlation_tile(src, a, b, xp, za) for b in range(a, n_panels))
        return out

    c.info.update(rows=M, columns=int(keep.size), tile_cols=size["tile_cols"],
                  tiles=len(widths) * (len(widths) + 1) // 2, gflop=round(flops / 1e9, 2))
    with _timer(c.cpu):
        ref = tiles(np)
    c.cpu["gflop_per_s"] = round(flops / 1e9 / c.cpu["seconds"], 1)
    if gpu:
        cp = backend.array_module("cuda")
        with _timer(c.gpu, "warmup_seconds"):
            tiles(cp)
        with _timer(c.gpu):
            got = tiles(cp)
        c.gpu["gflop_per_s"] = round(flops / 1e9 / c.gpu["seconds"], 1)
        c.diff["max_abs"] = max(max_abs(r, g) for r, g in zip(ref, got, strict=True))
    c.tolerance["max_abs"] = ("<=", 1e-4)


def _graph(X: np.ndarray, correlation: str, size: dict[str, Any], device: str) -> Any:
    from scalespd.config import GraphConfig  # noqa: PLC0415
    from scalespd.graph.build import build_graph  # noqa: PLC0415

    # A fixed edge threshold: the data-derived one is computed on the host either way.
    cfg = GraphConfig(k=size["k"], edge_threshold=0.05, tile_cols=size["tile_cols"],
                      correlation=correlation)  # type: ignore[arg-type]
    return build_graph(X, cfg, device=device)


def _compare_topk(c: Check, ref: Any, got: Any) -> None:
    """Top-k lists of two GraphResults: values must agree; ids may differ only where two
    candidates' correlations are within the value tolerance (float rounding decides ties)."""
    c.diff["values_max_abs"] = max_abs(ref.topk_val, got.topk_val)
    rows = np.flatnonzero((ref.topk_idx != got.topk_idx).any(axis=1))
    c.info["rows_with_different_ids"] = int(rows.size)
    c.info["edges"] = [int(ref.graph.nnz), int(got.graph.nnz)]
    c.tolerance["values_max_abs"] = ("<=", 1e-4)


@check("topk_dense", "cupy", "graph.build.build_graph dense pass 2 (tiles + top-k)")
def check_topk_dense(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    X = _profiles(size["n_mechanisms"], size["n_rows"])
    c.info.update(rows=X.shape[0], columns=X.shape[1], k=size["k"])
    _run_topk(c, X, "dense", gpu, size)


@check("topk_sparse", "cupy", "graph.build.build_graph sparse pass 2 (co-activation products)")
def check_topk_sparse(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    # No dense noise: mostly exact zeros, like hard-clamped causal importances.
    X = _profiles(size["n_mechanisms"], size["n_rows"], noise=0.0)
    c.info.update(rows=X.shape[0], columns=X.shape[1], k=size["k"],
                  density=round(float(np.count_nonzero(X)) / X.size, 4))
    _run_topk(c, X, "sparse", gpu, size)


def _run_topk(c: Check, X: np.ndarray, path: str, gpu: bool, size: dict[str, Any]) -> None:
    """build_graph on `path` on the CPU and, with a GPU, on CUDA; top-k lists compared."""
    _graph(X[:256], path, size, "cpu")  # imports and first-call set-up, untimed
    with _timer(c.cpu):
        ref = _graph(X, path, size, "cpu")
    c.cpu["topk_seconds"] = round(ref.summary["timings"]["topk_s"], 4)
    c.info["path"] = ref.summary.get("correlation", {}).get("path")
    if gpu:
        with _timer(c.gpu, "warmup_seconds"):
            _graph(X[:256], path, size, "cuda")
        with _timer(c.gpu):
            got = _graph(X, path, size, "cuda")
        c.gpu["topk_seconds"] = round(got.summary["timings"]["topk_s"], 4)
        _compare_topk(c, ref, got)
    c.tolerance["values_max_abs"] = ("<=", 1e-4)


# --------------------------------------------------------------------------------------------
# spectral
# --------------------------------------------------------------------------------------------


def _planted_graph(blocks: list[int]) -> tuple[Any, np.ndarray]:
    from synthetic_spectral import planted_graph  # noqa: PLC0415 (tests/, numpy + scipy)

    W, truth, _ = planted_graph([blocks], degree=6.0, seed=0)
    return W, truth


def _eigen(c: Check, gpu: bool, blocks: list[int], solver_cpu: str, solver_gpu: str) -> None:
    from scalespd.spectral.eigen import degrees, smallest_eigenpairs  # noqa: PLC0415

    W, _ = _planted_graph(blocks)
    n, n_eig = W.shape[0], len(blocks) + 1
    # The CPU solver of the same kind as the GPU's: dense LAPACK for the dense check (the
    # spectral stage's own switch, spectral.dense_max_nodes, is far lower), ARPACK otherwise.
    dense_max = n if solver_cpu == "dense" else 2000
    c.info.update(nodes=n, edges=int(W.nnz // 2), n_eig=n_eig)
    with _timer(c.cpu):
        lam1, V1, s1 = smallest_eigenpairs(W, n_eig, dense_max_nodes=dense_max, device="cpu")
    c.cpu["solver"] = s1
    if s1 != solver_cpu:
        raise AssertionError(f"CPU solver {s1}, expected {solver_cpu}")
    if gpu:
        with _timer(c.gpu, "warmup_seconds"):
            smallest_eigenpairs(W, n_eig, dense_max_nodes=dense_max, device="cuda")
        with _timer(c.gpu):
            lam2, V2, s2 = smallest_eigenpairs(W, n_eig, dense_max_nodes=dense_max, device="cuda")
        c.gpu["solver"] = s2
        if s2 != solver_gpu:
            raise AssertionError(f"GPU solver {s2}, expected {solver_gpu}")
        c.diff["eigenvalues_max_abs"] = max_abs(lam1, lam2)
        # The planted blocks' eigenvectors (the last one sits at a gap edge: left out).
        c.diff["subspace_sin"] = subspace_sin(V1[:, :-1], V2[:, :-1], degrees(W))
    c.tolerance["eigenvalues_max_abs"] = ("<=", 1e-6)
    c.tolerance["subspace_sin"] = ("<=", 1e-4)


@check("eigen_dense", "cupy", "spectral.eigen.smallest_eigenpairs, scipy eigh vs cupy eigh")
def check_eigen_dense(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    _eigen(c, gpu, size["blocks"], "dense", "gpu_dense")


@check("eigen_sparse", "cupy",
       "spectral.eigen.smallest_eigenpairs, ARPACK shift-invert vs cupy Lanczos")
def check_eigen_sparse(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    _eigen(c, gpu, size["blocks"], "sparse", "gpu_sparse")


@check("kmeans", "cupy", "backend.kmeans (sklearn vs cuML/CuPy) and kmeans_xp (numpy vs cupy)")
def check_kmeans(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    n, d, k = size["n"], size["d"], size["k"]
    centres = rng.normal(0.0, 10.0, (k, d))
    truth = rng.integers(0, k, n)
    X = centres[truth] + rng.normal(0.0, 1.0, (n, d))
    c.info.update(rows=n, dims=d, clusters=k, n_init=10,
                  cuml=backend.cuml_available() if gpu else None)
    try:
        backend.kmeans(X[:2500], k, seed=0, device="cpu")  # imports scikit-learn, untimed
        sklearn = True
    except ImportError as err:
        # The CPU path above 2,000 rows is scikit-learn's; without it the GPU result is
        # compared with the batched NumPy k-means (the CPU path of smaller problems).
        c.info["cpu_reference"] = f"kmeans_xp on numpy ({err})"
        sklearn = False
    with _timer(c.cpu):
        ref = (backend.kmeans(X, k, seed=0, device="cpu") if sklearn
               else backend.kmeans_xp(X, k, seed=0, xp=np)[0])
    with _timer(c.cpu, "kmeans_xp_seconds"):
        ref_xp, inertia_cpu = backend.kmeans_xp(X, k, seed=0, xp=np)
    c.info["ari_cpu_vs_truth"] = round(adjusted_rand(ref, truth), 6)
    if gpu:
        cp = backend.array_module("cuda")
        with _timer(c.gpu, "warmup_seconds"):
            backend.kmeans(X[:1000], k, seed=0, device="cuda")
        with _timer(c.gpu):
            got = backend.kmeans(X, k, seed=0, device="cuda")
        Xg = cp.asarray(X)
        with _timer(c.gpu, "kmeans_xp_seconds"):
            got_xp, inertia_gpu = backend.kmeans_xp(Xg, k, seed=0, xp=cp)
        got_xp = backend.to_numpy(got_xp)
        c.diff["ari_kmeans"] = adjusted_rand(ref, got)
        # The same seeding on both devices; a rounding difference in a k-means++ draw would
        # renumber the clusters, so the partitions are compared (label equality is info).
        c.diff["kmeans_xp_ari"] = adjusted_rand(ref_xp, got_xp)
        c.info["kmeans_xp_labels_equal"] = float(np.mean(ref_xp == got_xp))
        c.diff["kmeans_xp_inertia_rel"] = abs(inertia_gpu - inertia_cpu) / inertia_cpu
    c.tolerance["ari_kmeans"] = (">=", 0.999)
    c.tolerance["kmeans_xp_ari"] = (">=", 0.999)
    c.tolerance["kmeans_xp_inertia_rel"] = ("<=", 1e-6)


@check("spectral_piece", "cupy", "spectral.core.cluster_piece (eigengap, k-means, splits)")
def check_piece(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    from scalespd.config import SpectralConfig  # noqa: PLC0415
    from scalespd.spectral.core import cluster_piece  # noqa: PLC0415

    W, truth = _planted_graph(size["blocks"])
    n = W.shape[0]
    keys = np.arange(n)
    cfg = SpectralConfig(gpu_min_nodes=1)  # every piece, however small, on the GPU
    c.info.update(nodes=n, planted_clusters=len(size["blocks"]))
    with _timer(c.cpu):
        ref = cluster_piece(W, keys, cfg, device="cpu")
    c.cpu["clusters"] = int(ref.labels.max()) + 1
    c.info["ari_cpu_vs_planted"] = round(adjusted_rand(ref.labels, truth), 6)
    if gpu:
        with _timer(c.gpu):
            got = cluster_piece(W, keys, cfg, device="cuda")
        c.gpu["clusters"] = int(got.labels.max()) + 1
        c.gpu["solvers"] = sorted({r["solver"] for r in got.records})
        c.diff["ari"] = adjusted_rand(ref.labels, got.labels)
    c.tolerance["ari"] = (">=", 0.999)


# --------------------------------------------------------------------------------------------
# profiles and train: TMS and a language model
# --------------------------------------------------------------------------------------------


def _harvest_forward(model: Any, x: torch.Tensor, batch_inputs: int, device: str
                     ) -> np.ndarray:
    """(R, N) float32 causal importances of inputs x in module order, batch by batch on
    `device`: the forward of `profiles.harvest.compute_block_ci` (which this script cannot
    import: profiles/harvest.py imports zarr at module top)."""
    parts = []
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch_inputs):
            ci = model.causal_importances(x[s:s + batch_inputs].to(device))
            cols = [ci[p].reshape(-1, ci[p].shape[-1]).to(torch.float32).cpu().numpy()
                    for p in model.module_paths]
            parts.append(np.concatenate(cols, axis=1))
    return np.concatenate(parts)


def _harvest(c: Check, gpu: bool, cpu_model: Any, gpu_model: Any | None, x: torch.Tensor,
             batch_inputs: int, rows_per_input: int) -> None:
    c.info.update(rows=int(x.shape[0]) * rows_per_input, batch_inputs=batch_inputs,
                  columns=int(sum(cpu_model.C.values())))
    _harvest_forward(cpu_model, x[:1], batch_inputs, "cpu")  # first-call set-up, untimed
    with _timer(c.cpu):
        ref = _harvest_forward(cpu_model, x, batch_inputs, "cpu")
    c.cpu["rows_per_s"] = round(ref.shape[0] / c.cpu["seconds"])
    if gpu and gpu_model is not None:
        with _timer(c.gpu, "warmup_seconds"):
            _harvest_forward(gpu_model, x[:batch_inputs], batch_inputs, TORCH_GPU)
        with _timer(c.gpu):
            got = _harvest_forward(gpu_model, x, batch_inputs, TORCH_GPU)
        c.gpu["rows_per_s"] = round(got.shape[0] / c.gpu["seconds"])
        c.diff["max_abs"] = max_abs(ref, got)
    c.tolerance["max_abs"] = ("<=", 1e-3)


def _steps(trainer: Any, n: int, into: dict[str, Any], warmup: int) -> None:
    """Time n train steps after `warmup` untimed ones (first-call set-up, kernel selection)."""
    for _ in range(warmup):
        trainer.train_step()
    _sync()
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    for _ in range(n):
        out = trainer.train_step()
    _sync()
    dt = time.perf_counter() - t0
    into.update(steps=n, seconds=round(dt, 4), steps_per_s=round(n / dt, 3),
                last_total_loss=float(out["total"]))
    if not math.isfinite(out["total"]):
        raise AssertionError(f"non-finite SPD loss after {n} steps on {trainer.device}")


def _same_inputs_losses(cfg: Any, models: list[Any], params: list[list[torch.Tensor]],
                        x: torch.Tensor, subset: bool) -> dict[str, float]:
    """On identical weights and data, per model (CPU first): the deterministic `spd_loss`
    terms (faithfulness + importance minimality) and the masked forward of the stochastic
    losses with masks drawn once on the host. Returns the value and gradient differences."""
    from scalespd.train.components import Mask  # noqa: PLC0415
    from scalespd.train.losses import recon_error, spd_loss, subset_routing  # noqa: PLC0415

    loss_cfg = cfg.loss.model_copy(update={"stochastic_recon": 0.0,
                                           "stochastic_recon_layerwise": 0.0,
                                           "stochastic_recon_subset": 0.0})
    det_cfg = cfg.model_copy(update={"loss": loss_cfg})
    det, det_grads, rec, rec_grads = [], [], [], []
    for model, ps in zip(models, params, strict=True):
        dev = ps[0].device
        xd = x.to(dev)
        for p in ps:
            p.grad = None
        total, _, _ = spd_loss(model, xd, det_cfg, 0, torch.Generator(device=dev).manual_seed(0))
        total.backward()
        det.append(float(total.detach()))
        det_grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                          for p in ps])
        for p in ps:
            p.grad = None
        cache = model.forward_cached(xd)
        ci = model.ci_from_cache(cache)  # continuous sampling: no randomness here
        gen = torch.Generator().manual_seed(1)  # host masks: the same on every device
        masks = {}
        for path, g in ci.lower.items():
            r = torch.rand(g.shape, generator=gen).to(dev)
            delta = (torch.rand(g.shape[:-1], generator=gen).to(dev)
                     if cfg.use_delta_component else None)
            masks[path] = Mask(component=g + (1 - g) * r, delta=delta)
        if subset:
            lead = next(iter(ci.lower.values())).shape[:-1]
            route = subset_routing(lead, len(model.module_paths), torch.device("cpu"),
                                   gen).to(dev)
            masks = {p: Mask(m.component, m.delta, route[..., i])
                     for i, (p, m) in enumerate(masks.items())}
        err, count = recon_error(model.forward_masked(xd, masks, cache), cache.output,
                                 cfg.loss.output)
        loss = err / count
        loss.backward()
        rec.append(float(loss.detach()))
        rec_grads.append([p.grad.detach().clone() if p.grad is not None
                          else torch.zeros_like(p) for p in ps])
        for p in ps:
            p.grad = None

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), 1e-30)

    return {"deterministic_loss_rel": rel(det[0], det[1]),
            "deterministic_grad_rel": grads_rel(det_grads[0], det_grads[1]),
            "masked_recon_loss_rel": rel(rec[0], rec[1]),
            "masked_recon_grad_rel": grads_rel(rec_grads[0], rec_grads[1])}


def _train_check(c: Check, gpu: bool, make: Callable[[str], Any], x: torch.Tensor,
                 size: dict[str, Any], subset: bool) -> tuple[Any, Any]:
    """Steps/s on each device, then the same-inputs comparison on the CPU trainer's weights.
    Returns the CPU and GPU trainers (GPU None when skipped) with identical weights.

    The CPU steps run with decompose.cpus_per_worker torch threads, as a CPU Ray Train worker
    of the decompose stage does (more threads make small steps slower on a shared machine)."""
    cpu = make("cpu")
    c.info.update(batch_size=cpu.cfg.batch_size, modules=len(cpu.model.module_paths),
                  subcomponents=int(sum(cpu.model.C.values())), ci_fn=cpu.cfg.ci_fn,
                  output_loss=cpu.cfg.loss.output,
                  trainable_params=int(sum(p.numel() for p in cpu.params)))
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu.cfg.cpus_per_worker)
    try:
        _steps(cpu, size["steps_cpu"], c.cpu, size["warmup_cpu"])
    finally:
        torch.set_num_threads(threads)
    c.cpu["torch_threads"] = cpu.cfg.cpus_per_worker
    if not gpu:
        return cpu, None
    dev = make(TORCH_GPU)
    _steps(dev, size["steps_gpu"], c.gpu, 2)
    c.info["gpu_speedup"] = round(c.gpu["steps_per_s"] / c.cpu["steps_per_s"], 2)
    dev.model.load_state_dict(cpu.model.state_dict())
    c.diff.update(_same_inputs_losses(cpu.cfg, [cpu.model, dev.model], [cpu.params, dev.params],
                                      x, subset))
    return cpu, dev


_TRAIN_TOL = {"deterministic_loss_rel": ("<=", 1e-4), "deterministic_grad_rel": ("<=", 1e-3),
              "masked_recon_loss_rel": ("<=", 1e-3), "masked_recon_grad_rel": ("<=", 1e-2)}

# Trainers shared by a train check and the harvest check that follows it (same weights).
_SHARED: dict[str, tuple[Any, Any]] = {}


def _tms_setup() -> tuple[Any, Any]:
    from scalespd.config import RunConfig  # noqa: PLC0415

    run = RunConfig()  # the built-in default run: TMS 5-2
    return run.target, run.decompose.model_copy(update={"faithfulness_warmup_steps": 0})


@check("spd_step_tms", "torch", "train.trainer.SPDTrainer.train_step, default TMS 5-2 run")
def check_spd_tms(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    from scalespd.targets import build_target, make_dataset  # noqa: PLC0415
    from scalespd.train.trainer import SPDTrainer  # noqa: PLC0415

    tcfg, dcfg = _tms_setup()

    def make(device: str) -> Any:
        return SPDTrainer(build_target(tcfg), tcfg, dcfg, device=device)

    x = make_dataset(tcfg).sample(dcfg.batch_size, torch.Generator().manual_seed(0))
    c.info["target"] = f"tms {tcfg.n_features}-{tcfg.n_hidden}"
    _SHARED["tms"] = _train_check(c, gpu, make, x, size, subset=False)
    c.tolerance.update(_TRAIN_TOL)


@check("harvest_forward_tms", "torch", "profiles harvest forward, default TMS decomposition")
def check_harvest_tms(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    from scalespd.config import ProfilesConfig  # noqa: PLC0415
    from scalespd.targets import make_dataset  # noqa: PLC0415

    if "tms" not in _SHARED:
        raise RuntimeError("needs the trainers of spd_step_tms (run it too)")
    cpu, dev = _SHARED["tms"]
    tcfg, _ = _tms_setup()
    x = make_dataset(tcfg).sample(size["harvest_rows"], torch.Generator().manual_seed(2))
    _harvest(c, gpu, cpu.model, None if dev is None else dev.model, x,
             ProfilesConfig().batch_rows, 1)


def _lm_setup(quick: bool) -> tuple[Any, Any]:
    from scalespd.config import HFCausalLMTargetConfig, load_config  # noqa: PLC0415

    cfg = load_config(REPO / "configs" / "lm_tiny.yaml")
    dcfg = cfg.decompose.model_copy(update={"faithfulness_warmup_steps": 0})
    tcfg = cfg.target
    if quick:
        tcfg = HFCausalLMTargetConfig(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2,
                                      d_mlp=48, vocab_size=300, seq_len=16, max_seq_len=16)
        dcfg = dcfg.model_copy(update={
            "modules": [m.model_copy(update={"C": 8}) for m in dcfg.modules],
            "ci_hidden": [16], "batch_size": 2, "eval_batch_size": 2})
    return tcfg, dcfg


def _lm_data(tcfg: Any) -> Any:
    from scalespd.train.lm import LMSequences  # noqa: PLC0415

    seqs = torch.randint(0, tcfg.vocab_size, (96, tcfg.seq_len),
                         generator=torch.Generator().manual_seed(0))
    return LMSequences(train=seqs[:64], heldout=seqs[64:], heldout_index=torch.arange(64, 96))


@check("spd_step_lm", "torch", "train.trainer.SPDTrainer.train_step, LLaMA with lm_tiny's "
       "settings (global_shared_mlp, kl, stochastic_recon_subset)")
def check_spd_lm(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    from scalespd.targets.lm.training import build_default_model  # noqa: PLC0415
    from scalespd.train.trainer import SPDTrainer  # noqa: PLC0415

    tcfg, dcfg = _lm_setup(size["quick"])
    data = _lm_data(tcfg)

    def make(device: str) -> Any:
        return SPDTrainer(build_default_model(tcfg).eval(), tcfg, dcfg, device=device,
                          data=data)

    c.info.update(target=f"LlamaForCausalLM {tcfg.n_layers} layers, d_model {tcfg.d_model}, "
                         f"vocab {tcfg.vocab_size}", seq_len=tcfg.seq_len,
                  loss={k: v for k, v in dcfg.loss.model_dump().items() if v})
    _SHARED["lm"] = _train_check(c, gpu, make, data.train[:dcfg.batch_size], size,
                                 subset=True)
    c.tolerance.update(_TRAIN_TOL)


@check("harvest_forward_lm", "torch", "profiles harvest forward, per-token LLaMA decomposition")
def check_harvest_lm(c: Check, gpu: bool, size: dict[str, Any]) -> None:
    if "lm" not in _SHARED:
        raise RuntimeError("needs the trainers of spd_step_lm (run it too)")
    cpu, dev = _SHARED["lm"]
    tcfg, _ = _lm_setup(size["quick"])
    x = torch.randint(0, tcfg.vocab_size, (size["harvest_sequences"], tcfg.seq_len),
                      generator=torch.Generator().manual_seed(3))
    _harvest(c, gpu, cpu.model, None if dev is None else dev.model, x,
             max(1, 8192 // tcfg.seq_len), tcfg.seq_len)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

SIZE_KEY = {"correlation_tiles": "tiles", "topk_dense": "topk", "topk_sparse": "sparse",
            "eigen_dense": "eigen_dense", "eigen_sparse": "eigen_sparse", "kmeans": "kmeans",
            "spectral_piece": "piece", "spd_step_tms": "tms", "harvest_forward_tms": "tms",
            "spd_step_lm": "lm", "harvest_forward_lm": "lm"}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                           "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("scipy", "cupy", "cuml", "transformers", "sklearn", "pydantic"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    if backend.cupy_gpu_available():
        import cupy  # noqa: PLC0415

        out["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        out["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    import scalespd  # noqa: PLC0415

    out["scalespd"] = scalespd.__version__
    try:
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except Exception:
        out["git_commit"] = None
    out["torch_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


def _clean(x: Any) -> Any:
    """JSON-able: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def run_check(name: str, library: str, summary: str, fn: CheckFn, devices: Devices,
              size: dict[str, Any]) -> dict[str, Any]:
    gpu = devices.cupy if library == "cupy" else devices.torch
    reason = devices.cupy_reason if library == "cupy" else devices.torch_reason
    c = Check(name, library, summary)
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"path": summary, "library": library}
    try:
        fn(c, gpu, size)
    except Exception as err:
        rec.update(status="error", error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=-6))
    else:
        within = c.within()
        if not gpu:
            rec["status"] = "gpu_skipped"
        elif all(within.values()):
            rec["status"] = "ok"
        else:
            rec["status"] = "mismatch"
            rec["over_tolerance"] = sorted(m for m, ok in within.items() if not ok)
    rec.update(cpu=c.cpu, gpu=c.gpu if gpu else {"skipped": reason}, diff=c.diff,
               tolerance={m: list(t) for m, t in c.tolerance.items()}, info=c.info,
               seconds_total=round(time.perf_counter() - t0, 3))
    return _clean(rec)


def _line(name: str, rec: dict[str, Any]) -> str:
    cpu = rec["cpu"].get("seconds")
    gpu = rec["gpu"].get("seconds")
    parts = [f"{name:<20}", f"{rec['status']:<11}",
             f"cpu {cpu:8.3f} s" if cpu is not None else "cpu        - ",
             f"gpu {gpu:8.3f} s" if gpu is not None else "gpu        - "]
    parts += [f"{m} {v:.3g}" for m, v in rec["diff"].items() if v is not None]
    if rec["status"] == "error":
        parts.append(rec["error"])
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    names = [n for n, *_ in CHECKS]
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                    help=f"run only these checks (of {', '.join(names)})")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    devices = Devices()
    sizes = QUICK if args.quick else FULL
    dev = devices.record()
    print(f"device: {dev.get('name') or dev.get('reason')}; "
          f"{'quick' if args.quick else 'full'} sizes", flush=True)
    results: dict[str, Any] = {}
    for name, library, summary, fn in CHECKS:
        if args.only and name not in args.only:
            continue
        size = {**sizes[SIZE_KEY[name]], "quick": args.quick}
        results[name] = run_check(name, library, summary, fn, devices, size)
        print(_line(name, results[name]), flush=True)
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    statuses = [r["status"] for r in results.values()]
    out = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "device": dev,
        "versions": versions(),
        "imported_heavy_modules": heavy,
        "summary": {s: statuses.count(s) for s in sorted(set(statuses))},
        "checks": results,
        "seconds_total": round(time.perf_counter() - t0, 2),
        "note": "status: ok (GPU matches CPU within tolerance) | mismatch | gpu_skipped | "
                "error; diff: the measured differences, tolerance: [op, bound] per metric; "
                "seconds exclude the one-off GPU warm-up (warmup_seconds)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(out), indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({out['seconds_total']} s; {out['summary']})", flush=True)
    if heavy:
        print(f"warning: imported {heavy}; the GPU machine does not have them", flush=True)
    return 1 if heavy or any(s in ("error", "mismatch") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
