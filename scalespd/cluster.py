"""`python -m scalespd.cluster PROFILES --out DIR`: cluster profiles a user already has.

PROFILES is an (M, N) matrix — rows are inputs, columns subcomponents — as a `.npy` file, a
scipy sparse `.npz` file (`scipy.sparse.save_npz`), a zarr array, or a scalespd profiles
directory (holding `ci.zarr`). A sparse `.npz` is loaded whole in its sparse form (about 8–12
bytes per stored entry) and read in sparse row blocks throughout; its correlations take the
sparse co-activation path when that is the cheaper one (graph.correlation: auto, see
`scalespd.graph.sparse`). The command runs the alive filter
(max over rows > tau, streamed over row chunks), the correlation k-NN graph
(`scalespd.graph.build_graph`), spectral clustering (`scalespd.spectral`) and a summary, and
writes into DIR:

    clusters.csv     one row per column: component,name,layer,module,alive,connected_component,
                     cluster (−1 for dead / excluded columns)
    summary.json     counts (n_components, n_alive, n_edges, n_connected_components, n_clusters,
                     cluster_sizes, layer_span_counts, ...), parameters, timings (seconds per
                     step, peak_rss_mb of this process and ray_worker_peak_rss_mb of the Ray
                     workers), and `partial` (null, or the finished row blocks used with
                     --allow-partial)
    components.csv   per-column statistics (max, mean, std, frac_active, alive) and metadata
    spectra.json     per-component eigenvalues and chosen K
    graph/           the k-NN graph (scalespd.graph.GraphResult.save)
    .scalespd-cluster.json   the record of every file above (written last)

The input is only read, never written, and never whole (a sparse `.npz` excepted, in its sparse
form): a `.npy` file is read block by block
through read-only mappings that last one read each (`scalespd.graph.source.NpyFile`), so its
pages do not pile up in the resident set. With Ray, tasks get a small descriptor of PROFILES
(path, kind, shape, dtype, row subset) and read their own column tiles from the file or zarr
store; the matrix never enters Ray's object store (issue 16).

Locations. PROFILES, --components and --out may be local paths or fsspec URLs (s3://, gs://,
memory://, ...; `scalespd.storage`). A `.npy` at a URL is read by byte ranges of whole rows (C
order only); Ray tasks reach an input at a URL themselves, except on a filesystem only this
process sees (memory://), where the work stays in this process.

Output safety. Everything is written into a temporary sibling directory
(`.DIR.partial-<pid>-<host>`) that is renamed to DIR only when all of it is complete, so an
interrupted or failed run never leaves a DIR that looks finished; a run killed outright leaves
that sibling behind, and the next run on the same DIR removes it once its process is gone. An
existing non-empty DIR is refused; `--overwrite` replaces it only when it holds exactly what
an earlier run recorded in `.scalespd-cluster.json` — a DIR with other files (or no record) is
refused even with `--overwrite`, and so is a DIR that holds PROFILES or --components, or that
lies inside the PROFILES directory. The old DIR is renamed aside and deleted only after the
new one is in place (a run killed in between gets it restored by the next run). An --out on an
object store (or memory://) has no renames: the files are written into DIR itself and
.scalespd-cluster.json, written last, marks it complete; a failed or interrupted run removes
what it wrote, and --overwrite removes the old output before writing the new one.

Input checks. Bad input stops with one `error:` line on stderr naming the file or flag, and
exit status 2: a missing, empty (0-byte) or unreadable file, not 2-D, fewer than MIN_ROWS
rows, NaN/inf or negative values (profiles are importances; CI lies in [0, 1]), a metadata CSV
with the wrong rows or columns, --tau outside [0, 1), --edge-threshold outside [0, 1), and a
disk that is full or read-only while writing. A scalespd profiles directory whose harvest is
unfinished (no harvest.json; the check of the pipeline's graph stage,
`scalespd.profiles.open_profiles`) is refused with the number of finished row blocks;
`--allow-partial` clusters only the rows of the finished blocks (logged, and recorded in
summary.json). Ctrl-C (or SIGTERM) removes the temporary directory and exits with status 130;
any other failure is an internal bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
from pydantic import ValidationError
from upath import UPath

from scalespd import storage
from scalespd.config import GraphConfig, ProfilesConfig, SpectralConfig
from scalespd.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    StorageError,
    UserError,
    storage_error,
)
from scalespd.executor import choose_graph
from scalespd.graph.source import NpyFile, RowSubset, peak_rss_mb, row_subset
from scalespd.graph.sparse_io import SparseBlocks, as_row_sliceable, is_sparse_rows
from scalespd.graph.sparse_plan import BLOCK_NNZ, block_rows_for
from scalespd.graph.sparse_stats import block_moments, entry_columns
from scalespd.jsonio import write_json_atomic

if TYPE_CHECKING:
    import zarr

log = logging.getLogger("scalespd.cluster")

META_COLUMNS = ["name", "layer", "module"]
# Rows per block of the alive-filter pass are chosen so a float64 block stays near this size.
_BLOCK_BYTES = 128 << 20
# Fewest rows (inputs) accepted. Two columns active together on a single input and zero
# elsewhere correlate perfectly; under the row-permutation null that the edge threshold uses,
# that happens by chance with probability 1/M. Below M = 20 this chance exceeds 5%, so even a
# perfect correlation of a single pair cannot be told apart from chance, no edge survives the
# threshold and every column ends up a singleton (with M = 2 every correlation is ±1 outright).
MIN_ROWS = 20
# The record of the files a run wrote into --out; --overwrite replaces only such a directory.
MANIFEST = ".scalespd-cluster.json"
MANIFEST_FORMAT = 1
# Temporary siblings of --out carry the writer's pid and host, so a later run can tell a stale
# one (its process is gone) from one still being written, also on a shared file system.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
INTERRUPTED = "interrupted; re-run the same command (--out {out} is as it was before the run)"
# Where --out is written in place (no renames), an interrupted run empties it: with --overwrite
# the earlier output is gone already.
INTERRUPTED_IN_PLACE = ("interrupted; re-run the same command (--out {out} holds nothing of this "
                        "run; with --overwrite its earlier output was removed before writing)")


class InputError(UserError, ValueError):
    """Bad user input; the message names the file or flag and what was expected."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _block_ranges(blocks: list[int], layout: Any) -> tuple[tuple[int, int], ...]:
    """Row ranges of the sorted blocks `blocks`, adjacent blocks merged into one range."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        a, e = layout.block_range(b)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], e)
        else:
            out.append((a, e))
    return tuple(out)


def open_harvest(profiles_dir: UPath, allow_partial: bool) -> tuple[Any, dict[str, Any] | None]:
    """The CI array of the scalespd profiles directory `profiles_dir` and, for an unfinished
    harvest opened with allow_partial, the record of the finished row blocks it is limited to
    (the array is then a RowSubset of those rows)."""
    from scalespd.profiles.reader import (  # noqa: PLC0415
        BLOCKS_DIR,
        SUMMARY_FILE,
        open_profiles,
    )
    from scalespd.profiles.store import (  # noqa: PLC0415
        ATTR_KEY,
        BlockLayout,
        ProfilesError,
        finished_blocks,
    )

    try:
        # The very check the pipeline's graph stage makes: harvest.json marks a finished harvest.
        return open_profiles(profiles_dir), None
    except ProfilesError as err:
        first = err
    except Exception as err:  # noqa: BLE001  (zarr raises several types for unreadable arrays)
        raise InputError(f"PROFILES {profiles_dir}/ci.zarr is not a readable zarr array ({err})"
                         ) from None
    # open_profiles refused it; if only because the harvest is unfinished, count its blocks.
    try:
        arr = open_profiles(profiles_dir, allow_incomplete=True)
    except ProfilesError as err:  # another problem (e.g. not a scalespd profiles array)
        raise InputError(f"PROFILES {profiles_dir}: {err}") from None
    M, N = (int(s) for s in arr.shape)
    attrs = arr.attrs.get(ATTR_KEY)
    block_rows = attrs.get("block_rows") if isinstance(attrs, Mapping) else None
    if not isinstance(block_rows, int):
        raise InputError(f"PROFILES {profiles_dir}: {first}")
    try:
        layout = BlockLayout.make(M, N, int(arr.chunks[0]), int(arr.chunks[1]), block_rows,
                                  arr.dtype.itemsize)
        done = sorted(finished_blocks(profiles_dir / BLOCKS_DIR, layout))
    except ProfilesError as err:  # e.g. a completion record that does not fit the array
        raise InputError(f"PROFILES {profiles_dir}: {first}; {err}") from None
    ranges = _block_ranges(done, layout)
    rows = sum(b - a for a, b in ranges)
    if not allow_partial:
        raise InputError(
            f"PROFILES {profiles_dir} holds an unfinished harvest: {len(done)} of "
            f"{layout.n_blocks} row blocks are finished ({SUMMARY_FILE} is missing); re-run the "
            f"profiles stage to finish it, or pass --allow-partial to cluster only the {rows} "
            "rows of the finished blocks"
        )
    if not done:
        raise InputError(f"PROFILES {profiles_dir} holds an unfinished harvest with no finished "
                         f"row block (0 of {layout.n_blocks}); nothing to cluster")
    info = {"finished_blocks": len(done), "n_blocks": layout.n_blocks, "rows_used": rows,
            "rows_total": M, "row_ranges": [list(r) for r in ranges]}
    log.warning("--allow-partial: %s holds an unfinished harvest; clustering only the %d rows "
                "of its %d finished row blocks (of %d blocks, %d rows)", profiles_dir, rows,
                len(done), layout.n_blocks, M)
    return row_subset(arr, tuple(ranges)), info


def open_sparse(path: UPath) -> sp.csr_matrix:
    """The scipy sparse matrix saved at `path` (scipy.sparse.save_npz), in CSR form so that its
    row blocks are cheap slices."""
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"PROFILES {path} is empty (0 bytes); expected a sparse matrix written "
                         "by scipy.sparse.save_npz")
    try:
        with path.open("rb") as f:
            X = sp.load_npz(f)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise InputError(f"PROFILES {path} is not a sparse matrix saved by "
                         f"scipy.sparse.save_npz ({err})") from None
    return sp.csr_matrix(as_row_sliceable(X))


def open_matrix(path: storage.PathLike, allow_partial: bool = False
                ) -> tuple[Any, dict[str, Any] | None]:
    """The (M, N) profile matrix at `path`: .npy (an NpyFile, read-only), a scipy sparse .npz
    (loaded whole as CSR), a zarr array, or a profiles directory holding ci.zarr; a dense one is
    never read whole. The second value is None, or the record of the finished row blocks of an
    unfinished harvest (see `open_harvest`)."""
    path = storage.as_path(path)
    partial = None
    X: NpyFile | RowSubset | zarr.Array | sp.csr_matrix
    if not path.exists():
        raise InputError(f"PROFILES {path} does not exist")
    if path.suffix == ".npz":
        X = open_sparse(path)
    elif path.suffix == ".npy":
        if path.is_file() and path.stat().st_size == 0:
            raise InputError(f"PROFILES {path} is empty (0 bytes); expected an array written "
                             "by np.save")
        try:
            # Read block by block, each through a mapping that lives for that read only.
            X = NpyFile.open(path)
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"PROFILES {path} is not a readable .npy array ({err})") from None
    else:
        import zarr  # noqa: PLC0415

        from scalespd.profiles.sparse_store import is_sparse_store  # noqa: PLC0415
        from scalespd.profiles.store import ATTR_KEY  # noqa: PLC0415

        # A profiles directory, or its ci.zarr passed directly, or any other zarr array.
        target = path / "ci.zarr" if (path / "ci.zarr").exists() else path
        if target.name == "ci.zarr" and is_sparse_store(target):
            # The sparse layout of a scalespd harvest (a zarr group of CSR row blocks).
            return _checked_shape(path, *open_harvest(target.parent, allow_partial))
        try:
            X = zarr.open_array(store=storage.zarr_store(target, read_only=True), mode="r")
        except Exception as err:  # noqa: BLE001  (zarr raises several types for "no array")
            raise InputError(
                f"PROFILES {path} is neither a .npy file nor a zarr array ({err})"
            ) from None
        # An array a scalespd harvest wrote: the pipeline's completeness check applies.
        if target.name == "ci.zarr" and ATTR_KEY in X.attrs:
            X, partial = open_harvest(target.parent, allow_partial)
    return _checked_shape(path, X, partial)


def _checked_shape(path: UPath, X: Any, partial: dict[str, Any] | None
                   ) -> tuple[Any, dict[str, Any] | None]:
    """(X, partial) after checking that X is a 2-D numeric matrix with enough rows."""
    if len(X.shape) != 2:
        raise InputError(
            f"PROFILES {path} must be a 2-D array (M rows = inputs, N columns = subcomponents); "
            f"got shape {tuple(X.shape)}"
        )
    if np.dtype(X.dtype).kind not in "fiu":
        raise InputError(f"PROFILES {path} must hold numbers; got dtype {X.dtype}")
    M, N = (int(s) for s in X.shape)
    if M < MIN_ROWS or N < 1:
        used = " (the rows of the finished blocks)" if partial else ""
        raise InputError(
            f"PROFILES {path} needs at least {MIN_ROWS} rows{used} and 1 column; got shape "
            f"{(M, N)} (with fewer than {MIN_ROWS} inputs no correlation can be told apart "
            "from chance)"
        )
    return X, partial


def read_metadata(path: storage.PathLike | None, n_cols: int) -> pd.DataFrame:
    """component,name,layer,module(,module_type) for each of the n_cols columns: from the CSV
    at `path` (needs name, layer, module; one row per column, in column order) or generic."""
    if path is None:
        return pd.DataFrame({"component": np.arange(n_cols), "name": [f"col:{i}" for i in
                             range(n_cols)], "layer": 0, "module": "", "module_type": ""})
    path = storage.as_path(path)
    if not path.is_file():
        raise InputError(f"--components {path} does not exist")
    try:
        with path.open("rb") as f:
            df = pd.read_csv(f)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise InputError(f"--components {path} is not a readable CSV ({err})") from None
    missing = [c for c in META_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"--components {path} lacks column(s) {missing}; it needs "
                         f"{META_COLUMNS} with one row per profile column")
    if len(df) != n_cols:
        raise InputError(f"--components {path} has {len(df)} rows but PROFILES has {n_cols} "
                         "columns (one metadata row per column expected)")
    if "component" in df.columns and not np.array_equal(df["component"].to_numpy(),
                                                         np.arange(n_cols)):
        raise InputError(f"--components {path}: column 'component' must be 0..{n_cols - 1} "
                         "in order (the column index)")
    layer = pd.to_numeric(df["layer"], errors="coerce")
    if layer.isna().any() or (layer != layer.round()).any():
        bad = int(np.flatnonzero((layer.isna() | (layer != layer.round())).to_numpy())[0])
        raise InputError(f"--components {path}: 'layer' must be an integer in every row "
                         f"(row {bad} holds {df['layer'].iloc[bad]!r})")
    out = pd.DataFrame({"component": np.arange(n_cols), "name": df["name"].astype(str),
                        "layer": layer.astype(np.int64), "module": df["module"].astype(str)})
    out["module_type"] = df["module_type"].astype(str) if "module_type" in df.columns else ""
    return out


def column_stats(X: Any, tau: float, source: str) -> pd.DataFrame:
    """max, mean, std, frac_active (> tau), alive (max > tau) per column, streaming over row
    blocks in float64 (X: (M, N)); returns an (N,)-row frame.

    Every value must be finite and non-negative: profiles are importances (CI lies in [0, 1]),
    and both the alive filter (max > tau) and frac_active read them so. A NaN / inf or negative
    value is an error naming the first offending cell (row, column); the scan costs one
    comparison per value on the block that is read anyway. Rows are numbered in the source."""
    from scalespd.profiles import ColumnStats  # noqa: PLC0415

    if is_sparse_rows(X):
        return _sparse_column_stats(X, tau, source)
    M, N = (int(s) for s in X.shape)
    # Whole zarr row chunks per read; an unchunked array (.npy) has no such constraint (a
    # default of M rows here once read a whole .npy as float64 at once).
    chunk = int(getattr(X, "chunks", (1,))[0] or 1)
    rows = max(1, _BLOCK_BYTES // (8 * N))
    rows = max(chunk, rows // chunk * chunk)  # whole zarr chunks per read
    source_row = getattr(X, "source_row", lambda r: r)  # a RowSubset maps to harvest rows
    total = ColumnStats.empty(N, tau)
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        # (r1 - r0, N) float64; X is only read.
        block = np.asarray(X[r0:r1], dtype=np.float64)
        # One pass: NaN compares False, so `>= 0` fails for NaN and negatives; +inf is caught
        # by the max below (only a block that fails is scanned again to name the cell).
        if not (block >= 0).all() or not np.isfinite(block.max(initial=0.0)):
            finite = np.isfinite(block)
            if not finite.all():
                i, j = np.argwhere(~finite)[0]
                raise InputError(
                    f"PROFILES {source} holds NaN or inf (first at row {source_row(r0 + i)}, "
                    f"column {j}: {block[i, j]}); profiles must be finite")
            i, j = np.argwhere(block < 0)[0]
            raise InputError(
                f"PROFILES {source} holds a negative value (first at row {source_row(r0 + i)}, "
                f"column {j}: {block[i, j]:.6g}); profiles must be non-negative (causal "
                "importances lie in [0, 1]; pass absolute values for signed activations)")
        total = total.merge(ColumnStats.of(block, tau))
    return pd.DataFrame({"max": total.max, "mean": total.mean, "std": total.std,
                         "frac_active": total.frac_active, "alive": total.max > tau})


def _sparse_column_stats(X: Any, tau: float, source: str) -> pd.DataFrame:
    """`column_stats` of a sparse X: the same frame and the same checks, from sparse row blocks
    of about BLOCK_NNZ stored entries (time and memory follow the stored entries, not M·N)."""
    from scalespd.profiles import ColumnStats  # noqa: PLC0415

    M, N = (int(s) for s in X.shape)
    rows = block_rows_for(np.array([int(getattr(X, "nnz", M))]), M, 1, BLOCK_NNZ)
    total = ColumnStats.empty(N, tau)
    for r0, _, B in SparseBlocks(X, np.arange(N), rows, rows):
        _check_sparse_block(B, r0, source)
        part, _, _ = block_moments(B, tau)
        total = total.merge(part)
    return pd.DataFrame({"max": total.max, "mean": total.mean, "std": total.std,
                         "frac_active": total.frac_active, "alive": total.max > tau})


def _check_sparse_block(B: Any, r0: int, source: str) -> None:
    """The checks of `column_stats` on a sparse (r, N) CSC block of rows r0..: the first (in
    row-major order) NaN / inf, else the first negative value, is an InputError."""
    data = B.data[: B.indptr[-1]]
    finite = np.isfinite(data)
    bad = ~finite if not finite.all() else data < 0
    if not bad.any():
        return
    rows, cols = B.indices[bad], entry_columns(B)[bad]
    first = np.lexsort((cols, rows))[0]
    i, j, value = int(rows[first]) + r0, int(cols[first]), float(data[bad][first])
    if not finite.all():
        raise InputError(f"PROFILES {source} holds NaN or inf (first at row {i}, column {j}: "
                         f"{value}); profiles must be finite")
    raise InputError(
        f"PROFILES {source} holds a negative value (first at row {i}, column {j}: {value:.6g}); "
        "profiles must be non-negative (causal importances lie in [0, 1]; pass absolute values "
        "for signed activations)")


# --------------------------------------------------------------------------------------------
# Output directory handling
# --------------------------------------------------------------------------------------------


def _sibling(out: UPath, kind: str) -> UPath:
    """This process's temporary sibling of `out` ("partial": being written, "old": the output
    being replaced)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{_HOST}"


def remove_stale_siblings(out: UPath) -> None:
    """Clean up after runs on `out` that were killed outright (SIGKILL, power loss).

    Their `.<name>.partial-<pid>-<host>` directories are deleted, and a
    `.<name>.old-<pid>-<host>` (the output a run was replacing at the moment it died) is moved
    back to `out` when `out` is missing, else deleted. Only siblings of this host whose process
    is gone are touched: a live pid (even a reused one) or another host's run is left alone.
    An --out without renames (an object store) has no such siblings."""
    if not storage.has_rename(out) or not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)(?:-(.+))?")
    for path in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(path.name)
        if m is None or not path.is_dir() or path.is_symlink():
            continue
        kind, pid, host = m[1], int(m[2]), m[3]
        if (host is not None and host != _HOST) or pid == os.getpid() or psutil.pid_exists(pid):
            continue
        if kind == "old" and not out.exists() and not out.is_symlink():
            path.rename(out)
            log.warning("restored %s from %s, left by a run (pid %d) killed while replacing it",
                        out, path.name, pid)
        else:
            storage.rmtree(path, missing_ok=False)
            log.info("removed %s, left by a run (pid %d) that is no longer running", path, pid)


def _inside(child: PurePosixPath, parent: PurePosixPath) -> bool:
    """Whether `child` is `parent` or lies below it (both already resolved)."""
    return child == parent or parent in child.parents


def _location(p: UPath) -> tuple[str, PurePosixPath]:
    """(filesystem, absolute path on it) of `p`, resolved where it is local, to compare
    locations: paths on different filesystems never contain one another."""
    if storage.is_local(p):
        return "", PurePosixPath(storage.local_path(p).resolve())
    protocol = p.protocol
    return protocol, PurePosixPath("/" + p.path.strip("/"))


def check_out_apart_from_inputs(out: UPath, inputs: list[tuple[str, UPath]]) -> None:
    """--out must neither hold an input nor lie inside the PROFILES directory: replacing it
    would delete the input, and the input's directory is not ours to write into.

    inputs: (flag, path) of PROFILES and --components."""
    o_fs, o = _location(out)
    for flag, path in inputs:
        p_fs, p = _location(path)
        if p_fs != o_fs:
            continue
        if _inside(p, o):
            raise InputError(f"--out {out} holds the input {flag} {path}; choose an --out "
                             "directory that does not contain the inputs")
        if path.is_dir() and _inside(o, p):
            raise InputError(f"--out {out} lies inside the {flag} directory {path}; choose an "
                             "--out outside it")


def recorded_outputs(out: UPath) -> set[str] | None:
    """The files (relative paths) an earlier run recorded writing into `out`, from its
    MANIFEST; None when `out` holds no readable record."""
    try:
        rec = json.loads((out / MANIFEST).read_text())
        files = rec["files"]
        if rec.get("written_by") != "scalespd.cluster" or not isinstance(files, list):
            return None
        return {str(f) for f in files}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _entries(root: UPath) -> list[str]:
    """Relative paths of every file, directory and link below `root` (links not followed);
    at a URL, of every object and the folders the filesystem reports."""
    out = []
    if storage.is_local(root):
        for dirpath, dirnames, filenames in os.walk(storage.local_path(root)):
            rel = Path(dirpath).relative_to(storage.local_path(root))
            out += [(rel / n).as_posix() for n in dirnames + filenames]
        return sorted(out)
    return _remote_entries(root, withdirs=True)


def _remote_entries(root: UPath, withdirs: bool) -> list[str]:
    """Relative paths of the objects (and, with `withdirs`, the folders) below the URL
    `root`."""
    base = root.path.rstrip("/")
    found = root.fs.find(base, withdirs=withdirs, detail=True)
    out = {name.rstrip("/")[len(base):].lstrip("/") for name, info in found.items()
           if withdirs or info.get("type") != "directory"}
    return sorted(out - {""})


def check_existing_out(out: UPath, overwrite: bool) -> None:
    """An existing --out may be replaced only when it is an empty directory, or with
    --overwrite when it holds exactly what an earlier run recorded in MANIFEST."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    record = recorded_outputs(out)
    if record is None:
        raise InputError(
            f"--out {out} already exists, is not empty and holds no record of scalespd.cluster "
            f"output ({MANIFEST}); --overwrite replaces only what scalespd.cluster wrote: "
            "choose another --out or empty it yourself"
        )
    if not overwrite:
        raise InputError(f"--out {out} already holds scalespd.cluster output; pass --overwrite "
                         "to replace it or choose another directory")
    allowed = {MANIFEST} | record
    allowed |= {parent.as_posix() for f in record for parent in Path(f).parents
                if parent != Path(".")}
    extra = [e for e in _entries(out) if e not in allowed]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise InputError(
            f"--out {out} holds files scalespd.cluster did not write ({', '.join(extra[:3])}"
            f"{more}); --overwrite replaces only its own output: move them away or choose "
            "another --out"
        )


def prepare_out(out: UPath, overwrite: bool, inputs: list[tuple[str, UPath]]) -> UPath:
    """Check that --out may be written (see `check_out_apart_from_inputs`,
    `check_existing_out`), clean up stale siblings, and return a new, empty temporary
    directory next to it to fill. Without renames (`scalespd.storage.has_rename`: an object
    store) the directory to fill is --out itself, emptied of an earlier run's output that
    --overwrite replaces."""
    check_out_apart_from_inputs(out, inputs)
    remove_stale_siblings(out)  # first: it may restore an --out that a killed run moved aside
    check_existing_out(out, overwrite)
    try:
        if not storage.has_rename(out):
            _empty(out)
            storage.makedirs(out)
            return out
        tmp = _sibling(out, "partial")
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            storage.rmtree(tmp, missing_ok=False)
        tmp.mkdir()
    except OSError as err:
        user = storage_error(err)
        if user is None:
            raise
        raise StorageError(f"--out {out}: cannot create it ({user})", user.errno,
                           user.filename) from err
    return tmp


def _empty(out: UPath) -> None:
    """Remove everything inside the folder `out` (which stays, where folders exist)."""
    if out.is_dir():
        for child in list(out.iterdir()):
            storage.remove(child)


def discard(tmp: UPath, out: UPath) -> None:
    """Remove what a failed or interrupted run wrote: its temporary sibling, or (without
    renames) the contents of --out itself."""
    if tmp == out:
        _empty(out)
    else:
        storage.rmtree(tmp)


def write_manifest(tmp: UPath, summary: dict[str, Any]) -> None:
    """Record every file written into `tmp` (relative paths) in tmp/MANIFEST, last: a later
    --overwrite replaces a directory only when it holds exactly these files. Where --out is
    written in place (an object store), this record is also what marks it complete."""
    if storage.is_local(tmp):
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                       if p.is_file() and p.name != MANIFEST)
    else:
        files = [f for f in _remote_entries(tmp, withdirs=False) if f != MANIFEST]
    write_json_atomic(tmp / MANIFEST, {
        "written_by": "scalespd.cluster",
        "format_version": MANIFEST_FORMAT,
        "note": "python -m scalespd.cluster --overwrite replaces this directory only while it "
                "holds exactly these files",
        "inputs": summary["inputs"],
        "files": files,
    })


def publish(tmp: UPath, out: UPath, overwrite: bool) -> None:
    """Move the finished temporary directory into place; an old DIR is renamed aside first and
    deleted only once the new one is in place (restored if that rename fails). Nothing to do
    where --out was written in place."""
    if tmp == out:
        return
    # The rules again: the run may have taken long, and someone may have written into --out.
    check_existing_out(out, overwrite)
    old = None
    if out.exists():
        old = _sibling(out, "old")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        storage.rmtree(old)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    g, s, pr = GraphConfig(), SpectralConfig(), ProfilesConfig()
    p = argparse.ArgumentParser(
        prog="python -m scalespd.cluster",
        description="Cluster subcomponent activation profiles (M inputs x N subcomponents) into "
                    "mechanisms: alive filter -> correlation k-NN graph -> spectral clustering.",
    )
    p.add_argument("profiles", type=storage.as_path,
                   help="(M, N) matrix: .npy file, scipy sparse .npz (scipy.sparse.save_npz), "
                        "zarr array, or a profiles dir with ci.zarr")
    p.add_argument("--out", type=storage.as_path, required=True,
                   help="output directory (a local path or an fsspec URL)")
    p.add_argument("--components", type=storage.as_path,
                   help="CSV with name,layer,module (optional module_type) per column")
    p.add_argument("--tau", type=float, default=pr.tau, help="alive if max > tau (%(default)s)")
    p.add_argument("--k", type=int, default=g.k, help="neighbours per node (%(default)s)")
    p.add_argument("--edge-threshold", default=str(g.edge_threshold),
                   help="'auto' (chance level from the data) or a correlation; 0 = the paper's "
                        "plain ReLU clamp (%(default)s)")
    p.add_argument("--k-max", type=int, default=s.k_max, help="K_max (%(default)s)")
    p.add_argument("--mode", choices=["per_component", "largest_component"], default=s.mode)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--always-on", type=_fraction_or_none, default=s.always_on_fraction,
                   metavar="FRACTION|none",
                   help="always-on group: columns active on more than this fraction of rows "
                        "and without a partner (%(default)s; none: no group, the paper's)")
    p.add_argument("--no-recursive-split", action="store_true",
                   help="do not re-split components whose eigengap picks K_max")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                   help="Ray tasks or this process (auto: scalespd/executor.py's policy, per "
                        "stage: Ray for more than one graph tile or spectral work worth Ray "
                        "workers, or whenever RAY_ADDRESS is set)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an --out written by an earlier run (it must hold exactly the "
                        f"files recorded in its {MANIFEST}; anything else is refused)")
    p.add_argument("--allow-partial", action="store_true",
                   help="for a profiles directory whose harvest is unfinished: cluster only the "
                        "rows of its finished row blocks (refused without this flag)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE",
                   help="change any other graph.* or spectral.* field (VALUE is YAML; "
                        "repeatable), e.g. --set graph.neighbours=mutual; see docs/config.md")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


# Flags whose name is not the config field's.
_FLAGS = {"always_on_fraction": "--always-on", "recursive_split": "--no-recursive-split"}


def _fraction_or_none(text: str) -> float | None:
    """--always-on: a number, or none / null / off for no always-on group."""
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or 'none', got {text!r}") from None


def _configs(args: argparse.Namespace) -> tuple[GraphConfig, SpectralConfig]:
    thr: Any = args.edge_threshold
    if thr != "auto":
        try:
            thr = float(thr)
        except ValueError:
            raise InputError(f"--edge-threshold must be 'auto' or a number, got {thr!r}") from None
        # A correlation threshold of 1 or more keeps no edge (every column a singleton); a
        # negative one would let anti-correlated pairs count as evidence of a mechanism.
        if not 0.0 <= thr < 1.0:
            raise InputError(f"--edge-threshold must be 'auto' or a correlation in [0, 1), got "
                             f"{args.edge_threshold}")
    if not 0.0 <= args.tau < 1.0:
        raise InputError(f"--tau must be in [0, 1), got {args.tau}")
    try:
        g = GraphConfig(k=args.k, edge_threshold=thr, device=args.device)
        s = SpectralConfig(k_max=args.k_max, mode=args.mode, seed=args.seed,
                           always_on_fraction=args.always_on, device=args.device,
                           recursive_split=not args.no_recursive_split)
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0])
        flag = _FLAGS.get(field, "--" + field.replace("_", "-"))
        raise InputError(f"{flag}: {e['msg']}") from None
    if args.overrides:
        g, s = _apply_sets(g, s, args.overrides)
    return g, s


def _apply_sets(g: GraphConfig, s: SpectralConfig, overrides: list[str]
                ) -> tuple[GraphConfig, SpectralConfig]:
    """The graph and spectral configs with `--set section.field=VALUE` applied, validated like
    the pipeline's YAML (errors name the field)."""
    from scalespd.config import ConfigError, apply_overrides  # noqa: PLC0415

    for item in overrides:
        section = item.partition("=")[0].split(".")[0]
        if section not in ("graph", "spectral"):
            raise InputError(f"--set {item!r}: only graph.* and spectral.* fields apply to "
                             "scalespd.cluster (see docs/config.md)")
    try:
        data = apply_overrides({"graph": g.model_dump(mode="json"),
                                "spectral": s.model_dump(mode="json")}, overrides)
    except ConfigError as err:
        raise InputError(str(err)) from None
    out: list[Any] = []
    for section, model in (("graph", GraphConfig), ("spectral", SpectralConfig)):
        try:
            out.append(model.model_validate(data[section]))
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            raise InputError(f"--set {section}.{where}: {msg}") from None
    return out[0], out[1]


def run_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """The whole command; returns the summary. Raises InputError (a UserError) on bad input
    and StorageError when --out cannot be created; on any failure or interrupt the temporary
    directory is removed and --out is left as it was."""
    from scalespd.backend import resolve_device  # noqa: PLC0415
    from scalespd.graph import build_graph  # noqa: PLC0415
    from scalespd.spectral.clustering import (  # noqa: PLC0415
        cluster_alive,
        cluster_summary,
        clusters_table,
    )
    from scalespd.spectral.stage import write_outputs  # noqa: PLC0415

    t0 = time.perf_counter()
    gcfg, scfg = _configs(args)
    device = resolve_device(args.device, field="--device")  # "cuda" without a GPU: an error
    profiles = storage.as_path(args.profiles)
    components = None if args.components is None else storage.as_path(args.components)
    X, partial = open_matrix(profiles, args.allow_partial)
    M, N = (int(s) for s in X.shape)
    meta = read_metadata(components, N)
    out = storage.as_path(args.out)
    inputs = [("PROFILES", profiles)]
    if components is not None:
        inputs.append(("--components", components))
    tmp = prepare_out(out, args.overwrite, inputs)
    try:
        timings: dict[str, float] = {}
        stats = column_stats(X, args.tau, storage.url(profiles))
        table = pd.concat([meta, stats], axis=1)
        alive = np.flatnonzero(table["alive"].to_numpy())
        timings["alive_filter_s"] = time.perf_counter() - t0
        if alive.size == 0:
            raise InputError(f"no column of PROFILES {storage.url(profiles)} exceeds --tau "
                             f"{args.tau} (largest value {float(stats['max'].max()):.4g}); "
                             "lower --tau")
        log.info("%d of %d columns alive (max > %g), M = %d%s", alive.size, N, args.tau, M,
                 "" if partial is None else f" (finished blocks only: {partial['finished_blocks']}"
                 f" of {partial['n_blocks']}, {M} of {partial['rows_total']} rows)")

        use_ray = choose_graph(args.executor, alive.size, gcfg.tile_cols,
                               data=profiles) == "ray"
        if use_ray:
            from scalespd.raytools import ensure_ray  # noqa: PLC0415

            ensure_ray()

        t1 = time.perf_counter()
        # Ray tasks open PROFILES themselves and read only their blocks; an input they could
        # not open by path would be converted in the temporary output directory (removed).
        graph = build_graph(X, gcfg, columns=alive, device=device, use_ray=use_ray,
                            scratch_dir=tmp)
        graph.save(tmp / "graph")
        timings["graph_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        frac = table["frac_active"].to_numpy()[alive]
        result = cluster_alive(graph, scfg, frac_active=frac, profiles=X,
                               executor=args.executor, device=device, progress=args.verbose)
        clusters = clusters_table(table, graph.columns, graph.labels, result.labels)
        timings["spectral_s"] = time.perf_counter() - t2

        csum = cluster_summary(clusters)
        with storage.atomic_writer(tmp / "components.csv", "w") as f:
            table.to_csv(f, index=False)
        write_outputs(tmp, clusters, result, {"k_max": scfg.k_max, "seed": scfg.seed,
                                              "device": device})
        timings["total_s"] = time.perf_counter() - t0
        # Peak resident memory next to the wall time: this process's over its life, and the
        # largest a Ray worker reported from the graph tasks (a separate process; None
        # without Ray). MiB; file pages mapped at the time count as resident.
        timings["peak_rss_mb"] = peak_rss_mb()
        worker_peak = graph.summary.get("ray_worker_peak_rss_mb")
        summary = {
            "n_components": N,
            "n_rows": M,
            "n_alive": int(alive.size),
            "n_zero_var": int(graph.zero_var.sum()),
            "n_edges": int(graph.graph.nnz // 2),
            "n_connected_components": int(graph.labels.max()) + 1 if graph.labels.size else 0,
            "n_isolated": int((np.bincount(graph.labels) == 1).sum()),
            **csum,
            "n_always_on": result.info["n_always_on"],
            "edge_threshold": float(graph.threshold),
            # How the correlations were computed: "dense" tiles or "sparse" co-activations.
            "correlation": graph.summary["correlation"]["path"],
            "params": {"tau": args.tau, "k": gcfg.k, "edge_threshold": gcfg.edge_threshold,
                       "k_max": scfg.k_max, "mode": scfg.mode, "seed": scfg.seed,
                       "always_on_fraction": scfg.always_on_fraction,
                       "recursive_split": scfg.recursive_split, "device": device,
                       "executor": {"graph": "ray" if use_ray else "local",
                                    "spectral": result.info["executor"]}},
            "inputs": {"profiles": storage.url(profiles), "shape": [M, N],
                       "dtype": str(X.dtype),
                       "components": None if components is None else storage.url(components)},
            # None, or which row blocks of an unfinished harvest were used (--allow-partial).
            "partial": partial,
            "timings": {**{k: round(v, 4) for k, v in timings.items()},
                        "ray_worker_peak_rss_mb": worker_peak},
        }
        storage.write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=1))
        write_manifest(tmp, summary)
        publish(tmp, out, args.overwrite)
        return summary
    except BaseException:
        discard(tmp, out)
        raise


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # `kill`, `ray job stop` and schedulers send SIGTERM: clean up as for Ctrl-C.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The CLI. Exit status 0; 2 (EXIT_USER_ERROR) with one `error:` line for a UserError or a
    storage problem (disk full, read-only, permissions); 130 on Ctrl-C / SIGTERM. Anything else
    is an internal bug and propagates with its traceback."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        summary = run_cluster(args)
    except KeyboardInterrupt:
        # run_cluster removed its temporary directory; outputs only ever appear complete.
        note = INTERRUPTED if storage.has_rename(args.out) else INTERRUPTED_IN_PLACE
        print(f"\n{note.format(out=args.out)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as err:
        if args.verbose:
            log.exception("failed")
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        user = storage_error(err)
        if user is None:
            raise  # an internal bug: keep the traceback
        if args.verbose:
            log.exception("failed")
        print(f"error: {user}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    sizes = summary["cluster_sizes"]
    print(f"{summary['n_alive']} of {summary['n_components']} columns alive, "
          f"{summary['n_edges']} edges, {summary['n_connected_components']} connected components,"
          f" {summary['n_clusters']} clusters ({summary['n_singletons']} singletons; largest "
          f"{sizes[:5]}) in {summary['timings']['total_s']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
