"""The speculation policy: its cost model against simulation, its choices against the math."""

from __future__ import annotations

import pytest
import torch

from specmoe_ray.spec.policy import AdaptivePolicy, FixedPolicy, StepCostModel, experts_touched


@pytest.mark.parametrize(("E", "K", "T"), [(128, 8, 1), (128, 8, 4), (64, 6, 9), (8, 2, 3)])
def test_experts_touched_matches_simulated_routing(E, K, T):
    g = torch.Generator().manual_seed(0)
    trials = 4000
    # Each token picks K distinct experts uniformly at random.
    picks = torch.rand(trials, T, E, generator=g).argsort(-1)[..., :K]
    hit = torch.zeros(trials, E, dtype=torch.bool)
    hit.scatter_(1, picks.reshape(trials, -1), True)
    simulated = hit.sum(-1).double().mean().item()
    assert abs(simulated - experts_touched(E, K, T)) < 0.02 * E**0.5, (simulated, experts_touched(E, K, T))


def test_expected_tokens_per_step_formula():
    p = AdaptivePolicy(k_max=8, prior_acceptance=0.7)
    for k in range(6):
        brute = sum(0.7**i for i in range(k + 1))  # 1 + a + ... + a^k
        assert p.expected_tokens(k) == pytest.approx(brute)


def test_expected_tokens_from_the_acceptance_at_each_position():
    """With a rate per position (draft i accepted given all before it), a step of k drafts emits
    the accepted run's length plus one: its expectation over the run's distribution (float64,
    P(run = j) = a_1 ... a_j (1 - a_{j+1}), the whole k with a_1 ... a_k)."""
    p = AdaptivePolicy(k_max=5)
    p.position_acceptance, p.seen_positions = [0.9, 0.5, 0.95, 0.2, 0.7], [True] * 5
    for k in range(6):
        a = [float(x) for x in p.position_acceptance[:k]]
        reach = [1.0]
        for x in a:
            reach.append(reach[-1] * x)  # P(run >= j)
        dist = [reach[j] * (1.0 - a[j]) for j in range(k)] + [reach[k]]
        assert sum(dist) == pytest.approx(1.0)
        assert p.expected_tokens(k) == pytest.approx(sum((j + 1) * q for j, q in enumerate(dist)))


def test_a_depth_never_tried_takes_the_deepest_tried_rate():
    """Positions beyond every k tried take the rate of the deepest measured one (the prior only
    before any measurement): two positions seen always accepted (0.6 -> 0.68 after one step)."""
    p = AdaptivePolicy(k_max=4, prior_acceptance=0.6)
    assert p.expected_tokens(4) == pytest.approx(sum(0.6**j for j in range(5)))
    p.record(
        batch_size=4, k=2, verify_s=0.01, draft_s=0.002, num_drafted=8, num_accepted=8, num_rejected=0,
        accepted=[2] * 4, drafted=[2] * 4,
    )  # fmt: skip
    assert p.seen_positions == [True, True, False, False]
    assert p.position_acceptance == pytest.approx([0.68, 0.68, 0.6, 0.6])
    assert p.expected_tokens(4) == pytest.approx(sum(0.68**j for j in range(5)))


def test_acceptance_that_falls_after_the_first_draft_keeps_speculation_shallow():
    """A draft that predicts the next token well (0.9) and the ones after poorly (0.1 each, given
    the ones before were accepted): with a 10 ms verify and 2 ms per drafted position, k = 1 pays
    most (1.9 tokens in 12 ms against 1.99 in 14 at k = 2). One i.i.d. rate fitted to every
    position (~0.5 at k = 2) misjudges both depths and settles at 2; the positions' own rates are
    learnt (0.9, 0.1) and the policy settles at 1."""
    rng = torch.Generator().manual_seed(0)
    policy, batch, choices = AdaptivePolicy(k_max=6, prior_acceptance=0.6), 8, []
    rates = [0.9] + [0.1] * 5
    for _ in range(600):
        k = policy.choose(batch)
        choices.append(k)
        accepted = []
        for _ in range(batch):  # each row's run of accepted drafts
            a = 0
            while a < k and torch.rand((), generator=rng).item() < rates[a]:
                a += 1
            accepted.append(a)
        policy.record(
            batch_size=batch,
            k=k,
            verify_s=0.010,
            draft_s=0.002 * k,
            num_drafted=k * batch,
            num_accepted=sum(accepted),
            num_rejected=sum(a < k for a in accepted),
            accepted=accepted,
            drafted=[k] * batch,
        )
    assert choices[-100:].count(1) >= 80, choices[-100:]
    assert policy.position_acceptance[0] == pytest.approx(0.9, abs=0.1)
    assert policy.position_acceptance[1] == pytest.approx(0.1, abs=0.1)


def feed(
    policy: AdaptivePolicy, cost, acceptance: float, steps: int = 200, batch: int = 1, draft: float = 0.001
) -> list[int]:
    """Drive the policy with a synthetic step cost, a proposal of k positions costing draft * k
    seconds over the whole batch, and acceptance; return its choices."""
    choices = []
    for _ in range(steps):
        k = policy.choose(batch)
        choices.append(k)
        accepted = round(acceptance * k)
        policy.record(
            batch_size=batch,
            k=k,
            verify_s=cost(k),
            draft_s=draft * k,
            num_drafted=k * batch,
            num_accepted=accepted * batch,
            num_rejected=batch if accepted < k else 0,
            accepted=[accepted] * batch,
            drafted=[k] * batch,
        )
    return choices


def test_high_acceptance_and_flat_cost_speculates_deep():
    choices = feed(AdaptivePolicy(k_max=6), cost=lambda k: 0.010, acceptance=0.95)
    assert max(set(choices[-50:]), key=choices[-50:].count) >= 5


def test_useless_draft_turns_speculation_off():
    choices = feed(AdaptivePolicy(k_max=6), cost=lambda k: 0.010 * (1 + 0.3 * k), acceptance=0.0)
    assert choices[-50:].count(0) >= 40  # mostly off; an occasional exploration step remains


def test_batch_size_does_not_discount_the_draft():
    """A proposal's cost is per position (one draft forward over the batch), not per row: with
    the same step costs at batch 8 as at batch 1 the policy makes the same choices. Drafting
    costs 20 ms per position against a 10 ms verify: even drafts that are always accepted do not
    pay (2 tokens in 30 ms against 1 in 10), so speculation turns off at either batch size."""
    one, eight = (
        feed(AdaptivePolicy(k_max=6), lambda k: 0.010, acceptance=1.0, batch=b, draft=0.020) for b in (1, 8)
    )
    assert one == eight
    assert eight[-50:].count(0) >= 40, eight[-50:]


def test_moe_cost_model_makes_speculation_shallower():
    """Same acceptance, but verify cost grows with the experts k + 1 tokens touch."""
    moe = StepCostModel(dense_bytes=1e8, expert_bytes=1e7, num_moe_layers=48, num_experts=128, top_k=8)
    assert moe.bytes_for(1) == pytest.approx(1e8 + 48 * 8 * 1e7)  # one token: exactly top_k experts
    assert moe.bytes_for(10_000) == pytest.approx(1e8 + 48 * 128 * 1e7)  # many tokens: every expert
    flat = feed(AdaptivePolicy(k_max=6), cost=lambda k: 0.010, acceptance=0.7)
    steep = feed(
        AdaptivePolicy(k_max=6, cost_model=moe),
        cost=lambda k: 0.010 * moe.bytes_for(k + 1) / 1e9,
        acceptance=0.7,
    )
    assert sum(steep[-50:]) < sum(flat[-50:])


def test_fixed_policy():
    assert FixedPolicy(3).choose(8) == 3
    with pytest.raises(ValueError, match="must be >= 0"):
        FixedPolicy(-1)


def test_a_catch_up_proposal_leaves_the_draft_cost_and_counts_the_acceptance():
    """record(draft_s=None) (the engine's proposal that caught the draft up on tokens it missed):
    the draft's cost per position stays as measured; the acceptance estimate still moves."""
    p = AdaptivePolicy(k_max=4, prior_acceptance=0.5)
    p.record(batch_size=2, k=2, verify_s=0.01, draft_s=0.004, num_drafted=4, num_accepted=4, num_rejected=0)
    assert p.draft_s == {2: pytest.approx(0.002)}
    acceptance = p.acceptance
    p.record(batch_size=2, k=2, verify_s=0.01, draft_s=None, num_drafted=4, num_accepted=0, num_rejected=2)
    assert p.draft_s == {2: pytest.approx(0.002)} and p.acceptance < acceptance
