"""Profiles stage: the (M, N) causal-importance matrix in chunked zarr plus per-component stats.

Public API (DESIGN §4 "Profiles"): `harvest(model, source, out_dir, cfg)` writes
`ci.zarr`, `inputs.zarr`, `blocks/`, `components.csv`; `open_profiles(profiles_dir)` opens the
finished (M, N) array read-only; `read_components(profiles_dir)` reads the per-component table.
"""

from scalespd.profiles.harvest import (
    CIModel,
    HarvestResult,
    column_names,
    harvest,
    open_profiles,
    read_components,
)
from scalespd.profiles.sources import RandomRowSource, RowSource, ToyRowSource
from scalespd.profiles.stats import ColumnStats
from scalespd.profiles.store import BlockLayout, ProfilesError

__all__ = [
    "BlockLayout",
    "CIModel",
    "ColumnStats",
    "HarvestResult",
    "ProfilesError",
    "RandomRowSource",
    "RowSource",
    "ToyRowSource",
    "column_names",
    "harvest",
    "open_profiles",
    "read_components",
]
