"""Decomposition metrics on hand-made decompositions and CI matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from toys import preset

from scalespd.config import DecomposeConfig
from scalespd.targets import build_target, module_info, one_hot_inputs
from scalespd.train.components import ComponentModel, match_modules
from scalespd.train.metrics import (
    decomposition_metrics,
    dense_ci_error,
    greedy_permutation,
    identity_ci_error,
    mmcs_ml2r,
    one_per_feature,
    save_ci_heatmap,
)


def _exact_feature_decomposition(W: torch.Tensor, C: int, perm: list[int], scale: float = 1.0):
    """V, U whose first n subcomponents are the per-input-feature pieces W[:, j] e_j^T
    (in the order `perm`, scaled by `scale`), the rest zero-ish noise."""
    d_out, n = W.shape
    V = torch.zeros(n, C)
    U = torch.full((C, d_out), 1e-4)
    for c, j in enumerate(perm):
        V[j, c] = -2.0 if c % 2 else 0.5  # the sign and split of the scale must not matter
        U[c] = W[:, j] * scale / V[j, c]
    return V, U


def test_mmcs_ml2r_of_exact_per_feature_decomposition_is_one():
    torch.manual_seed(0)
    W = torch.randn(2, 5)  # TMS encoder layout (n_hidden, n_features)
    V, U = _exact_feature_decomposition(W, C=20, perm=[3, 0, 4, 1, 2])
    mm, ml = mmcs_ml2r(W, V, U, "in")
    assert mm == pytest.approx(1.0, abs=1e-6) and ml == pytest.approx(1.0, abs=1e-6)
    V, U = _exact_feature_decomposition(W, C=20, perm=[3, 0, 4, 1, 2], scale=0.8)
    assert mmcs_ml2r(W, V, U, "in")[1] == pytest.approx(0.8, abs=1e-6)


def test_mmcs_ml2r_decoder_axis_uses_rows():
    torch.manual_seed(1)
    W = torch.randn(2, 5)
    V, U = _exact_feature_decomposition(W, C=8, perm=[0, 1, 2, 3, 4])
    # The transposed matrix with transposed subcomponents (V' = U^T, U' = V^T) is exact by rows.
    mm, ml = mmcs_ml2r(W.T, U.T, V.T, "out")
    assert mm == pytest.approx(1.0, abs=1e-6) and ml == pytest.approx(1.0, abs=1e-6)


def test_negligible_dead_pieces_do_not_win_the_max():
    """A dead subcomponent whose tiny piece happens to point exactly along W_j must not be the
    argmax (it would make that feature's L2 ratio ~0)."""
    torch.manual_seed(2)
    W = torch.randn(2, 5)
    V, U = _exact_feature_decomposition(W, C=20, perm=[0, 1, 2, 3, 4])
    with torch.no_grad():
        # Live piece for feature 0 slightly off-direction, dead piece (norm 1e-3) exactly on it.
        U[0] = U[0] + 0.01 * torch.tensor([1.0, -1.0])
        V[0, 7] = 1.0
        U[7] = 1e-3 * W[:, 0] / W[:, 0].norm()
    mm, ml = mmcs_ml2r(W, V, U, "in")
    assert ml == pytest.approx(1.0, abs=0.02)
    assert mm > 0.999
    # Without the norm floor the dead piece wins and the ratio collapses for that feature.
    assert mmcs_ml2r(W, V, U, "in", min_norm_frac=0.0)[1] < 0.85


def test_mmcs_penalises_mixed_subcomponents():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # One subcomponent holding both columns' directions (rank one, so it cannot be exact).
    V = torch.tensor([[1.0], [1.0]])
    U = torch.tensor([[1.0, 1.0]])
    mm, ml = mmcs_ml2r(W, V, U, "in")
    assert mm == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert ml == pytest.approx(np.sqrt(2), abs=1e-6)


def test_identity_ci_error_counts():
    perfect = np.zeros((3, 6))
    perfect[[0, 1, 2], [4, 0, 2]] = 1.0
    assert identity_ci_error(perfect, 0.1) == 0
    assert one_per_feature(perfect, 0.1) == 3
    off = perfect.copy()
    off[0, 1] = 0.2  # one off-diagonal entry above tau
    assert identity_ci_error(off, 0.1) == 1
    weak = perfect.copy()
    weak[1, 0] = 0.85  # a matched entry below 1 - tau
    assert identity_ci_error(weak, 0.1) == 1
    merged = np.zeros((3, 6))
    merged[[0, 1, 2], [0, 0, 1]] = 1.0  # two features share one subcomponent
    assert one_per_feature(merged, 0.1) == 1


def test_dense_ci_error_counts():
    ci = np.zeros((3, 5))
    ci[:, 1] = 1.0
    ci[:, 3] = 0.95
    assert dense_ci_error(ci, k=2, tau=0.1) == 0
    # k=3: the third-heaviest column has no entry >= 0.9.
    assert dense_ci_error(ci, k=3, tau=0.1) == 1
    ci[0, 0] = 0.5  # a third column above tau while only 2 are expected
    assert dense_ci_error(ci, k=2, tau=0.1) == 1


def test_greedy_permutation_puts_each_feature_on_the_diagonal():
    ci = np.array([[0.1, 0.9, 0.0, 0.3], [0.8, 0.95, 0.0, 0.0], [0.0, 0.0, 0.2, 0.7]])
    order = greedy_permutation(ci)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert order[:3].tolist() == [1, 0, 3]  # row 1 cannot reuse column 1, takes column 0


def test_decomposition_metrics_keys_and_heatmap(tmp_path):
    tc = preset("tms_5-2-id")
    target = build_target(tc)
    cfg = DecomposeConfig(modules=[{"pattern": "*", "C": 7}])
    infos = module_info(tc)
    mc = match_modules([(m.pattern, m.C) for m in cfg.modules], [i.path for i in infos])
    model = ComponentModel(target, mc, infos, cfg, generator=torch.Generator().manual_seed(0))
    from scalespd.targets import ground_truth, make_dataset

    gen = torch.Generator().manual_seed(0)
    x = make_dataset(tc).sample(64, gen)
    out = decomposition_metrics(model, cfg, x, one_hot_inputs(tc), ground_truth(tc), p=1.0,
                                generator=gen)
    for m in ("linear1", "hidden_layers.0", "linear2"):
        for k in ("l0", "alive_data", "alive_onehot", "l0_onehot", "one_per_feature",
                  "ci_error"):
            assert f"{k}/{m}" in out
        assert 0 <= out[f"alive_onehot/{m}"] <= 7
    assert {k for k in out if k.startswith("mmcs/")} == {"mmcs/linear1", "mmcs/linear2"}
    for k in ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise",
              "ci_masked_recon", "unmasked_recon", "importance_minimality"):
        assert np.isfinite(out[f"loss/{k}"])
    assert out["alive_onehot/total"] == sum(out[f"alive_onehot/{m}"] for m in model.module_paths)

    path = tmp_path / "sub" / "heat.png"
    save_ci_heatmap(model, one_hot_inputs(tc), path, title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
