"""Ground-truth scoring on hand-made one-hot CI matrices and clusterings."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from scalespd.report import groundtruth as gt

F = 4
TAU = 0.1


def tms_like(extra: list[np.ndarray] | None = None):
    """A TMS+ID-like toy: encoder e_f (layer 0), two dense identity pieces (layer 1), decoder
    d_f (layer 2). Node order: e0..e3, i0, i1, d0..d3, then `extra` columns (layer 1).
    Returns onehot (F, n), layers (n,), names."""
    cols, layers, names = [], [], []
    for f in range(F):
        cols.append(np.eye(F)[f]), layers.append(0), names.append(f"enc:{f}")
    for i in range(2):
        cols.append(np.full(F, 0.9)), layers.append(1), names.append(f"id:{i}")
    for f in range(F):
        cols.append(np.eye(F)[f] * 0.8), layers.append(2), names.append(f"dec:{f}")
    for j, c in enumerate(extra or []):
        cols.append(c), layers.append(1), names.append(f"extra:{j}")
    return np.stack(cols, axis=1), np.array(layers), names


def perfect_clusters(n_extra: int = 0) -> np.ndarray:
    # feature f -> cluster f, identity -> cluster F, extras -> their own clusters
    return np.array([0, 1, 2, 3, F, F, 0, 1, 2, 3] + [F + 1 + j for j in range(n_extra)])


def test_assignment_features_dense_inactive_tie():
    tie = np.array([1.0, 1.0, 0.0, 0.0])
    inactive = np.full(F, 0.05)
    onehot, _, _ = tms_like([tie, inactive])
    a = gt.assign_features(onehot, TAU, dense_fraction=0.5, tie_tol=1e-3)
    assert a.labels[:4].tolist() == [0, 1, 2, 3]
    assert a.labels[4:6].tolist() == [gt.DENSE, gt.DENSE]
    assert a.labels[6:10].tolist() == [0, 1, 2, 3]
    assert a.labels[10] == gt.TIE and a.tied == {10: [0, 1]}
    assert a.labels[11] == gt.INACTIVE
    assert a.n_served[4] == F and a.n_served[11] == 0


def test_near_tie_outside_tolerance_takes_argmax():
    col = np.array([[0.9], [0.85], [0.0], [0.0]])
    a = gt.assign_features(col, TAU, tie_tol=1e-3)
    assert a.labels.tolist() == [0] and a.tied == {}
    a = gt.assign_features(col, TAU, tie_tol=0.1)
    assert a.labels.tolist() == [gt.TIE] and a.tied == {0: [0, 1]}


def test_dense_module_subcomponents_are_dense_whatever_features_they_serve():
    """ResidMLP mlp_out subcomponents each serve an arbitrary subset of the features (SPD Fig. 8
    and 12); as parts of the dense identity projection they are DENSE, not ties or features. A
    dense-module subcomponent that serves no one-hot input stays INACTIVE; other modules keep
    the one-hot rule."""
    # columns: serves features 0+1 | serves feature 2 | serves none | (other module) serves
    # feature 0 | (other module) serves none
    cols = np.array([[1.0, 0.0, 0.05, 0.9, 0.0],
                     [1.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.8, 0.0, 0.0, 0.05],
                     [0.0, 0.0, 0.0, 0.0, 0.0]])  # (F = 4, n = 5)
    dense_module = np.array([True, True, True, False, False])
    a = gt.assign_features(cols, TAU, tie_tol=1e-3, dense_module=dense_module)
    assert a.labels.tolist() == [gt.DENSE, gt.DENSE, gt.INACTIVE, 0, gt.INACTIVE]
    plain = gt.assign_features(cols, TAU, tie_tol=1e-3)
    assert plain.labels.tolist() == [gt.TIE, 2, gt.INACTIVE, 0, gt.INACTIVE]
    with pytest.raises(ValueError, match="dense_module"):
        gt.assign_features(cols, TAU, dense_module=np.ones(3, dtype=bool))


def test_dense_fraction_is_strict():
    half = np.array([[1.0], [1.0], [0.0], [0.0]])  # served by exactly 2 of 4 inputs
    assert gt.assign_features(half, TAU, dense_fraction=0.5, tie_tol=0).labels[0] == gt.TIE
    assert gt.assign_features(half, TAU, dense_fraction=0.4, tie_tol=0).labels[0] == gt.DENSE


def test_perfect_clustering_recovers_everything():
    onehot, layers, names = tms_like()
    a = gt.assign_features(onehot, TAU)
    s = gt.score_clustering(a, perfect_clusters(), layers, {0, 2}, names)
    assert s["mechanisms_total"] == F
    assert s["mechanisms_recovered"] == F
    assert s["purity"] == 1.0
    assert s["ari"] == pytest.approx(1.0)
    assert s["dense"]["recovered"] and s["dense"]["n_clusters_holding_dense"] == 1
    assert s["dense"]["size"] == 2 and s["dense"]["purity"] == 1.0
    assert [f["members"] for f in s["features"]][1] == ["enc:1", "dec:1"]


def test_merged_pair_is_not_recovered():
    onehot, layers, names = tms_like()
    c = perfect_clusters()
    c[[1, 7]] = 0  # feature 1's pair joins feature 0's cluster
    s = gt.score_clustering(gt.assign_features(onehot, TAU), c, layers, {0, 2}, names)
    assert s["mechanisms_recovered"] == F - 2
    status = {f["feature"]: f["status"] for f in s["features"]}
    assert status[0] == status[1] == "merged"
    assert s["purity"] < 1.0
    assert s["ari"] < 1.0


def test_split_pair_is_not_recovered():
    onehot, layers, names = tms_like()
    c = perfect_clusters()
    c[6] = 9  # decoder of feature 0 alone
    s = gt.score_clustering(gt.assign_features(onehot, TAU), c, layers, {0, 2}, names)
    assert s["mechanisms_recovered"] == F - 1
    assert s["features"][0]["status"] == "split"


def test_identity_spread_over_feature_clusters():
    """The TMS 5-2+ID failure: dense pieces land in feature clusters."""
    onehot, layers, names = tms_like()
    c = perfect_clusters()
    c[4], c[5] = 0, 1
    s = gt.score_clustering(gt.assign_features(onehot, TAU), c, layers, {0, 2}, names)
    assert s["dense"]["n_clusters_holding_dense"] == 2
    assert not s["dense"]["recovered"]
    assert s["dense"]["size"] == 3 and s["dense"]["purity"] == pytest.approx(1 / 3)
    assert s["mechanisms_recovered"] == F - 2  # features 0 and 1 are merged with identity


def test_dense_cluster_with_extra_member_is_not_exact():
    onehot, layers, names = tms_like()
    c = perfect_clusters()
    c[9] = F  # decoder of feature 3 joins the identity cluster
    s = gt.score_clustering(gt.assign_features(onehot, TAU), c, layers, {0, 2}, names)
    d = s["dense"]
    assert d["n_clusters_holding_dense"] == 1 and not d["recovered"]
    assert d["size"] == 3 and d["n_dense_in_cluster"] == 2
    assert s["features"][3]["status"] == "split"


def test_incomplete_and_missing_mechanisms():
    onehot, layers, names = tms_like()
    keep = np.array([j for j in range(10) if j != 9])  # decoder of feature 3 is dead
    # and nothing serves feature 2 at all:
    keep = keep[~np.isin(keep, [2, 8])]
    a = gt.assign_features(onehot[:, keep], TAU)
    c = perfect_clusters()[keep]
    names_k = [names[j] for j in keep]
    s = gt.score_clustering(a, c, layers[keep], {0, 2}, names_k)
    status = {f["feature"]: f["status"] for f in s["features"]}
    assert status == {0: "recovered", 1: "recovered", 2: "missing", 3: "incomplete"}
    assert s["mechanisms_recoverable"] == 2  # 2 has no member, 3 no decoder: no clustering helps
    s_free = gt.score_clustering(a, c, layers[keep], None, names_k)
    assert s_free["mechanisms_recovered"] == 3  # no layer-coverage requirement
    assert s_free["mechanisms_recoverable"] == 3


def test_ties_and_inactive_are_their_own_truth_classes():
    tie = np.array([1.0, 1.0, 0.0, 0.0])
    inactive = np.full(F, 0.0)
    onehot, layers, names = tms_like([tie, inactive])
    a = gt.assign_features(onehot, TAU)
    truth = gt.truth_labels(a.labels)
    assert len(set(truth[[10, 11]])) == 2 and not set(truth[[10, 11]]) & set(truth[:10])
    # Clustering the tie and the inactive node together with feature 0 breaks feature 0 only.
    c = perfect_clusters(2)
    c[10] = 0
    s = gt.score_clustering(a, c, layers, {0, 2}, names)
    assert s["n_ties"] == 1 and s["ties"] == {"extra:0": [0, 1]}
    assert s["n_inactive"] == 1
    assert s["features"][0]["status"] == "merged" and s["mechanisms_recovered"] == F - 1
    assert s["ari"] == pytest.approx(adjusted_rand_score(truth, c))


def test_unclustered_nodes_count_as_singletons():
    onehot, layers, names = tms_like()
    c = perfect_clusters()
    c[[0, 6]] = -1  # feature 0 pair left unclustered -> split into two singletons
    s = gt.score_clustering(gt.assign_features(onehot, TAU), c, layers, {0, 2}, names)
    assert s["features"][0]["status"] == "split"
    assert s["mechanisms_recovered"] == F - 1
    assert s["purity"] == 1.0  # unclustered nodes are ignored by purity


def test_bad_input_raises():
    with pytest.raises(ValueError, match="NaN"):
        gt.assign_features(np.array([[np.nan]]), TAU)
    with pytest.raises(ValueError, match=r"\(F, n\)"):
        gt.assign_features(np.zeros(3), TAU)
    onehot, layers, names = tms_like()
    a = gt.assign_features(onehot, TAU)
    with pytest.raises(ValueError, match="shape"):
        gt.score_clustering(a, np.zeros(3, dtype=int), layers, None, names)
