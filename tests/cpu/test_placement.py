"""Placement plans and the shard autoscaler's decisions (pure logic, no cluster)."""

from __future__ import annotations

import itertools

import pytest

from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.serving.autoscale import ShardAutoscaleConfig, ShardAutoscaler


def test_contiguous_covers_every_expert_once():
    plan = PlacementPlan.contiguous((0, 2), num_experts=8, num_shards=3)
    held = [plan.experts_of(s) for s in range(3)]
    for layer in (0, 2):
        assert sorted(e for h in held for e in h[layer]) == list(range(8))
    assert [len(h[0]) for h in held] == [3, 3, 2]


def test_balanced_is_optimal_on_small_cases():
    """LPT against the best assignment found by brute force: within 4/3 (Graham's bound)."""
    load = {0: [40, 10, 10, 9, 8, 7, 3, 1]}
    plan = PlacementPlan.balanced(load, num_shards=3)
    got = max(plan.shard_loads(load))
    best = min(
        max(sum(c for c, s in zip(load[0], assign) if s == k) for k in range(3))
        for assign in itertools.product(range(3), repeat=8)
    )
    assert got <= 4 / 3 * best
    assert sorted(e for s in range(3) for e in plan.experts_of(s)[0]) == list(range(8))


def test_replicating_the_hot_expert_splits_its_load():
    load = {0: [100, 5, 5, 5, 5, 5, 5, 5]}
    plain = PlacementPlan.balanced(load, num_shards=2)
    hot = PlacementPlan.balanced(load, num_shards=2, replicate_top=1)
    assert hot.owner[0][0] == (0, 1)  # expert 0 lives on both shards
    assert max(hot.shard_loads(load)) < max(plain.shard_loads(load))
    assert max(hot.shard_loads(load)) == pytest.approx(70.0)  # 50 + 4 x 5 against 50 + 3 x 5


def test_bad_plans_are_rejected():
    with pytest.raises(ValueError, match="exceeds the model's 8 experts"):
        PlacementPlan.contiguous((0,), 8, 9)
    with pytest.raises(ValueError, match="bad shards"):
        PlacementPlan(2, 2, {0: ((0,), (2,))})


def test_autoscaler_follows_load_with_hysteresis():
    scaler = ShardAutoscaler(
        ShardAutoscaleConfig(
            min_shards=1, max_shards=4, target_pairs_per_shard_s=1000, upscale_delay_s=2, downscale_delay_s=10
        )
    )
    assert scaler.decide(0.0, 2500, 0.01, current=1) is None  # wanted, not yet long enough
    d = scaler.decide(2.5, 2600, 0.01, current=1)
    assert d.num_shards == 3 and "2600 pairs/s" in d.reason
    assert scaler.decide(5.0, 100, 0.01, current=3) is None  # scale down waits 10 s
    assert scaler.decide(14.0, 100, 0.01, current=3) is None
    assert scaler.decide(15.1, 100, 0.01, current=3).num_shards == 1
    assert scaler.decide(20.0, 50_000, 0.01, current=1) is None
    assert scaler.decide(22.0, 50_000, 0.01, current=1).num_shards == 4  # capped at max_shards


def test_autoscaler_step_latency_adds_a_shard():
    scaler = ShardAutoscaler(
        ShardAutoscaleConfig(max_shards=3, target_pairs_per_shard_s=1e9, max_step_s=0.05)
    )
    assert scaler.decide(0.0, 10, 0.2, current=1).num_shards == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dispatch_payload_round_trips_rows_and_ids(dtype):
    import torch

    from specmoe_ray.moe.dispatch import pack_rows, unpack_rows

    dt = getattr(torch, dtype)
    x = torch.randn(7, 24).to(dt)
    ids = torch.tensor([0, 5, 127, 2**40, 3, 3, 1])
    x2, ids2 = unpack_rows(pack_rows(x, ids), 24, dt)
    assert torch.equal(x2, x) and torch.equal(ids2, ids)
    empty = pack_rows(x[:0], ids[:0])
    assert empty.shape == (0, 24 * x.element_size() + 8)


def test_experts_skip_padding_and_experts_held_elsewhere():
    """A shard's experts against float64 per-row math: rows routed to experts it does not hold,
    and padding rows (id -1, unused rows of a static exchange), give zeros and count nothing."""
    import torch
    import torch.nn.functional as F

    from specmoe_ray.moe.experts import ExpertStore, LocalExperts

    g = torch.Generator().manual_seed(0)
    E, D, I = 8, 16, 12
    held = [1, 4, 6]
    gate_up = torch.randn(len(held), 2 * I, D, generator=g)
    down = torch.randn(len(held), D, I, generator=g)
    store = ExpertStore({3: LocalExperts(held, gate_up, down, E)})
    x = torch.randn(9, D, generator=g)
    ids = torch.tensor([4, -1, 1, 0, 6, -1, 4, 7, 1])
    out = store(3, x, ids).double()
    for r, e in enumerate(ids.tolist()):
        if e in held:
            gate, up = F.linear(x[r].double(), gate_up[held.index(e)].double()).chunk(2)
            ref = F.linear(F.silu(gate) * up, down[held.index(e)].double())
            torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)
        else:
            assert not out[r].any(), (r, e)
    assert store.computed_counts() == {3: [0, 2, 0, 0, 2, 0, 1, 0]}
