"""Profiles stage: the (M, N) causal-importance matrix in chunked zarr plus per-component stats.

Public API (DESIGN §4 "Profiles"): `harvest.harvest(model, source, out_dir, cfg)` writes
`ci.zarr`, `inputs.zarr`, `blocks/`, `components.csv`; `open_profiles(profiles_dir)` opens the
finished (M, N) array read-only; `read_components(profiles_dir)` reads the per-component table.

Importing this package does not import torch: the readers (`scalespd.profiles.reader`) serve the
graph, spectral and report stages and `scalespd.cluster`. The harvest and its row sources, which
run the model, are imported from `scalespd.profiles.harvest` and `scalespd.profiles.sources`.
"""

from scalespd.profiles.reader import column_names, open_profiles, read_components
from scalespd.profiles.stats import ColumnStats
from scalespd.profiles.store import BlockLayout, ProfilesError

__all__ = [
    "BlockLayout",
    "ColumnStats",
    "ProfilesError",
    "column_names",
    "open_profiles",
    "read_components",
]
