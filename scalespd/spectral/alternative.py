"""The second clustering of "report both": the same graph clustered with the other always-on
setting, so that the two clusterings differ only in that one option (the TMS 5-2+ID failure
case of the paper's setting next to the always-on grouped repair).

The spectral stage writes it as `spectral/clusters_alternative.csv`; the report only reads it.
"""

from __future__ import annotations

import numpy as np

from scalespd.config import SpectralConfig


def alternative_config(scfg: SpectralConfig) -> SpectralConfig | None:
    """`scfg` with always_on_fraction flipped: None -> alternative_always_on_fraction, set ->
    None (the paper's setting). None when no alternative is configured."""
    if scfg.alternative_always_on_fraction is None:
        return None
    alt = scfg.alternative_always_on_fraction if scfg.always_on_fraction is None else None
    return SpectralConfig.model_validate({**scfg.model_dump(), "always_on_fraction": alt})


def needs_alternative(scfg: SpectralConfig, frac_active: np.ndarray) -> bool:
    """Whether the alternative clustering can differ from the configured one: only when some
    node is always-on under either setting (otherwise no group forms and both are equal).

    frac_active: (n,) fraction of profile rows on which each alive node is active."""
    alt = alternative_config(scfg)
    if alt is None:
        return False
    fractions = [f for f in (scfg.always_on_fraction, alt.always_on_fraction) if f is not None]
    return any(bool((np.asarray(frac_active) > f).any()) for f in fractions)


def describe(scfg: SpectralConfig) -> str:
    """One line naming the always-on setting of a clustering, for the report's tables."""
    if scfg.always_on_fraction is None:
        return "paper setting: no always-on group (always_on_fraction=None)"
    return (f"always-on grouped: active on > {scfg.always_on_fraction:g} of inputs with no "
            f"correlation >= {scfg.always_on_max_corr:g} -> own group ({scfg.always_on_grouping})")
