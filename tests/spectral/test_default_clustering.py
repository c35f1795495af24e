"""The default graph + spectral procedure on the regression corpus of real SPD profiles and on
planted profiles with hubs, always-on groups, large mechanisms and power-law rates (issue 13).

Every check uses GraphConfig() and SpectralConfig() exactly as shipped: no graph or spectral
field is overridden.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from corpus import CorpusEntry, corpus_names, load
from planted_profiles import PLANTED_SETS, hub_profiles
from sklearn.metrics import adjusted_rand_score

from scalespd.config import GraphConfig, SpectralConfig
from scalespd.graph import build_graph
from scalespd.report.groundtruth import FeatureAssignment, score_clustering
from scalespd.spectral.clustering import cluster_alive


def cluster_default(X: np.ndarray, frac_active: np.ndarray,
                    seeds: tuple[int, ...] = (0,)) -> list[np.ndarray]:
    """(n,) cluster ids of the columns of X (M, n) with the shipped defaults, one per seed (the
    graph does not depend on the seed, so it is built once)."""
    graph = build_graph(X, GraphConfig())
    return [cluster_alive(graph, SpectralConfig(seed=s), frac_active=frac_active,
                          executor="local").labels for s in seeds]


def score(entry: CorpusEntry, clusters: np.ndarray) -> dict:
    n = entry.labels.size
    assignment = FeatureAssignment(entry.labels, np.zeros(n), np.zeros(n, dtype=np.int64), {},
                                   entry.n_features)
    return score_clustering(assignment, clusters, entry.layers, entry.feature_layers,
                            entry.names)


# What each toy must give with the defaults: least mechanisms recovered, purity, and how the
# dense subcomponents (TMS identity, ResidMLP mlp_out) must end up: "one" = exactly one cluster
# holding all of them and nothing else, a float = at least that share in one cluster. These are
# the targets.
MUST = {
    "tms_5-2": dict(recovered=5, purity=1.0, dense=None),
    "tms_40-10": dict(recovered=40, purity=1.0, dense=None),
    "tms_5-2-id": dict(recovered=5, purity=None, dense="one"),
    "tms_40-10-id": dict(recovered=38, purity=None, dense="one"),
    # 100 of 100 here. Without the containment test (spectral.edge_mass_ratio) 91: 5 features
    # each correlate at 0.50-0.65 with an mlp_out subcomponent that carries 4.9-58x their mass,
    # 3 with a barely-alive companion (470-1900x less mass).
    "resid_mlp1": dict(recovered=97, purity=None, dense=0.9),
    "resid_mlp2": dict(recovered=98, purity=None, dense="one"),
    # Not an issue target: a regression guard. The 5k-step CPU SPD leaves only 34 of the 102
    # triplets whole (a member in each of the 3 layers, `mechanisms_recoverable`); the default
    # recovers 27 of them and puts 48 of the 53 dense mlp_out in one cluster of purity 1.
    "resid_mlp3": dict(recovered=25, purity=None, dense=0.85),
}


def test_the_corpus_holds_every_toy() -> None:
    assert set(MUST) <= set(corpus_names()), corpus_names()


def _check(name: str, must: dict) -> None:
    entry = load(name)
    s = score(entry, cluster_default(entry.X, entry.frac_active)[0])
    assert s["mechanisms_recovered"] >= must["recovered"], s["mechanism_status_counts"]
    if must["purity"] is not None:
        assert s["purity"] == pytest.approx(must["purity"])
    dense = s["dense"]
    if must["dense"] == "one":
        assert dense is not None and dense["recovered"], dense
    elif must["dense"] is not None:
        assert dense["n_dense_in_cluster"] >= must["dense"] * dense["n_dense"], dense


@pytest.mark.parametrize("name", sorted(MUST))
def test_default_recovers_the_toy_mechanisms(name: str) -> None:
    _check(name, MUST[name])


@pytest.mark.parametrize("name", corpus_names())
def test_default_is_stable_across_seeds(name: str) -> None:
    entry = load(name)
    runs = cluster_default(entry.X, entry.frac_active, seeds=(0, 1, 2, 3, 4))
    for a, b in itertools.combinations(runs, 2):
        assert adjusted_rand_score(a, b) >= 0.95


# The issue asks ARI >= 0.95 of every planted set. lone+hubs needs the containment test
# (spectral.edge_mass_ratio; 0.81 without it: lone subcomponents firing inside hubs' supports
# correlate with the hubs as strongly as the hubs with each other), many-small the "join" rule
# for always-on groups (0.95 with every always-on pair linked, "join_all": its hubs, active on
# 63-94% of the rows, were tied to the separate always-on group).
@pytest.mark.parametrize("name", sorted(PLANTED_SETS))
def test_default_on_planted_profiles(name: str) -> None:
    spec, seed = PLANTED_SETS[name]
    X, truth = hub_profiles(spec, seed=seed)
    frac = (X > 0.1).mean(axis=0)
    assert adjusted_rand_score(truth, cluster_default(X, frac)[0]) >= 0.95


# The clustering paper's procedure, one documented block away (README "Clustering default").
PAPER_GRAPH = GraphConfig(neighbours="mutual", edge_threshold=0.0)
PAPER_SPECTRAL = SpectralConfig(always_on_fraction=None, assign_labels="kmeans",
                                edge_mass_ratio=None)


def test_the_paper_procedure_fails_where_the_default_does_not() -> None:
    """TMS 40-10 + identity: the identity subcomponents are a hub every pair hangs off; the
    paper's procedure recovers almost no pair there (the issue's motivating failure)."""
    entry = load("tms_40-10-id")
    graph = build_graph(entry.X, PAPER_GRAPH)
    labels = cluster_alive(graph, PAPER_SPECTRAL, frac_active=entry.frac_active,
                           executor="local").labels
    assert score(entry, labels)["mechanisms_recovered"] < 38
