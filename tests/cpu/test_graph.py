"""The static-shape step path (`engine/graph.py`) on CPU: the padded buckets a CUDA graph replays
give the same tokens, the same expert load and the same random draws as the plain path.

The capture itself needs a GPU (tests/gpu); everything it replays (bucketing, padding, the
one-buffer upload, the scratch slot for padding, the masked load counters) runs here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, generate_stepwise, hf_greedy

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.engine.graph import MIN_KV_BUCKET, bucket

NEW = 20
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
# Ragged prompts, so decode steps mix sequence lengths and some steps mix prefill with decode.
RAGGED = [
    *PROMPTS,
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
    [4, 4],
]


def run(path: str, mode: str, prompts, params, **kwargs):
    with Engine.from_pretrained(path, step_graphs=mode, max_model_len=128, **kwargs) as engine:
        outs = engine.generate(prompts, params)
        keys = sorted(engine.graphs._static) if engine.graphs is not None else []
        draft_graphs = getattr(engine.proposer, "graphs", None)
        if draft_graphs is not None:  # a draft model's steps run padded too: record its buckets
            keys += [("draft", *key) for key in sorted(draft_graphs._static)]
        return [o.token_ids for o in outs], engine.expert_load(), engine.stats(), keys


def test_bucket():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, 16]
    assert bucket(3, 12) == 4 and bucket(9, 12) == 12  # the cap is the last bucket
    assert bucket(10, 4096, MIN_KV_BUCKET) == MIN_KV_BUCKET


@pytest.mark.parametrize("draft", [None, "self", "ngram"])
def test_padded_steps_equal_plain_steps_and_transformers(checkpoints, draft):
    path = checkpoints("qwen3_moe")
    kwargs = {"draft": path if draft == "self" else draft, "num_speculative_tokens": 3}
    ref = hf_greedy(path, RAGGED, NEW)
    plain, plain_load, plain_stats, no_keys = run(path, "off", RAGGED, GREEDY, **kwargs)
    padded, padded_load, padded_stats, keys = run(path, "padded", RAGGED, GREEDY, **kwargs)
    assert plain == padded == ref
    assert no_keys == [] and keys, "the padded path never ran"
    target_keys = [key for key in keys if key[0] != "draft"]
    # 5 sequences run in the 8-sequence bucket: three padded sequences per step.
    assert {B for B, _, _ in target_keys} >= {8}
    if draft is not None:
        assert {Tq for _, Tq, _ in target_keys} & {2, 3, 4}, keys  # verify steps ran padded too
    if draft == "self":  # the draft model's catch-up (<= k + 1 tokens) and 1-token steps too
        assert {Tq for _, _, Tq, _ in keys[len(target_keys) :]} >= {1, 2}, keys
    # Padding is computed but never counted: the load is the plain path's, pair for pair.
    assert padded_load == plain_load
    assert padded_stats["expert_tokens_per_shard"] == plain_stats["expert_tokens_per_shard"]
    assert padded_stats["acceptance_rate"] == plain_stats["acceptance_rate"]


def test_upload_writes_the_same_buffer_row_by_row_and_all_at_once(checkpoints, monkeypatch):
    """A step's metadata (`StepGraphs._upload`): written block by block for all sequences at once
    (`_fill_rows`, more than `UPLOAD_LOOP_ROWS` sequences) it is the per-row loop's buffer, entry
    for entry, for ragged feeds, logits wanted from any place, padded sequences and positions past
    the cache; the logits rows are a prefix (no gather) exactly where they are 0 .. M-1."""
    import random

    from specmoe_ray.engine import graph as graph_module

    with Engine.from_pretrained(checkpoints("qwen3_moe"), step_graphs="padded", max_model_len=128) as engine:
        graphs = engine.graphs
        rng = random.Random(0)
        prefixes = 0
        for trial in range(200):
            B, Tq = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4])
            feeds = [
                [rng.randrange(1, 500) for _ in range(rng.randint(1, Tq))] for _ in range(rng.randint(1, B))
            ]
            starts = [rng.randrange(0, 127) for _ in feeds]
            slots = [rng.randrange(0, 8) for _ in feeds]
            logits_from = [rng.choice([0, len(f) - 1, rng.randrange(len(f))]) for f in feeds]
            buffers = []
            for loop_rows in (10**6, 0):
                monkeypatch.setattr(graph_module, "UPLOAD_LOOP_ROWS", loop_rows)
                graphs._host.fill_(-7)
                M = graphs._upload(B, Tq, feeds, starts, slots, logits_from)
                buffers.append((M, graphs._rows_from_zero, graphs._host.clone()))
            (m1, zero1, h1), (m2, zero2, h2) = buffers
            assert m1 == m2 and zero1 == zero2 and torch.equal(h1, h2), trial
            N = B * Tq
            rows = h1[5 * N : 5 * N + m1].tolist()
            assert zero1 == (rows == list(range(m1))), trial
            prefixes += zero1
        assert 0 < prefixes < 200


def test_padded_sampling_draws_the_same_tokens(checkpoints):
    """Seeded sampling with a draft: same verification inputs, same random draws, same tokens."""
    path = checkpoints("qwen3_moe")
    params = [
        SamplingParams(max_tokens=NEW, temperature=t, top_p=0.9, seed=i)
        for i, t in enumerate((0.7, 1.0, 1.3))
    ]
    outs = [
        run(path, mode, PROMPTS, params, draft=path, num_speculative_tokens=2)[0]
        for mode in ("off", "padded")
    ]
    assert outs[0] == outs[1]


def test_padded_steps_with_mla_and_long_contexts(tmp_path):
    """DeepSeek-V3 (MLA cache) through the padded path, past one key bucket (64 -> 128 keys)."""
    from test_deepseek import make_deepseek

    path = make_deepseek(str(tmp_path / "v3"), "deepseek_v3")
    prompts = [list(range(1, 50)), [7, 8, 9]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = hf_greedy(path, prompts, 40)
    plain, _, _, _ = run(path, "off", prompts, params, draft="ngram", num_speculative_tokens=2)
    padded, _, _, keys = run(path, "padded", prompts, params, draft="ngram", num_speculative_tokens=2)
    assert plain == padded == ref
    assert {L for _, _, L in keys} == {64, 128}, keys


def test_prompts_prefill_in_static_steps_unless_mostly_padding(checkpoints):
    """Prompts of up to `graph_prompt_tokens` prefill in prompt buckets (Tq a power of two), alone
    or with prompts of like length; a prompt joining decoding sequences, which it would pad to
    its own length, prefills eagerly. Tokens equal transformers' either way."""
    path = checkpoints("qwen3_moe")
    prompts = [list(range(1, 30)), list(range(3, 27))]  # 29 and 24 tokens: one 32-token bucket
    short = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    ref = hf_greedy(path, prompts + short, NEW)
    with Engine.from_pretrained(path, step_graphs="padded", max_model_len=128) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref[:2]
        assert engine.metrics.num_static_steps == engine.metrics.num_steps  # the prefill too
        assert (2, 32, 64) in engine.graphs._static
    with Engine.from_pretrained(path, step_graphs="padded", max_model_len=128) as engine:
        ids = [engine.add_request(p, GREEDY) for p in short]
        done = {}
        for _ in range(3):  # their prefill, then two decode steps
            done.update({o.request_id: o for o in engine.step() if o.finished})
        before = engine.metrics.num_static_steps
        ids.insert(0, engine.add_request(prompts[0], GREEDY))
        engine.step()  # 29 prompt tokens + 3 decoded ones would fill 32 of 4 x 32 padded slots
        assert engine.metrics.num_static_steps == before
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        assert [done[i].token_ids for i in ids] == ref[:1] + ref[2:]
    off = dict(step_graphs="padded", graph_prompt_tokens=0, max_model_len=128)
    with Engine.from_pretrained(path, **off) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref[:2]
        assert engine.metrics.num_static_steps == engine.metrics.num_steps - 1
    with pytest.raises(ValueError, match="graph_prompt_tokens"):
        Engine.from_pretrained(path, graph_prompt_tokens=-1)


def test_step_graphs_setting_is_checked(checkpoints):
    with pytest.raises(ValueError, match="step_graphs must be"):
        Engine.from_pretrained(checkpoints("qwen3_moe"), step_graphs="always")


def replicate_then_kill(args) -> dict:
    """`generate_stepwise` events: at step 3 a re-placement with every expert on both of 2
    shards (each expert's pairs alternate between its replicas), at step 6 the last shard
    actor killed (the group re-forms and the step replays)."""
    import ray

    from specmoe_ray.moe.placement import PlacementPlan

    owner = {layer: tuple((0, 1) for _ in range(args.num_experts)) for layer in args.moe_layers}
    replicated = PlacementPlan(2, args.num_experts, owner)
    return {
        3: lambda e: e.reshard(plan=replicated),
        6: lambda e: ray.kill(e.shard_group.actors[-1], no_restart=True),
    }


@pytest.mark.parametrize("local_shard,kernel", [(False, False), (True, False), (True, True)])
def test_static_exchange_with_shards_replicas_and_a_killed_shard(
    ray_cluster, checkpoints, local_shard, kernel, monkeypatch
):
    """Padded static steps over 2 expert shards (one header per forward, fixed-size all_to_alls):
    tokens equal transformers' through a re-placement onto replicated experts and a killed
    shard (re-formed, step replayed); every routed pair is computed exactly once, padding never.
    local_shard: shard 0 is the engine's own process (rank 0 serves experts too). kernel: rank 0
    packs the exchanges with the GPUs' Triton kernel (`pack_pairs`, on Triton's interpreter)."""
    from test_shards import pinned

    from specmoe_ray.models.loader import read_config
    from specmoe_ray.moe import triton_dispatch

    if kernel:
        if not triton_dispatch.INTERPRETED:
            pytest.skip("runs the kernel on Triton's interpreter (CPU-only machines)")
        monkeypatch.setattr(triton_dispatch, "ON_CPU", True)
        calls = []
        pack = triton_dispatch.pack_pairs
        monkeypatch.setattr(triton_dispatch, "pack_pairs", lambda *a: calls.append(1) or pack(*a))

    path = checkpoints("qwen3_moe")
    args, _ = read_config(path)
    ref = hf_greedy(path, RAGGED, NEW)
    opts = pinned(2, collective_timeout_s=20)
    opts.local_shard = local_shard
    opts.cuda_graphs = True  # (captures on GPUs only)
    with Engine.from_pretrained(
        path, num_shards=2, draft="ngram", step_graphs="padded", max_model_len=128, shard_options=opts
    ) as engine:
        got = generate_stepwise(engine, RAGGED, GREEDY, at=replicate_then_kill(args))
        stats = engine.stats()
        routed = engine.shard_group.dispatch.load.snapshot()
        computed = engine.shard_group.computed_counts()
        assert engine.graphs._static, "no static step ran"
        assert len(engine.shard_group.actors) == (1 if local_shard else 2)
        assert [info.get("local", False) for info in stats["shards"]["shards"]] == [local_shard, False]
    assert got == ref
    assert not kernel or calls, "the packing kernel never ran"
    assert stats["num_recoveries"] == 1
    # Counters restart with each group: after the last re-form, replicas split each expert's pairs.
    assert sum(stats["expert_tokens_per_shard"]) == sum(sum(c) for c in routed.values())
    split = []
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            per_replica = [c.get(layer, [0] * args.num_experts)[e] for c in computed]
            assert sum(per_replica) == routed[layer][e], (layer, e)
            split.append(min(per_replica) / routed[layer][e] if routed[layer][e] >= 4 else None)
    # Replicas alternate by token position and exchange: busy experts' pairs are split between
    # them (an expert always picked by the same position every other step can still land on one).
    busy = [x for x in split if x is not None]
    assert busy and sum(x > 0 for x in busy) >= 0.75 * len(busy), split
    assert sum(busy) / len(busy) > 0.2, split


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_deferred_combine_gives_the_tokens_of_transformers(checkpoints, monkeypatch, arch):
    """`fused.DEFER_COMBINE`: static steps leave an MoE block's output uncombined until the next
    layer's add + norm (`combine_add_rms_norm`), or the final norm; Qwen2-MoE's shared expert
    keeps the plain combine. Ragged batches with n-gram speculation == transformers, and every
    MoE layer without a shared expert deferred its combine."""
    from specmoe_ray.models import fused

    monkeypatch.setattr(fused, "DEFER_COMBINE", True)
    calls = []
    fn = fused.combine_add_rms_norm
    monkeypatch.setattr(fused, "combine_add_rms_norm", lambda *a: calls.append(1) or fn(*a))
    path = checkpoints(arch)
    got, _, stats, _ = run(path, "padded", RAGGED, GREEDY, draft="ngram")
    assert got == hf_greedy(path, RAGGED, NEW)
    assert stats["num_static_steps"] > 0
    assert bool(calls) == (arch != "qwen2_moe")


def test_one_kernel_router_with_shards_counts_the_same_load(ray_cluster, checkpoints, monkeypatch):
    """`ROUTER_TOPK` + `ROUTER_TOPK_NORM` (Triton's interpreter) with 2 expert shards (the
    engine's process serving one): decode and verify steps of <= 4 tokens route in one kernel
    that counts into the exchange's load counters, padding masked: the same tokens as
    transformers and the same expert load as the plain routing path."""
    from test_shards import pinned

    from specmoe_ray.models import triton_kernels

    if not triton_kernels.INTERPRETED:
        pytest.skip("runs the kernel on Triton's interpreter (CPU-only machines)")
    path = checkpoints("qwen3_moe")
    opts = pinned(2, collective_timeout_s=20)
    opts.local_shard = True
    prompts = [PROMPTS[0]]  # one sequence: its steps have <= 4 tokens
    args = dict(draft="ngram", num_shards=2, shard_options=opts)
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK", False)  # the plain routing path first
    plain, plain_load, _, _ = run(path, "padded", prompts, GREEDY, **args)
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK", True)
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK_NORM", True)
    calls = []
    fn = triton_kernels.router_topk
    monkeypatch.setattr(triton_kernels, "router_topk", lambda *a: calls.append(a[6] is not None) or fn(*a))
    got, load, _, _ = run(path, "padded", prompts, GREEDY, **args)
    assert calls and all(calls)  # counted inside the kernel
    assert got == plain == hf_greedy(path, prompts, NEW)
    assert load == plain_load and sum(map(sum, load.values())) > 0


def test_decode_steps_run_ahead_emit_the_same_tokens(checkpoints):
    """`decode_steps`: static decode steps with nothing to verify run up to 4 steps per host sync,
    each fed the last one's tokens on the device. Greedy tokens equal transformers' and the
    one-step-per-sync engine's through a stop token and a max_tokens mid-run, a sequence whose
    cache room ends first (finishes by length) and a request joining mid-run; seeded sampling
    draws the same tokens; steps count each run-ahead step."""
    path = checkpoints("qwen3_moe")
    ref = hf_greedy(path, RAGGED, NEW)
    stop = ref[1][6]  # sequence 1 stops on its 7th token (inside its second run-ahead)
    first = ref[1].index(stop)
    params = [
        GREEDY,
        SamplingParams(max_tokens=NEW, temperature=0.0, stop_token_ids=[stop]),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),  # ends mid-run
        GREEDY,
        GREEDY,
    ]
    want = [ref[0], ref[1][: first + 1], ref[2][:10], ref[3], ref[4]]

    def generate(decode_steps: int, late: list[int] | None = None, **kwargs):
        with Engine.from_pretrained(
            path, step_graphs="padded", decode_steps=decode_steps, max_model_len=128, **kwargs
        ) as engine:
            ids = [engine.add_request(p, q) for p, q in zip(RAGGED, params)]
            done, sizes, calls = {}, [], 0
            while engine.has_unfinished():
                calls += 1
                if calls == 4 and late is not None:  # joins while the others decode
                    ids.append(engine.add_request(late, GREEDY))
                for out in engine.step():
                    sizes.append(len(out.new_token_ids))
                    if out.finished:
                        done[out.request_id] = out
            return [done[i] for i in ids], engine.stats(), sizes, calls

    one, one_stats, one_sizes, one_calls = generate(1, late=[9, 8, 7])
    four, four_stats, four_sizes, four_calls = generate(4, late=[9, 8, 7])
    late_ref = hf_greedy(path, [[9, 8, 7]], NEW)
    assert [o.token_ids for o in one] == [o.token_ids for o in four] == want + late_ref
    assert [o.finish_reason for o in four] == ["length", "stop", "length", "length", "length", "length"]
    assert max(one_sizes) == 1 and max(four_sizes) == 4
    assert four_calls < one_calls / 2, (four_calls, one_calls)  # fewer host round trips
    # Each run-ahead step counts as a step: at least one per token of the longest sequence.
    assert four_stats["num_steps"] >= NEW > four_calls
    assert four_stats["num_static_steps"] > four_calls

    # Cache room: 24 prompt tokens + 20 wanted, 40 positions: the sequence stops by length at 40
    # (run-ahead never writes past the cache), the short one decodes on.
    room = dict(max_model_len=40)
    prompts = [RAGGED[3], [4, 4]]
    with Engine.from_pretrained(path, step_graphs="padded", decode_steps=4, **room) as engine:
        got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert got == [hf_greedy(path, prompts[:1], 16)[0], hf_greedy(path, prompts[1:], NEW)[0]]

    seeded = [SamplingParams(max_tokens=NEW, temperature=1.0, top_p=0.9, seed=i) for i in range(3)]
    draws = []
    for n in (1, 4):
        with Engine.from_pretrained(path, step_graphs="padded", decode_steps=n, max_model_len=128) as engine:
            draws.append([o.token_ids for o in engine.generate(PROMPTS, seeded)])
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="decode_steps"):
        Engine.from_pretrained(path, decode_steps=0)


def test_decode_run_ahead_over_shards_survives_a_killed_shard(ray_cluster, checkpoints):
    """Run-ahead decode steps over 2 expert shards (padded static exchanges): a shard killed
    just before a run-ahead step (tokens only on the device) is detected in that step, the group
    re-forms and the step is replayed from the device's tokens: every request finishes with
    transformers' tokens."""
    import ray
    from test_shards import pinned

    path = checkpoints("qwen3_moe")
    ref = hf_greedy(path, RAGGED, NEW)
    opts = pinned(2, collective_timeout_s=20)
    with Engine.from_pretrained(
        path, num_shards=2, step_graphs="padded", decode_steps=4, max_model_len=128, shard_options=opts
    ) as engine:
        run, ahead = engine.graphs.run, []

        def run_killing_once(*args, fed=None):
            if fed is not None:
                ahead.append(1)
                if len(ahead) == 3:  # the third run-ahead step: kill a shard first
                    ray.kill(engine.shard_group.actors[-1], no_restart=True)
            return run(*args, fed=fed)

        engine.graphs.run = run_killing_once
        got = [o.token_ids for o in engine.generate(RAGGED, GREEDY)]
        stats = engine.stats()
    assert got == ref
    assert len(ahead) > 6 and stats["num_recoveries"] == 1  # ran ahead after the recovery too
