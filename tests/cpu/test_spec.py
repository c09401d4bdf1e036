"""Speculative decoding is lossless: greedy equals transformers, sampling follows the target."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from conftest import (
    PROMPTS,
    benchmark_module,
    chi2_pvalue,
    exact_pair_probs,
    hf_greedy,
    hf_next_logits,
    make_checkpoint,
    sample_pairs,
    save_char_tokenizer,
)

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.spec import rejection
from specmoe_ray.spec.proposer import DraftRequest, NgramProposer

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(checkpoints, tmp_path_factory):
    """target (MoE), and a poor draft: a random dense model with the same vocabulary."""
    target = checkpoints("qwen3_moe")
    poor = make_checkpoint(str(tmp_path_factory.mktemp("poor") / "llama"), "llama", seed=123)
    return target, poor, hf_greedy(target, PROMPTS, NEW)


def drafts(pair):
    target, poor, _ = pair
    return {"self": target, "poor": poor, "ngram": "ngram"}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("which", ["self", "poor", "ngram"])
def test_greedy_speculation_equals_target_greedy(pair, which, k):
    target, _, ref = pair
    with Engine.from_pretrained(
        target, draft=drafts(pair)[which], num_speculative_tokens=k, max_model_len=128
    ) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
        stats = engine.stats()
    assert [o.token_ids for o in outs] == ref
    if which == "self":  # the target drafting for itself is always right
        assert stats["acceptance_rate"] > 0.95, stats
        assert stats["mean_accepted_length"] > 0.9 * (k + 1) or k == 5
    if which == "poor":
        assert stats["acceptance_rate"] < 0.5, stats
    for o in outs:
        assert o.metrics.num_generated_tokens == NEW
        assert o.metrics.acceptance_rate is None or 0 <= o.metrics.acceptance_rate <= 1


@pytest.mark.parametrize("which", ["self", "poor", "ngram"])
def test_greedy_speculation_with_expert_shards(ray_cluster, pair, which):
    target, _, ref = pair
    with Engine.from_pretrained(
        target, draft=drafts(pair)[which], num_shards=2, num_speculative_tokens=3, max_model_len=128
    ) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
        stats = engine.stats()
    assert [o.token_ids for o in outs] == ref
    assert all(n > 0 for n in stats["expert_tokens_per_shard"])


def test_mixed_batch_of_lengths_and_temperatures(pair):
    target, poor, ref = pair
    params = [
        GREEDY,
        SamplingParams(max_tokens=NEW, temperature=0.9, top_k=20, seed=7, ignore_eos=True),
        GREEDY,
        SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, seed=8, ignore_eos=True),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1][:5]]
    runs = []
    for _ in range(2):
        with Engine.from_pretrained(
            target, draft=poor, num_speculative_tokens=3, max_model_len=128
        ) as engine:
            runs.append([o.token_ids for o in engine.generate(prompts, params)])
    outs = runs[0]
    assert outs[0] == ref[0] and outs[2] == ref[2]
    assert len(outs[1]) == NEW and len(outs[3]) == 10
    assert runs[0] == runs[1], "seeded requests reproduce"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafts_read_after_verification_give_the_same_tokens(pair, monkeypatch, temperature):
    """`engine.DEFER_DRAFT_READ`: static steps with a draft model verify drafts left on the
    device (the proposal is not read before the verify step; `StepGraphs.run(drafts=)` places
    them; the proposer reads them at its next call): the same tokens as reading them first
    (greedy: transformers'; sampled, seeded: equal), with rows that draft fewer than others
    (sequences near their end: the indexed placement) and sequences that finish, freeing their
    draft cache, between a proposal and its read. The target drafts for itself, so nearly every
    draft is accepted and a misplaced one would change the tokens."""
    from specmoe_ray.engine import engine as engine_module
    from specmoe_ray.engine.graph import StepGraphs
    from specmoe_ray.spec.proposer import DraftModelProposer

    target, poor, ref = pair
    placed, unread, reads = [], [], []
    place, propose, read = StepGraphs._place_drafts, DraftModelProposer.propose, Engine._read_drafts
    monkeypatch.setattr(
        Engine, "_read_drafts", lambda self, s, p: reads.append(p.host_tokens is None) or read(self, s, p)
    )
    monkeypatch.setattr(
        StepGraphs, "_place_drafts", lambda self, *a: placed.append(list(a[-1])) or place(self, *a)
    )
    monkeypatch.setattr(
        DraftModelProposer,
        "propose",
        lambda self, requests, read=True: unread.append(not read) or propose(self, requests, read),
    )
    lengths = (NEW, 7, NEW - 3)
    params = [
        SamplingParams(max_tokens=n, temperature=temperature, seed=i, ignore_eos=True)
        for i, n in enumerate(lengths)
    ]
    runs, drafted = {}, {}
    for defer in (True, False):
        monkeypatch.setattr(engine_module, "DEFER_DRAFT_READ", defer)
        placed.clear(), unread.clear()
        with Engine.from_pretrained(
            target, draft=target, num_speculative_tokens=3, max_model_len=128, step_graphs="padded"
        ) as engine:
            runs[defer] = [o.token_ids for o in engine.generate(PROMPTS, params)]
            stats = engine.stats()
            # The draft caches' entries completed a step later hold the same: the same drafts
            drafted[defer] = (stats["acceptance_rate"], stats["mean_accepted_length"], stats["num_steps"])
        assert any(unread) == defer and all(unread) == defer and (len(placed) > 0) == defer
        if defer:  # every row k drafts (one strided copy) and rows near their end fewer (indexed)
            assert any(len(set(c)) == 1 for c in placed) and any(len(set(c)) > 1 for c in placed), placed
        # (sampled: the draft's top-32 distribution against the target's whole one)
        assert stats["acceptance_rate"] > (0.9 if temperature == 0.0 else 0.6), stats
        # A poor draft (one token per step) and equal lengths: a last step where no row has room
        # for a draft (the proposer's empty proposal, made on the host).
        short = SamplingParams(max_tokens=5, temperature=temperature, seed=9, ignore_eos=True)
        with Engine.from_pretrained(
            target, draft=poor, num_speculative_tokens=3, max_model_len=128, step_graphs="padded"
        ) as engine:
            runs[defer].append([o.token_ids for o in engine.generate(PROMPTS, short)])
            # A request joining while another drafts: its prompt chunk makes the step eager, which
            # reads the drafts before it runs.
            first = engine.add_request(PROMPTS[0], params[0])
            for _ in range(3):
                engine.step()
            second = engine.add_request(PROMPTS[1], params[1])
            reads.clear()
            done = {}
            while engine.has_unfinished():
                done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
            runs[defer].append([done[first], done[second]])
            assert any(reads) == defer  # (an eager step read drafts left on the device)
    assert runs[True] == runs[False] and drafted[True] == drafted[False]
    assert [len(t) for t in runs[True][:3]] == list(lengths) and [len(t) for t in runs[True][3]] == [5] * 3
    if temperature == 0.0:
        assert runs[True][:3] == [r[:n] for r, n in zip(ref, lengths)]
        assert runs[True][3] == [r[:5] for r in ref] and runs[True][4] == [ref[0], ref[1][:7]]


def test_requests_join_while_others_run(pair):
    target, poor, ref = pair
    with Engine.from_pretrained(target, draft=poor, num_speculative_tokens=4, max_model_len=128) as engine:
        ids = [engine.add_request(PROMPTS[0], GREEDY)]
        done = {}
        for step in range(500):
            if step in (2, 5):
                ids.append(engine.add_request(PROMPTS[len(ids)], GREEDY))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            if len(done) == 3:
                break
    assert [done[i] for i in ids] == ref


def test_adaptive_policy_is_lossless(pair):
    target, _, ref = pair
    with Engine.from_pretrained(
        target, draft=target, spec_policy="adaptive", num_speculative_tokens=6, max_model_len=128
    ) as engine:
        outs = engine.generate(PROMPTS * 3, GREEDY)
    assert [o.token_ids for o in outs] == ref * 3


def test_adaptive_policy_times_the_draft_only_where_it_continues(pair, monkeypatch):
    """The adaptive policy's draft cost comes only from proposals whose every drafting row drafted
    in the step before: a proposal after a step without drafts, or for a sequence that just joined,
    first feeds the draft model what it missed (its whole prompt, at first) and is no sample of
    what k costs. The draft's first forward of each proposal is watched: every kept sample fed at
    most 2 tokens per row there (a continuing row's last draft and bonus token, or its recovered
    token), catch-ups (more) were left out, and the estimate is the moving average of the kept
    ones. The tokens stay transformers' whatever k the steps took."""
    from specmoe_ray.spec.policy import AdaptivePolicy
    from specmoe_ray.spec.proposer import DraftModelProposer

    target, poor, ref = pair
    script = iter([2, 2, 0, 0, 3, 3, 1, 0, 2, 2, 2, 3] * 8)
    first_feed, samples = [], []
    forward, propose, record = DraftModelProposer._forward, DraftModelProposer.propose, AdaptivePolicy.record

    def watched_forward(self, feeds, *args):
        if first_feed[-1] is None:
            first_feed[-1] = max(len(f) for f in feeds)
        return forward(self, feeds, *args)

    def watched_propose(self, requests, read=True):
        first_feed.append(None)
        return propose(self, requests, read)

    def recorded(self, **kw):
        if kw["num_drafted"]:
            samples.append((kw["draft_s"], first_feed[-1], kw["k"], AdaptivePolicy._bucket(kw["batch_size"])))
        return record(self, **kw)

    monkeypatch.setattr(DraftModelProposer, "_forward", watched_forward)
    monkeypatch.setattr(DraftModelProposer, "propose", watched_propose)
    monkeypatch.setattr(AdaptivePolicy, "record", recorded)
    monkeypatch.setattr(AdaptivePolicy, "choose", lambda self, batch_size: next(script))
    with Engine.from_pretrained(
        target, draft=poor, spec_policy="adaptive", num_speculative_tokens=3, max_model_len=128
    ) as engine:
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:2]]
        outs = {}
        for step in range(400):
            if step == 6:  # a sequence joins while the others decode
                ids.append(engine.add_request(PROMPTS[2], GREEDY))
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out.token_ids
            if not engine.has_unfinished():
                break
        policy = engine.policy
    assert [outs[i] for i in ids] == ref
    kept = [(d, fed, k, b) for d, fed, k, b in samples if d is not None]
    assert kept and all(fed <= 2 for _, fed, _, _ in kept), samples
    assert any(fed > 2 for d, fed, _, _ in samples if d is None), samples  # catch-ups happened, left out
    estimate = {}  # batch bucket -> seconds per drafted position
    for d, _, k, b in kept:
        estimate[b] = d / k if b not in estimate else (1 - policy.ema) * estimate[b] + policy.ema * d / k
    assert policy.draft_s == pytest.approx(estimate)


def test_cancellation_frees_slot_and_draft_cache(pair):
    target, poor, _ = pair
    with Engine.from_pretrained(target, draft=poor, max_num_seqs=2, max_model_len=128) as engine:
        a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        b = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        c = engine.add_request(PROMPTS[2], GREEDY)
        for _ in range(3):
            engine.step()
        assert engine.num_running == 2 and engine.cache.num_free_slots == 0
        assert a in engine.proposer.entries
        assert engine.abort(a)
        assert engine.num_running == 1 and engine.cache.num_free_slots == 1
        assert a not in engine.proposer.entries
        assert not engine.abort(a)
        finished = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                if len(finished) == 1:
                    engine.abort(b)
        assert c in finished and a not in finished and b not in finished


def test_stop_strings(tmp_path):
    path = make_checkpoint(str(tmp_path / "tok"), "qwen3_moe", seed=5)
    save_char_tokenizer(path)
    prompt = "def f(x):"
    with Engine.from_pretrained(path, draft="ngram", max_model_len=128) as engine:
        full = engine.generate([prompt], GREEDY)[0]
        stop = full.text[6:8]
        cut = full.text.find(stop)
        out = engine.generate(
            [prompt], SamplingParams(max_tokens=NEW, temperature=0.0, stop=[stop, "\x7f\x7f"])
        )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    # Tokens stop at the one that completed the stop string.
    assert out.token_ids == full.token_ids[: cut + len(stop)]


def test_ngram_lookup():
    ng = NgramProposer(min_n=1, max_n=3)
    assert ng.lookup([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert ng.lookup([5, 1, 2, 7, 8, 1, 2], 2) == [7, 8]  # latest match of the longest suffix
    assert ng.lookup([1, 2, 3], 3) == []
    assert ng.lookup([7], 3) == [] and ng.lookup([], 3) == []
    # Token 256's bytes followed by token 0's hold token 1's bytes, straddling the two: no match.
    assert NgramProposer(1, 1).lookup([256, 0, 5, 1], 2) == []
    assert NgramProposer(1, 1).lookup([256, 1, 0, 5, 1], 2) == [0, 5]
    # The longest suffix's match outside the last NGRAM_WINDOW tokens beats a shorter one inside.
    far = [1, 2, 3, 40, 41] + [9] * 2000 + [2, 3, 60] + [1, 2, 3]
    assert ng.lookup(far, 2) == [40, 41] and ng.lookup(far[:-1], 2) == [3, 40]


def test_ngram_lookup_equals_the_plain_scan():
    """The byte search (the last NGRAM_WINDOW tokens first) == the scan of every start, over
    random sequences of 2- to 50-token vocabularies crossing the window, large token ids too."""
    scan_lookup = benchmark_module("lookup").scan_lookup  # the plain scan (the benchmark's baseline)
    rng = random.Random(0)
    for trial in range(300):
        vocab = rng.choice([2, 3, 5, 50, 1 << 40])
        L = rng.choice([rng.randrange(12), rng.randrange(1500)])
        tokens = [rng.randrange(vocab) for _ in range(L)]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        k = rng.randrange(1, 6)
        got = NgramProposer(min_n, max_n).lookup(tokens, k)
        assert got == scan_lookup(tokens, k, min_n, max_n), (trial, vocab, L, min_n, max_n, k)


def test_common_prefix_equals_the_plain_loop():
    """The draft cache's reuse: the longest common prefix by slice compares == an element loop,
    for divergence anywhere (before and inside the last 64), none, and limits from -1 up."""
    from specmoe_ray.spec.proposer import common_prefix

    scan_prefix = benchmark_module("lookup").scan_prefix
    rng = random.Random(1)
    for trial in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(300))]
        b = list(a)
        if b and rng.random() < 0.8:
            b[rng.randrange(len(b))] += 1 + rng.randrange(2)
        b += [rng.randrange(3) for _ in range(rng.randrange(5))]
        limit = rng.randrange(-1, min(len(a), len(b)) + 1)
        assert common_prefix(a, b, limit) == scan_prefix(a, b, limit), (trial, limit)
    a = list(range(200))
    for limit in (1, 64, 65, 100, 200):  # every divergence around the last 64's boundary
        assert common_prefix(a, list(a), limit) == limit
        for i in range(max(0, limit - 70), limit):
            assert common_prefix(a, a[:i] + [-1] + a[i + 1 :], limit) == i, (limit, i)


def test_ngram_proposal_tensors_and_host_lists():
    """Prompt lookup's proposal, packed into one copy: the padded drafts, their counts, one-hot
    ids and probabilities, and the drafts as host lists (which the engine and verification read
    instead of the device); a sampling row's verification draws as many uniforms either way."""
    histories = [[1, 2, 3, 9, 1, 2, 3], [5, 6], [4, 4, 4, 4], [7, 8, 7]]
    wants = [3, 3, 2, 0]
    reqs = [DraftRequest(str(i), h, k) for i, (h, k) in enumerate(zip(histories, wants))]
    proposal = NgramProposer(min_n=1, max_n=3).propose(reqs)
    drafted = [[9, 1, 2], [], [4], []]  # (the 4s' match ends at the history's end)
    assert proposal.host_tokens == drafted
    want = torch.tensor([[9, 1, 2], [-1, -1, -1], [4, -1, -1], [-1, -1, -1]])
    assert torch.equal(proposal.tokens, want)
    assert proposal.num_draft.tolist() == [3, 0, 1, 0]
    assert torch.equal(proposal.sparse_ids, want[..., None])
    assert torch.equal(proposal.sparse_probs, (want >= 0).float()[..., None])

    params = [SamplingParams(temperature=0.9), GREEDY, SamplingParams(temperature=0.7), GREEDY]
    logits = torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(0))
    logits[0, 0, 9] = logits[2, 0, 4] = 8.0  # (drafts likely kept)
    results = []
    for host in (proposal.host_tokens, None):
        gens = [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(6), None]
        p = dataclasses.replace(proposal, tokens=proposal.tokens.clone(), host_tokens=host)
        result = rejection.verify(logits, p, params, gens)
        results.append((result, [g.get_state() if g else None for g in gens]))
    (a, states_a), (b, states_b) = results
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)
    assert all(x is None or torch.equal(x, y) for x, y in zip(states_a, states_b))


# -- losslessness of sampling, end to end ---------------------------------------------------

V = 16
PROMPT = [3, 7, 1]
TEMPERATURE, TOP_K = 0.8, 12
N = 20_000


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target = make_checkpoint(str(root / "target"), "qwen2_moe", seed=11, vocab_size=V)
    draft = make_checkpoint(str(root / "draft"), "llama", seed=99, vocab_size=V)
    return target, draft


def exact_first_two(target: str) -> np.ndarray:
    """P(t1, t2 | prompt) in float64 from transformers' model: [V, V]."""
    return exact_pair_probs(hf_next_logits(target), PROMPT, V, TEMPERATURE, TOP_K)


def sample_first_two(target: str, draft: str) -> np.ndarray:
    counts, stats = sample_pairs(target, draft, PROMPT, V, TEMPERATURE, TOP_K, N)
    assert 0.05 < stats["acceptance_rate"] < 0.9, f"the draft should be a different distribution: {stats}"
    return counts


def test_sampling_follows_target_distribution(tiny_pair):
    target, draft = tiny_pair
    stat, p = chi2_pvalue(sample_first_two(target, draft), exact_first_two(target))
    assert p > 1e-3, f"chi-square {stat:.1f}, p={p:.3g} over {N} samples of (t1, t2)"


def test_broken_rule_is_detected(tiny_pair, monkeypatch):
    """Resampling from p instead of the residual max(0, p - q) is a classic bug: the test sees it."""
    target, draft = tiny_pair
    monkeypatch.setattr(rejection, "_recovered_or_bonus_probs", lambda p, ids, probs: p)
    stat, p = chi2_pvalue(sample_first_two(target, draft), exact_first_two(target))
    assert p < 1e-6, f"broken rule not detected: chi-square {stat:.1f}, p={p:.3g}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_draft_rows_follow_their_own_parameters_only(device):
    """A draft model's draw per row (`proposer.sample_drafts`): a seeded row drafts the same token
    from the same sparse distribution alone or beside greedy rows, rows with top-k / top-p and
    other seeds (each row's path follows its own parameters); the token lies in its support with
    mass; greedy rows draft their argmax, one-hot; an all-sampled batch equals its rows alone. On
    GPUs the rows of temperature only take `triton_sampling.top_n`."""
    from specmoe_ray.spec.proposer import DraftRequest, sample_drafts

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU")
    V, top_n = 60, 8
    logits = (torch.randn(5, V, generator=torch.Generator().manual_seed(3)) * 2).to(device)
    reqs = [
        DraftRequest("a", [1], 1, temperature=0.8, seed=11),
        DraftRequest("b", [1], 1, temperature=0.0),
        DraftRequest("c", [1], 1, temperature=1.2, top_k=5, top_p=0.9, seed=12),
        DraftRequest("d", [1], 1, temperature=1.0, seed=13),
        DraftRequest("e", [1], 1, temperature=0.9, top_p=0.7, seed=14),
    ]
    tokens, ids, probs = sample_drafts(logits, reqs, top_n, {})
    for i, q in enumerate(reqs):
        t1, i1, p1 = sample_drafts(logits[i : i + 1], [q], top_n, {})
        assert t1[0] == tokens[i], q
        if q.temperature > 0:  # (a greedy row alone: its argmax only, below)
            assert torch.equal(i1[0], ids[i]) and torch.equal(p1[0], probs[i]), q
        assert probs[i][ids[i] == tokens[i]].sum() > 0
    assert tokens[1] == logits[1].argmax() and ids[1, 0] == tokens[1] and probs[1, 0] == 1.0
    assert (ids[2] >= 0).sum() <= 5  # top-k 5
    plain = [0, 3]  # every row samples from its temperature alone: the batch without bookkeeping
    t2, i2, p2 = sample_drafts(logits[plain], [reqs[i] for i in plain], top_n, {})
    assert torch.equal(t2, tokens[plain]) and torch.equal(i2, ids[plain]) and torch.equal(p2, probs[plain])
    greedy = [1, 1]  # no row samples: the argmax alone (the one-hot made once, `DraftBuffers`)
    t3, i3, p3 = sample_drafts(logits[greedy], [reqs[i] for i in greedy], top_n, {})
    assert torch.equal(t3, logits[greedy].argmax(-1)) and i3 is None and p3 is None


def test_chain_indices_slice_where_every_row_drafts():
    """The draft chain's indices (`proposer.chain_indices`): None (a slice, no gather or scatter)
    where a position's rows are the whole batch or the previous position's rows; else the rows'
    places in the batch and among the previous position's rows, which `rows_of` and
    `DraftBuffers.put` use. Greedy buffers keep the drafts only and give their point masses
    (-1 and 0 where a row drafted nothing); sampled ones keep each position's distribution."""
    from specmoe_ray.spec.proposer import DraftBuffers, DraftRequest, chain_indices, rows_of

    index, keep = chain_indices([[0, 1, 2], [0, 1, 2], [0, 2]], 3, "cpu")
    assert index[:2] == [None, None] and index[2].tolist() == [0, 2]
    assert keep[:2] == [None, None] and keep[2].tolist() == [0, 2]
    index, keep = chain_indices([[1, 3], [1, 3]], 4, "cpu")
    assert index[0].tolist() == [1, 3] and index[1].tolist() == [1, 3] and keep == [None, None]
    picked = torch.tensor([7, 9])
    assert rows_of(picked, None) is picked and rows_of(picked, torch.tensor([1])).tolist() == [9]
    greedy = DraftBuffers([DraftRequest(str(b), [1], 2) for b in range(4)], 2, 8, 60, "cpu")
    greedy.put(index[1], 1, picked, None, None)
    assert greedy.tokens[:, 1].tolist() == [-1, 7, -1, 9] and (greedy.tokens[:, 0] == -1).all()
    ids, probs = greedy.sparse()
    assert ids.shape == probs.shape == (4, 2, 1) and torch.equal(ids[..., 0], greedy.tokens)
    assert probs[..., 0].tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    reqs = [DraftRequest(str(b), [1], 2, temperature=1.0 if b == 3 else 0.0) for b in range(4)]
    sampled = DraftBuffers(reqs, 2, 8, 60, "cpu")
    dist = torch.arange(16).view(2, 8), torch.full((2, 8), 0.125)
    sampled.put(index[1], 0, picked, *dist)
    ids, probs = sampled.sparse()
    assert ids.shape == probs.shape == (4, 2, 8) and torch.equal(ids[[1, 3], 0], dist[0])
    assert torch.equal(probs[[1, 3], 0], dist[1]) and (ids[[0, 2]] == -1).all() and (probs[:, 1] == 0).all()
    sampled.put(index[1], 1, picked, None, None)  # a position where only greedy rows draft
    ids, probs = sampled.sparse()
    assert ids[[1, 3], 1, 0].tolist() == [7, 9] and (ids[[1, 3], 1, 1:] == -1).all()
    assert probs[[1, 3], 1].sum(-1).tolist() == [1.0, 1.0] and (probs[[0, 2], 1] == 0).all()


def test_draft_cache_reuses_a_growing_list_as_a_copied_one(checkpoints):
    """The draft cache keeps a sequence's token list by reference (sequences only grow): fed a
    list that grows in place, a proposer feeds the same tokens and drafts the same as one fed
    fresh copies, while steps accept none, some or all drafts; a list changed under it (not
    grown) is compared whole, as a copy would be. A third proposer leaves its drafts unread
    (`propose(read=False)`, the engine's `DEFER_DRAFT_READ`): its cache entries, completed at its
    next call after the lists grew, feed and draft the same."""
    from specmoe_ray.models.loader import load_trunk
    from specmoe_ray.spec.proposer import DraftModelProposer

    path = checkpoints("qwen3")
    a, b, c = (DraftModelProposer(load_trunk(path), 2, 128, step_graphs="off") for _ in range(3))
    rng = random.Random(5)
    grown = [[3, 1, 4, 1, 5], [9, 2, 6]]
    for step in range(16):
        if step % 4 == 3:  # steps without drafts (k = 0): tokens the proposers never saw
            for t in grown:
                t += [rng.randrange(50) for _ in range(rng.randrange(1, 4))]
            continue
        reqs = [DraftRequest(f"s{i}", t, 3) for i, t in enumerate(grown)]
        copies = [DraftRequest(f"s{i}", list(t), 3) for i, t in enumerate(grown)]
        pa, pb = a.propose(reqs), b.propose(copies)
        pc = c.propose([DraftRequest(f"s{i}", t, 3) for i, t in enumerate(grown)], read=False)
        assert pa.host_tokens == pb.host_tokens and a.num_fed_tokens == b.num_fed_tokens, step
        assert pc.host_tokens is None and pc.host_num_draft == [3, 3]
        assert pc.tokens.tolist() == pa.host_tokens and c.num_fed_tokens == a.num_fed_tokens, step
        for t, drafts in zip(grown, pa.host_tokens):
            keep = rng.randrange(4)  # accepted drafts, then one more token
            t += drafts[:keep] + [rng.randrange(50)]
    fed = a.num_fed_tokens
    grown[0][:] = [90] * len(grown[0])  # the same list changed, not grown: all of it fed again
    a.propose([DraftRequest("s0", grown[0], 1)])
    assert a.num_fed_tokens - fed == len(grown[0])
