"""Reading a finished profiles directory, without torch: the contract the graph, spectral,
evaluate and report stages and `scalespd.cluster` rely on (DESIGN §4 "Profiles").

    ci.zarr         (M, N) causal importances, columns in the global order: a dense zarr array,
                    or a group of CSR row blocks (`sparse_store`)
    inputs.zarr     what each row's input was (toys: the vector; LMs: token/sequence/position)
    blocks/         the completion record of finished row blocks
    components.csv  one row per column: component, name, layer, module, module_type, stats, alive
    harvest.json    written last: the harvest is finished

The profiles folder may be a local path or an fsspec URL, given as a string, a Path or a UPath
(`scalespd.storage.as_path`); errors name files by `storage.url`.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pandas as pd
import zarr

from scalespd import storage
from scalespd.profiles.sparse_store import SparseProfiles, is_sparse_store
from scalespd.profiles.store import ATTR_KEY, ProfilesError

CI_FILE = "ci.zarr"
INPUTS_FILE = "inputs.zarr"
BLOCKS_DIR = "blocks"
COMPONENTS_FILE = "components.csv"
SUMMARY_FILE = "harvest.json"
# components.csv as the harvest writes it; the first six columns (identity and alive) are what
# every reader needs, the statistics are there for the graph and spectral stages and the report.
COMPONENT_COLUMNS = ["component", "name", "layer", "module", "module_type", "max", "mean", "std",
                     "frac_active", "alive"]
REQUIRED_COMPONENT_COLUMNS = ["component", "name", "layer", "module", "module_type", "alive"]


def open_profiles(profiles_dir: storage.PathLike,
                  allow_incomplete: bool = False) -> zarr.Array | SparseProfiles:
    """The (M, N) CI matrix of a finished harvest (read-only): a zarr array (dense layout) or a
    `SparseProfiles` (the sparse layout; `csr_rows` gives row blocks as scipy CSR, and it
    offers the dense array's reads too)."""
    profiles_dir = storage.as_path(profiles_dir)
    path = profiles_dir / CI_FILE
    if not path.exists():
        raise ProfilesError(f"{storage.url(path)} does not exist (run the profiles stage "
                            "first)")
    if not allow_incomplete and not (profiles_dir / SUMMARY_FILE).exists():
        raise ProfilesError(f"{storage.url(profiles_dir)} holds an unfinished harvest "
                            f"({SUMMARY_FILE} is missing); re-run the profiles stage to "
                            "complete it")
    arr: zarr.Array | SparseProfiles
    if is_sparse_store(path):
        try:
            arr = SparseProfiles(path)
        except ValueError as err:
            raise ProfilesError(str(err)) from None
        return arr
    arr = zarr.open_array(store=storage.zarr_store(path, read_only=True), mode="r")
    if ATTR_KEY not in arr.attrs:
        raise ProfilesError(f"{storage.url(path)} is not a scalespd profiles array (no "
                            f"{ATTR_KEY} attribute)")
    return arr


def open_ci(path: storage.PathLike) -> zarr.Array | SparseProfiles:
    """The ci.zarr at `path` as stored (dense array or sparse store), read-only, without the
    completeness checks of `open_profiles`."""
    if is_sparse_store(path):
        return SparseProfiles(path)
    return zarr.open_array(store=storage.zarr_store(path, read_only=True), mode="r")


def as_bool(col: pd.Series) -> np.ndarray:
    """A CSV column of booleans (True/False, true/false or 1/0) as a bool array."""
    if col.dtype == bool:
        return col.to_numpy()
    return col.astype(str).str.lower().isin(["true", "1"]).to_numpy()


def read_components(profiles_dir: storage.PathLike) -> pd.DataFrame:
    """The per-component table (one row per column of ci.zarr), indexed by the global column id
    `component` (kept as a column too), in column order. Every id 0..N-1 appears once."""
    p = storage.as_path(storage.as_path(profiles_dir) / COMPONENTS_FILE)
    path = storage.url(p)  # for messages
    if not p.is_file():
        raise ProfilesError(f"{path} does not exist (run the profiles stage first)")
    try:
        with p.open("rb") as f:
            df = pd.read_csv(f)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ProfilesError(f"{path} is not a readable CSV ({err}); re-run the profiles "
                            "stage") from None
    missing = [c for c in REQUIRED_COMPONENT_COLUMNS if c not in df.columns]
    if missing:
        raise ProfilesError(f"{path} lacks columns {missing}; expected {COMPONENT_COLUMNS}")
    df["alive"] = as_bool(df["alive"])
    ids = df["component"].to_numpy()
    if not np.array_equal(np.sort(ids), np.arange(len(df))):
        raise ProfilesError(f"{path}: 'component' must hold each id 0..{len(df) - 1} exactly "
                            "once")
    return df.set_index("component", drop=False).sort_index()


def column_names(arr: zarr.Array | SparseProfiles) -> list[str]:
    """`<module>:<c>` for every column of a profiles array, from its attributes."""
    # The attribute the harvest writes (scalespd.profiles.harvest): a dict with "modules".
    meta = cast("dict[str, Any]", arr.attrs[ATTR_KEY])
    modules: list[dict[str, Any]] = meta["modules"]
    return [f"{m['module']}:{c}" for m in modules for c in range(m["C"])]
