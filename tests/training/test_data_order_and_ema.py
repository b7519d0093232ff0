"""The resumable data order and the EMA, against what they must be by definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.training import EMA, BatchOrder, mix_seed


# ----- data order --------------------------------------------------------------------------------
def test_every_epoch_visits_every_item_once():
    order = BatchOrder(n=10, seed=3, batch_size=4)
    stream = [i for step in range(5) for i in order.indices(step, 0, 0)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation each epoch


def test_order_is_a_function_of_seed_and_step_only():
    a, b = BatchOrder(97, 5, 8), BatchOrder(97, 5, 8)
    late = a.indices(40, 0, 0)  # jump straight to step 40 (mid-epoch 3)
    for step in range(41):  # walk b there step by step
        got = b.indices(step, 0, 0)
    assert got == late
    assert BatchOrder(97, 6, 8).indices(40, 0, 0) != late


@pytest.mark.parametrize("accum, procs", [(1, 2), (2, 1), (2, 2)])
def test_micro_batches_partition_the_global_batch(accum, procs):
    whole = BatchOrder(50, 1, 8)
    split = BatchOrder(50, 1, 8, grad_accum=accum, num_processes=procs)
    for step in (0, 3, 7):
        parts = [split.indices(step, m, r) for m in range(accum) for r in range(procs)]
        assert all(len(p) == 8 // (accum * procs) for p in parts)
        assert [i for p in parts for i in p] == whole.indices(step, 0, 0)


def test_indivisible_batch_is_rejected():
    with pytest.raises(DifflabError, match="batch_size=6 must be divisible by .* 4"):
        BatchOrder(10, 0, 6, grad_accum=2, num_processes=2)
    with pytest.raises(DifflabError, match="empty"):
        BatchOrder(0, 0, 4)


def test_mix_seed_separates_its_inputs():
    seeds = {mix_seed(s, step, m) for s in range(3) for step in range(20) for m in range(2)}
    assert len(seeds) == 120 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) == mix_seed(1, 2)


# ----- EMA ----------------------------------------------------------------------------------------
def constant_model(value: float) -> nn.Module:
    m = nn.Linear(3, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_ema_of_a_constant_converges_geometrically():
    """theta_ema after k updates towards a fixed w is w + d^k (theta_0 - w)."""
    model = constant_model(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    for _ in range(7):
        ema.update(model)
    expect = 1.0 + 0.9**7 * (0.0 - 1.0)
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expect))
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_warmup_decays_follow_the_num_updates_rule():
    """decay_n = min(decay, (1 + n) / (10 + n)): reaches 0.9 at n = 80."""
    ema = EMA(constant_model(0.0), decay=0.9, warmup=True)
    decays = []
    for _ in range(150):
        decays.append(ema.current_decay())
        ema.update(constant_model(1.0))
    assert decays[0] == pytest.approx(1 / 10) and decays[5] == pytest.approx(6 / 15)
    assert decays[79] == pytest.approx(80 / 89) and decays[80] == decays[149] == 0.9
    # the first update keeps only 10% of the initial weights
    ema2 = EMA(constant_model(0.0), decay=0.99)
    ema2.update(constant_model(1.0))
    torch.testing.assert_close(next(ema2.model.parameters()), torch.full((2, 3), 0.9))
    assert ema2.state() == {"decay": 0.99, "warmup": True, "num_updates": 1}
