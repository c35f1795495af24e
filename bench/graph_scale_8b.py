"""The sparse correlation path at 8B scale, measured in slices -> bench/results/graph_scale_8b.json.

The 8B problem (issue 14): N_total = 1,245,184 columns, 15% alive (n = 186,778), M = 2,000,000
rows. It does not fit the 2-core development machine (about 2·10⁹ stored entries, hours of
work), so slices of it are measured and the cost of the whole is built from how each part of
the work grows.

Data: `graph_sparse_bench.lm_like_blocks`, the SimpleStories benchmark's generator, with its
default column law: firing rates between 0.01% and 10% with density ∝ rate^-1.5 (7% of the
columns above 1%), 60% of the columns in planted mechanisms of 2–200 members. The number of
mechanisms grows with n by construction (a fixed fraction of the columns), and so do the hubs
and always-on columns here: 20 and 4 per 8,400 alive columns as in that benchmark (445 hubs and
89 always-on columns at n = 186,778), so a slice of n columns is n columns drawn from the same
law, and the mean non-zeros per row grow ∝ n (≈ 973 at full n).

Slices (each process-wide peak RSS reset before the run, as graph_sparse_bench does):

A. all n = 186,778 alive columns, M = --a-rows: the statistics pass and the threshold timed
   whole; of pass 2 a sample of its passes (`sparse.group_topk` plus the merge of its lists,
   as `sparse_topk` runs them), each timed on its own — a pass is the unit of work (it reads
   every row block once and feeds a group of column tiles), so this is the "column tile"
   slice at full width. With --a-whole-rows, also the whole `build_graph` at those M.
B. a column subset (n = --b-alive, same law) at M = --b-rows up to the full 2,000,000 rows:
   whole `build_graph` runs (graph.correlation: sparse, defaults otherwise).
C. M = --c-rows fixed, n = --c-alive growing: whole `build_graph` runs.

Inside every run the pieces of pass 2 are timed by wrapping the functions of
`scalespd.graph.sparse` in this process (nothing in the package is changed): reading and
slicing row blocks (read), the Gram products (products), turning a Gram block into
correlations (correlation), the top-k selection from it (select), the merges of lists (merge);
the rest (allocations, the loop) is `other`. Each piece is fitted to the count it should be
proportional to, counted exactly on the data for the plan that ran (`plan_features`):

    read         passes × stored entries of the rows (every pass reads whole row blocks and
                 looks up the column position of each of their entries), and the entries of
                 the pass's partner columns (the only ones converted to CSC, since 37fc10b)
    products     co-activations of the spgemm tiles (Σ over rows of tile non-zeros × partner
                 non-zeros), multiply-adds of the spmm tiles, partner entries sliced per spgemm
                 tile, accumulator values per row block (a product added as a dense array:
                 always for spmm, for a well-filled spgemm product), (tile, row block) calls
    correlation, select, other
                 accumulator values (Σ over tiles of partners × width ≈ n²/2), passes
    merge        list rows merged

(non-negative least squares, relative error). The fitted coefficients and the counts of the
full problem's plan (made by `sparse_plan.make_plan` from the column densities of the largest
slice A, scaled to M = 2,000,000; a column that did not fire there gets the generator's lowest
rate, 1e-4; its row counts come from the rows of that slice, scaled by 2,000,000 / M) give
the projected time of every pass of the full run, and from them the cost on this CPU, on one
GPU (the parts that `device: cuda` moves to the GPU divided by an assumed speed-up — no GPU
was available, so that factor is an assumption, stated in the output) and on G GPUs (passes
as independent tasks, longest first). Plain log-log exponents in M (B) and in n (C) are
recorded too.

Usage: python bench/graph_scale_8b.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "graph_scale_8b.json"

from graph_sparse_bench import (  # noqa: E402
    BlockedCSR,
    lm_like_blocks,
    machine,
    measured,
    record,
)

import scalespd.graph.sparse as sparse_mod  # noqa: E402
from scalespd.config import GraphConfig  # noqa: E402
from scalespd.graph import build_graph  # noqa: E402
from scalespd.graph.sparse import empty_lists, group_topk  # noqa: E402
from scalespd.graph.sparse_io import SparseBlocks  # noqa: E402
from scalespd.graph.sparse_plan import SparsePlan, make_plan  # noqa: E402
from scalespd.graph.sparse_stats import sparse_column_stats  # noqa: E402
from scalespd.graph.threshold import edge_threshold  # noqa: E402

N_TOTAL = 1_245_184
N_ALIVE = 186_778  # 15% of N_TOTAL
M_FULL = 2_000_000
RATE_FLOOR = 1e-4  # the generator's lowest firing rate

# --------------------------------------------------------------------------------------------
# Timing the pieces of pass 2 (wrappers installed in scalespd.graph.sparse, this process only)
# --------------------------------------------------------------------------------------------

PIECES = ("read", "products", "correlation", "select", "merge")
CLOCK: dict[str, float] = dict.fromkeys(PIECES, 0.0)


def _timed(piece: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            CLOCK[piece] += time.perf_counter() - t
    return wrapper


class _TimedBlocks(SparseBlocks):
    def block(self, r0: int, r1: int) -> Any:
        t = time.perf_counter()
        try:
            return super().block(r0, r1)
        finally:
            CLOCK["read"] += time.perf_counter() - t


class _TimedPartners(sparse_mod._RowMajorPartners):
    def __init__(self, B: Any) -> None:
        t = time.perf_counter()
        super().__init__(B)
        CLOCK["read"] += time.perf_counter() - t


def install_clocks() -> None:
    sparse_mod.SparseBlocks = _TimedBlocks  # type: ignore[misc]
    sparse_mod._RowMajorPartners = _TimedPartners  # type: ignore[misc]
    sparse_mod._accumulate = _timed("products", sparse_mod._accumulate)
    sparse_mod._to_correlation = _timed("correlation", sparse_mod._to_correlation)
    sparse_mod._tile_lists = _timed("select", sparse_mod._tile_lists)
    sparse_mod.merge_topk = _timed("merge", sparse_mod.merge_topk)


def reset_clocks() -> None:
    for key in PIECES:
        CLOCK[key] = 0.0


def pieces(pass2_s: float) -> dict[str, float]:
    out = {key: round(CLOCK[key], 3) for key in PIECES}
    out["other"] = round(max(0.0, pass2_s - sum(CLOCK.values())), 3)
    return out


# --------------------------------------------------------------------------------------------
# Data and the counts of a plan
# --------------------------------------------------------------------------------------------


def generate(n_alive: int, n_rows: int, seed: int) -> tuple[BlockedCSR, dict[str, Any]]:
    """The 8B-shaped data: N_TOTAL columns, n_alive of them alive, hubs and always-on columns
    scaled with n_alive (20 and 4 per 8,400, as in graph_sparse_bench)."""
    hubs, on = max(1, round(20 * n_alive / 8400)), max(1, round(4 * n_alive / 8400))
    t0 = time.perf_counter()
    X, info = lm_like_blocks(n_rows, N_TOTAL, n_alive, rate_exponent=1.5, n_hubs=hubs,
                             n_always_on=on, seed=seed)
    info["generate_s"] = round(time.perf_counter() - t0, 1)
    info["nnz"] = X.nnz
    info["mean_row_nnz"] = round(X.nnz / n_rows, 1)
    info["input_mb"] = round(X.nbytes / 2**20, 1)
    return X, info


def column_nnz(X: BlockedCSR) -> np.ndarray:
    """(N_TOTAL,) stored entries per column over the rows of X."""
    out = np.zeros(N_TOTAL, dtype=np.int64)
    for r0 in range(0, X.n_rows, X.block):
        out += np.bincount(X.csr_rows(r0, r0 + X.block).indices, minlength=N_TOTAL)
    return out


def row_pairs(X: BlockedCSR) -> float:
    """Σ over the rows of nnz_row · (nnz_row - 1) / 2: the co-active pairs of all columns."""
    total = 0.0
    for r0 in range(0, X.n_rows, X.block):
        c = np.diff(X.csr_rows(r0, r0 + X.block).indptr).astype(np.float64)
        total += float((c * (c - 1) / 2).sum())
    return total


def plan_features(X: BlockedCSR, cols: np.ndarray, plan: SparsePlan, k: int,
                  scale: float = 1.0, n_rows: int | None = None) -> list[dict[str, float]]:
    """Per pass of `plan` (over the columns `cols`, local order), the counts its pieces of work
    are proportional to, counted on the rows of X (multiplied by `scale`: rows of a sample
    standing for more rows). n_rows: the rows the plan is for (default X's)."""
    n_rows = X.n_rows if n_rows is None else n_rows
    n = plan.order.size
    starts = np.array([t.start for t in plan.tiles], dtype=np.int64)
    widths = np.array([t.width for t in plan.tiles], dtype=np.float64)
    spgemm = np.array([t.kernel == "spgemm" for t in plan.tiles])
    T = starts.size
    where = np.full(N_TOTAL, -1, dtype=np.int64)
    placed = cols[plan.order]
    seen = placed >= 0  # -1: a column with no entries in X (counted in n only)
    where[placed[seen]] = np.flatnonzero(seen)
    coact, ge_sum = np.zeros(T), np.zeros(T)
    step = 8192
    for r0 in range(0, X.n_rows, step):
        B = X.csr_rows(r0, min(r0 + step, X.n_rows))
        r = B.shape[0]
        pos = where[B.indices]
        row = np.repeat(np.arange(r), np.diff(B.indptr))
        keep = pos >= 0
        tile = np.searchsorted(starts, pos[keep], side="right") - 1
        cnt = np.bincount(row[keep] * T + tile, minlength=r * T).reshape(r, T)
        ge = cnt[:, ::-1].cumsum(axis=1)[:, ::-1]  # non-zeros at positions >= tile start
        coact += (cnt * ge).sum(axis=0)
        ge_sum += ge.sum(axis=0)
    coact *= scale
    ge_sum *= scale
    entries = (n - starts) * widths
    n_blocks = -(-n_rows // plan.block_rows)
    row_entries = float(X.nnz) * scale
    out = []
    for a, b in plan.groups:
        sl = slice(a, b)
        out.append({
            "read_all": row_entries,
            "read_selected": float(ge_sum[a]),
            "coactivations": float((coact[sl] * spgemm[sl]).sum()),
            "spmm_macs": float((ge_sum[sl] * widths[sl] * ~spgemm[sl]).sum()),
            "partner_entries": float((ge_sum[sl] * spgemm[sl]).sum()),
            "spmm_block_values": float((entries[sl] * ~spgemm[sl]).sum() * n_blocks),
            "spgemm_block_values": float((entries[sl] * spgemm[sl]).sum() * n_blocks),
            "calls": float((b - a) * n_blocks),
            "entries": float(entries[sl].sum()),
            "merged_rows": float(k * ((n - starts[a]) + ((n - starts[sl]) + widths[sl]).sum())),
            "passes": 1.0,
        })
    return out


def total(features: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(sum(f[key] for f in features)) for key in features[0]}


# --------------------------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------------------------


def prepare(X: BlockedCSR, cfg: GraphConfig) -> dict[str, Any]:
    """What build_graph does before pass 2 (statistics, threshold, plan), timed."""
    col_nnz = column_nnz(X)
    cols = np.flatnonzero(col_nnz > 0)
    t0 = time.perf_counter()
    stats = sparse_column_stats(SparseBlocks(X, cols, cfg.row_chunk, cfg.row_chunk))
    stats_s = time.perf_counter() - t0
    active = np.flatnonzero(~stats.zero_var)
    t1 = time.perf_counter()
    threshold, _, pair = edge_threshold(
        cfg.edge_threshold, stats.max_abs_z[active], X, cols[active], X.n_rows, cfg.row_chunk,
        alpha=cfg.null_alpha, null_model=cfg.null_model, perm_cols=cfg.null_perm_cols,
        seed=cfg.null_seed)
    threshold_s = time.perf_counter() - t1
    plan = make_plan(stats.nnz[active], X.n_rows, acc_entries=4 * cfg.tile_cols ** 2,
                     row_chunk=cfg.row_chunk)
    return {"cols": cols[active], "mean": stats.mean[active], "std": stats.std[active],
            "threshold": threshold, "k": 2 * cfg.k if pair is not None else cfg.k,
            "plan": plan, "stats_s": stats_s, "threshold_s": threshold_s,
            "col_nnz": col_nnz}


def sample_passes(n_passes: int, count: int) -> list[int]:
    """About `count` pass indices: the first few (the dense columns, the most work per pass)
    and the rest spread log-uniformly and evenly to the last."""
    picks = {0, 1, 2, n_passes - 1}
    picks |= {int(x) for x in np.geomspace(1, n_passes - 1, count // 2)}
    picks |= {int(x) for x in np.linspace(0, n_passes - 1, count // 2)}
    return sorted(p for p in picks if 0 <= p < n_passes)


def slice_a(X: BlockedCSR, cfg: GraphConfig, n_sample: int) -> dict[str, Any]:
    """All alive columns: statistics, threshold, plan, and a sample of passes timed alone."""
    prep = prepare(X, cfg)
    plan: SparsePlan = prep["plan"]
    feats = plan_features(X, prep["cols"], plan, prep["k"])
    out: dict[str, Any] = {
        "rows": X.n_rows, "nnz": X.nnz, "n_nonconstant": int(prep["cols"].size),
        "stats_s": round(prep["stats_s"], 3), "threshold_s": round(prep["threshold_s"], 3),
        "threshold": prep["threshold"], "k_search": prep["k"], "plan": plan.summary(),
        "plan_features_total": total(feats), "passes": []}
    n = prep["cols"].size
    for g in sample_passes(len(plan.groups), n_sample):
        reset_clocks()

        def one_pass(g: int = g) -> None:
            p0, v, i = group_topk(X, prep["cols"], prep["mean"], prep["std"], plan, g,
                                  prep["threshold"], prep["k"], cfg.row_chunk)
            vals, idx = empty_lists(n, prep["k"])
            sparse_mod.merge_topk(vals[p0:], idx[p0:], v, i, prep["k"])

        _, meas = measured(one_pass)
        a, b = plan.groups[g]
        rec = {"pass": g, "tiles": [a, b], "kernels": sorted({t.kernel for t in
                                                             plan.group_tiles(g)}),
               **meas, "pieces": pieces(meas["wall_s"]), "features": feats[g]}
        out["passes"].append(rec)
        print(json.dumps({key: rec[key] for key in ("pass", "wall_s", "peak_rss_mb",
                                                    "pieces")}), flush=True)
    return out


def whole(X: BlockedCSR, cfg: GraphConfig) -> dict[str, Any]:
    """build_graph (sparse) on all of X's alive columns, its pieces and plan counts."""
    col_nnz = column_nnz(X)
    cols = np.flatnonzero(col_nnz > 0)
    reset_clocks()
    res, meas = measured(lambda: build_graph(X, cfg, columns=cols))
    rec = {"rows": X.n_rows, "nnz": X.nnz, "n_alive_observed": int(cols.size),
           **record(res, meas)}
    pass2 = float(res.summary["timings"]["topk_s"])
    rec["pieces"] = pieces(pass2)
    active = np.flatnonzero(~res.zero_var)
    k = 2 * cfg.k if res.summary["threshold_info"].get("pairwise", False) else cfg.k
    plan = make_plan(col_nnz[cols[active]], X.n_rows, acc_entries=4 * cfg.tile_cols ** 2,
                     row_chunk=cfg.row_chunk)
    assert plan.summary() == rec["correlation"]["plan"], "plan differs from build_graph's"
    rec["features"] = total(plan_features(X, cols[active], plan, k))
    rec["row_pairs"] = row_pairs(X)
    print(json.dumps({key: rec[key] for key in ("rows", "nnz", "wall_s", "peak_rss_mb",
                                                "timings", "pieces")}), flush=True)
    del res
    return rec


# --------------------------------------------------------------------------------------------
# Fit and projection
# --------------------------------------------------------------------------------------------

# Which counts each piece of pass 2 is proportional to.
MODEL = {
    "read": ("read_all", "read_selected"),
    "products": ("coactivations", "spmm_macs", "partner_entries", "spmm_block_values",
                 "spgemm_block_values", "calls"),
    "correlation": ("entries",),
    "select": ("entries",),
    "merge": ("merged_rows",),
    "other": ("entries", "passes"),
}
# Pieces that run on the GPU with graph.device: cuda (sparse.py: the products and the
# correlation transform run on CuPy; row blocks are read and sliced on the host, the
# accumulators copied back and the selection and merges run on the host).
ON_DEVICE = ("products", "correlation")


def fit(points: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, Any]:
    """Per piece, non-negative coefficients (seconds per count) minimising the relative error
    over `points` = [(features, pieces)]; with each piece's relative residuals."""
    out: dict[str, Any] = {}
    for piece, keys in MODEL.items():
        y = np.array([p[piece] for _, p in points])
        A = np.array([[f[key] for key in keys] for f, _ in points])
        w = 1.0 / np.maximum(y, 1e-3)
        colscale = np.maximum(A.max(axis=0), 1e-30)
        coef, _ = nnls(A / colscale * w[:, None], y * w)
        coef = coef / colscale
        pred = A @ coef
        out[piece] = {"coef_ns": {key: round(float(c) * 1e9, 4) for key, c in
                                  zip(keys, coef, strict=True)},
                      "median_abs_rel_residual": round(float(np.median(
                          np.abs(pred - y) / np.maximum(y, 1e-3))), 3)}
    return out


def predict(model: dict[str, Any], f: dict[str, float]) -> dict[str, float]:
    return {piece: sum(m["coef_ns"][key] * 1e-9 * f[key] for key in m["coef_ns"])
            for piece, m in model.items()}


def makespan(times: list[float], workers: int) -> float:
    """Longest-first list scheduling of independent tasks on `workers` equal workers."""
    heap = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + t)
    return max(heap)


def loglog(xs: list[float], ys: list[float]) -> float:
    return round(float(np.polyfit(np.log(xs), np.log(ys), 1)[0]), 3)


def project(out: dict[str, Any], X_big: BlockedCSR, cfg: GraphConfig, args: argparse.Namespace
            ) -> dict[str, Any]:
    """The full run from the fitted pieces and the full plan's counts."""
    labelled = []
    for a in out["A_all_columns"]:
        labelled += [(f"A {a['rows']} rows, pass {p['pass']}", p["features"], p["pieces"])
                     for p in a["passes"]]
    whole_runs = [(f"A whole, {r['rows']} rows", r) for r in out["A_whole"]]
    whole_runs += [(f"B {r['rows']} rows", r) for r in out["B_column_subset"]]
    whole_runs += [(f"C n = {r['n_alive']}", r) for r in out["C_columns_growth"]]
    labelled += [(name, r["features"], r["pieces"]) for name, r in whole_runs]
    points = [(f, p) for _, f, p in labelled]
    model = fit(points)
    # Pass 2 of each whole run: measured, fitted (in sample), and predicted by a fit without
    # the largest runs (the whole A runs and the B run with the most rows): out of sample.
    held = {name for name, _ in whole_runs if name.startswith("A whole")}
    if out["B_column_subset"]:
        held.add(f"B {max(r['rows'] for r in out['B_column_subset'])} rows")
    model_out = fit([(f, p) for name, f, p in labelled if name not in held])
    checks = [{"run": name, "pass2_measured_s": r["timings"]["topk_s"],
               "pass2_fitted_s": round(sum(predict(model, r["features"]).values()), 1),
               "pass2_held_out_fit_s": round(sum(predict(model_out, r["features"]).values()), 1)
               if name in held else None}
              for name, r in whole_runs]

    # The full problem's plan: densities of the largest slice A scaled to M_FULL.
    m_big = X_big.n_rows
    col_nnz = column_nnz(X_big)
    alive = np.flatnonzero(col_nnz > 0)
    n_unseen = N_ALIVE - alive.size
    dens = col_nnz[alive] / m_big
    # Columns that did not fire in the slice: alive ids of the full problem are unknown here,
    # so they are appended as extra columns of the lowest rate (they add to n and to the
    # accumulator values; their co-activations are negligible and not counted).
    nnz_full = np.concatenate([np.round(dens * M_FULL), np.full(n_unseen, RATE_FLOOR * M_FULL)]
                              ).astype(np.int64)
    plan = make_plan(nnz_full, M_FULL, acc_entries=4 * cfg.tile_cols ** 2,
                     row_chunk=cfg.row_chunk)
    # Row counts from the slice's rows, for the plan's order restricted to the seen columns
    # (positions of unseen columns are all at the end: lowest density).
    k_search = out["A_all_columns"][-1]["k_search"]
    feats = plan_features(X_big, np.concatenate([alive, np.full(n_unseen, -1)]), plan,
                          k_search, scale=M_FULL / m_big, n_rows=M_FULL)
    per_pass = [predict(model, f) for f in feats]
    cpu_pass = [sum(p.values()) for p in per_pass]
    piece_tot = {piece: round(sum(p[piece] for p in per_pass), 1) for piece in MODEL}

    # Statistics and threshold: time per stored entry / per row, from every whole run and A.
    pre = [(r["nnz"], r["rows"], r["timings"]["stats_s"], r["timings"]["threshold_s"])
           for r in out["B_column_subset"] + out["C_columns_growth"] + out["A_whole"]]
    pre += [(a["nnz"], a["rows"], a["stats_s"], a["threshold_s"]) for a in out["A_all_columns"]]
    stats_ns = float(np.median([s / nz for nz, _, s, _ in pre])) * 1e9
    thr = np.array([[nz, m] for nz, m, _, _ in pre], dtype=float)
    thr_coef, _ = nnls(thr / thr.max(axis=0), np.array([t for *_, t in pre]))
    thr_coef /= thr.max(axis=0)
    nnz_total = float(X_big.nnz) * M_FULL / m_big
    stats_s = stats_ns * 1e-9 * nnz_total
    threshold_s = float(thr_coef @ [nnz_total, M_FULL])

    # One GPU: the device pieces divided by the assumed speed-up, host pieces as measured here,
    # plus copies over PCIe (row blocks to the device every pass, accumulators back).
    S, pcie = args.gpu_speedup, args.pcie_gb_s * 1e9
    copy_s = [(f["read_selected"] * 8 + f["entries"] * 8) / pcie for f in feats]
    gpu_pass = [sum(v / S if piece in ON_DEVICE else v for piece, v in p.items()) + c
                for p, c in zip(per_pass, copy_s, strict=True)]
    host_share = sum(sum(v for piece, v in p.items() if piece not in ON_DEVICE)
                     for p in per_pass) / sum(gpu_pass)
    # Cross-check without the per-count model: the sampled passes of the largest slice A, their
    # row-proportional pieces (read, products) scaled to M_FULL by rows or by row blocks, the
    # other pieces as measured, interpolated linearly over the pass index.
    big = out["A_all_columns"][-1]
    g = np.array([p["pass"] for p in big["passes"]])
    prop = np.array([p["pieces"]["read"] + p["pieces"]["products"] for p in big["passes"]])
    rest = np.array([sum(p["pieces"].values()) for p in big["passes"]]) - prop
    every = np.arange(big["plan"]["n_passes"])
    prop_s, rest_s = float(np.interp(every, g, prop).sum()), float(np.interp(every, g, rest).sum())
    br = big["plan"]["block_rows"]
    by_rows, by_blocks = M_FULL / big["rows"], -(-M_FULL // br) / -(-big["rows"] // br)
    direct = {"slice_rows": big["rows"], "sampled_passes": int(g.size),
              "pass2_s_scaled_by_rows": round(rest_s + prop_s * by_rows, 1),
              "pass2_s_scaled_by_row_blocks": round(rest_s + prop_s * by_blocks, 1)}

    a_peaks = [p["peak_rss_mb"] - p["rss_before_mb"] for a in out["A_all_columns"]
               for p in a["passes"] if a["rows"] >= cfg.row_chunk and p["peak_rss_mb"]]
    acc_mb = 4 * cfg.tile_cols ** 2 * 8 / 2**20
    lists_mb = N_ALIVE * k_search * 16 / 2**20
    gpus = args.gpus
    cluster = {str(g): {"pass2_h": round(makespan(gpu_pass, g) / 3600, 2),
                        "longest_pass_s": round(max(gpu_pass), 1),
                        "store_reads_per_gpu_tb": round(
                            len(feats) * nnz_total * 8 / g / 1e12, 2)}
               for g in gpus}
    return {
        "fit": model,
        "fit_points": len(points),
        "fit_checks": checks,
        "direct_scaling_check": direct,
        "full_plan": {**plan.summary(), "n_columns": int(nnz_full.size),
                      "columns_not_seen_in_slice": int(n_unseen),
                      "plan_estimate_s (sparse_plan's own model)": round(plan.estimate_s, 1)},
        "full_counts": {key: float(sum(f[key] for f in feats)) for key in feats[0]},
        "full_nnz": nnz_total,
        "full_input_gb_csr": round(nnz_total * 8 / 1e9, 1),
        "co_active_pairs_all_columns": out["A_all_columns"][-1]["row_pairs"]
        * M_FULL / m_big,
        "cpu_this_machine": {
            "stats_s": round(stats_s, 1), "threshold_s": round(threshold_s, 1),
            "pass2_pieces_s": piece_tot, "pass2_s": round(sum(cpu_pass), 1),
            "total_h": round((stats_s + threshold_s + sum(cpu_pass)) / 3600, 2),
            "basis": "fitted per-piece seconds per count (fit) x the full plan's counts; one "
                     "process as the stage runs it today (single-threaded scipy products)"},
        "memory": {
            "pass_working_set_mb_measured": round(max(a_peaks), 1) if a_peaks else None,
            "accumulator_budget_mb": acc_mb, "lists_mb": round(lists_mb, 1),
            "basis": "peak RSS minus RSS before, per pass of slice A at M >= row_chunk (row "
                     "blocks then have the full run's size: block_rows is fixed by the "
                     "row non-zeros, not by M); the input is not held: it is read block by "
                     "block from the sparse store"},
        "one_gpu": {
            "assumption": f"products and correlation transform {S:g}x faster than this CPU's "
                          f"one core (ASSUMED, not measured: no GPU was available and "
                          f"bench/results/gpu_check.json has no GPU numbers); host pieces as "
                          f"measured here; PCIe {args.pcie_gb_s:g} GB/s for row blocks "
                          f"(8 B per entry, every pass) and accumulators (8 B per value)",
            "pass2_h": round(sum(gpu_pass) / 3600, 2),
            "total_h": round((stats_s + threshold_s + sum(gpu_pass)) / 3600, 2),
            "host_share_of_pass2": round(host_share, 3),
            "pass2_h_if_speedup": {str(s): round(sum(
                sum(v / s if piece in ON_DEVICE else v for piece, v in p.items()) + c
                for p, c in zip(per_pass, copy_s, strict=True)) / 3600, 2)
                for s in (10, 30, 100, 1e9)},
        },
        "ray_cluster": {
            "partition": "one task per pass (passes are independent; their lists merge in "
                         "any order): build_graph(use_ray=True) runs the sparse pass 2 so "
                         "(sparse.sparse_topk with ray_source, since cdbdc1b); the times are "
                         "projected from one-process measurements, not measured on a cluster",
            "by_gpus": cluster,
            "per_task": "reads every row block of the store once (its partner columns), "
                        "holds <= acc budget of accumulators + one row block, returns "
                        "(n - p0, k) lists",
        },
    }


# --------------------------------------------------------------------------------------------


def git_head() -> str | None:
    """The commit of the code measured (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a-rows", type=int, nargs="*", default=[10_000, 20_000, 40_000])
    ap.add_argument("--a-passes", type=int, default=20, help="passes sampled per M in A")
    ap.add_argument("--a-whole-rows", type=int, nargs="*", default=[10_000])
    ap.add_argument("--b-alive", type=int, default=16_384)
    ap.add_argument("--b-rows", type=int, nargs="*",
                    default=[125_000, 250_000, 500_000, 1_000_000, 2_000_000])
    ap.add_argument("--c-rows", type=int, default=20_000)
    ap.add_argument("--c-alive", type=int, nargs="*", default=[11_674, 23_347, 46_694, 93_389])
    ap.add_argument("--gpu-speedup", type=float, default=30.0,
                    help="ASSUMED speed-up of the device pieces on one GPU over one core here")
    ap.add_argument("--pcie-gb-s", type=float, default=20.0)
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 8, 32, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny slices, to try the script")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.a_rows, args.a_passes, args.a_whole_rows = [2000, 4000], 6, []
        args.b_alive, args.b_rows = 4096, [20_000, 40_000]
        args.c_rows, args.c_alive = 4000, [4096, 8192]

    install_clocks()
    cfg = GraphConfig(k=10, device="cpu", correlation="sparse")
    t_start = time.perf_counter()
    out: dict[str, Any] = {"machine": machine(), "code_commit": git_head(),
                           "args": vars(args) | {"out": str(args.out)},
                           "problem": {"n_total": N_TOTAL, "n_alive": N_ALIVE, "rows": M_FULL,
                                       "rate_exponent": 1.5,
                                       "hubs_always_on": "20 and 4 per 8,400 alive columns"}}

    # A: all alive columns, fewer rows.
    out["A_all_columns"], out["A_whole"] = [], []
    X_big = None
    for m in sorted(args.a_rows):
        X, info = generate(N_ALIVE, m, args.seed)
        print(json.dumps(info), flush=True)
        rec = {"data": info, **slice_a(X, cfg, args.a_passes), "row_pairs": row_pairs(X)}
        out["A_all_columns"].append(rec)
        if m in args.a_whole_rows:
            out["A_whole"].append({"data": info, **whole(X, cfg)})
        X_big = X
    for m in sorted(set(args.a_whole_rows) - set(args.a_rows)):
        X, info = generate(N_ALIVE, m, args.seed)
        out["A_whole"].append({"data": info, **whole(X, cfg)})
        del X

    # B: a column subset, up to all rows.
    X, info = generate(args.b_alive, max(args.b_rows), args.seed)
    print(json.dumps(info), flush=True)
    out["B_data"] = info
    out["B_column_subset"] = [whole(X if m == X.n_rows else X.head(m), cfg)
                              for m in sorted(args.b_rows)]
    del X

    # C: fixed rows, growing columns.
    out["C_columns_growth"] = []
    for n in sorted(args.c_alive):
        X, info = generate(n, args.c_rows, args.seed)
        out["C_columns_growth"].append({"n_alive": n, "data": info, **whole(X, cfg)})
        del X

    # Growth exponents.
    b, c = out["B_column_subset"], out["C_columns_growth"]
    growth: dict[str, Any] = {}
    if len(b) >= 2:
        growth["B_total_s_exponent_in_M"] = loglog([r["rows"] for r in b],
                                                   [r["wall_s"] for r in b])
        growth["B_pass2_s_exponent_in_M"] = loglog([r["rows"] for r in b],
                                                   [r["timings"]["topk_s"] for r in b])
    if len(c) >= 2:
        growth["C_pass2_s_exponent_in_n"] = loglog([r["n_alive"] for r in c],
                                                   [r["timings"]["topk_s"] for r in c])
        growth["C_row_pairs_exponent_in_n"] = loglog([r["n_alive"] for r in c],
                                                     [r["row_pairs"] for r in c])
        growth["C_entries_exponent_in_n"] = loglog([r["n_alive"] for r in c],
                                                   [r["features"]["entries"] for r in c])
    out["growth"] = growth
    assert X_big is not None
    out["projection"] = project(out, X_big, cfg, args)
    out["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["script_wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({"growth": growth, **{key: out["projection"][key] for key in (
        "fit", "fit_checks", "direct_scaling_check", "full_plan", "cpu_this_machine", "memory",
        "one_gpu", "ray_cluster")}},
        indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
