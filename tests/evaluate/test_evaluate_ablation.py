"""The cluster ablation test: a planted mechanism beats random same-shape sets, an irrelevant set
does not, the numbers equal a direct computation (batching, row selection, stacked draws), and
the random sets keep the cluster's size and per-layer mix."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from scalespd.config import DecomposeConfig, ModuleSpec, TMSTargetConfig
from scalespd.evaluate.ablation import (
    ablation_test,
    column_layout,
    draw_random_sets,
    largest_clusters,
)
from scalespd.targets import build_target, module_info, module_paths
from scalespd.train.components import ComponentModel, Mask, match_modules

RECORD_KEYS = {"cluster", "size", "layers", "n_active", "n_inactive", "effect_active",
               "effect_inactive", "specificity", "random_effect_mean", "random_effect_p95",
               "percentile", "beats_95", "n_random_drawn", "random_size"}
TOP_KEYS = {"n_random", "tau", "seed", "n_positions", "baseline_kl", "clusters", "n_tested",
            "n_beats_95"}


class FakeModel:
    """Two modules, "a" (layer 0) and "b" (layer 1), C = 6 each: global columns a0..a5 = 0..5,
    b0..b5 = 6..11. Input x (..., 2): x[..., 0] in {0, 1} switches the planted pair a0, b0
    (CI 1 where on, 0.05 elsewhere, so below tau but not zero); x[..., 1] in [0, 1] drives the
    other columns' CI densely. Logits (..., V) = sum_p m_p W_p, where W's rows have norm 3 for the
    planted pair, 0.01 for a5, b5 (irrelevant) and 0.3 otherwise (`scale`). The target is the
    same with m = CI plus `bias` times a fixed vector (bias 0: a perfect decomposition, so every
    ablation has effect >= 0). With causal=True and x (S, T, 2), position t sees the running
    mean over positions <= t, as a sequence model would."""

    V = 7

    def __init__(self, causal: bool = False, bias: float = 0.0,
                 scale: tuple[float, ...] = (3.0, 0.3, 0.3, 0.3, 0.3, 0.01)) -> None:
        gen = torch.Generator().manual_seed(0)
        self.module_paths = ["a", "b"]
        self.C = {"a": 6, "b": 6}
        self.W = {}
        for p in self.module_paths:
            w = torch.randn(6, self.V, generator=gen)
            self.W[p] = w / w.norm(dim=1, keepdim=True) * torch.tensor(scale)[:, None]
        self.bias = bias * torch.randn(self.V, generator=gen)
        self.causal = causal
        self.n_forwards = 0

    def causal_importances(self, x: Tensor) -> dict[str, Tensor]:
        on = x[..., :1]
        planted = torch.where(on > 0.5, 1.0, 0.05)
        rest = torch.remainder(x[..., 1:2] + torch.arange(1, 6) / 7, 1.0)
        return {"a": torch.cat([planted, rest], -1), "b": torch.cat([planted, 1 - rest], -1)}

    def _mix(self, h: Tensor) -> Tensor:
        if not self.causal:
            return h
        t = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return h.cumsum(1) / t

    def forward_masked(self, x: Tensor, masks: dict[str, Mask]) -> Tensor:
        self.n_forwards += 1
        assert set(masks) == {"a", "b"} and all(m.delta is None for m in masks.values())
        h = sum(masks[p].component @ self.W[p] for p in self.module_paths)
        assert isinstance(h, Tensor) and h.shape[:-1] == x.shape[:-1]
        return self._mix(h)

    def __call__(self, x: Tensor) -> Tensor:
        ci = self.causal_importances(x)
        return self._mix(sum(ci[p] @ self.W[p] for p in self.module_paths) + self.bias)


LAYER = np.repeat([0, 1], 6)
ALIVE = np.ones(12, dtype=bool)
PLANTED = np.array([0, 6])  # a0, b0
WEAK = np.array([5, 11])  # a5, b5


def toy_inputs(n: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    on = (torch.rand(n, generator=gen) < 0.3).float()
    return torch.stack([on, torch.rand(n, generator=gen)], -1)


def run(model, x, clusters, **kw):
    args = dict(column_layer=LAYER, alive=ALIVE, n_random=40, tau=0.1, seed=3, batch_size=64)
    return ablation_test(model, x, clusters, **{**args, **kw})


def kl_per_position(target: Tensor, pred: Tensor) -> Tensor:
    """Written out independently of the module: sum_v p (log p - log q)."""
    logp, logq = F.log_softmax(target, -1), F.log_softmax(pred, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def ablated_masks(ci: dict[str, Tensor], cols: np.ndarray, C: int = 6) -> dict[str, Mask]:
    out = {}
    for m, p in enumerate(ci):
        g = ci[p].clone()
        local = [int(c) - m * C for c in cols if m * C <= c < (m + 1) * C]
        g[..., local] = 0.0
        out[p] = Mask(component=g)
    return out


# ------------------------------------------------------------------------------------------
# Planted mechanism vs irrelevant set
# ------------------------------------------------------------------------------------------


def test_planted_cluster_beats_random_sets_and_weak_set_does_not():
    x = toy_inputs(300)
    res = run(FakeModel(), x, [PLANTED, WEAK], cluster_ids=[7, 9])
    planted, weak = res["clusters"]
    n_on = int(x[:, 0].sum())

    assert planted["cluster"] == 7 and planted["size"] == 2
    assert planted["layers"] == {"0": 1, "1": 1}
    assert planted["n_active"] == n_on and planted["n_inactive"] == 300 - n_on
    assert planted["percentile"] == 100.0 and planted["beats_95"] is True
    assert planted["effect_active"] > 10 * planted["random_effect_p95"]
    assert planted["random_effect_p95"] >= planted["random_effect_mean"] > 0
    # It hurts where it fires far more than where it is below tau (CI 0.05 there).
    assert planted["effect_inactive"] > 0
    assert planted["specificity"] > 10
    assert planted["specificity"] == pytest.approx(
        planted["effect_active"] / planted["effect_inactive"])
    assert planted["n_random_drawn"] == 40 and planted["random_size"] == 2

    # a5/b5 (weight 0.01) are active almost everywhere but matter less than any random set.
    assert weak["n_active"] > 0
    assert weak["percentile"] < 5 and weak["beats_95"] is False
    assert res["n_tested"] == 2 and res["n_beats_95"] == 1
    assert res["n_positions"] == 300 and res["baseline_kl"] == pytest.approx(0.0, abs=1e-6)


def test_schema_and_json_roundtrip():
    res = run(FakeModel(), toy_inputs(50), [PLANTED, np.array([1, 2, 8])])
    assert set(res) == TOP_KEYS
    assert [c["cluster"] for c in res["clusters"]] == [0, 1]
    for rec in res["clusters"]:
        assert set(rec) == RECORD_KEYS
    assert res["clusters"][1]["layers"] == {"0": 2, "1": 1}
    assert json.loads(json.dumps(res)) == res  # plain Python types only (allow_nan aside)


def test_cluster_never_active_has_no_percentile():
    x = toy_inputs(40)
    x[:, 0] = 0.0  # planted pair at CI 0.05 < tau everywhere
    rec = run(FakeModel(), x, [PLANTED])["clusters"][0]
    assert rec["n_active"] == 0 and rec["n_inactive"] == 40
    assert rec["effect_active"] is None and rec["specificity"] is None
    assert rec["percentile"] is None and rec["random_effect_mean"] is None
    assert rec["beats_95"] is False and rec["n_random_drawn"] == 0
    assert rec["effect_inactive"] > 0


def test_reproducible_with_seed():
    x = toy_inputs(80)
    clusters = [np.array([1, 7]), np.array([2, 3, 9])]
    a = run(FakeModel(), x, clusters, seed=11)
    b = run(FakeModel(), x, clusters, seed=11)
    c = run(FakeModel(), x, clusters, seed=12)
    assert a == b
    assert [r["random_effect_mean"] for r in a["clusters"]] != \
        [r["random_effect_mean"] for r in c["clusters"]]
    # A cluster's draws do not depend on the other clusters tested with it.
    alone = run(FakeModel(), x, clusters[1:], seed=11, cluster_ids=[1])
    assert alone["clusters"][0] == a["clusters"][1]


# ------------------------------------------------------------------------------------------
# Exactness: batching, whole-row selection, stacked random draws
# ------------------------------------------------------------------------------------------


def test_numbers_equal_direct_computation_in_a_sequence_model():
    """x (S, T, 2) with a causal model: ablating at t changes t and later positions, so the
    random sets must be forwarded on whole rows. With alive = the cluster plus a1, b1 the random
    set is forced to {a1, b1}, whose effect on the cluster's active positions we compute
    directly, like the cluster's own numbers."""
    model = FakeModel(causal=True, bias=0.3)
    S, T = 7, 5
    x = toy_inputs(S * T, seed=1).reshape(S, T, 2)
    x[:, :, 0] = 0.0
    x[1, 3, 0] = x[4, 0, 0] = x[4, 2, 0] = x[6, 4, 0] = 1.0  # rows 0, 2, 3, 5 never active
    alive = np.zeros(12, dtype=bool)
    alive[[0, 6, 1, 7]] = True

    ci = model.causal_importances(x)
    target = model(x)
    base = kl_per_position(target, model.forward_masked(x, {p: Mask(g) for p, g in ci.items()}))
    eff = kl_per_position(target, model.forward_masked(x, ablated_masks(ci, PLANTED))) - base
    eff_rand = kl_per_position(target, model.forward_masked(
        x, ablated_masks(ci, np.array([1, 7])))) - base
    active = (ci["a"][..., 0] > 0.1) | (ci["b"][..., 0] > 0.1)
    assert int(active.sum()) == 4

    for batch_size in (2, 3, 100):  # uneven batches; 1 or several stacked draws per forward
        model.n_forwards = 0
        res = run(model, x, [PLANTED], alive=alive, n_random=5, batch_size=batch_size)
        rec = res["clusters"][0]
        assert res["n_positions"] == S * T
        assert base.mean().item() > 1e-3
        assert res["baseline_kl"] == pytest.approx(base.mean().item(), rel=1e-5)
        assert rec["n_active"] == 4 and rec["n_inactive"] == S * T - 4
        assert rec["effect_active"] == pytest.approx(eff[active].mean().item(), rel=1e-5)
        assert rec["effect_inactive"] == pytest.approx(eff[~active].mean().item(), rel=1e-5)
        assert rec["random_effect_mean"] == pytest.approx(eff_rand[active].mean().item(),
                                                          rel=1e-5)
        assert rec["random_effect_p95"] == pytest.approx(rec["random_effect_mean"], rel=1e-6)
        assert rec["percentile"] == 100.0 and rec["random_size"] == 2
        n_batches = -(-S // batch_size)
        # per batch: baseline + cluster; random draws only in batches holding active rows
        assert model.n_forwards >= 2 * n_batches
    # Everything stacked: 1 batch, baseline + cluster + one forward for all 5 draws.
    assert model.n_forwards == 3


def test_matches_real_component_model():
    """A real (untrained) TMS ComponentModel in float64: baseline KL, effects and active counts
    equal forward_masked computed by hand (an untrained model's effects may have either sign)."""
    target = TMSTargetConfig(n_features=5, n_hidden=2, n_identity_layers=1)
    dec = DecomposeConfig(modules=[ModuleSpec(pattern="linear*", C=4),
                                   ModuleSpec(pattern="hidden_layers.*", C=3)])
    specs = [(m.pattern, m.C) for m in dec.modules]
    model = ComponentModel(build_target(target), match_modules(specs, module_paths(target)),
                           module_info(target), dec, generator=torch.Generator().manual_seed(0))
    model.double().eval()
    layer_of = {mi.path: mi.layer for mi in model.module_info}
    column_layer = np.concatenate([[layer_of[p]] * model.C[p] for p in model.module_paths])
    # inputs scaled up so that the untrained model's logits are not nearly flat
    x = 5 * torch.rand(64, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cluster = np.array([1, 5, 9])  # one column in each of linear1, hidden_layers.0, linear2
    tau = 0.1

    res = ablation_test(model, x, [cluster], column_layer=column_layer,
                        alive=np.ones(column_layer.size, dtype=bool), n_random=20, tau=tau,
                        seed=0, batch_size=16)
    with torch.no_grad():
        ci = model.causal_importances(x)
        out = model(x)
        base = kl_per_position(out, model.forward_masked(x, {p: Mask(g) for p, g in ci.items()}))
        masks = {}
        offset = 0
        for p in model.module_paths:
            g = ci[p].clone()
            local = [int(c) - offset for c in cluster if offset <= c < offset + model.C[p]]
            g[..., local] = 0.0
            masks[p] = Mask(g)
            offset += model.C[p]
        eff = kl_per_position(out, model.forward_masked(x, masks)) - base
    g_all = torch.cat([ci[p] for p in model.module_paths], -1)
    active = (g_all[:, cluster] > tau).any(-1)
    assert 0 < int(active.sum()) < 64  # both groups present
    rec = res["clusters"][0]
    assert res["baseline_kl"] == pytest.approx(base.mean().item(), rel=1e-9)
    assert rec["n_active"] == int(active.sum())
    assert rec["effect_active"] == pytest.approx(eff[active].mean().item(), rel=1e-9)
    assert rec["effect_inactive"] == pytest.approx(eff[~active].mean().item(), rel=1e-9)
    assert abs(rec["effect_active"]) > 1e-4
    assert 0.0 <= rec["percentile"] <= 100.0 and rec["n_random_drawn"] == 20
    assert rec["layers"] == {str(layer_of[p]): 1 for p in model.module_paths}


# ------------------------------------------------------------------------------------------
# Random sets
# ------------------------------------------------------------------------------------------


def test_random_sets_keep_size_and_layer_mix():
    column_layer = np.repeat([0, 1, 2], 20)
    alive = np.ones(60, dtype=bool)
    alive[[3, 4, 25, 41, 42]] = False
    members = np.array([0, 1, 2, 21, 40])
    sets, short = draw_random_sets(np.random.default_rng(0), members, column_layer, alive, 200)
    assert sets.shape == (200, 5) and short == {}
    for s in sets:
        assert np.unique(s).size == 5
        assert not np.isin(s, members).any() and alive[s].all()
        assert np.array_equal(np.bincount(column_layer[s], minlength=3), [3, 1, 1])
    # draws vary, and every eligible column of layer 0 shows up
    assert len({tuple(s) for s in sets}) > 150
    assert set(sets[:, :3].ravel()) == set(np.flatnonzero(alive[:20])) - set(members)
    again, _ = draw_random_sets(np.random.default_rng(0), members, column_layer, alive, 200)
    assert np.array_equal(sets, again)


def test_short_layer_is_recorded_and_drawn_from_what_there_is():
    alive = np.zeros(12, dtype=bool)
    alive[[0, 1, 2, 6, 7]] = True  # layer 1 has one alive non-member for two members
    members = np.array([0, 6, 8])
    sets, short = draw_random_sets(np.random.default_rng(1), members, LAYER, alive, 10)
    assert short == {1: 1}
    assert sets.shape == (10, 2)
    assert set(sets[:, 1]) == {7} and set(sets[:, 0]) <= {1, 2}

    rec = run(FakeModel(), toy_inputs(60), [members], alive=alive, n_random=10)["clusters"][0]
    assert rec["size"] == 3 and rec["random_size"] == 2 and rec["n_random_drawn"] == 10


def test_ties_count_half():
    """Columns with zero weight change nothing: the cluster {a5} and its only possible random
    set {a4} both have effect exactly 0, a tie in every draw."""
    model = FakeModel(scale=(3.0, 0.3, 0.3, 0.3, 0.0, 0.0))
    alive = np.zeros(12, dtype=bool)
    alive[[4, 5]] = True
    rec = run(model, toy_inputs(60), [np.array([5])], alive=alive)["clusters"][0]
    assert rec["n_active"] > 0 and rec["effect_active"] == 0.0
    assert rec["random_effect_mean"] == 0.0
    assert rec["percentile"] == 50.0 and rec["beats_95"] is False


def test_no_candidates_means_no_comparison():
    alive = np.zeros(12, dtype=bool)
    alive[PLANTED] = True
    rec = run(FakeModel(), toy_inputs(60), [PLANTED], alive=alive)["clusters"][0]
    assert rec["random_size"] == 0 and rec["n_random_drawn"] == 0
    assert rec["percentile"] is None and rec["beats_95"] is False
    assert rec["effect_active"] > 0


@pytest.mark.parametrize("kw, match", [
    (dict(column_layer=LAYER[:5]), "one entry per global column"),
    (dict(clusters=[np.array([0, 0])]), "distinct"),
    (dict(clusters=[np.array([], dtype=np.int64)]), "distinct and non-empty"),
    (dict(clusters=[np.array([3, 12])]), "outside"),
    (dict(cluster_ids=[1, 2]), "one non-negative id"),
])
def test_rejects_bad_input(kw, match):
    clusters = kw.pop("clusters", [PLANTED])
    with pytest.raises(ValueError, match=match):
        run(FakeModel(), toy_inputs(10), clusters, **kw)


# ------------------------------------------------------------------------------------------
# From clusters.csv
# ------------------------------------------------------------------------------------------


def clusters_csv() -> pd.DataFrame:
    cluster = [2, 2, -1, 0, 5, 5, 5, 1, 0, 3, 3, 4]
    return pd.DataFrame({
        "component": np.arange(12)[::-1],  # rows in any order
        "name": [f"m:{i}" for i in range(12)], "layer": LAYER,
        "module": ["a"] * 6 + ["b"] * 6, "alive": [c >= 0 for c in cluster],
        "connected_component": 0, "cluster": cluster,
    })


def test_largest_clusters_skips_singletons_and_unclustered():
    got = largest_clusters(clusters_csv(), n=3)
    # sizes: 5 -> 3, 0/2/3 -> 2 each (ties by id), 1 and 4 singletons, -1 excluded
    assert list(got) == [5, 0, 2]
    assert got[5].tolist() == [5, 6, 7] and got[0].tolist() == [3, 8]
    assert got[2].dtype == np.int64 and got[2].tolist() == [10, 11]
    assert list(largest_clusters(clusters_csv(), n=10)) == [5, 0, 2, 3]


def test_column_layout_indexes_by_component_id():
    layer, alive = column_layout(clusters_csv())
    assert layer.tolist() == LAYER[::-1].tolist()
    assert alive.tolist() == [c >= 0 for c in clusters_csv()["cluster"]][::-1]
    bad = clusters_csv().assign(component=np.arange(1, 13))
    with pytest.raises(ValueError, match="not exactly 0..11"):
        column_layout(bad)
