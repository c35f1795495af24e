"""Cluster statistics on small known inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scalespd.report import stats


@pytest.mark.parametrize(
    ("module_type", "category"),
    [("q_proj", "attention"), ("k_proj", "attention"), ("v_proj", "attention"),
     ("o_proj", "attention"), ("self_attn.o_proj", "attention"), ("attn", "attention"),
     ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"), ("mlp_in", "mlp"),
     ("mlp_out", "mlp"), ("mlp", "mlp"),
     ("encoder", "encoder"), ("decoder", "decoder"), ("identity", "identity")],
)
def test_module_category(module_type, category):
    assert stats.module_category(module_type) == category


def test_composition_labels():
    assert stats.composition_label({"q_proj", "k_proj"}) == "attention-only"
    assert stats.composition_label({"gate_proj", "down_proj"}) == "mlp-only"
    assert stats.composition_label({"q_proj", "up_proj"}) == "mixed"
    assert stats.composition_label({"encoder", "decoder"}) == "decoder+encoder"
    assert stats.composition_label({"encoder", "identity", "decoder"}) == \
        "decoder+encoder+identity"


def _toy():
    # clusters: 0 = {0, 1} (layers 0, 1; q + up -> mixed), 1 = {2, 3, 4} (layer 0, mlp only),
    # 2 = {5} singleton, node 6 unclustered (-1), 3 = {7, 8} spans layers 0 and 3.
    clusters = np.array([0, 0, 1, 1, 1, 2, -1, 3, 3])
    layers = np.array([0, 1, 0, 0, 0, 3, 1, 0, 3])
    types = np.array(["q_proj", "up_proj", "gate_proj", "up_proj", "down_proj", "q_proj",
                      "k_proj", "v_proj", "o_proj"])
    modules = np.array([f"layers.{lay}.{t}" for lay, t in zip(layers, types, strict=True)])
    names = np.array([f"{m}:{i}" for i, m in enumerate(modules)])
    return clusters, layers, types, modules, names


def test_cluster_table_and_stats():
    clusters, layers, types, modules, names = _toy()
    table = stats.cluster_table(clusters, layers, types, modules, names)
    assert [r["cluster"] for r in table] == [1, 0, 3, 2]  # largest first, then by id
    by_id = {r["cluster"]: r for r in table}
    assert by_id[0]["layers"] == [0, 1] and by_id[0]["composition"] == "mixed"
    assert by_id[1]["layer_span"] == 1 and by_id[1]["composition"] == "mlp-only"
    assert by_id[3]["composition"] == "attention-only" and by_id[3]["layer_span"] == 2
    assert by_id[1]["members"] == list(names[[2, 3, 4]])
    assert all(r["cluster"] != -1 for r in table)

    s = stats.cluster_stats(table, set(layers.tolist()))
    assert s["n_clusters"] == 4 and s["cluster_sizes"] == [3, 2, 2, 1]
    assert s["n_singletons"] == 1 and s["n_non_singleton"] == 3
    assert s["layer_span_counts"] == {"1": 1, "2": 2}
    assert s["frac_multi_layer"] == pytest.approx(2 / 3)
    assert s["n_span_all_layers"] == 0  # no cluster covers layers {0, 1, 3}
    assert s["composition_counts"] == {"mixed": 1, "mlp-only": 1, "attention-only": 1}
    assert s["module_type_set_counts"]["down_proj+gate_proj+up_proj"] == 1


def test_span_all_layers():
    table = stats.cluster_table(np.array([0, 0, 0]), np.array([0, 1, 2]),
                                np.array(["mlp_in"] * 3), np.array(["m"] * 3),
                                np.array(["a", "b", "c"]))
    s = stats.cluster_stats(table, {0, 1, 2})
    assert s["n_span_all_layers"] == 1 and s["layer_span_counts"] == {"3": 1}


def test_edge_stats():
    # edges: (0,1) w=.9 within, (1,2) w=.3 between, (2,3) w=.5 within, (3,4) w=.1 with -1 node
    rows, cols, w = [0, 1, 2, 3], [1, 2, 3, 4], [0.9, 0.3, 0.5, 0.1]
    W = sp.coo_matrix((w, (rows, cols)), shape=(5, 5))
    W = (W + W.T).tocsr()
    e = stats.edge_stats(W, np.array([0, 0, 1, 1, -1]))
    assert e["n_edges"] == 4
    assert e["frac_edges_within"] == pytest.approx(0.5)
    assert e["mean_edge_weight_within"] == pytest.approx(0.7)
    assert e["mean_edge_weight_between"] == pytest.approx(0.2)
    empty = stats.edge_stats(sp.csr_matrix((3, 3)), np.zeros(3, dtype=int))
    assert empty["n_edges"] == 0 and empty["frac_edges_within"] is None


def test_pearson_and_correlation_stats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = rng.normal(size=200)
    X = np.stack([a, a + 0.1 * rng.normal(size=200), b, b * 2 + 1, np.ones(200)], axis=1)
    C = stats.pearson(X)
    np.testing.assert_allclose(C[:4, :4], np.corrcoef(X[:, :4].T), atol=1e-12)
    assert np.isnan(C[4]).all() and np.isnan(C[:, 4]).all()  # constant column
    s = stats.correlation_stats(C, np.array([0, 0, 1, 1, 2]))
    assert s["n_pairs_within"] == 2
    assert s["n_pairs_between"] == 4  # the constant column's pairs are NaN and left out
    assert s["mean_corr_within"] == pytest.approx((C[0, 1] + C[2, 3]) / 2)
    assert s["mean_corr_between"] == pytest.approx(np.mean([C[0, 2], C[0, 3], C[1, 2],
                                                            C[1, 3]]))
