"""Expert shards on Ray actors across nodes, exchanging over a gloo process group."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import ray
import torch.distributed as dist
from conftest import NODE_RESOURCES, PROMPTS, generate_stepwise, hf_greedy
from safetensors.torch import load_file, save_file

from specmoe_ray import Engine, SamplingParams, ShardStartupError
from specmoe_ray.models.loader import read_config
from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.serving.shards import ShardOptions

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def pinned(num_shards: int, **kw) -> ShardOptions:
    """One shard per node, round robin over the cluster's nodes."""
    return ShardOptions(
        num_cpus=0.5,
        strategy="SPREAD",
        bundle_resources=[{NODE_RESOURCES[s % 3]: 1} for s in range(num_shards)],
        **kw,
    )


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_shard_counts_give_identical_tokens(ray_cluster, checkpoints, arch):
    path = checkpoints(arch)
    args, _ = read_config(path)
    ref = hf_greedy(path, PROMPTS, NEW)
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size
    for num_shards in (0, 1, 2, 3):
        with Engine.from_pretrained(
            path, num_shards=num_shards, max_model_len=128, shard_options=pinned(num_shards)
        ) as engine:
            got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
            assert got == ref, f"num_shards={num_shards}"
            if num_shards == 0:
                continue
            stats = engine.stats()["shards"]
            held_total = 0
            nodes = set()
            for info in stats["shards"]:
                held = info["held"]
                num_held = sum(len(v) for v in held.values())
                # A shard holds exactly its own experts' weights, nothing else.
                assert info["num_parameters"] == num_held * per_expert
                assert sorted(held) == sorted(args.moe_layers)
                held_total += num_held
                nodes.add(info["node_id"])
            assert held_total == len(args.moe_layers) * args.num_experts
            assert len(nodes) == num_shards, "each shard was pinned to its own node"
            assert sum(stats["tokens_per_shard"]) > 0 and all(c > 0 for c in stats["tokens_per_shard"])
            # Each actor says where its start went (logged by the group as its slowest actor's).
            for info in stats["shards"]:
                assert set(info["phases"]) == {"experts"} and info["phases"]["experts"] >= 0
                assert 0 <= info["began_at"] - engine.shard_group._created_at < 120
            assert "(slowest: rank " in engine.shard_group._slowest_actor()
            actors = list(engine.shard_group.actors)
        assert not dist.is_initialized()
        if num_shards:  # shutdown killed the actors (ray.kill is asynchronous: a call may still land)
            deadline = time.monotonic() + 30
            with pytest.raises(ray.exceptions.RayActorError):
                while time.monotonic() < deadline:
                    ray.get(actors[0].info.remote(), timeout=30)
                    time.sleep(0.2)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_local_shard_serves_experts_from_the_engine_process(ray_cluster, checkpoints, num_shards, tmp_path):
    """Shard 0 in the engine's process (rank 0 exchanges with itself inside the all_to_alls):
    same tokens as transformers, one actor fewer, and each shard computes what was sent to it.
    Meanwhile the shard actors profile 3 of their forwards (`ShardGroup.profile`)."""
    import json

    path = checkpoints("qwen2_moe")
    ref = hf_greedy(path, PROMPTS, NEW)
    opts = pinned(num_shards)
    opts.local_shard = True
    with Engine.from_pretrained(
        path, num_shards=num_shards, draft="ngram", max_model_len=128, shard_options=opts
    ) as engine:
        profiles = engine.shard_group.profile(3, trace_dir=str(tmp_path))
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        sent = engine.stats()["expert_tokens_per_shard"]
        computed = engine.shard_group.computed_counts()
        assert len(engine.shard_group.actors) == num_shards - 1
        tables = ray.get(profiles, timeout=60)
    assert got == ref
    for rank, table in enumerate(tables, start=1):
        assert table.startswith(f"rank {rank}: 3 forwards in ") and "aten::" in table, table
        with open(tmp_path / f"shard-rank{rank}.json") as f:
            assert json.load(f)["traceEvents"]
    assert [sum(sum(c) for c in shard.values()) for shard in computed] == sent
    assert all(n > 0 for n in sent)


def test_idle_group_survives_past_collective_timeout(ray_cluster, checkpoints):
    """The heartbeat keeps idle shards' collectives inside their timeout; the group's
    environment (`ShardOptions.env_vars`) reaches every shard process and this one."""
    import time

    path = checkpoints("olmoe")
    env = {"SPECMOE_TEST_GROUP_ENV": "on"}  # what e.g. NCCL_GRAPH_REGISTER would travel as
    opts = pinned(2, collective_timeout_s=2.0, heartbeat_interval_s=0.3, env_vars=env)
    with Engine.from_pretrained(path, num_shards=2, max_model_len=128, shard_options=opts) as engine:
        first = engine.generate(PROMPTS[:1], GREEDY)[0].token_ids
        time.sleep(5)
        again = engine.generate(PROMPTS[:1], GREEDY)[0].token_ids
        getenv = lambda _: os.environ.get("SPECMOE_TEST_GROUP_ENV")  # noqa: E731 (runs in each shard)
        seen = ray.get([a.__ray_call__.remote(getenv) for a in engine.shard_group.actors])
    assert first == again
    assert seen == ["on", "on"] and os.environ.get("SPECMOE_TEST_GROUP_ENV") == "on"
    os.environ.pop("SPECMOE_TEST_GROUP_ENV")


def test_slow_local_load_does_not_outlast_the_collective_timeout(ray_cluster, checkpoints, monkeypatch):
    """Shard 0's experts load in the engine's process before the group forms, while the actors
    load theirs: a local load longer than collective_timeout_s (a 48-layer split took minutes on
    an H200) leaves no shard waiting in a collective meanwhile."""
    from specmoe_ray.models import loader

    real, calls = loader.load_experts, []

    def slow_load(*args, **kwargs):
        calls.append(dist.is_initialized())
        time.sleep(6)  # 3x the collective timeout below
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load_experts", slow_load)
    path = checkpoints("qwen2_moe")
    ref = hf_greedy(path, PROMPTS, NEW)
    opts = pinned(2, collective_timeout_s=2.0, heartbeat_interval_s=0.3, local_shard=True)
    with Engine.from_pretrained(path, num_shards=2, max_model_len=128, shard_options=opts) as engine:
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        recoveries = engine.stats()["num_recoveries"]
    assert calls == [False]  # loaded once, before the group formed
    assert got == ref and recoveries == 0


def test_unschedulable_shards_fail_with_clear_error(ray_cluster, checkpoints):
    path = checkpoints("mixtral")
    opts = ShardOptions(resources={"no_such_accelerator": 1}, startup_timeout_s=2)
    with pytest.raises(ShardStartupError, match="could not reserve resources for 2 expert shards"):
        Engine.from_pretrained(path, num_shards=2, shard_options=opts)
    assert not dist.is_initialized()


def test_shard_that_cannot_load_its_experts_names_the_tensor(ray_cluster, checkpoints, tmp_path):
    src = checkpoints("qwen2_moe")
    dst = str(tmp_path / "broken")
    shutil.copytree(src, dst)
    state = load_file(os.path.join(dst, "model.safetensors"))
    missing = "model.layers.2.mlp.experts.7.up_proj.weight"
    del state[missing]
    save_file(state, os.path.join(dst, "model.safetensors"))
    with pytest.raises(
        ShardStartupError, match=r"expert shard 1 \(rank 2\) failed to start.*experts\.7\.up_proj"
    ):
        Engine.from_pretrained(dst, num_shards=2, shard_options=pinned(2))
    assert not dist.is_initialized()


def test_too_many_shards(checkpoints):
    with pytest.raises(ValueError, match="num_shards=9 exceeds the model's 8 experts"):
        Engine.from_pretrained(checkpoints("olmoe"), num_shards=9)
    with pytest.raises(ValueError, match="dense model"):
        Engine.from_pretrained(checkpoints("llama"), num_shards=2)


def test_reshard_mid_generation_keeps_outputs(ray_cluster, checkpoints):
    """The group re-forms 2 -> 3 -> 1 shards while requests run: no token lost, repeated or changed."""
    path = checkpoints("qwen3_moe")
    ref = hf_greedy(path, PROMPTS, NEW)
    with Engine.from_pretrained(
        path, num_shards=2, draft="ngram", max_model_len=128, shard_options=pinned(3)
    ) as engine:
        got = generate_stepwise(
            engine, PROMPTS, GREEDY, at={3: lambda e: e.reshard(3), 7: lambda e: e.reshard(1)}
        )
        assert engine.shard_group.plan.num_shards == 1
        assert len(engine.stats()["shards"]["shards"]) == 1
    assert got == ref


def test_killed_shard_is_replaced_and_the_step_replayed(ray_cluster, checkpoints):
    path = checkpoints("mixtral")
    ref = hf_greedy(path, PROMPTS, NEW)
    opts = pinned(2, collective_timeout_s=20)
    with Engine.from_pretrained(
        path, num_shards=2, draft="ngram", max_model_len=128, shard_options=opts
    ) as engine:
        kill = {4: lambda e: ray.kill(e.shard_group.actors[1], no_restart=True)}
        got = generate_stepwise(engine, PROMPTS, GREEDY, at=kill)
        stats = engine.stats()
    assert got == ref
    assert stats["num_recoveries"] == 1
    print(f"recovered from a killed shard in {stats['recovery_time_s']:.1f}s")
    assert stats["recovery_time_s"] < 60


@pytest.mark.parametrize("layout", ["coordinator", "replicas", "split"])
def test_scale_1_3_2_while_ten_requests_stream(ray_cluster, checkpoints, layout):
    """Re-forms 1 -> 3 -> 2 shards (the last with a replicated hot expert per layer) while ten
    requests run: the same tokens as transformers. replicas: trunk replicas, so each re-form
    refills the new ranks' KV caches from the running sequences (from one rank, the engine
    alone, to three); split: trunk replicas holding slices of every expert, re-cut into 3 and
    then 2 parts (the plan's placement does not apply)."""
    path = checkpoints("qwen2_moe")
    prompts = [PROMPTS[i % 3][: 2 + i] for i in range(10)]
    ref = hf_greedy(path, prompts, NEW)
    split = "intermediate" if layout == "split" else "experts"
    opts = pinned(3, replicate_trunk=layout != "coordinator", replica_split=split)
    with Engine.from_pretrained(
        path, num_shards=1, max_model_len=128, max_num_seqs=10, shard_options=opts
    ) as engine:

        def balanced(e):  # to 2 shards, balanced by the load measured so far
            load = e.shard_group.dispatch.load.snapshot()
            e.reshard(plan=PlacementPlan.balanced(load, 2, replicate_top=1))

        got = generate_stepwise(engine, prompts, GREEDY, at={4: lambda e: e.reshard(3), 9: balanced})
        assert engine.shard_group.plan.num_shards == 2
        if layout == "split":  # both ranks hold every expert, half of each
            held = [s["held"] for s in engine.stats()["shards"]["shards"]]
            assert held[0] == held[1] and all(len(v) == 8 for v in held[0].values())
    assert got == ref


def test_hot_expert_replicas_split_its_tokens(ray_cluster, checkpoints):
    path = checkpoints("qwen3_moe")
    args, _ = read_config(path)
    ref = hf_greedy(path, PROMPTS, NEW)
    # Every expert of every MoE layer on both shards: each expert's tokens alternate between them.
    owner = {layer: tuple((0, 1) for _ in range(args.num_experts)) for layer in args.moe_layers}
    plan = PlacementPlan(2, args.num_experts, owner)
    with Engine.from_pretrained(path, num_shards=2, max_model_len=128, shard_options=pinned(2)) as engine:
        engine.reshard(plan=plan)
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        routed = engine.shard_group.dispatch.load.snapshot()
        computed = engine.shard_group.computed_counts()
    assert got == ref
    split = []
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            per_replica = [c[layer][e] for c in computed]
            assert sum(per_replica) == routed[layer][e]
            split.append(min(per_replica) / routed[layer][e] if routed[layer][e] >= 4 else None)
    # Replicas alternate by token position and exchange: busy experts' pairs are split between
    # them (an expert always picked by the same position every other step can still land on one).
    busy = [x for x in split if x is not None]
    assert busy and sum(x > 0 for x in busy) >= 0.75 * len(busy), split
    assert sum(busy) / len(busy) > 0.2, split


def test_autoscaler_adds_shards_under_load(ray_cluster, checkpoints):
    from specmoe_ray.serving.autoscale import ShardAutoscaleConfig

    path = checkpoints("olmoe")
    ref = hf_greedy(path, PROMPTS, NEW)
    scale = ShardAutoscaleConfig(
        # A short window: the whole generation may take well under a second on a fast box.
        min_shards=1,
        max_shards=2,
        target_pairs_per_shard_s=1.0,
        interval_s=0.02,
        replicate_hot_experts=1,
    )
    with Engine.from_pretrained(
        path, num_shards=1, max_model_len=128, shard_options=pinned(2), shard_autoscale=scale
    ) as engine:
        outs = [o.token_ids for o in engine.generate(PROMPTS * 2, GREEDY)]
        stats = engine.stats()
        decisions = [d.reason for d in engine.autoscaler.decisions]
    assert outs == ref * 2
    # Scaled up under load (a slow box may also scale back down as the last requests finish).
    assert stats["num_rescales"] >= 1
    assert decisions and decisions[0].startswith("1 -> 2 shards"), decisions


def test_stuck_shard_times_out_and_the_group_recovers(ray_cluster, checkpoints, caplog):
    """A shard that stops answering (SIGSTOP) fails its collective after the timeout, not a hang.
    Before that, the group's watcher sees the step run past half the timeout and the actor not
    answer (a quarter of it): it names the shard and breaks the group (over NCCL that ends the
    waits at once; gloo's collective still waits for its timeout), so the re-formed group keeps
    CUDA graphs, as after a dead shard."""
    import logging
    import signal
    import time

    path = checkpoints("qwen2_moe")
    ref = hf_greedy(path, PROMPTS, NEW)
    caplog.set_level(logging.ERROR, logger="specmoe_ray.serving.shards")
    opts = pinned(2, collective_timeout_s=16, heartbeat_interval_s=60)
    with Engine.from_pretrained(path, num_shards=2, max_model_len=128, shard_options=opts) as engine:
        pid = engine.stats()["shards"]["shards"][0]["pid"]
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        done, step = {}, 0
        stuck_at = None
        while len(done) < len(ids):
            step += 1
            if step == 3:
                os.kill(pid, signal.SIGSTOP)
                stuck_at = time.monotonic()
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            if stuck_at is not None:
                waited, stuck_at = time.monotonic() - stuck_at, None
                assert waited < 60, f"the stuck step took {waited:.0f}s"
        stats = engine.stats()
        graphs_kept = engine.shard_group.options.cuda_graphs
    assert [done[i] for i in ids] == ref
    assert stats["num_recoveries"] == 1 and graphs_kept
    said = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert any("shard 0 (rank 1) did not answer within 4s while a step waited" in m for m in said), said
