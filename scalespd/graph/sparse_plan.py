"""How the sparse correlation path splits its work, what it costs, and when it beats dense.

Order. Columns are processed densest first (position p holds local node `order[p]`; ties keep
node order). Every unordered pair (p, q), p < q, belongs to exactly one *tile*: the tile whose
column range holds p. A tile [s, e) computes the Gram block G[q, p] = Σ_m x_mq x_mp for all
partners q ≥ s and its own columns p, so both directions of an edge come from one number.

Kernels. The Gram block of a tile is a sum over row blocks B of one of two products:

    spgemm   B[:, s:]ᵀ · B[:, s:e]           sparse × sparse: one multiply-add per co-activation
                                             (row where both columns are non-zero), ~8 ns each
                                             with adding the product into the accumulator
    spmm     B[:, s:]ᵀ · (dense B[:, s:e] - mean)   sparse × dense: one multiply-add per stored
                                             entry of a partner per tile column, ~0.25 ns each

A column of density d costs about d · (row non-zeros) co-activations in spgemm and about
(row non-zeros) · 1 in spmm, so spmm is cheaper for columns denser than ~ SPMM_NS / SPGEMM_NS
(a few per cent): the frequent columns (hubs, always-on) — the ones that would make a sparse
XᵀX dense — are taken with a dense operand. Densest-first order makes them one prefix.

Memory. A *pass* reads every row block once and feeds a group of consecutive tiles; their float64
accumulators together hold at most `acc_entries` values. Row blocks hold about `block_nnz`
stored entries (whole `row_chunk`s), an spmm tile's dense operand at most `dense_bytes`.

The cost constants below were measured with bench/graph_sparse_bench.py on the 2-core development
machine; they only steer choices (kernels, graph.correlation: auto), never results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

# Nanoseconds per unit of work, measured on the development machine (see module docstring).
SPGEMM_NS = 8.0      # per co-activation multiply-add of scipy's sparse x sparse product, added
SPMM_NS = 0.3        # per multiply-add of sparse x dense (float32, 64 wide), slicing included
ENTRY_NS = 12.0      # per accumulator value turned into a correlation and selected from
READ_NS = 25.0       # per stored entry read, sliced and converted per pass
DENSE_NS = 0.03      # per multiply-add of the dense path's float32 GEMM tiles (0.7 of peak)
DENSE_READ_NS = 1.5  # per value the dense path reads and z-scores (once per tile pair)
CALL_S = 2e-4        # fixed cost per (tile, row block) product

# Default budgets (see module docstring). An spmm tile is at most SPMM_WIDTH wide: the product
# scatters into (partners, width) float32 rows, which stay in cache when narrow (0.2 ns per
# multiply-add at 64 columns, 0.4 ns at 341 on the development machine).
BLOCK_NNZ = 8 << 20
DENSE_BYTES = 64 << 20
SPMM_WIDTH = 64
# An spgemm tile's product covers its whole own square, twice the pairs it needs there: narrow
# tiles keep that waste small (1/2 of the square ~ width / (2 · partners) of the work).
SPGEMM_WIDTH = 512
# Auto leaves the path that matches how X is stored (dense tiles for a dense X, sparse products
# for a sparse one) only when the model says the other is at least this many times cheaper: the
# estimates are rough, and the dense path would have to densify a sparse X block by block.
AUTO_MARGIN = 2.0


@dataclass(frozen=True)
class Tile:
    """Columns at positions [start, stop), computed with `kernel` against positions ≥ start."""

    start: int
    stop: int
    kernel: Literal["spmm", "spgemm"]

    @property
    def width(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SparsePlan:
    """The sparse path's work for n non-constant columns over M rows.

    order: (n,) int64 local node at each position (densest first). tiles: in position order.
    groups: [first, stop) tile indices of each pass. block_rows: rows per row block.
    estimate_s: modelled seconds of the whole pass 2."""

    order: np.ndarray
    tiles: tuple[Tile, ...]
    groups: tuple[tuple[int, int], ...]
    block_rows: int
    estimate_s: float

    def group_tiles(self, g: int) -> tuple[Tile, ...]:
        a, b = self.groups[g]
        return self.tiles[a:b]

    def summary(self) -> dict[str, Any]:
        """JSON-able description for the graph summary."""
        spmm = [t for t in self.tiles if t.kernel == "spmm"]
        return {
            "n_tiles": len(self.tiles),
            "n_passes": len(self.groups),
            "block_rows": self.block_rows,
            "spmm_columns": int(sum(t.width for t in spmm)),
            "spgemm_columns": int(sum(t.width for t in self.tiles) - sum(t.width for t in spmm)),
            "estimate_s": round(self.estimate_s, 3),
        }


def crossover_density() -> float:
    """Column density above which the spmm kernel is the cheaper one."""
    return SPMM_NS / SPGEMM_NS


def block_rows_for(nnz: np.ndarray, n_rows: int, row_chunk: int, block_nnz: int) -> int:
    """Rows per row block: about block_nnz stored entries, in whole row_chunks, within [1, M]."""
    per_row = max(float(nnz.sum()) / n_rows, 1e-9)
    chunks = max(1, int(block_nnz / (per_row * row_chunk)))
    return int(min(n_rows, chunks * row_chunk))


def make_plan(
    nnz: np.ndarray, n_rows: int, *, acc_entries: int, row_chunk: int,
    block_nnz: int = BLOCK_NNZ, dense_bytes: int = DENSE_BYTES,
) -> SparsePlan:
    """Order, tiles, passes and modelled cost for columns with `nnz` (n,) non-zero rows each.

    acc_entries: float64 accumulator values one pass may hold (≥ 1)."""
    n = int(nnz.size)
    order = np.argsort(-nnz, kind="stable").astype(np.int64)
    d = nnz[order].astype(np.float64) / n_rows
    # suffix[p] = Σ_{q ≥ p} d_q: the mean non-zeros per row among positions ≥ p.
    suffix = np.concatenate([np.cumsum(d[::-1])[::-1], [0.0]])
    block_rows = block_rows_for(nnz, n_rows, row_chunk, block_nnz)
    n_blocks = -(-n_rows // block_rows)
    spmm_width = max(1, min(SPMM_WIDTH, dense_bytes // (4 * block_rows)))
    cross = crossover_density()

    tiles: list[Tile] = []
    cost = 0.0
    p = 0
    while p < n:
        partners = n - p
        cap = max(1, acc_entries // partners)
        if d[p] >= cross:
            dense_run = int(np.searchsorted(-d, -cross, side="right"))  # positions with d ≥ cross
            t = max(1, min(cap, spmm_width, dense_run - p))
            kernel: Literal["spmm", "spgemm"] = "spmm"
            work = n_rows * suffix[p] * t * SPMM_NS + partners * t * n_blocks * 1.0
        else:
            t = min(cap, partners, SPGEMM_WIDTH)
            kernel = "spgemm"
            coact = n_rows * (suffix[p] - suffix[p + t]) * suffix[p]
            work = coact * SPGEMM_NS
        tiles.append(Tile(p, p + t, kernel))
        cost += work * 1e-9 + partners * t * ENTRY_NS * 1e-9 + n_blocks * CALL_S
        p += t

    groups: list[tuple[int, int]] = []
    first, held = 0, 0
    for i, tile in enumerate(tiles):
        size = (n - tile.start) * tile.width
        if i > first and held + size > acc_entries:
            groups.append((first, i))
            first, held = i, 0
        held += size
    if tiles:
        groups.append((first, len(tiles)))
    # Each pass reads the stored entries of its partner columns once.
    cost += sum(n_rows * suffix[tiles[a].start] for a, _ in groups) * READ_NS * 1e-9
    return SparsePlan(order, tuple(tiles), tuple(groups), block_rows, float(cost))


def dense_estimate_s(n: int, n_rows: int, tile_cols: int) -> float:
    """Modelled seconds of the dense path's pass 2 on n columns: the upper triangle of tile
    pairs (a, b ≥ a), each a GEMM over all rows reading two z-scored panels."""
    n_panels = -(-n // tile_cols)
    pairs = n_panels * (n_panels + 1) / 2
    macs = n_rows * n * (n + min(n, tile_cols)) / 2
    reads = pairs * 2 * n_rows * min(n, tile_cols)
    return macs * DENSE_NS * 1e-9 + reads * DENSE_READ_NS * 1e-9


def choose_path(
    setting: str, n: int, n_rows: int, min_value: float, plan: SparsePlan | None,
    tile_cols: int, sparse_input: bool = False,
) -> tuple[str, dict[str, Any]]:
    """("dense" | "sparse", a JSON-able record of why) for graph.correlation = `setting`.

    n: non-constant columns; min_value: their smallest value (the sparse path needs ≥ 0);
    plan: the sparse plan (None when it was not made); sparse_input: X is stored sparse."""
    dense_s = dense_estimate_s(n, n_rows, tile_cols)
    info: dict[str, Any] = {"setting": setting, "dense_estimate_s": round(dense_s, 3),
                            "sparse_estimate_s": None if plan is None
                            else round(plan.estimate_s, 3)}
    if setting == "dense":
        return "dense", {**info, "reason": "graph.correlation: dense"}
    if min_value < 0:
        if setting == "sparse":
            raise ValueError(
                f"graph.correlation: sparse needs non-negative profiles (the smallest value of "
                f"a non-constant column is {min_value:.6g}): for signed data, columns that are "
                "never non-zero together can still correlate positively; use dense or auto")
        return "dense", {**info, "reason": "negative values (the sparse path needs x >= 0)"}
    if setting == "sparse":
        return "sparse", {**info, "reason": "graph.correlation: sparse"}
    if plan is None:
        return "dense", {**info, "reason": "fewer than 2 non-constant columns"}
    if sparse_input:
        if dense_s * AUTO_MARGIN < plan.estimate_s:
            return "dense", {**info, "reason": f"sparse input, but dense modelled >= "
                                               f"{AUTO_MARGIN:g}x cheaper"}
        return "sparse", {**info, "reason": f"sparse input, dense not modelled >= "
                                            f"{AUTO_MARGIN:g}x cheaper"}
    if plan.estimate_s * AUTO_MARGIN < dense_s:
        return "sparse", {**info, "reason": f"modelled >= {AUTO_MARGIN:g}x cheaper than dense"}
    return "dense", {**info, "reason": f"sparse not modelled >= {AUTO_MARGIN:g}x cheaper"}
