"""PNG plots of the report (matplotlib, Agg backend, no display needed).

Each function draws one figure from plain arrays, writes it to `path` and returns the path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from upath import UPath

from scalespd import storage


def _plt():
    import matplotlib  # noqa: PLC0415  (heavy; only the report stage needs it)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path: storage.PathLike) -> UPath:
    """Write the figure to `path` (all or nothing; its format from the suffix) and close it."""
    path = storage.as_path(path)
    storage.makedirs(path.parent)
    fig.tight_layout()
    with storage.atomic_writer(path) as f:
        fig.savefig(f, dpi=110, format=path.suffix.lstrip(".") or None)
    _plt().close(fig)
    return path


def _boundaries(sorted_clusters: np.ndarray) -> np.ndarray:
    """Positions between runs of equal cluster ids (for block outlines)."""
    return np.flatnonzero(np.diff(sorted_clusters) != 0) + 1


def correlation_heatmap(corr: np.ndarray, clusters: np.ndarray, path: storage.PathLike,
                        title: str = "", labels: list[str] | None = None) -> UPath:
    """corr: (s, s) correlation of sampled columns already ordered by cluster; clusters: (s,);
    labels: (s,) subcomponent names, drawn as ticks when there are few."""
    plt = _plt()
    s = len(clusters)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(np.nan_to_num(corr), cmap="RdBu_r", vmin=-1, vmax=1,
                   interpolation="nearest")
    # Outline clusters only while the lines stay readable.
    bounds = _boundaries(np.asarray(clusters))
    if len(bounds) <= 200:
        for b in bounds:
            ax.axhline(b - 0.5, color="k", lw=0.3)
            ax.axvline(b - 0.5, color="k", lw=0.3)
    fig.colorbar(im, ax=ax, label="Pearson ρ")
    ax.set_title(title or f"Correlation of {s} alive subcomponents, ordered by cluster")
    if labels is not None and s <= 60:
        ax.set_xticks(range(s), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(s), labels, fontsize=6)
    else:
        ax.set_xlabel("subcomponent (by cluster)")
        ax.set_ylabel("subcomponent (by cluster)")
    return _save(fig, path)


def spectra_plot(spectra: list[dict[str, Any]], path: storage.PathLike) -> UPath:
    """spectra: dicts with `component`, `size`, `eigenvalues` (ascending) and `k` (chosen K);
    one panel per connected component, the chosen gap (between λ_K and λ_{K+1}) marked."""
    plt = _plt()
    n = max(len(spectra), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(spectra):]:
        ax.axis("off")
    for ax, spec in zip(axes.ravel(), spectra, strict=False):
        ev = np.asarray(spec["eigenvalues"], dtype=float)
        idx = np.arange(1, len(ev) + 1)
        ax.plot(idx, ev, "o-", ms=4)
        k = spec.get("k")
        if k is not None and 1 <= k < len(ev):
            ax.axvspan(k, k + 1, color="tab:orange", alpha=0.25,
                       label=f"gap λ{k + 1}−λ{k}, K={k}")
            ax.legend(fontsize=7, loc="upper left")
        elif k is not None:
            ax.set_xlabel(f"K={k}")
        depth = f", split depth {spec['depth']}" if spec.get("depth") else ""
        ax.set_title(f"component {spec.get('component', '?')} (n={spec.get('size', '?')}"
                     f"{depth})", fontsize=9)
        ax.set_xlabel("index k")
        ax.set_ylabel("λ_k")
    if not spectra:
        axes[0, 0].text(0.5, 0.5, "no component needed an eigensolver", ha="center")
    return _save(fig, path)


def size_histogram(sizes: list[int], path: storage.PathLike) -> UPath:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(sizes):
        vals, counts = np.unique(np.asarray(sizes, dtype=int), return_counts=True)
        ax.bar(vals, counts, width=0.8 if vals.max() < 60 else max(vals.max() / 80, 1))
        if counts.max() / max(counts.min(), 1) > 50:
            ax.set_yscale("log")
    ax.set_xlabel("cluster size")
    ax.set_ylabel("number of clusters")
    ax.set_title(f"Cluster sizes ({len(sizes)} clusters)")
    return _save(fig, path)


def layer_span_plot(span_counts: dict[str, int], path: storage.PathLike) -> UPath:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    spans = sorted(span_counts, key=int)
    ax.bar([int(s) for s in spans], [span_counts[s] for s in spans])
    ax.set_xlabel("distinct layers in cluster")
    ax.set_ylabel("non-singleton clusters")
    ax.set_xticks([int(s) for s in spans])
    ax.set_title("Layer span of non-singleton clusters")
    return _save(fig, path)


def composition_plot(counts: dict[str, int], path: storage.PathLike, title: str) -> UPath:
    plt = _plt()
    labels = list(counts)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * max(len(labels), 2)))
    ax.barh(range(len(labels)), [counts[k] for k in labels])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("non-singleton clusters")
    ax.set_title(title)
    return _save(fig, path)


def onehot_ci_heatmap(ci: np.ndarray, col_labels: list[str], path: storage.PathLike,
                      boundaries: np.ndarray | None = None) -> UPath:
    """ci: (F, s) CI on one-hot inputs, columns already ordered (by cluster); boundaries:
    column positions where a new cluster starts."""
    plt = _plt()
    F, s = ci.shape
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2 + 0.15 * s), 18),
                                    min(max(3.0, 1.5 + 0.15 * F), 12)))
    im = ax.imshow(ci, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if boundaries is not None and len(boundaries) <= 300:
        for b in boundaries:
            ax.axvline(b - 0.5, color="tab:red", lw=0.4)
    if s <= 60:
        ax.set_xticks(range(s), col_labels, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("alive subcomponents, ordered by cluster (red lines: cluster borders)")
    ax.set_ylabel("one-hot input feature")
    fig.colorbar(im, ax=ax, label="causal importance")
    ax.set_title("Causal importance on one-hot inputs")
    return _save(fig, path)
