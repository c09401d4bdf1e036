"""Trunk replicas (`ShardOptions.replicate_trunk`): every rank runs the trunk, each its own
experts, one all_reduce per MoE layer; real Ray actors and a gloo group on CPUs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import PROMPTS, generate_stepwise, hf_greedy
from test_graph import RAGGED, replicate_then_kill
from test_shards import pinned

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.models.loader import read_config
from specmoe_ray.moe.experts import ExpertStore
from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.moe.replica import ReplicaDispatch, pack_batch, unpack_batch

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def replicas(num_shards: int, **kw):
    opts = pinned(num_shards, collective_timeout_s=30, **kw)
    opts.replicate_trunk = True
    return opts


@pytest.mark.parametrize(
    "arch,num_shards,mode",
    [
        ("qwen3_moe", 2, "partial"),
        ("qwen2_moe", 3, "partial"),
        ("mixtral", 2, "exact"),
        ("qwen3_moe", 3, "split"),
        ("qwen3_moe", 2, "heads"),
        ("qwen2_moe", 2, "heads"),  # (q/k/v biases, a shared expert)
    ],
)
def test_trunk_replicas_give_the_tokens_of_transformers(ray_cluster, checkpoints, arch, num_shards, mode):
    """Prompts, then decode and n-gram verify steps, eager and padded (the static batches CUDA
    graphs capture): the same greedy tokens as transformers, with float32 partial sums, the
    pairs' outputs summed (`replica_exact`), or every expert split by its intermediate size
    (`replica_split`), or every rank half of the attention heads and their KV cache, each
    layer's attention output summed too (`replica_attention` "heads"). Each actor holds the
    trunk and only its own experts (split: a third of every expert); the engine's process holds
    shard 0."""
    path = checkpoints(arch)
    args, _ = read_config(path)
    ref = hf_greedy(path, RAGGED, NEW)
    options = {
        "replica_exact": mode == "exact",
        "replica_split": "intermediate" if mode == "split" else "experts",
        "replica_peer_sum": 64 if mode == "split" else 0,  # GPUs only: CPUs keep the all_reduce
        "replica_attention": "heads" if mode == "heads" else "replicated",
    }
    for step_graphs in ("off", "padded"):
        with Engine.from_pretrained(
            path,
            num_shards=num_shards,
            draft="ngram",
            step_graphs=step_graphs,
            max_model_len=128,
            shard_options=replicas(num_shards, **options),
        ) as engine:
            got = [o.token_ids for o in engine.generate(RAGGED, GREEDY)]
            stats = engine.stats()
            static = stats["num_static_steps"]
            shards = stats["shards"]["shards"]
            kv_heads = engine.cache.kv[0].shape[2]  # [slots, 2, heads, length, head_dim]
            if mode == "heads":  # its count is fixed: a reshard to another is refused, nothing torn down
                with pytest.raises(ValueError, match="over 2 shards: the count cannot change"):
                    engine.reshard(3)
                assert engine.generate(RAGGED[:1], GREEDY)[0].token_ids == ref[0]
        assert kv_heads == args.num_kv_heads // (num_shards if mode == "heads" else 1)
        assert got == ref, step_graphs
        assert (static > 0) == (step_graphs == "padded")
        assert [s.get("local", False) for s in shards] == [True] + [False] * (num_shards - 1)
        assert all(s["trunk"] for s in shards[1:])
        assert all(list(s["phases"]) == ["experts", "trunk", "cache"] for s in shards[1:])  # (started)
        assert all(sorted(s["load_times"]) == ["copy", "read"] for s in shards)  # (where loads go)
        held = [sum(len(v) for v in s["held"].values()) for s in shards]
        every = len(args.moe_layers) * args.num_experts
        assert held == [every] * num_shards if mode == "split" else sum(held) == every and all(held)
        assert all(c > 0 for c in stats["shards"]["tokens_per_shard"])
        assert not dist.is_initialized()


@pytest.mark.parametrize("attention", ["replicated", "heads"])
def test_replicas_refilled_after_a_replicated_plan_and_a_killed_shard(
    ray_cluster, checkpoints, attention, monkeypatch
):
    """Mid-generation: a re-placement with every expert on both shards (each pair computed by
    one replica, by position and rotation), then a killed shard (the group re-forms and the
    step replays). New replicas start with empty KV caches and are refilled from the running
    sequences: the tokens still equal transformers'. heads: the new actor's half of the heads'
    caches is refilled (the engine keeps its own half's). The engine loads its own experts
    twice (at the start, for the re-placement); the re-form after the kill keeps them."""
    from specmoe_ray.models import loader

    real, loads = loader.load_experts, []

    def counted(*a, **kw):
        loads.append(a[1])  # the assignment
        return real(*a, **kw)

    monkeypatch.setattr(loader, "load_experts", counted)
    path = checkpoints("qwen3_moe")
    args, _ = read_config(path)
    ref = hf_greedy(path, RAGGED, NEW)
    options = replicas(2, replica_attention=attention)
    with Engine.from_pretrained(
        path, num_shards=2, draft="ngram", step_graphs="padded", max_model_len=128, shard_options=options
    ) as engine:
        got = generate_stepwise(engine, RAGGED, GREEDY, at=replicate_then_kill(args))
        stats = engine.stats()
        engine.reshard(2)  # refilled nothing (no running sequence); nothing routed since
        assert engine.stats()["expert_tokens_per_shard"] == [0, 0]
    assert got == ref
    assert stats["num_recoveries"] == 1
    # start, the re-placement (and the last reshard, to half the experts again); not the re-form
    assert len(loads) == 3 and loads[0] == loads[2] != loads[1], loads


def test_every_pair_is_computed_by_exactly_one_rank():
    """Ownership over 3 ranks with replicated experts (two and three copies): each (token,
    expert) pair is owned by exactly one rank, and over forwards the rotation spreads a
    replicated expert's pairs over all of its replicas."""
    E, A, T = 6, 2, 5
    owner = {0: ((0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2))}
    plan = PlacementPlan(3, E, owner)
    store = ExpertStore({})
    ranks = [ReplicaDispatch(plan, store, r, "cpu") for r in range(3)]
    ids = torch.tensor([[3, 5], [5, 4], [0, 3], [1, 2], [5, 3]]).reshape(-1)
    seen: dict[int, set[int]] = {e: set() for e in range(E)}
    for _ in range(4):
        for d in ranks:
            d.begin_forward()
        owned = torch.stack([d._owned(0, ids, A) for d in ranks]).long()  # [ranks, T * A]
        assert owned.sum(0).tolist() == [1] * (T * A)
        for p, e in enumerate(ids.tolist()):
            rank = int(owned[:, p].argmax())
            assert rank in owner[0][e]
            seen[e].add(rank)
    assert all(seen[e] == set(owner[0][e]) for e in (3, 5)), seen


@pytest.mark.parametrize("lookup", ["held[index]", "mask"])
def test_partial_sums_match_float64(lookup):
    """`partial_combine` (and `owned_rows`, the exact mode's masking): the pairs computed here,
    each product rounded to bf16 as `fused.combine` rounds it, summed == the same sum in
    float64; rows of pairs computed elsewhere (garbage here) never reach it. Then the
    deferred rounding (`Pending` without weights): `sum_add_rms_norm` == add_rms_norm of the
    sum rounded to bf16."""
    from specmoe_ray.models import fused
    from specmoe_ray.moe.replica import owned_rows, partial_combine

    g = torch.Generator().manual_seed(3)
    T, A, D, E = 5, 4, 16, 10
    y = torch.randn(T, A, D, generator=g).to(torch.bfloat16)
    weights = torch.rand(T, A, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    held = torch.rand(E, generator=g) < 0.5
    own = held[ids]
    y = torch.where(own[..., None], y, torch.tensor(float("nan"), dtype=y.dtype))  # not computed here
    args = (held, ids) if lookup == "held[index]" else (own, None)
    like = torch.empty(0, dtype=torch.bfloat16)
    got = partial_combine(y, weights, *args, like)
    products = (y.double() * weights.double()[..., None]).to(torch.bfloat16).double()
    want = torch.where(own[..., None], products, 0).sum(1)
    assert got.dtype == torch.float32 and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    masked = owned_rows(y, *args)
    assert torch.equal(masked, torch.where(own[..., None], y, 0))
    residual = torch.randn(T, D, generator=g).to(torch.bfloat16)
    weight, eps = torch.rand(D, generator=g).to(torch.bfloat16), 1e-6
    pending = fused.Pending(got, None, residual)
    assert torch.equal(pending.combined(), got.to(torch.bfloat16))
    fused_out = fused.sum_add_rms_norm(got, residual, weight, eps)
    apart = fused.add_rms_norm(got.to(torch.bfloat16), residual, weight, eps)
    for a, b in zip(fused_out, apart):
        assert torch.equal(a, b)


@pytest.mark.parametrize("parts", [2, 3])
def test_expert_parts_sum_to_the_expert(checkpoints, parts):
    """`load_experts(part=(p, parts))`: slices of each expert's intermediate size whose outputs
    sum to the whole expert's (float64); a part out of range is refused, naming it."""
    from specmoe_ray.models.loader import load_experts

    path = checkpoints("qwen3_moe")
    args, _ = read_config(path)
    layer, experts = args.moe_layers[0], [0, 3]
    whole = load_experts(path, {layer: experts}, dtype=torch.float32, args=args).double()
    pieces = [
        load_experts(path, {layer: experts}, dtype=torch.float32, args=args, part=(p, parts)).double()
        for p in range(parts)
    ]
    I = args.moe_intermediate_size
    assert sum(s.by_layer[str(layer)].down.shape[-1] for s in pieces) == I
    x = torch.randn(4, args.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 3, 3, 0])
    want = whole(layer, x, ids)
    got = sum(s(layer, x, ids) for s in pieces)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"part \(2, 2\)"):
        load_experts(path, {layer: experts}, args=args, part=(2, 2))


def test_batches_travel_whole():
    """`pack_batch` / `unpack_batch`: a ragged batch's index tensors come back equal."""
    from specmoe_ray.models.transformer import build_forward_batch

    batch = build_forward_batch([[5, 6, 7], [8]], [0, 4], [1, 0], [2, 0], "cpu")
    payload = pack_batch(batch)
    key = (3 + 1, 2, 2 * 3, batch.kv_len, batch.max_new, 0)
    got = unpack_batch(payload, key)
    names = ("tokens", "positions", "write_slots", "read_slots", "pad_index", "unpad_index")
    names += ("query_positions",)
    for name in names:
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    assert (got.kv_len, got.max_new, got.padded) == (batch.kv_len, 3, False)


def test_replica_options_are_checked(checkpoints):
    """Trunk replicas need the engine's cache shape; `replica_split` takes two values, applies
    to trunk replicas only and not with `replica_exact`; so does `replica_peer_sum`, a token
    count: each refused, naming what is wrong."""
    from specmoe_ray.serving.shards import ShardGroup, ShardOptions

    path = checkpoints("qwen3_moe")
    args, _ = read_config(path)
    plan = PlacementPlan.contiguous(args.moe_layers, args.num_experts, 2)
    with pytest.raises(ValueError, match="cache_shape"):
        ShardGroup(path, plan, args.hidden_size, torch.float32, "cpu", ShardOptions(replicate_trunk=True))
    shape = (4, 128)
    for options, message in (
        (ShardOptions(replica_split="intermediate"), "'intermediate' applies to trunk replicas"),
        (ShardOptions(replicate_trunk=True, replica_exact=True, replica_split="intermediate"), "cannot be"),
        (ShardOptions(replicate_trunk=True, replica_split="rows"), "expected 'experts' or 'intermediate'"),
        (ShardOptions(replica_peer_sum=32), "replica_peer_sum 32: .*set replicate_trunk"),
        (ShardOptions(replicate_trunk=True, replica_exact=True, replica_peer_sum=32), "not replica_exact"),
        (ShardOptions(replicate_trunk=True, replica_peer_sum=-1), "replica_peer_sum -1: a token count"),
        (ShardOptions(replicate_trunk=True, replica_peer_sum=10**6), "replica_peer_sum 1000000: .* to 65536"),
        (ShardOptions(replicate_trunk=True, replica_peer_sum="64"), "replica_peer_sum '64': a token count"),
        (ShardOptions(replica_attention="heads"), "'heads' applies to trunk replicas"),
        (
            ShardOptions(replicate_trunk=True, replica_exact=True, replica_attention="heads"),
            "cannot be replica_",
        ),
        (ShardOptions(replicate_trunk=True, replica_attention="rows"), "expected 'replicated' or 'heads'"),
    ):
        with pytest.raises(ValueError, match=message):
            ShardGroup(path, plan, args.hidden_size, torch.float32, "cpu", options, cache_shape=shape)
    heads = ShardOptions(replicate_trunk=True, replica_attention="heads")
    three = PlacementPlan.contiguous(args.moe_layers, args.num_experts, 3)  # 4 query, 2 key/value heads
    with pytest.raises(ValueError, match="4 query and 2 key/value heads do not split evenly over 3 shards"):
        ShardGroup(path, three, args.hidden_size, torch.float32, "cpu", heads, cache_shape=shape)
    from specmoe_ray.serving.autoscale import ShardAutoscaleConfig

    scale = ShardAutoscaleConfig(min_shards=2, max_shards=2, target_pairs_per_shard_s=1.0)
    with pytest.raises(ValueError, match="'heads' fixes the shard count .* cannot autoscale"):
        Engine.from_pretrained(path, num_shards=2, shard_options=heads, shard_autoscale=scale)
    olmoe, _ = read_config(checkpoints("olmoe"))  # q and k normed over all heads at once
    with pytest.raises(ValueError, match="full-width q/k norm"):
        ShardGroup(
            checkpoints("olmoe"), plan, olmoe.hidden_size, torch.float32, "cpu", heads, cache_shape=shape
        )
    with pytest.raises(ValueError, match="cannot be exact"):
        ReplicaDispatch(plan, ExpertStore({}), 0, "cpu", exact=True, split=True)
    with pytest.raises(ValueError, match="peer sums add partial sums"):
        ReplicaDispatch(plan, ExpertStore({}), 0, "cpu", exact=True, peer_rows=8)


def test_peer_sums_are_on_by_default_for_trunk_replicas_on_gpus(checkpoints):
    """`replica_peer_sum` None (the default) resolves to DEFAULT_PEER_ROWS for trunk replicas
    on GPUs that sum partial outputs, to 0 elsewhere (CPUs, exact sums, no replicas); a number
    given is kept. (Building a ShardGroup starts nothing.)"""
    from specmoe_ray.serving.shards import DEFAULT_PEER_ROWS, ShardGroup, ShardOptions

    path = checkpoints("qwen3_moe")
    args, _ = read_config(path)
    plan = PlacementPlan.contiguous(args.moe_layers, args.num_experts, 2)

    def rows(device, **options):
        group = ShardGroup(
            path, plan, args.hidden_size, torch.bfloat16, device, ShardOptions(**options), (4, 128)
        )
        return group.peer_rows

    assert DEFAULT_PEER_ROWS == 256
    assert rows("cuda:0", replicate_trunk=True) == DEFAULT_PEER_ROWS
    assert rows("cuda:0", replicate_trunk=True, replica_split="intermediate") == DEFAULT_PEER_ROWS
    assert rows("cuda:0", replicate_trunk=True, replica_exact=True) == 0
    assert rows("cuda:0") == 0
    assert rows("cpu", replicate_trunk=True) == 0
    assert rows("cuda:0", replicate_trunk=True, replica_peer_sum=0) == 0
    assert rows("cuda:0", replicate_trunk=True, replica_peer_sum=64) == 64


def test_shard_actor_device_with_every_gpu_visible(monkeypatch):
    """Peer sums keep every GPU visible in the shard actors (Ray's NOSET switch): an actor then
    takes the GPU with Ray's id, as an index into CUDA_VISIBLE_DEVICES where that is set; without
    the switch Ray narrows visibility to its GPU, "cuda:0". (No GPU here: Ray's id is given.)"""
    from specmoe_ray.serving import shards

    monkeypatch.setattr(shards.ray, "get_gpu_ids", lambda: ["1"])
    monkeypatch.delenv(shards.NOSET_VISIBLE, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert shards._actor_device("cuda") == "cuda:0"
    assert shards._actor_device("cpu") == "cpu"
    monkeypatch.setenv(shards.NOSET_VISIBLE, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert shards._actor_device("cuda") == "cuda:1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,1,2")
    assert shards._actor_device("cuda") == "cuda:1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.setattr(shards.ray, "get_gpu_ids", lambda: ["7"])
    assert shards._actor_device("cuda") == "cuda:1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(shards.ray, "get_gpu_ids", lambda: [3])
    assert shards._actor_device("cuda") == "cuda:3"


def test_peer_sums_unavailable_names_why():
    """`peer_sum.unavailable`: from every rank's (host, handle, error), the reason the group
    cannot map each other's buffers (ranks on several hosts; a rank that could not share its
    buffer), the same on every rank (it sees every share), or None."""
    from specmoe_ray.moe.peer_sum import unavailable

    assert unavailable([("gpu-a", "h0", None), ("gpu-a", "h1", None)]) is None
    why = unavailable([("gpu-a", "h0", None), ("gpu-b", "h1", None), ("gpu-a", "h2", None)])
    assert why == "peer sums need every rank on one host; this group spans gpu-a, gpu-b"
    why = unavailable([("gpu-a", "h0", None), ("gpu-a", None, "RuntimeError: no IPC")])
    assert why == "rank 1: RuntimeError: no IPC"


HEADS_AND_MOE = [k for layer in range(3) for k in (("attention", layer), layer)]


@pytest.mark.parametrize(
    "layers", [[0, 1], [3, 4, 5], list(range(48)), [1, 3, 5, 7, 9], [2], HEADS_AND_MOE, HEADS_AND_MOE[:-1]]
)
def test_peer_sum_slots_alternate_across_forwards(layers):
    """`peer_sum.slot_order`: consecutive sums use different shared slots, the last sum of
    a forward and the first of the next one too (a rank writes the first one without waiting,
    while its peers may still read the last), and no more slots than the buffer has; sums
    named in the order a forward runs them (split heads: an attention sum before each MoE's)."""
    from specmoe_ray.moe.peer_sum import SLOTS, slot_order

    order = slot_order(layers)
    if len(layers) < 2:
        assert order == {}
        return
    assert list(order) == layers
    slots = [order[key] for key in layers] * 2  # two forwards in a row
    assert all(a != b for a, b in zip(slots, slots[1:]))
    assert set(slots) <= set(range(SLOTS))


def test_one_replica_is_the_engine_alone(ray_cluster, checkpoints):
    """A one-shard group of replicas is the engine's process alone (no actor, world of one)."""
    path = checkpoints("qwen3_moe")
    ref = hf_greedy(path, PROMPTS[:1], NEW)
    with Engine.from_pretrained(path, num_shards=1, max_model_len=128, shard_options=replicas(1)) as engine:
        got = engine.generate(PROMPTS[:1], GREEDY)[0].token_ids
        assert not engine.shard_group.actors
    assert got == ref[0]


def test_cli_generate_with_trunk_replicas(ray_cluster, capsys):
    """`specmoe generate --num-shards 2 --replicate-trunk` (experts whole, or split by their
    intermediate size, or the attention heads split) on the demo target streams the text of the
    in-process run; the flags without what they need (or a shard count the heads do not divide
    by) are refused, naming it."""
    from specmoe_ray import cli

    args = ["generate", "def add(a, b):", "--no-spec", "--max-tokens", "12"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main(args + ["--num-shards", "2", "--replicate-trunk"]) == 0
    assert capsys.readouterr().out == plain and plain.strip()
    assert cli.main(args + ["--num-shards", "2", "--replicate-trunk", "--replica-split", "intermediate"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.main(args + ["--num-shards", "2", "--replicate-trunk", "--replica-attention", "heads"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.main(args + ["--num-shards", "3", "--replicate-trunk", "--replica-attention", "heads"]) == 2
    assert "do not split evenly over 3 shards" in capsys.readouterr().err
    assert cli.main(args + ["--replicate-trunk"]) == 2
    assert "--replicate-trunk needs --num-shards" in capsys.readouterr().err
    assert cli.main(args + ["--num-shards", "2", "--replica-split", "intermediate"]) == 2
    assert "--replica-split applies to trunk replicas" in capsys.readouterr().err
    assert cli.main(args + ["--num-shards", "2", "--replica-attention", "heads"]) == 2
    assert "--replica-attention applies to trunk replicas" in capsys.readouterr().err


def test_a_step_found_broken_after_its_sync_is_rolled_back_and_replayed(ray_cluster, checkpoints):
    """An NCCL collective aborted for a dead rank returns garbage, not an error: the group's
    watcher names the broken group (`ShardGroup.failure`) and the engine checks it after each
    step's host sync. Here, injected before step 1 (a prompt chunk alone: 8 tokens a step) and
    step 5 (decode and verify rows; each step runs whole on a healthy group, as one whose
    collectives were aborted would), then for real: a shard actor killed after step 8, which the
    watcher reports. Each time the step is rolled back (KV lengths, seeded generators) and
    replayed on a re-formed group: greedy tokens equal transformers', the seeded samples those
    of the same batch without failures."""
    import time

    import ray

    path = checkpoints("qwen3_moe")
    greedy = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]  # the 17-token prompt first: chunked alone
    ref = hf_greedy(path, greedy, NEW)
    seeded = SamplingParams(max_tokens=NEW, temperature=1.0, seed=5, ignore_eos=True)
    prompts, params = greedy + [PROMPTS[0]], [GREEDY] * len(greedy) + [seeded]
    reports = []

    def kill(e):
        group = e.shard_group
        ray.kill(group.actors[0], no_restart=True)
        deadline = time.monotonic() + 30
        while group.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        reports.append(group.failure)

    def inject(e):
        e.shard_group.failure = "injected"

    with Engine.from_pretrained(
        path,
        num_shards=2,
        draft="ngram",
        max_model_len=128,
        max_num_batched_tokens=8,
        shard_options=replicas(2),
    ) as engine:
        clean = generate_stepwise(engine, prompts, params)
        got = generate_stepwise(engine, prompts, params, at={1: inject, 5: inject, 9: kill})
        stats = engine.stats()
        graphs_kept = engine.shard_group.options.cuda_graphs  # stopped shards: graphs stay on
    assert got[:-1] == ref
    assert got[-1] == clean[-1] and clean[:-1] == ref
    assert stats["num_recoveries"] == 3 and graphs_kept
    assert reports[0] is not None and reports[0].startswith("shard 1 (rank 1) stopped: "), reports
