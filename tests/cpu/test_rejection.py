"""Verification of draft tokens (specmoe_ray.spec.rejection).

Greedy rules are checked on named edge cases with logits built to force each argmax. The
sampling rule is checked statistically: speculative sampling of the first two tokens of a
small Markov-chain "model" must match the exact target distribution, computed here in
float64 by an independent implementation of temperature / top-k / top-p; and the same
harness must reject deliberately broken rules, so the check is shown to be able to fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from specmoe_ray.engine.sampling import make_generator, target_probs
from specmoe_ray.engine.sequence import SamplingParams
from specmoe_ray.spec import rejection
from specmoe_ray.spec.rejection import (
    DraftProposal,
    VerifyResult,
    sample_sparse,
    sample_sparse_one,
    sparse_from_probs,
    verify,
)

GREEDY = SamplingParams(temperature=0.0)

# ---------------------------------------------------------------------------------------------
# Builders


def forced_logits(argmaxes: list[list[int]], V: int = 16) -> torch.Tensor:
    """argmaxes[b][i] = the target's argmax at position i of row b -> logits [B, k + 1, V]."""
    logits = torch.zeros(len(argmaxes), len(argmaxes[0]), V)
    for b, row in enumerate(argmaxes):
        for i, t in enumerate(row):
            logits[b, i, t] = 5.0
    return logits


def one_hot_proposal(drafts: list[list[int]], k: int) -> DraftProposal:
    """Greedy drafts: drafts[b] = row b's tokens (len <= k), each position one-hot."""
    B = len(drafts)
    tokens = torch.full((B, k), -1, dtype=torch.long)
    for b, row in enumerate(drafts):
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    probs = (tokens >= 0).float()[..., None]  # [B, k, 1]
    return DraftProposal(
        tokens=tokens,
        num_draft=torch.tensor([len(r) for r in drafts], dtype=torch.long),
        sparse_ids=tokens[..., None].clone(),
        sparse_probs=probs,
    )


def random_case(B: int, k: int, V: int, S: int, seed: int) -> tuple[torch.Tensor, DraftProposal]:
    """Random target logits and a random sparse draft, drafts sampled from it; num_draft in 0..k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, k + 1, V, generator=g) * 2
    draft_probs = torch.softmax(torch.randn(B, k, V, generator=g) * 2, dim=-1)
    ids, probs = sparse_from_probs(draft_probs, S)
    num_draft = torch.randint(0, k + 1, (B,), generator=g)
    num_draft[0] = k  # the widest row sets k
    tokens = torch.full((B, k), -1, dtype=torch.long)
    for b in range(B):
        for i in range(int(num_draft[b])):
            tokens[b, i] = sample_sparse_one(ids[b, i], probs[b, i], g)
    valid = torch.arange(k) < num_draft[:, None]
    ids = ids.masked_fill(~valid[..., None], -1)
    probs = probs.masked_fill(~valid[..., None], 0.0)
    return logits, DraftProposal(tokens, num_draft, ids, probs)


def take_rows(logits: torch.Tensor, proposal: DraftProposal, rows: list[int]) -> tuple:
    """Sub-batch of `rows`, trimmed to its own widest draft (so k changes too)."""
    k = int(proposal.num_draft[rows].max())
    sub = DraftProposal(
        proposal.tokens[rows, :k],
        proposal.num_draft[rows],
        proposal.sparse_ids[rows, :k],
        proposal.sparse_probs[rows, :k],
    )
    return logits[rows, : k + 1], sub


def emitted(result: VerifyResult) -> list[list[int]]:
    return [row[: n + 1] for row, n in zip(result.tokens.tolist(), result.num_accepted.tolist(), strict=True)]


# ---------------------------------------------------------------------------------------------
# Greedy: named edge cases


@pytest.mark.parametrize(
    ("name", "argmaxes", "drafts", "tokens", "num_accepted"),
    [
        ("perfect match", [1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4], 3),
        ("first-token mismatch", [1, 2, 3, 4], [5, 2, 3], [1, -1, -1, -1], 0),
        ("mismatch in the middle", [1, 2, 3, 4], [1, 5, 3], [1, 2, -1, -1], 1),
        ("mismatch at the last draft", [1, 2, 3, 4], [1, 2, 7], [1, 2, 3, -1], 2),
    ],
)
def test_greedy_named_cases(name, argmaxes, drafts, tokens, num_accepted):
    result = verify(forced_logits([argmaxes]), one_hot_proposal([drafts], 3), [GREEDY], [None])
    assert result.tokens.tolist() == [tokens], name
    assert result.num_accepted.tolist() == [num_accepted], name
    assert result.tokens.dtype == torch.long


def test_greedy_empty_draft():
    result = verify(forced_logits([[9]]), one_hot_proposal([[]], 0), [GREEDY], [None])
    assert result.tokens.tolist() == [[9]]
    assert result.num_accepted.tolist() == [0]


def test_greedy_mixed_num_draft_with_padding():
    argmaxes = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [1, 3, 5, 7], [2, 2, 2, 2]]
    drafts = [[1, 2, 3], [5], [], [1, 3], [2, 4]]
    result = verify(forced_logits(argmaxes), one_hot_proposal(drafts, 3), [GREEDY] * 5, [None] * 5)
    assert result.tokens.tolist() == [
        [1, 2, 3, 4],  # all accepted + bonus
        [5, 6, -1, -1],  # its only draft accepted, bonus at position 1
        [9, -1, -1, -1],  # no drafts: the target's own token
        [1, 3, 5, -1],  # both accepted, bonus at position 2
        [2, 2, -1, -1],  # second draft rejected, recovered = argmax
    ]
    assert result.num_accepted.tolist() == [3, 1, 0, 2, 1]


def test_greedy_ignores_tokens_past_num_draft():
    # Tokens past num_draft would match the argmax; num_draft = 1 must still bound acceptance.
    proposal = one_hot_proposal([[1, 2, 3]], 3)
    proposal.num_draft = torch.tensor([1])
    result = verify(forced_logits([[1, 2, 3, 4]]), proposal, [GREEDY], [None])
    assert result.tokens.tolist() == [[1, 2, -1, -1]]
    assert result.num_accepted.tolist() == [1]


# ---------------------------------------------------------------------------------------------
# Sampling: deterministic consequences of the rule

SAMPLED = SamplingParams(temperature=0.7, top_k=10, top_p=0.95)


def test_draft_equal_to_target_is_always_accepted():
    B, k, V = 64, 4, 20
    logits = torch.randn(B, k + 1, V, generator=torch.Generator().manual_seed(0)) * 3
    p = target_probs(
        logits.view(-1, V),
        torch.full((B * (k + 1),), SAMPLED.temperature),
        torch.full((B * (k + 1),), SAMPLED.top_k),
        torch.full((B * (k + 1),), SAMPLED.top_p),
    ).view(B, k + 1, V)[:, :k]
    ids, probs = sparse_from_probs(p, V)  # q = p exactly
    g = torch.Generator().manual_seed(1)
    tokens = torch.stack(
        [torch.stack([sample_sparse_one(ids[b, i], probs[b, i], g) for i in range(k)]) for b in range(B)]
    )
    proposal = DraftProposal(tokens, torch.full((B,), k), ids, probs)
    gens = [make_generator(100 + b, "cpu") for b in range(B)]
    result = verify(logits, proposal, [SAMPLED] * B, gens)
    assert result.num_accepted.tolist() == [k] * B
    assert torch.equal(result.tokens[:, :k], tokens)


def test_one_hot_draft_acceptance_and_recovery():
    """A one-hot draft token x is accepted with probability p(x); when rejected the recovered
    token is never x; a token outside the target's top-k (p(x) = 0) is always rejected."""
    B, V = 4000, 12
    params = SamplingParams(temperature=1.3, top_k=5)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3)).repeat(B, 2, 1)
    p = target_probs(logits[:1, 0], torch.tensor([1.3]), torch.tensor([5]), torch.tensor([1.0]))[0]
    order = p.argsort(descending=True).tolist()
    x_in, x_out = order[1], order[-1]  # second most likely; excluded by top-k
    assert p[x_out] == 0
    drafts = [[x_in]] * (B // 2) + [[x_out]] * (B // 2)
    gens = [make_generator(b, "cpu") for b in range(B)]
    result = verify(logits, one_hot_proposal(drafts, 1), [params] * B, gens)
    acc, tok = result.num_accepted, result.tokens
    first, second = slice(0, B // 2), slice(B // 2, B)
    assert not acc[second].any(), "a draft token with target probability 0 was accepted"
    assert (p[tok[second, 0]] > 0).all()
    rejected = acc[first] == 0
    assert (tok[first][rejected, 0] != x_in).all(), "recovered token equals the rejected one-hot draft"
    assert (tok[first][~rejected, 0] == x_in).all()
    n, rate = B // 2, float(p[x_in])
    z = (acc[first].sum().item() - n * rate) / (n * rate * (1 - rate)) ** 0.5
    assert abs(z) < 4.5, f"acceptance {acc[first].float().mean():.4f} vs p(x) = {rate:.4f} (z = {z:.2f})"


def test_sampling_empty_draft_samples_the_target():
    """k = 0 for the whole batch: every row is one plain sample from position 0."""
    B, V = 6000, 10
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4)).repeat(B, 1, 1) * 2  # [B, 1, V]
    empty = DraftProposal(
        torch.zeros(B, 0, dtype=torch.long),
        torch.zeros(B, dtype=torch.long),
        torch.zeros(B, 0, 3, dtype=torch.long),
        torch.zeros(B, 0, 3),
    )
    result = verify(logits, empty, [SAMPLED] * B, [make_generator(b, "cpu") for b in range(B)])
    assert result.tokens.shape == (B, 1) and not result.num_accepted.any()
    expected = reference_probs(logits[0, 0].numpy(), SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p)
    stat, pvalue = chi_square(np.bincount(result.tokens[:, 0].numpy(), minlength=V), expected)
    assert pvalue > 1e-3, f"chi2 = {stat:.1f}, p = {pvalue:.3g}"


def test_sample_sparse_draws_by_inverse_cdf():
    """The draft's sparse draw: the first support entry whose running mass exceeds u * total,
    padding (-1, whatever its probability) never drawn, rows at once."""
    ids = torch.tensor([[7, 3, 9, -1], [5, -1, 2, 8]])
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.3], [0.25, 0.5, 0.25, 0.5]])  # (row 1's total: 1.0)
    for u, expected in [(0.0, [7, 5]), (0.25, [7, 2]), (0.5, [3, 8]), (0.75, [9, 8]), (1 - 2**-53, [9, 8])]:
        got = sample_sparse(ids, probs, torch.full((2,), u, dtype=torch.float64))
        assert got.tolist() == expected, u


def test_residual_falls_back_to_target_when_empty():
    p = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1], [0, -1]])
    probs = torch.tensor([[0.25, 0.75], [0.2, 0.9]], dtype=torch.float64)  # padding prob is ignored
    out = rejection._recovered_or_bonus_probs(p, ids, probs)
    assert torch.equal(out[0], p[0])  # p - q has no mass: sample from p
    assert torch.allclose(out[1], torch.tensor([0.3, 0.5, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Reproducibility and independence of rows


def test_seeded_reproducibility():
    logits, proposal = random_case(B=32, k=4, V=20, S=6, seed=7)
    runs = [
        verify(logits, proposal, [SAMPLED] * 32, [make_generator(s, "cpu") for s in range(32)])
        for _ in range(2)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].num_accepted, runs[1].num_accepted)
    assert 0 < runs[0].num_accepted.sum() < proposal.num_draft.sum()  # a mix of accepts and rejects


def test_row_does_not_depend_on_batch():
    B = 12
    logits, proposal = random_case(B=B, k=5, V=20, S=6, seed=11)
    seeds = [1000 + b for b in range(B)]
    gens = [make_generator(s, "cpu") for s in seeds]
    full = emitted(verify(logits, proposal, [SAMPLED] * B, gens))
    next_full = [torch.rand(1, generator=g).item() for g in gens]
    for rows in ([3], [5, 1], [2, 7, 9, 4]):
        sub_logits, sub = take_rows(logits, proposal, rows)
        sub_gens = [make_generator(seeds[b], "cpu") for b in rows]
        alone = emitted(verify(sub_logits, sub, [SAMPLED] * len(rows), sub_gens))
        assert alone == [full[b] for b in rows]
        # The generators advance the same way too, so later steps stay independent of the batch.
        assert [torch.rand(1, generator=g).item() for g in sub_gens] == [next_full[b] for b in rows]


def test_rows_without_drafts_draw_alike_in_every_batch():
    """A row with no drafts (plain decoding) draws the same token from the same seed alone, in a
    batch of greedy, temperature-only and top-k / top-p rows, and beside rows with drafts (the
    accept/resample path): each row's draw depends on its own parameters and seed only."""
    B, V = 8, 50
    logits = torch.randn(B, 4, V, generator=torch.Generator().manual_seed(21)) * 2
    hot, other = SamplingParams(temperature=0.9), SamplingParams(temperature=1.3, top_k=5)
    params = [GREEDY, hot, SAMPLED, SamplingParams(temperature=1.4), other, GREEDY, hot, SAMPLED]
    drafts = [[]] * 6 + [[1, 2, 3], [4, 5]]

    def gens(rows):
        return [None if params[b].greedy else make_generator(100 + b, "cpu") for b in rows]

    full = emitted(verify(logits, one_hot_proposal(drafts, 3), params, gens(range(B))))
    plain = emitted(verify(logits[:6, :1], one_hot_proposal(drafts[:6], 0), params[:6], gens(range(6))))
    for b in range(6):
        alone = emitted(verify(logits[b : b + 1, :1], one_hot_proposal([[]], 0), [params[b]], gens([b])))
        assert full[b] == plain[b] == alone[0], b
    assert len({t[0] for t in plain}) > 2  # (not one token everywhere)


def test_target_probs_of_a_row_follow_its_own_parameters_only():
    """target_probs: rows with top-k / top-p on match the float64 reference, and are the same
    computed alone (`plain=False`: no plain softmax beside the sort's); rows with both off are
    exactly the plain softmax whether or not other rows filter (the sort is skipped when none
    does, `filtered=False`)."""
    from specmoe_ray.engine.sampling import plain_probs

    V = 40
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(8)) * 2
    temperature = torch.tensor([0.7, 1.2, 0.9, 1.0])
    top_k, top_p = torch.tensor([0, 6, 0, V]), torch.tensor([1.0, 1.0, 0.8, 1.0])
    probs = target_probs(logits, temperature, top_k, top_p)
    for b in (1, 2):
        ref = reference_probs(logits[b].numpy(), *(float(temperature[b]), int(top_k[b]), float(top_p[b])))
        assert np.abs(probs[b].double().numpy() - ref).max() < 1e-6
    plain = [0, 3]
    expected = plain_probs(logits[plain], temperature[plain])
    assert torch.equal(probs[plain], expected)
    assert torch.equal(
        target_probs(logits[plain], temperature[plain], top_k[plain], top_p[plain], False), expected
    )
    rows = [1, 2]  # every row filters: the same probabilities without the plain softmax beside
    alone = target_probs(logits[rows], temperature[rows], top_k[rows], top_p[rows], plain=False)
    assert torch.equal(alone, probs[rows])


def test_greedy_and_sampling_rows_mixed():
    B = 10
    logits, proposal = random_case(B=B, k=4, V=20, S=6, seed=5)
    greedy_rows, sampled_rows = [0, 3, 4, 8], [1, 2, 5, 6, 7, 9]
    params = [GREEDY if b in greedy_rows else SAMPLED for b in range(B)]
    gens = [None if b in greedy_rows else make_generator(b, "cpu") for b in range(B)]
    mixed = emitted(verify(logits, proposal, params, gens))

    for b in greedy_rows:  # greedy: the longest prefix equal to the argmax, then the argmax
        argmax = logits[b].argmax(-1).tolist()
        n = int(proposal.num_draft[b])
        a = 0
        while a < n and proposal.tokens[b, a] == argmax[a]:
            a += 1
        assert mixed[b] == argmax[:a] + [argmax[a]]
    sub_logits, sub = take_rows(logits, proposal, sampled_rows)
    alone = emitted(verify(sub_logits, sub, [SAMPLED] * 6, [make_generator(b, "cpu") for b in sampled_rows]))
    assert alone == [mixed[b] for b in sampled_rows]


def test_sampling_row_without_generator_is_an_error():
    logits, proposal = random_case(B=2, k=2, V=8, S=4, seed=0)
    with pytest.raises(ValueError, match="Generator"):
        verify(logits, proposal, [SAMPLED, SAMPLED], [make_generator(0, "cpu"), None])


# ---------------------------------------------------------------------------------------------
# Losslessness, statistically: a Markov-chain target, a very different sparse draft

V = 24
TOP_N = 6  # draft support: misses most of the vocabulary
START = 3  # the context's last token
MAX_DRAFT = 3
NUM_ROWS = 20_000
# top-k and top-p both shape the target: after top-k, top-p keeps 7..10 tokens of each row.
TARGET = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
TARGET_TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(1234))  # logits[prev]
# The draft: the target's logits plus strong noise, then its top 6. It accepts ~40% of drafts,
# puts ~30% of its mass where the target has none, and misses some of the target's tokens.
DRAFT_PROBS = torch.softmax(
    TARGET_TABLE + 1.5 * torch.randn(V, V, generator=torch.Generator().manual_seed(99)), dim=-1
)


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top-k, then top-p on the renormalised top-k, in float64."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp(z[order] - z[order].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    # The kept set must not hinge on rounding (float32 under test vs float64 here).
    assert top_p >= 1 or np.abs(mass_before - top_p).min() > 1e-5
    keep = mass_before < top_p if top_p < 1 else np.ones_like(probs, dtype=bool)
    out = np.zeros_like(z)
    out[order[keep]] = probs[keep] / probs[keep].sum()
    return out


def exact_first_two(target: SamplingParams = TARGET) -> np.ndarray:
    """P(t1, t2) of plain sampling from the chain -> [V, V] float64."""
    table = TARGET_TABLE.double().numpy()
    args = (target.temperature, target.top_k, target.top_p)
    p1 = reference_probs(table[START], *args)
    return p1[:, None] * np.stack([reference_probs(table[t], *args) for t in range(V)])


def draft_step(last: list[int], num_draft: list[int], gens: list) -> tuple[torch.Tensor, DraftProposal]:
    """Draft num_draft[r] tokens per row from the draft chain -> target logits [R, k + 1, V], proposal."""
    R, k = len(last), max(num_draft)
    tokens = torch.full((R, k), -1, dtype=torch.long)
    ids = torch.full((R, k, TOP_N), -1, dtype=torch.long)
    probs = torch.zeros(R, k, TOP_N)
    prev = list(last)
    for i in range(k):
        ids_i, probs_i = sparse_from_probs(DRAFT_PROBS[prev], TOP_N)  # [R, S]
        drafted = [
            int(sample_sparse_one(ids_r, probs_r, g)) if i < n else -1
            for ids_r, probs_r, g, n in zip(ids_i.unbind(), probs_i.unbind(), gens, num_draft, strict=True)
        ]
        on = torch.tensor(num_draft) > i
        tokens[:, i] = torch.tensor(drafted)
        ids[:, i] = ids_i.masked_fill(~on[:, None], -1)
        probs[:, i] = probs_i.masked_fill(~on[:, None], 0.0)
        prev = [t if t >= 0 else p for t, p in zip(drafted, prev, strict=True)]
    path = torch.cat([torch.tensor(last)[:, None], tokens.clamp(min=0)], dim=1)  # [R, k + 1]
    return TARGET_TABLE[path], DraftProposal(tokens, torch.tensor(num_draft), ids, probs)


def speculative_first_two(verify_fn, seed: int, target: SamplingParams = TARGET) -> np.ndarray:
    """First two tokens of NUM_ROWS speculative generations -> counts [V, V].

    Each row drafts 0..MAX_DRAFT tokens per step (drawn independently of everything else) and
    uses one generator for its drafts and its verification; a row that emits fewer than two
    tokens takes another step from what it has."""
    gens = [make_generator(seed * NUM_ROWS + r, "cpu") for r in range(NUM_ROWS)]
    num_draft = torch.randint(0, MAX_DRAFT + 1, (NUM_ROWS,), generator=torch.Generator().manual_seed(seed))
    out: list[list[int]] = [[] for _ in range(NUM_ROWS)]
    active = list(range(NUM_ROWS))
    while active:
        last = [out[r][-1] if out[r] else START for r in active]
        logits, proposal = draft_step(last, num_draft[active].tolist(), [gens[r] for r in active])
        result = verify_fn(logits, proposal, [target] * len(active), [gens[r] for r in active])
        for r, new in zip(active, emitted(result), strict=True):
            out[r].extend(new[: 2 - len(out[r])])
        active = [r for r in active if len(out[r]) < 2]
    counts = np.zeros((V, V), dtype=np.int64)
    np.add.at(counts, tuple(np.array(out).T), 1)
    return counts


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Pearson chi-square of counts against probs, cells with expected count < 5 merged."""
    counts, expected = counts.ravel(), probs.ravel() * counts.sum()
    if counts[expected == 0].any():
        return float("inf"), 0.0  # a token pair the target can never produce
    order = np.argsort(expected)
    counts, expected = counts[order], expected[order]
    counts, expected = counts[expected > 0], expected[expected > 0]
    cut = int((expected < 5).sum())  # pool the cells expected < 5 times (and more, until the pool reaches 5)
    while cut < len(expected) and 0 < expected[:cut].sum() < 5:
        cut += 1
    obs = np.concatenate([[counts[:cut].sum()], counts[cut:]]) if cut else counts
    exp = np.concatenate([[expected[:cut].sum()], expected[cut:]]) if cut else expected
    assert not (exp < 5).any()
    stat, pvalue = scipy.stats.chisquare(obs, exp)
    return float(stat), float(pvalue)


def always_accept(target_logits, proposal, params, generators) -> VerifyResult:
    """Broken: keeps every draft, then samples the bonus from the target."""
    B, K1, V = target_logits.shape
    n = proposal.num_draft
    tokens = torch.cat([proposal.tokens, torch.full((B, 1), -1)], dim=1)
    p = target_probs(
        target_logits[torch.arange(B), n],
        torch.tensor([q.temperature for q in params]),
        torch.tensor([q.top_k for q in params]),
        torch.tensor([q.top_p for q in params]),
    )
    for b in range(B):
        tokens[b, n[b]] = torch.multinomial(p[b], 1, generator=generators[b])[0]
    return VerifyResult(tokens, n.clone())


@pytest.fixture(scope="module")
def exact() -> np.ndarray:
    probs = exact_first_two()
    assert abs(probs.sum() - 1) < 1e-12
    return probs


PLAIN = SamplingParams(temperature=0.8)  # temperature only: Triton's draws on GPUs


def on_gpu(target_logits, proposal, params, generators) -> VerifyResult:
    """`verify` with the logits and the proposal on the GPU (the generators stay on the CPU)."""
    dev = torch.device("cuda")
    moved = DraftProposal(*(t.to(dev) for t in (proposal.tokens, proposal.num_draft)),
                          proposal.sparse_ids.to(dev), proposal.sparse_probs.to(dev))  # fmt: skip
    return verify(target_logits.to(dev), moved, params, generators)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU"))],
)
@pytest.mark.parametrize("target", [TARGET, PLAIN], ids=["top-k-top-p", "temperature-only"])
def test_sampling_is_lossless(target, device):
    """Speculative sampling's first two tokens follow the target's exact distribution: top-k /
    top-p rows (torch) and temperature-only rows (on GPUs: the Triton kernels of
    `engine/triton_sampling.py`, drafts and plain draws alike)."""
    exact = exact_first_two(target)
    counts = speculative_first_two(verify if device == "cpu" else on_gpu, seed=1, target=target)
    stat, pvalue = chi_square(counts, exact)
    print(f"lossless: chi2 = {stat:.1f}, p = {pvalue:.4g}")
    assert pvalue > 1e-3, f"speculative output differs from the target: chi2 = {stat:.1f}, p = {pvalue:.3g}"


def test_check_rejects_always_accept(exact):
    stat, pvalue = chi_square(speculative_first_two(always_accept, seed=2), exact)
    print(f"always accept: chi2 = {stat:.1f}, p = {pvalue:.4g}")
    assert pvalue < 1e-6, f"the check missed a broken rule: chi2 = {stat:.1f}, p = {pvalue:.3g}"


def test_check_rejects_resampling_from_target(exact, monkeypatch):
    # A common bug: after a rejection, sample from p instead of the residual max(0, p - q).
    monkeypatch.setattr(rejection, "_recovered_or_bonus_probs", lambda p, ids, probs: p)
    stat, pvalue = chi_square(speculative_first_two(verify, seed=3), exact)
    print(f"resample from p: chi2 = {stat:.1f}, p = {pvalue:.4g}")
    assert pvalue < 1e-6, f"the check missed a broken rule: chi2 = {stat:.1f}, p = {pvalue:.3g}"
