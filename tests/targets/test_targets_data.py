"""Sparse-feature data, the structured evaluation set, one-hot inputs, labels, LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from toys import preset

from scalespd.config import ResidMLPTargetConfig, ScheduleConfig, TMSTargetConfig
from scalespd.schedules import scheduled_lr
from scalespd.targets import (
    make_dataset,
    one_hot_inputs,
    resid_mlp_labels,
    structured_eval_inputs,
)

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("name", "p", "lo", "hi"),
                         [("tms_40-10", 0.05, 0.0, 1.0), ("resid_mlp1", 0.01, -1.0, 1.0)])
def test_sparse_data_statistics(name: str, p: float, lo: float, hi: float) -> None:
    cfg = preset(name)
    x = make_dataset(cfg).sample(20_000, gen(0))
    assert x.shape == (20_000, cfg.n_features) and x.dtype == torch.float32
    active = x != 0  # a U(lo, hi) draw is exactly 0 with probability 0
    n = active.numel()
    freq = active.float().mean().item()
    # 5 binomial standard deviations over all entries.
    assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Every feature is active at about the same rate (no feature left out).
    per_feature = active.float().mean(0)
    assert (per_feature - p).abs().max() < 6 * math.sqrt(p * (1 - p) / 20_000)
    vals = x[active]
    assert vals.min() >= lo and vals.max() <= hi
    assert abs(vals.mean().item() - (lo + hi) / 2) < 0.03 * (hi - lo)
    assert abs(vals.var().item() - (hi - lo) ** 2 / 12) < 0.05 * (hi - lo) ** 2 / 12
    # Features are independent: all-zero rows occur at the rate (1-p)^F.
    zero_rows = (~active.any(1)).float().mean().item()
    assert abs(zero_rows - (1 - p) ** cfg.n_features) < 0.02


def test_sampling_is_deterministic_per_generator() -> None:
    data = make_dataset(preset("tms_5-2"))
    a = data.sample(256, gen(7))
    assert torch.equal(a, data.sample(256, gen(7)))
    assert not torch.equal(a, data.sample(256, gen(8)))
    g = gen(7)
    first, second = data.sample(256, g), data.sample(256, g)
    assert torch.equal(first, a) and not torch.equal(first, second)
    torch.manual_seed(0)
    b = data.sample(256, gen(7))
    torch.manual_seed(1)
    assert torch.equal(b, data.sample(256, gen(7)))  # the global RNG plays no part
    with pytest.raises(ValueError, match="batch_size"):
        data.sample(0, gen(0))


def test_labels() -> None:
    x = torch.tensor([[-0.5, 0.0, 0.25, 1.0]])
    torch.testing.assert_close(resid_mlp_labels(x), torch.tensor([[-0.5, 0.0, 0.5, 2.0]]))
    resid = make_dataset(ResidMLPTargetConfig(n_features=4))
    torch.testing.assert_close(resid.labels(x), resid_mlp_labels(x))
    tms = make_dataset(TMSTargetConfig(n_features=4))
    xt = tms.sample(64, gen(0))
    torch.testing.assert_close(tms.labels(xt), xt)


@pytest.mark.parametrize("n_features", [5, 40])
def test_structured_eval_block_layout(n_features: int) -> None:
    cfg = TMSTargetConfig(n_features=n_features, n_hidden=2)
    s = 50
    x = structured_eval_inputs(cfg, s, gen(0))
    assert x.shape == (n_features * s, n_features)
    for k in range(n_features):
        block = x[k * s:(k + 1) * s]
        own = block[:, k]
        assert own.min() >= 0.8 and own.max() <= 1.0
        others = torch.cat([block[:, :k], block[:, k + 1:]], dim=1)
        assert others.min() >= 0.0 and others.max() <= 0.1
        assert (others > 0).all()  # dense, not sparse
        assert torch.equal(block.argmax(1), torch.full((s,), k))
    # Values are spread over their ranges, not constant.
    assert x.max() > 0.99 and x[:, 0][s:].mean().item() == pytest.approx(0.05, abs=0.01)
    assert torch.equal(x, structured_eval_inputs(cfg, s, gen(0)))
    assert not torch.equal(x, structured_eval_inputs(cfg, s, gen(1)))
    with pytest.raises(ValueError, match="samples_per_feature"):
        structured_eval_inputs(cfg, 0, gen(0))


def test_one_hot_inputs() -> None:
    x = one_hot_inputs(preset("resid_mlp3"))
    assert x.shape == (102, 102)
    torch.testing.assert_close(x, 0.75 * torch.eye(102))
    torch.testing.assert_close(one_hot_inputs(preset("tms_5-2"), value=1.0), torch.eye(5))


def test_scheduled_lr() -> None:
    const = ScheduleConfig(lr=0.1)
    assert [scheduled_lr(s, 10, const) for s in (0, 5, 9)] == [0.1, 0.1, 0.1]

    cos = ScheduleConfig(lr=1.0, fn="cosine", final_frac=0.0)
    assert scheduled_lr(0, 101, cos) == 1.0
    assert scheduled_lr(50, 101, cos) == pytest.approx(0.5)
    assert scheduled_lr(100, 101, cos) == pytest.approx(0.0, abs=1e-12)
    lrs = [scheduled_lr(s, 101, cos) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))

    lin = ScheduleConfig(lr=2.0, fn="linear", final_frac=0.25)
    assert scheduled_lr(0, 11, lin) == 2.0
    assert scheduled_lr(5, 11, lin) == pytest.approx(2.0 * (0.25 + 0.75 * 0.5))
    assert scheduled_lr(10, 11, lin) == pytest.approx(0.5)

    warm = ScheduleConfig(lr=1.0, fn="cosine", warmup_pct=0.1, final_frac=0.0)
    # 100 steps: 10 warm-up steps 0, 0.1, ..., 0.9, then cosine from 1 over steps 10..99.
    assert [scheduled_lr(s, 100, warm) for s in (0, 5)] == [0.0, 0.5]
    assert scheduled_lr(10, 100, warm) == 1.0
    assert scheduled_lr(99, 100, warm) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(100, 100, warm) == pytest.approx(0.0, abs=1e-12)  # log-only extra step
    assert scheduled_lr(0, 1, cos) == 1.0  # a single step has nothing to decay over
    with pytest.raises(ValueError, match="steps"):
        scheduled_lr(0, 0, const)
