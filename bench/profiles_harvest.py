"""Benchmark of the profiles harvest: memory bounded by the block, throughput vs same-run baselines.

    python bench/profiles_harvest.py [--rows 600000] [--cols 2000] [--out FILE.json]

A cheap synthetic CI model (N columns, clamp of a random linear map, mostly exact zeros like real
CI) is harvested over M rows with M x N float32 larger than 4 GiB, in-process, in a fresh child
process whose peak RSS (VmHWM) is recorded. Baselines measured in the same run and process:
  * forward_only: the same CI forward over the same block sizes with no stats and no writing;
  * np_save_block: raw uncompressed np.save of one block to the same disk.
The baselines run after the harvest so that the recorded peak RSS is the harvest's. A smaller
Ray run (2 actors) records rows/s and each actor's peak RSS. Scratch output is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 2**30


def _peak_rss_bytes() -> int:
    from scalespd.profiles.harvest import _peak_rss_bytes as peak

    return peak()


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _model_and_source(rows: int, cols: int, dim: int):
    from scalespd.profiles.sources import RandomRowSource
    from scalespd.profiles.synthetic import SyntheticCIModel

    n_mod = 4
    sizes = [(f"layers.{i}.mlp", cols // n_mod + (1 if i < cols % n_mod else 0))
             for i in range(n_mod)]
    # bias -0.9: ~85% exact zeros, roughly the sparsity of trained CI values.
    model = SyntheticCIModel(dim, sizes, seed=0, bias=-0.9, scale=2.0,
                             dead=tuple(range(0, cols, 97)), always_on=(5,))
    return model, RandomRowSource(rows, dim, seed=1, p=0.2)


def _cfg(**kw: Any):
    from scalespd.config import ProfilesConfig

    return ProfilesConfig(chunk_rows=8192, block_rows=16384, chunk_cols=1024, batch_rows=4096,
                          dtype="float32", device="cpu", tau=0.1, **kw)


def _local_part(args: dict[str, Any], q: mp.Queue) -> None:
    """Runs in a fresh process: baselines, then the big in-process harvest."""
    import numpy as np
    import torch

    from scalespd.profiles.harvest import harvest
    from scalespd.profiles.store import BlockLayout

    torch.set_num_threads(args["threads"])
    scratch = Path(args["scratch"])
    model, src = _model_and_source(args["rows"], args["cols"], args["dim"])
    cfg = _cfg(executor="local")
    lay = BlockLayout.make(src.n_rows, args["cols"], cfg.chunk_rows, cfg.chunk_cols,
                           cfg.block_rows, 4)

    rss_before = _peak_rss_bytes()

    # Peak RSS after each block: flat after the first blocks means bounded by the block, not M.
    peaks: list[int] = []

    def on_block(r: Any) -> None:
        peaks.append(_peak_rss_bytes())

    t0 = time.perf_counter()
    res = harvest(model, src, scratch / "local", cfg, on_block=on_block)
    wall = time.perf_counter() - t0
    peak = _peak_rss_bytes()  # before the baselines

    # Baseline 1: the forward alone (inputs + CI + cast), no statistics, no writing.
    n_base = min(6, lay.n_blocks)
    t0 = time.perf_counter()
    for b in range(n_base):
        x = src.block_inputs(b, *lay.block_range(b))
        with torch.inference_mode():
            for s in range(0, x.shape[0], cfg.batch_rows):
                ci = model.causal_importances(x[s:s + cfg.batch_rows])
                torch.cat(list(ci.values()), dim=1).numpy()
    fwd_s = time.perf_counter() - t0
    base_rows = n_base * cfg.block_rows
    # Baseline 2: uncompressed np.save of one block to the same disk (fsync'd).
    block = np.asarray(torch.cat(list(model.causal_importances(
        src.block_inputs(0, *lay.block_range(0))).values()), dim=1))
    t0 = time.perf_counter()
    with open(scratch / "block.npy", "wb") as f:
        np.save(f, block)
        f.flush()
        os.fsync(f.fileno())
    save_s = time.perf_counter() - t0
    (scratch / "block.npy").unlink()
    raw = src.n_rows * args["cols"] * 4
    stored = _du(scratch / "local" / "ci.zarr")
    q.put({
        "rows": src.n_rows, "cols": args["cols"], "dtype": "float32",
        "chunks": [cfg.chunk_rows, cfg.chunk_cols], "block_rows": cfg.block_rows,
        "n_blocks": res.n_blocks, "torch_threads": args["threads"],
        "uncompressed_bytes": raw, "uncompressed_GiB": round(raw / GiB, 3),
        "stored_bytes": stored, "compression_ratio": round(raw / stored, 2),
        "n_alive": res.n_alive,
        "seconds": round(wall, 2),
        "rows_per_s": round(src.n_rows / wall, 1),
        "MB_per_s_uncompressed": round(raw / wall / 1e6, 1),
        "MB_per_s_on_disk": round(stored / wall / 1e6, 1),
        "peak_rss_bytes": peak, "peak_rss_GiB": round(peak / GiB, 3),
        "peak_rss_after_imports_GiB": round(rss_before / GiB, 3),
        "peak_rss_after_block_3_GiB": round(peaks[min(2, len(peaks) - 1)] / GiB, 3),
        "peak_rss_after_half_GiB": round(peaks[len(peaks) // 2] / GiB, 3),
        "peak_rss_after_each_block_GiB": [round(p / GiB, 3) for p in peaks],
        "seconds_compute_total": round(sum(r.seconds_compute for r in res.block_results), 2),
        "seconds_write_total": round(sum(r.seconds_write for r in res.block_results), 2),
        "block_bytes": cfg.block_rows * args["cols"] * 4,
        "baseline_forward_only_rows_per_s": round(base_rows / fwd_s, 1),
        "baseline_forward_only_MB_per_s": round(base_rows * args["cols"] * 4 / fwd_s / 1e6, 1),
        "baseline_np_save_block_MB_per_s": round(block.nbytes / save_s / 1e6, 1),
        "harvest_vs_forward_only": round((src.n_rows / wall) / (base_rows / fwd_s), 3),
    })


def _ray_part(args: dict[str, Any]) -> dict[str, Any]:
    import ray

    from scalespd.config import RayConfig
    from scalespd.profiles.harvest import harvest
    from scalespd.raytools import ensure_ray

    ensure_ray(RayConfig(num_cpus=2, object_store_memory=300_000_000))
    model, src = _model_and_source(args["ray_rows"], args["cols"], args["dim"])
    cfg = _cfg(executor="ray", max_concurrency=2)
    t0 = time.perf_counter()
    res = harvest(model, src, Path(args["scratch"]) / "ray", cfg)
    wall = time.perf_counter() - t0
    per_actor: dict[int, int] = {}
    for r in res.block_results:
        per_actor[r.pid] = max(per_actor.get(r.pid, 0), r.peak_rss)
    ray.shutdown()
    raw = src.n_rows * args["cols"] * 4
    return {
        "rows": src.n_rows, "cols": args["cols"], "n_blocks": res.n_blocks,
        "actors": len(per_actor),
        "seconds_incl_actor_start": round(wall, 2),
        "rows_per_s": round(src.n_rows / wall, 1),
        "MB_per_s_uncompressed": round(raw / wall / 1e6, 1),
        "actor_peak_rss_GiB": sorted(round(v / GiB, 3) for v in per_actor.values()),
        "driver_peak_rss_GiB": round(_peak_rss_bytes() / GiB, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=600_000)
    p.add_argument("--cols", type=int, default=2000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ray-rows", type=int, default=131_072)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--scratch", type=Path, default=None, help="scratch folder (deleted after)")
    p.add_argument("--out", type=Path, default=Path("bench/results/profiles_harvest.json"))
    a = p.parse_args()

    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="profiles_bench_", dir=a.scratch))
    args = {"rows": a.rows, "cols": a.cols, "dim": a.dim, "ray_rows": a.ray_rows,
            "threads": a.threads, "scratch": str(scratch)}
    try:
        ctx = mp.get_context("spawn")  # fresh process: its ru_maxrss is the harvest's alone
        q = ctx.Queue()
        proc = ctx.Process(target=_local_part, args=(args, q))
        proc.start()
        local = None
        while local is None:
            try:
                local = q.get(timeout=5)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(
                        f"benchmark child failed (exit code {proc.exitcode})") from None
        proc.join()
        shutil.rmtree(scratch / "local")
        ray_res = _ray_part(args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    out = {
        "benchmark": "profiles_harvest",
        # Other jobs share this machine: the 1-min load average says how busy it was.
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "loadavg_1min_start_end": [round(load_start[0], 2),
                                               round(os.getloadavg()[0], 2)]},
        "local": local,
        "ray": ray_res,
        "checks": {
            "matrix_exceeds_4GiB": local["uncompressed_bytes"] > 4 * GiB,
            "peak_rss_below_1.5GiB": local["peak_rss_bytes"] < 1.5 * GiB,
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
