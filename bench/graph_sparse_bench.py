"""Sparse vs dense correlation path of the graph stage -> bench/results/graph_sparse_bench.json.

Data: a generator of language-model-like causal-importance profiles, built directly as sparse
row blocks (`lm_like_blocks`): N_total columns of which n_alive fire at all; power-law firing
rates between 0.01% and 10% (the rates of the columns have density ∝ rate^-a, a =
--rate-exponent: 1 is log-uniform, an equal number of columns per decade, mean rate 1.45%; the
default 1.5 puts 7% of the columns above 1%, mean rate 0.32%, closer to the firing-frequency
histograms of sparse dictionary features of language models); planted mechanisms of 2–200
members (power-law sizes) that fire together; a few hub columns (20–50% of rows) and always-on
columns (every row). Values U(0.05, 1). The matrix lives in memory as a list of CSR row blocks
behind the graph stage's sparse row-source protocol (`csr_rows`), so the stage reads it in row
blocks as it would a sparse store.

Measurements (one process, the machine's peak-RSS mark reset before each run through
/proc/self/clear_refs, so each peak is that run's; the input's own size is reported with it):

1. `build_graph` with graph.correlation: sparse (all passes, data-derived threshold, k = 10) on
   the first M rows for each M in --scaling (the last = --rows): wall time per pass, peak RSS,
   plan, edges.
2. Timing of the dense path on row subsamples (the first --dense-rows / 2 and --dense-rows
   rows, all alive columns) as a dense in-memory float32 array (the dense path's best case: no
   zarr decoding), each --repeats times (the fastest counts: the 2 cores are shared, and the
   fastest run is the least disturbed), and of the sparse path on the larger one; the edge
   threshold fixed to the one the full run derived (on a subsample alone the data-derived
   threshold is higher, up to 1 = no candidates, which would skip the dense path's work). The
   dense time is extrapolated to the full M along the line through the two sizes (a + b·M:
   the GEMMs grow with M, the per-tile selection does not) — an extrapolation, said so in the
   JSON. Wall and CPU seconds are both recorded. A short subsample is degenerate: columns
   firing on 0–2 of its rows give many pairs of exactly equal correlation (two columns firing
   once, on the same row, correlate exactly 1), which float32 and float64 arithmetic break in
   different orders; the lists are compared and every difference is checked to be such a tie
   (same values within 2e-5).
3. Exactness at full scale: dense and sparse on all M rows of a subset of --check-cols alive
   columns (hubs and always-on columns included; data-derived threshold): identical top-k lists
   and edges?

Usage: python bench/graph_sparse_bench.py [--rows 1000000] [--alive 8400] [--total 56000]
       [--rate-exponent 1.5] [--dense-rows 20000] [--scaling 250000 500000]
       [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "graph_sparse_bench.json"

from scalespd.config import GraphConfig  # noqa: E402
from scalespd.graph import GraphResult, build_graph  # noqa: E402

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class BlockedCSR:
    """An (M, N) sparse matrix held as CSR row blocks of `block` rows; `csr_rows(r0, r1)` is the
    graph stage's sparse row-source protocol (scalespd.graph.sparse_io). `rows` limits it to
    its first rows (a view for the scaling series)."""

    def __init__(self, blocks: list[sp.csr_matrix], block: int, rows: int | None = None) -> None:
        self.blocks, self.block = blocks, block
        total = sum(b.shape[0] for b in blocks)
        self.n_rows = total if rows is None else rows
        self.shape = (self.n_rows, int(blocks[0].shape[1]))
        self.dtype = np.dtype(np.float32)

    @property
    def nnz(self) -> int:
        full, rest = divmod(self.n_rows, self.block)
        n = sum(b.nnz for b in self.blocks[:full])
        if rest:
            n += int(self.blocks[full].indptr[rest])
        return n

    @property
    def nbytes(self) -> int:
        return sum(b.data.nbytes + b.indices.nbytes + b.indptr.nbytes for b in self.blocks)

    def head(self, rows: int) -> BlockedCSR:
        return BlockedCSR(self.blocks, self.block, rows)

    def csr_rows(self, r0: int, r1: int) -> sp.csr_matrix:
        r1 = min(r1, self.n_rows)
        parts = []
        for b in range(r0 // self.block, (r1 - 1) // self.block + 1):
            lo, hi = b * self.block, (b + 1) * self.block
            parts.append(self.blocks[b][max(r0, lo) - lo:min(r1, hi) - lo])
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def power_law(rng: np.random.Generator, lo: float, hi: float, a: float, size: int) -> np.ndarray:
    """`size` draws with density ∝ x^-a on [lo, hi] (inverse CDF; a = 1 is log-uniform)."""
    u = rng.random(size)
    if a == 1.0:
        return np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
    e = 1.0 - a
    return (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)


def lm_like_blocks(
    n_rows: int, n_total: int, n_alive: int, *, rates: tuple[float, float] = (1e-4, 0.1),
    rate_exponent: float = 1.5, n_hubs: int = 20, n_always_on: int = 4, mech_fraction: float = 0.6,
    mech_sizes: tuple[int, int] = (2, 200), block: int = 65536, seed: int = 0,
) -> tuple[BlockedCSR, dict[str, Any]]:
    """LM-like profiles (see module docstring) and a description of what was planted.

    Column c (alive) fires on its own with rate ρ_c drawn with density ∝ ρ^-rate_exponent in
    `rates`; a fraction `mech_fraction` of the alive columns belong to mechanisms (sizes from a
    power law ∝ s^-1.5 in `mech_sizes`) that fire with a rate from the same law in
    (rates[0], 0.02), each member joining
    90% of its mechanism's firings at amplitude·gain. Hubs fire with rate U(0.2, 0.5), always-on
    columns hold 0.3 + 0.7·U on every row. Positions of independent firings are drawn with
    replacement (repeats merge), so the realised rate of a column is 1 - exp(-ρ_c) ≈ ρ_c."""
    rng = np.random.default_rng(seed)
    alive = np.sort(rng.choice(n_total, n_alive, replace=False))
    kinds = rng.permutation(n_alive)
    hubs, on = kinds[:n_hubs], kinds[n_hubs:n_hubs + n_always_on]
    plain = kinds[n_hubs + n_always_on:]
    rate = np.zeros(n_alive)
    rate[plain] = power_law(rng, rates[0], rates[1], rate_exponent, plain.size)
    hub_rate = rng.uniform(0.2, 0.5, n_hubs)
    # Mechanisms over a random subset of the plain columns.
    members = rng.permutation(plain)[: int(mech_fraction * plain.size)]
    sizes: list[int] = []
    s_lo, s_hi = mech_sizes
    while sum(sizes) < members.size:
        u = rng.random()  # inverse CDF of a power law ∝ s^-1.5 on [s_lo, s_hi]
        a, b = s_lo ** -0.5, s_hi ** -0.5
        sizes.append(int(min(s_hi, (a - u * (a - b)) ** -2)))
    bounds = np.cumsum([0, *sizes])
    mechs = [members[bounds[i]:min(bounds[i + 1], members.size)] for i in range(len(sizes))]
    mechs = [m for m in mechs if m.size]
    mech_rate = power_law(rng, rates[0], 0.02, rate_exponent, len(mechs))
    gain = rng.uniform(0.5, 1.0, n_alive)

    blocks = []
    for r0 in range(0, n_rows, block):
        r = min(block, n_rows - r0)
        counts = rng.binomial(r, rate)
        cols = [np.repeat(np.arange(n_alive), counts)]
        rows = [rng.integers(0, r, size=cols[0].size)]
        vals = [rng.uniform(0.05, 1.0, cols[0].size)]
        for f, m in enumerate(mechs):
            fire = np.flatnonzero(rng.random(r) < mech_rate[f])
            if fire.size == 0:
                continue
            amp = rng.uniform(0.5, 1.0, fire.size)
            keep = rng.random((fire.size, m.size)) < 0.9
            rr, cc = np.nonzero(keep)
            rows.append(fire[rr])
            cols.append(m[cc])
            vals.append(amp[rr] * gain[m[cc]])
        hit = rng.random((r, n_hubs)) < hub_rate
        rr, cc = np.nonzero(hit)
        rows.append(rr)
        cols.append(hubs[cc])
        vals.append(rng.uniform(0.05, 1.0, rr.size))
        rows.append(np.repeat(np.arange(r), n_always_on))
        cols.append(np.tile(on, r))
        vals.append(0.3 + 0.7 * rng.random(r * n_always_on))
        coo = sp.coo_matrix((np.concatenate(vals).astype(np.float32),
                             (np.concatenate(rows), alive[np.concatenate(cols)])),
                            shape=(r, n_total))
        csr = coo.tocsr()  # sums repeated (row, column) draws
        np.minimum(csr.data, 1.0, out=csr.data)
        csr.sort_indices()
        blocks.append(csr)
    X = BlockedCSR(blocks, block)
    info = {"n_rows": n_rows, "n_total": n_total, "n_alive": n_alive, "rates": list(rates),
            "rate_exponent": rate_exponent,
            "n_hubs": n_hubs, "n_always_on": n_always_on, "n_mechanisms": len(mechs),
            "mechanism_sizes": {"min": int(min(map(len, mechs))),
                                "median": float(np.median(list(map(len, mechs)))),
                                "max": int(max(map(len, mechs)))},
            "mechanism_members": int(sum(map(len, mechs))), "seed": seed,
            "value_range": [0.05, 1.0]}
    return X, info


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measured(fn: Any) -> tuple[Any, dict[str, float]]:
    """Run fn(); its wall and CPU time (all threads), the RSS before, and the peak RSS while it
    ran (MiB)."""
    gc.collect()
    before = _status_kb("VmRSS") / 1024
    reset = reset_peak()
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    peak = _status_kb("VmHWM") / 1024
    return out, {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                 "load_avg_1min": round(os.getloadavg()[0], 2),
                 "rss_before_mb": round(before, 1),
                 "peak_rss_mb": round(peak, 1) if reset else None}


def edges(res: GraphResult) -> set[tuple[int, int]]:
    W = sp.triu(res.graph, k=1).tocoo()
    return set(zip(W.row.tolist(), W.col.tolist(), strict=True))


def record(res: GraphResult, meas: dict[str, float]) -> dict[str, Any]:
    s = res.summary
    return {**meas, "timings": s["timings"], "correlation": s["correlation"],
            "threshold": s["threshold"], "n_edges": s["n_edges"],
            "n_components": s["n_components"], "n_zero_var": s["n_zero_var"]}


def dense_timing(X: BlockedCSR, alive: np.ndarray, cfg: GraphConfig, repeats: int
                 ) -> tuple[GraphResult, dict[str, Any]]:
    """The dense path on X[:, alive] as a dense in-memory float32 array (made before the clock
    starts, counted in the peak RSS): the last result and the fastest of `repeats` runs."""
    dense_X = np.ascontiguousarray(X.csr_rows(0, X.n_rows)[:, alive].toarray(),
                                   dtype=np.float32)
    c = cfg.model_copy(update={"correlation": "dense"})
    runs = []
    for _ in range(repeats):
        res, meas = measured(lambda: build_graph(dense_X, c))
        runs.append(meas)
    best = min(runs, key=lambda r: r["wall_s"])
    return res, {**best, "walls_s": [r["wall_s"] for r in runs],
                 "input_mb": round(dense_X.nbytes / 2**20, 1)}


def compare(dres: GraphResult, sres: GraphResult, tol: float = 2e-5) -> dict[str, Any]:
    """Identity of two results' top-k lists, edges and components; for the rows whose lists
    differ, whether the difference is a near tie: the sorted values agree within `tol`, an
    empty slot counting as the edge threshold (a value within tol of the threshold may be a
    candidate in one path and not in the other)."""
    rows = np.flatnonzero((dres.topk_idx != sres.topk_idx).any(axis=1))
    thr = dres.threshold
    dv = np.where(dres.topk_idx[rows] >= 0, dres.topk_val[rows], thr)
    sv = np.where(sres.topk_idx[rows] >= 0, sres.topk_val[rows], thr)
    return {
        "topk_idx_identical": rows.size == 0,
        "rows_with_different_lists": int(rows.size),
        "differences_are_near_ties": bool(rows.size == 0 or np.abs(dv - sv).max() <= tol),
        "edges_identical": edges(dres) == edges(sres),
        "n_edges_dense_sparse": [dres.summary["n_edges"], sres.summary["n_edges"]],
        "labels_identical": bool(np.array_equal(dres.labels, sres.labels)),
        "max_abs_value_difference": float(np.abs(dres.topk_val - sres.topk_val).max()),
    }


def machine() -> dict[str, Any]:
    import psutil
    import scipy
    import threadpoolctl

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "numpy": np.__version__,
        "scipy": scipy.__version__,
        "blas": [f"{p['internal_api']} {p.get('version')} ({p['num_threads']} threads)"
                 for p in threadpoolctl.threadpool_info()],
        "note": "2 cores shared with other jobs: timings include their interference",
    }


def run_case(args: argparse.Namespace, exponent: float, dense_rows: int, scaling: list[int],
             check_cols: int, repeats: int) -> dict[str, Any]:
    """Sections 1–3 (module docstring) on one generated data set; check_cols 0 skips 3."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    X, info = lm_like_blocks(args.rows, args.total, args.alive, rate_exponent=exponent,
                             seed=args.seed)
    gen_s = time.perf_counter() - t0
    nnz = X.nnz
    col_nnz = np.bincount(np.concatenate([b.indices for b in X.blocks]), minlength=args.total)
    alive = np.flatnonzero(col_nnz > 0)
    dens = col_nnz[alive] / args.rows
    out["data"] = {**info, "generate_s": round(gen_s, 1), "nnz": nnz,
                   "input_mb": round(X.nbytes / 2**20, 1),
                   "density_alive_mean": float(dens.mean()),
                   "density_alive_quantiles": {q: float(np.quantile(dens, float(q))) for q in
                                               ("0.01", "0.5", "0.9", "0.99", "1.0")},
                   "mean_row_nnz": nnz / args.rows}
    print(json.dumps(out["data"], indent=1), flush=True)
    cfg = GraphConfig(k=args.k, device="cpu")

    # 1. The sparse path at growing M (the alive columns are the graph's nodes, as in the stage).
    out["sparse"] = []
    for m in sorted({*scaling, args.rows}):
        Xm = X if m == args.rows else X.head(m)
        res, meas = measured(lambda Xm=Xm: build_graph(
            Xm, cfg.model_copy(update={"correlation": "sparse"}), columns=alive))
        rec = {"rows": m, "nnz": Xm.nnz, **record(res, meas)}
        out["sparse"].append(rec)
        print(json.dumps(rec), flush=True)
        del res

    # 2. Dense timed on two row subsamples (extrapolated), sparse on the larger one.
    full = next(r for r in out["sparse"] if r["rows"] == args.rows)
    c = cfg.model_copy(update={"edge_threshold": min(float(full["threshold"]), 0.999)})
    sizes = [max(2, dense_rows // 2), dense_rows]
    dense_runs = []
    for m in sizes:
        dres, dmeas = dense_timing(X.head(m), alive, c, repeats)
        dense_runs.append({"rows": m, **record(dres, dmeas)})
        print(json.dumps(dense_runs[-1]), flush=True)
    sub = X.head(dense_rows)
    sres, smeas = measured(lambda: build_graph(
        sub, c.model_copy(update={"correlation": "sparse"}), columns=alive))
    (m1, t1), (m2, t2) = ((r["rows"], r["wall_s"]) for r in dense_runs)
    slope = (t2 - t1) / (m2 - m1)
    if slope <= 0:  # disturbed timings: fall back to proportional scaling of the larger run
        slope, icpt = t2 / m2, 0.0
    else:
        icpt = t1 - slope * m1
    dense_full = icpt + slope * args.rows
    out["subsample"] = {"rows": dense_rows, "threshold": c.edge_threshold,
                        "dense_runs": dense_runs, "sparse": record(sres, smeas),
                        "dense_fit_s": {"per_million_rows": round(slope * 1e6, 2),
                                        "fixed": round(icpt, 2)},
                        "speedup_same_rows": round(t2 / smeas["wall_s"], 1),
                        **compare(dres, sres)}
    print(json.dumps({k: v for k, v in out["subsample"].items() if k != "dense_runs"},
                     indent=1), flush=True)
    del dres, sres
    out["summary"] = {
        "rows": args.rows, "n_alive": int(alive.size), "n_total": args.total,
        "rate_exponent": exponent, "mean_row_nnz": round(nnz / args.rows, 1),
        "sparse_wall_s": full["wall_s"], "sparse_peak_rss_mb": full["peak_rss_mb"],
        "input_mb": out["data"]["input_mb"],
        "dense_wall_s_extrapolated": round(dense_full, 1),
        "dense_extrapolation": f"dense build_graph (threshold fixed to the full run's), fastest "
                               f"of {repeats} on the first {m1} and {m2} rows ({t1} s, {t2} "
                               f"s), extrapolated along that line to M = {args.rows}",
        "speedup": round(dense_full / full["wall_s"], 1),
        "subsample_differences_are_float32_ties":
            out["subsample"]["differences_are_near_ties"],
    }
    ms = np.array([r["rows"] for r in out["sparse"]], dtype=float)
    ts = np.array([r["wall_s"] for r in out["sparse"]], dtype=float)
    tk = np.array([r["timings"]["topk_s"] for r in out["sparse"]], dtype=float)
    if ms.size >= 2:
        out["summary"]["sparse_time_exponent_in_M"] = round(float(
            np.polyfit(np.log(ms), np.log(ts), 1)[0]), 2)
        out["summary"]["sparse_pass2_exponent_in_M"] = round(float(
            np.polyfit(np.log(ms), np.log(tk), 1)[0]), 2)

    # 3. Exactness on all rows, on a column subset both paths can afford.
    if check_cols:
        rng = np.random.default_rng(args.seed + 1)
        frequent = np.flatnonzero(dens >= 0.2)  # the hubs and always-on columns
        rest = np.setdiff1d(np.arange(alive.size), frequent)
        pick = np.sort(np.concatenate([frequent, rng.choice(
            rest, max(0, check_cols - frequent.size), replace=False)]))
        cols = alive[pick]
        dres, dmeas = measured(lambda: build_graph(
            X, cfg.model_copy(update={"correlation": "dense"}), columns=cols))
        sres, smeas = measured(lambda: build_graph(
            X, cfg.model_copy(update={"correlation": "sparse"}), columns=cols))
        check = {"rows": args.rows, "columns": int(cols.size),
                 "frequent_columns": int(frequent.size), "dense": record(dres, dmeas),
                 "sparse": record(sres, smeas), **compare(dres, sres)}
        out["full_rows_column_subset"] = check
        print(json.dumps(check, indent=1), flush=True)
        out["summary"]["full_rows_column_subset"] = {
            key: check[key] for key in ("columns", "topk_idx_identical",
                                        "rows_with_different_lists",
                                        "differences_are_near_ties", "edges_identical",
                                        "labels_identical")}
    print(json.dumps(out["summary"], indent=1), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--alive", type=int, default=8400)
    ap.add_argument("--total", type=int, default=56000)
    ap.add_argument("--rate-exponent", type=float, default=1.5)
    ap.add_argument("--dense-rows", type=int, default=20000)
    ap.add_argument("--check-cols", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scaling", type=int, nargs="*", default=[250_000, 500_000])
    ap.add_argument("--sensitivity-exponent", type=float, nargs="*", default=[1.0],
                    help="also run at these rate exponents (full M sparse, and the dense "
                         "subsample timing once; no scaling series / full-rows check)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    out: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}}
    out["main"] = run_case(args, args.rate_exponent, args.dense_rows, args.scaling,
                           args.check_cols, args.repeats)
    out["sensitivity"] = [run_case(args, a, args.dense_rows, [], 0, 1)
                          for a in args.sensitivity_exponent]
    out["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["summary"] = {"main": out["main"]["summary"],
                      "sensitivity": [c["summary"] for c in out["sensitivity"]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
