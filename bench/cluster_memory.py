"""Peak memory and wall time of `python -m scalespd.cluster` on a multi-GB `.npy` (issue 16).

    python bench/cluster_memory.py [--rows 100000] [--cols 8000] [--keep]

1. Writes LM-like sparse profiles, (rows, cols) float32, to bench/_scratch/cluster_memory/P.npy,
   streaming: np.lib.format.open_memmap writes the header and sizes the file, then each block
   of rows is generated and written with a plain file write, so this process never holds more
   than one block (and keeps no mapping of the file). Planted mechanisms (groups of 2-8
   columns that fire together on a sparse subset of rows) make the result checkable.
2. Runs `python -m scalespd.cluster P.npy --out ... --executor ray` and then the in-process
   path `--executor local` on the same file (default settings otherwise), each as a
   subprocess, sampling the memory of its whole process tree (the driver, the Ray daemons it
   starts and the Ray workers) in a thread.
3. Checks that both give the same clusters.csv (byte for byte), scores them against the
   planted mechanisms, and records everything in bench/results/cluster_memory.json; the data
   are deleted afterwards unless --keep.

Memory measure. The sum over the tree of each process's PSS (proportional set size, from
/proc/<pid>/smaps_rollup via psutil): a page shared by k processes counts 1/k in each, so
the sum counts every resident page once. RSS would count each shared page once per process
that maps it — the read-only mapped file pages, the shared libraries and Ray's shared-memory
object store — and a sum of RSS over a driver and its Ray workers double-counts; it is
recorded too, as an upper bound, with the sum of USS (pages private to one process) as a
lower bound. Page cache that no process maps (the file after it was read) is not counted by
any of them: it is the kernel's, reclaimable, and not what kills a 16 GB laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "bench" / "_scratch" / "cluster_memory"
RESULT = REPO / "bench" / "results" / "cluster_memory.json"
MIB = 2**20


# --------------------------------------------------------------------------------------------
# LM-like profiles, written streaming
# --------------------------------------------------------------------------------------------


def plan(n_cols: int, seed: int) -> dict[str, np.ndarray]:
    """The planted structure: which column belongs to which mechanism and how it fires.

    About 82% of the columns are members of mechanisms of 2-8 columns (spread over 4 "layers")
    whose firing rates are log-uniform in [3e-4, 3e-2], as sparse as the causal importances
    of a language model's subcomponents; 15% are dead (tiny values, never above tau = 0.1);
    3% are dense, unrelated "always-on" columns. Columns are shuffled so mechanisms straddle
    the correlation tiles."""
    rng = np.random.default_rng(seed)
    n_dead, n_dense = int(0.15 * n_cols), int(0.03 * n_cols)
    sizes: list[int] = []
    while sum(sizes) < n_cols - n_dead - n_dense:
        sizes.append(int(rng.integers(2, 9)))
    sizes[-1] -= sum(sizes) - (n_cols - n_dead - n_dense)
    if sizes[-1] < 2:  # fold a leftover single column into the previous mechanism
        sizes[-2] += sizes.pop()
    n_mech = len(sizes)
    truth = np.concatenate([np.repeat(np.arange(n_mech), sizes),
                            np.full(n_dead, -1), np.full(n_dense, -2)])
    perm = rng.permutation(n_cols)
    return {
        # (N,) mechanism id of each column; -1 dead, -2 dense.
        "truth": truth[perm],
        # (n_mech,) probability that a mechanism fires on a row.
        "rate": np.exp(rng.uniform(np.log(3e-4), np.log(3e-2), n_mech)),
        # (N,) gain of each member column; (N,) layer, for the metadata CSV.
        "gain": rng.uniform(0.7, 1.0, n_cols)[perm],
        "layer": rng.integers(0, 4, n_cols),
    }


def write_profiles(path: Path, n_rows: int, n_cols: int, p: dict[str, np.ndarray],
                   seed: int, block_rows: int = 2000) -> None:
    """(n_rows, n_cols) float32 LM-like profiles into the .npy at `path`, block by block."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, n_cols))
    offset = int(mm.offset)
    del mm  # header written, file sized; the data go in with plain writes
    truth, gain = p["truth"], p["gain"]
    members = np.flatnonzero(truth >= 0)
    mech = truth[members]
    dead, dense = np.flatnonzero(truth == -1), np.flatnonzero(truth == -2)
    rng = np.random.default_rng(seed + 1)
    with open(path, "r+b") as f:
        for r0 in range(0, n_rows, block_rows):
            r = min(block_rows, n_rows - r0)
            X = np.zeros((r, n_cols), dtype=np.float32)
            # (r, n_mech) strength of each mechanism on each row, 0 where it does not fire.
            fire = rng.random((r, p["rate"].size)) < p["rate"]
            strength = np.where(fire, rng.uniform(0.5, 1.0, fire.shape), 0.0)
            # Members copy it times their gain, missing 10% of the firings.
            vals = strength[:, mech] * gain[members]
            vals *= rng.random(vals.shape) >= 0.1
            X[:, members] = vals
            # Spurious single-column firings (heavy-tailed chance correlations).
            spur = rng.random((r, n_cols)) < 2e-4
            X[spur] = np.maximum(X[spur], rng.uniform(0.2, 1.0, int(spur.sum())))
            X[:, dead] = rng.uniform(0.0, 0.05, (r, dead.size)) * (rng.random((r, dead.size))
                                                                   < 0.01)
            X[:, dense] = rng.beta(2.0, 5.0, (r, dense.size))
            f.seek(offset + r0 * n_cols * 4)
            f.write(X.tobytes())


# --------------------------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Samples the summed PSS / RSS / USS of a process and all its descendants every
    `every_s` seconds and keeps the peaks (MiB)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.stop = threading.Event()
        self.peak = {"pss": 0.0, "rss": 0.0, "uss": 0.0, "driver_pss": 0.0}
        self.peak_at_s = 0.0
        self.max_procs = 0
        self.names: set[str] = set()
        self.samples = 0
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            tot = {"pss": 0.0, "rss": 0.0, "uss": 0.0}
            for proc in procs:
                try:
                    m = proc.memory_full_info()
                    self.names.add(proc.name())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                for key in tot:
                    tot[key] += getattr(m, key) / MIB
                if proc.pid == self.root.pid:
                    self.peak["driver_pss"] = max(self.peak["driver_pss"], m.pss / MIB)
            if tot["pss"] > self.peak["pss"]:
                self.peak_at_s = time.perf_counter() - self.t0
            for key, v in tot.items():
                self.peak[key] = max(self.peak[key], v)
            self.max_procs = max(self.max_procs, len(procs))
            self.samples += 1
            self.stop.wait(self.every_s)


def run_cluster(npy: Path, out: Path, executor: str, meta: Path) -> dict[str, Any]:
    """One `python -m scalespd.cluster` subprocess, measured."""
    cmd = [sys.executable, "-m", "scalespd.cluster", str(npy), "--out", str(out),
           "--components", str(meta), "--executor", executor]
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {rc}:\n{text[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    print(f"  {executor}: {wall:.1f} s, peak PSS of the process tree "
          f"{sampler.peak['pss']:.0f} MiB (RSS sum {sampler.peak['rss']:.0f}, USS sum "
          f"{sampler.peak['uss']:.0f}), {summary['n_clusters']} clusters", flush=True)
    return {
        "command": " ".join(["python", *cmd[1:]]).replace(str(REPO) + "/", ""),
        "wall_s": round(wall, 1),
        "peak_pss_tree_mib": round(sampler.peak["pss"]),
        "peak_rss_sum_tree_mib": round(sampler.peak["rss"]),
        "peak_uss_sum_tree_mib": round(sampler.peak["uss"]),
        "peak_pss_driver_mib": round(sampler.peak["driver_pss"]),
        "peak_pss_at_s": round(sampler.peak_at_s, 1),
        "max_processes": sampler.max_procs,
        "process_names": sorted(sampler.names),
        "samples": sampler.samples,
        "summary_timings": summary["timings"],
        "n_alive": summary["n_alive"],
        "n_edges": summary["n_edges"],
        "n_clusters": summary["n_clusters"],
        "edge_threshold": summary["edge_threshold"],
        "ray_spill_log_lines": [ln.strip() for ln in text.splitlines() if "Spilled" in ln],
    }


def score(clusters_csv: Path, truth: np.ndarray) -> dict[str, Any]:
    """How well the clusters recover the planted mechanisms: ARI over the member columns, and
    the number of mechanisms whose members form exactly one cluster with nothing else in it."""
    from sklearn.metrics import adjusted_rand_score

    cl = pd.read_csv(clusters_csv)["cluster"].to_numpy()
    members = truth >= 0
    size_of = pd.Series(cl[cl >= 0]).value_counts()
    exact = 0
    for m in np.unique(truth[members]):
        labels = np.unique(cl[truth == m])
        if labels.size == 1 and labels[0] >= 0 and size_of[labels[0]] == (truth == m).sum():
            exact += 1
    return {"ari_vs_planted": round(float(adjusted_rand_score(truth[members], cl[members])), 4),
            "mechanisms_recovered_exactly": exact,
            "mechanisms": int(np.unique(truth[members]).size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cols", type=int, default=8_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep bench/_scratch/cluster_memory")
    ap.add_argument("--result", type=Path, default=RESULT)
    args = ap.parse_args()

    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    SCRATCH.mkdir(parents=True)
    npy = SCRATCH / "P.npy"
    try:
        t = time.perf_counter()
        p = plan(args.cols, args.seed)
        write_profiles(npy, args.rows, args.cols, p, args.seed)
        gen_s = time.perf_counter() - t
        size = npy.stat().st_size
        print(f"wrote {npy} ({size / 1e9:.2f} GB) in {gen_s:.0f} s", flush=True)
        meta = SCRATCH / "meta.csv"
        pd.DataFrame({"name": [f"L{layer}:{i}" for i, layer in enumerate(p["layer"])],
                      "layer": p["layer"], "module": [f"L{layer}" for layer in p["layer"]]}
                     ).to_csv(meta, index=False)

        runs = {ex: run_cluster(npy, SCRATCH / f"out_{ex}", ex, meta) for ex in ("ray", "local")}
        same = ((SCRATCH / "out_ray" / "clusters.csv").read_bytes()
                == (SCRATCH / "out_local" / "clusters.csv").read_bytes())
        for ex in runs:
            runs[ex].update(score(SCRATCH / f"out_{ex}" / "clusters.csv", p["truth"]))
    finally:
        if not args.keep:
            shutil.rmtree(SCRATCH, ignore_errors=True)

    size_mib = size / MIB
    limit = size_mib + 1024
    record = {
        "benchmark": "cluster_memory (issue 16)",
        "data": {"rows": args.rows, "cols": args.cols, "dtype": "float32",
                 "file_bytes": size, "file_mib": round(size_mib), "generate_s": round(gen_s),
                 "generator": "bench/cluster_memory.py plan/write_profiles (LM-like sparse, "
                              "planted mechanisms of 2-8 columns)", "seed": args.seed},
        "memory_measure": "sum of PSS over the subprocess and all its descendants (driver, "
                          "Ray daemons, Ray workers), sampled every 0.2 s; RSS sum (counts "
                          "shared pages once per process) and USS sum recorded as bounds",
        "must_hold": {"ray_peak_pss_below_file_plus_1gib": runs["ray"]["peak_pss_tree_mib"]
                      < limit, "limit_mib": round(limit),
                      "identical_clusters_csv_ray_vs_local": same},
        "runs": runs,
        "before_the_fix": "issue 16: 100,000 x 9,602 float32 (3.8 GB .npy), default settings "
                          "(Ray): 13.0 GB peak RSS, 3662 + 7325 MiB spilled by Ray's object "
                          "store (not re-measured here: it would need ~13 GB on a shared "
                          "24 GB machine)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "logical_cpus": os.cpu_count(),
                    "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["must_hold"]))
    print(f"-> {args.result}")


if __name__ == "__main__":
    main()
