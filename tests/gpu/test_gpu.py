"""CUDA and NCCL paths (run on a GPU machine: `python -m pytest tests/gpu`)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_greedy

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.serving.shards import ShardOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
# A shard that fails surfaces within seconds, not after the default 2-minute collective timeout.
FAIL_FAST = ShardOptions(collective_timeout_s=30)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_cuda_engine_equals_transformers(checkpoints, arch):
    path = checkpoints(arch)
    ref = hf_greedy(path, PROMPTS, NEW)
    with Engine.from_pretrained(path, device="cuda", max_model_len=128) as engine:
        assert engine.model.lm_head.weight.is_cuda
        plain = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    with Engine.from_pretrained(
        path, draft=path, device="cuda", num_speculative_tokens=3, max_model_len=128
    ) as engine:
        spec = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        assert engine.stats()["acceptance_rate"] > 0.9
    assert plain == spec == ref


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_shards_equal_one_gpu_and_transformers(checkpoints):
    import ray

    n = torch.cuda.device_count()
    # Ray hands GPUs 0..n-2 to the shard actors; the engine (this process) takes the last one.
    ray.init(num_gpus=n - 1, num_cpus=8, include_dashboard=False)
    try:
        for arch in ("qwen3_moe", "mixtral"):
            path = checkpoints(arch)
            ref = hf_greedy(path, PROMPTS, NEW)
            with Engine.from_pretrained(path, device=f"cuda:{n - 1}", max_model_len=128) as engine:
                one_gpu = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
            with Engine.from_pretrained(
                path,
                device=f"cuda:{n - 1}",
                num_shards=n - 1,
                draft="ngram",
                max_model_len=128,
                shard_options=FAIL_FAST,
            ) as engine:
                sharded = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
                stats = engine.stats()["shards"]
            assert sharded == one_gpu == ref, arch
            assert all(c > 0 for c in stats["tokens_per_shard"])
            assert len({s["node_id"] for s in stats["shards"]}) == 1
    finally:
        ray.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_local_shard_and_static_exchange(checkpoints):
    """Every GPU holds experts (shard 0 on the engine's GPU, `local_shard`), static fixed-size
    exchanges over NCCL ("padded" steps) and the dynamic ones (prefill): == transformers."""
    import ray

    n = torch.cuda.device_count()
    ray.init(num_gpus=n - 1, num_cpus=8, include_dashboard=False)
    try:
        path = checkpoints("qwen3_moe")
        ref = hf_greedy(path, PROMPTS, NEW)
        for steps in ("off", "padded"):
            with Engine.from_pretrained(
                path,
                device=f"cuda:{n - 1}",
                num_shards=n,
                draft="ngram",
                max_model_len=128,
                step_graphs=steps,
                shard_options=ShardOptions(local_shard=True, collective_timeout_s=30),
            ) as engine:
                got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
                sent = engine.stats()["expert_tokens_per_shard"]
                assert len(engine.shard_group.actors) == n - 1
            assert got == ref, steps
            assert len(sent) == n and all(c > 0 for c in sent), sent
    finally:
        ray.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_cuda_graph_steps(checkpoints):
    """`ShardOptions.cuda_graphs`: the engine replays static steps with their NCCL exchanges from
    CUDA graphs and every shard replays its side of a forward: == transformers (float32)."""
    import ray

    n = torch.cuda.device_count()
    ray.init(num_gpus=n - 1, num_cpus=8, include_dashboard=False)
    try:
        path = checkpoints("qwen3_moe")
        ref = hf_greedy(path, PROMPTS, NEW)
        for local in (False, True):
            options = ShardOptions(local_shard=local, cuda_graphs=True, collective_timeout_s=30)
            with Engine.from_pretrained(
                path,
                device=f"cuda:{n - 1}",
                num_shards=n if local else n - 1,
                draft="ngram",
                max_model_len=128,
                shard_options=options,
            ) as engine:
                got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
                assert engine.graphs is not None and engine.graphs.capture
                assert engine.graphs.num_replays > 3
            assert got == ref, local
    finally:
        ray.shutdown()


def test_bfloat16_on_cuda_close_to_float32(checkpoints):
    path = checkpoints("qwen3_moe")
    with Engine.from_pretrained(path, device="cuda", dtype="bfloat16", max_model_len=128) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
    ref = hf_greedy(path, PROMPTS, NEW)
    # bf16 rounds differently from fp32: most leading tokens still agree.
    agree = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o.token_ids[:8], r[:8]))
    assert agree >= 12, (agree, [o.token_ids for o in outs], ref)


def test_grouped_gemm_experts_equal_float64_reference():
    """The CUDA grouped-GEMM expert path against a float64 per-expert computation."""
    import torch.nn.functional as F

    from specmoe_ray.moe.experts import LocalExperts

    g = torch.Generator().manual_seed(0)
    E, D, I, n = 16, 256, 128, 300
    gate_up = torch.randn(E, 2 * I, D, generator=g) / D**0.5
    down = torch.randn(E, D, I, generator=g) / I**0.5
    x = torch.randn(n, D, generator=g)
    ids = torch.randint(0, E, (n,), generator=g)
    ids[:10] = 3  # an expert with many rows; others may get none
    experts = LocalExperts(list(range(E)), gate_up.cuda().bfloat16(), down.cuda().bfloat16(), E)
    assert experts.grouped
    out = experts(x.cuda().bfloat16(), ids.cuda()).double().cpu()
    ref = torch.empty(n, D, dtype=torch.float64)
    for i in range(n):
        gate, up = F.linear(x[i].double(), gate_up[ids[i]].double()).chunk(2)
        ref[i] = F.linear(F.silu(gate) * up, down[ids[i]].double())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_steps_equal_eager_steps(checkpoints, dtype):
    """Replayed CUDA graphs == the same padded static steps run eagerly, bit for bit (same
    kernels, same shapes), on a ragged batch with and without speculation; in float32 both
    equal the plain path and transformers."""
    path = checkpoints("qwen3_moe")
    prompts = [*PROMPTS, list(range(1, 30)), [4, 4]]
    results = {}
    for mode in ("off", "padded", "auto"):
        for draft in (None, path, "ngram"):
            with Engine.from_pretrained(
                path, draft=draft, device="cuda", dtype=dtype, step_graphs=mode, max_model_len=128
            ) as engine:
                outs = [o.token_ids for o in engine.generate(prompts, GREEDY)]
                results[mode, draft] = outs, engine.expert_load()
                if mode == "auto":
                    assert engine.graphs.capture and engine.graphs.num_graphs > 0
                    # Every step but the first (prefill) is a decode/verify step: all replayed.
                    assert engine.graphs.num_replays == engine.metrics.num_steps - 1 > 3
    for draft in (None, path, "ngram"):
        assert results["auto", draft] == results["padded", draft], draft
        if dtype == "float32":
            assert results["padded", draft] == results["off", draft], draft
    if dtype == "float32":
        assert results["off", None][0] == hf_greedy(path, prompts, NEW)


def test_cuda_graph_steps_with_mla():
    """DeepSeek-V3 (MLA cache, grouped routing) replayed from graphs == eager == transformers."""
    import sys
    import tempfile

    sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/cpu")
    from test_deepseek import make_deepseek

    with tempfile.TemporaryDirectory() as tmp:
        path = make_deepseek(tmp + "/v3", "deepseek_v3")
        prompts = [list(range(1, 50)), [7, 8, 9]]
        ref = hf_greedy(path, prompts, NEW)
        for mode in ("off", "auto"):
            with Engine.from_pretrained(
                path, draft="ngram", device="cuda", step_graphs=mode, max_model_len=128
            ) as engine:
                assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref, mode


@pytest.mark.parametrize("path", ["pairs", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 40, 300])
def test_triton_experts_equal_float64_reference(dtype, n, path):
    """The Triton expert kernel (few rows per expert: decode/verify) against float64 per-row math,
    including an expert with more rows than one 16-row block and experts with none."""
    import torch.nn.functional as F

    from specmoe_ray.moe import triton_experts
    from specmoe_ray.moe.experts import LocalExperts

    assert triton_experts.AVAILABLE
    g = torch.Generator().manual_seed(n)
    E, D, I = 16, 256, 96
    gate_up = torch.randn(E, 2 * I, D, generator=g) / D**0.5
    down = torch.randn(E, D, I, generator=g) / I**0.5
    x = torch.randn(n, D, generator=g)
    ids = torch.randint(0, E, (n,), generator=g)
    ids[: min(n, 20)] = 5  # 20 rows on one expert: two 16-row blocks
    experts = LocalExperts(list(range(E)), gate_up.cuda().to(dtype), down.cuda().to(dtype), E)
    experts.triton_max_rows_per_expert = 10**6  # always a Triton kernel, whatever n
    experts.triton_max_pairs = 10**6 if path == "pairs" else 0
    out = experts(x.cuda().to(dtype), ids.cuda()).double().cpu()
    ref = torch.empty(n, D, dtype=torch.float64)
    for i in range(n):
        gate, up = F.linear(x[i].double(), gate_up[ids[i]].double()).chunk(2)
        ref[i] = F.linear(F.silu(gate) * up, down[ids[i]].double())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_kernel_reads_token_rows_and_skips_experts_not_held(dtype):
    """The per-pair kernel with `group` pairs per token row (what the MoE block passes: no
    expanded copy of the tokens), experts of a subset (others give zero rows), fused silu * up."""
    import torch.nn.functional as F

    from specmoe_ray.moe.experts import LocalExperts

    g = torch.Generator().manual_seed(3)
    E, D, I, T, A = 16, 320, 200, 5, 4  # widths that are not multiples of the blocks
    held = [1, 2, 3, 5, 8, 13]
    gate_up = torch.randn(len(held), 2 * I, D, generator=g) / D**0.5
    down = torch.randn(len(held), D, I, generator=g) / I**0.5
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)]).reshape(-1)
    experts = LocalExperts(held, gate_up.cuda().to(dtype), down.cuda().to(dtype), E)
    assert experts.triton and experts.triton_max_pairs >= T * A
    out = experts(x.cuda().to(dtype), ids.cuda(), group=A).double().cpu()
    ref = torch.zeros(T * A, D, dtype=torch.float64)
    for p, e in enumerate(ids.tolist()):
        if e in held:
            i = held.index(e)
            gate, up = F.linear(x[p // A].double(), gate_up[i].double()).chunk(2)
            ref[p] = F.linear(F.silu(gate) * up, down[i].double())
    assert (out[ref.abs().sum(1) == 0] == 0).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


def test_mtp_drafting_on_cuda_graphs():
    """DeepSeek-V3 with its MTP module drafting, target steps replayed from graphs that also
    return hidden states: == the eager path == transformers (float32)."""
    import sys
    import tempfile

    sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/cpu")
    from test_deepseek import make_deepseek
    from test_mtp import add_mtp, make_useful_mtp

    with tempfile.TemporaryDirectory() as tmp:
        path = make_useful_mtp(
            add_mtp(make_deepseek(tmp + "/v3", "deepseek_v3", seed=5), seed=6, own_head=False)
        )
        ref = hf_greedy(path, PROMPTS, NEW)
        for mode in ("off", "auto"):
            with Engine.from_pretrained(
                path,
                draft="mtp",
                device="cuda",
                step_graphs=mode,
                num_speculative_tokens=3,
                max_model_len=128,
            ) as engine:
                assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == ref, mode
                if mode == "auto":
                    assert engine.graphs.hidden and engine.graphs.num_replays > 0
                    assert engine.stats()["acceptance_rate"] > 0.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,Tq,L,window", [(1, 1, 256, None), (3, 4, 300, None), (2, 2, 1200, None), (3, 3, 200, 50)]
)
def test_decode_attention_kernel_equals_float64_reference(dtype, B, Tq, L, window):
    """The static steps' attention kernel (keys read from the cache by slot, grouped query heads,
    causal by position, sliding window, long caches split and merged) against float64 math."""
    from specmoe_ray.models.triton_kernels import decode_attention

    g = torch.Generator().manual_seed(B * Tq + L)
    H, Hkv, hd, S, Lmax = 8, 2, 128, 5, 2048
    G = H // Hkv
    kv = torch.randn(S + 1, 2, Hkv, Lmax, hd, generator=g).to(dtype)
    q = torch.randn(B * Tq, H, hd, generator=g).to(dtype)
    slots = [4, 0, 2][:B]
    lasts = [L - 1, L // 2, 17][:B]  # each sequence's last query position
    qpos = torch.tensor([[p - Tq + 1 + t for t in range(Tq)] for p in lasts])
    out = decode_attention(q.cuda(), kv.cuda(), torch.tensor(slots).cuda(), qpos.cuda(), L, window)
    out = out.double().cpu().view(B * Tq, H, hd)
    ref = torch.empty(B * Tq, H, hd, dtype=torch.float64)
    for b in range(B):
        for t in range(Tq):
            p = int(qpos[b, t])
            lo = 0 if window is None else max(0, p - window + 1)
            for h in range(H):
                keys = kv[slots[b], 0, h // G, lo : p + 1].double()
                values = kv[slots[b], 1, h // G, lo : p + 1].double()
                att = torch.softmax(keys @ q[b * Tq + t, h].double() / hd**0.5, dim=0)
                ref[b * Tq + t, h] = att @ values
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize("E,renorm", [(128, True), (60, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_topk_kernel_equals_torch(E, renorm, dtype):
    from specmoe_ray.models import fused, triton_kernels

    logits = torch.randn(37, E, generator=torch.Generator().manual_seed(E)).to(dtype)
    weights, ids = triton_kernels.softmax_topk(logits.cuda(), 8, renorm, torch.float32)
    ref_w, ref_ids = fused.softmax_topk.__wrapped__(logits, 8, renorm, logits, False)
    # bfloat16 logits tie often; among equal logits either expert is a top-k choice (the kernel
    # takes the lowest index), so compare the logits the ids select, and the ids where no tie.
    ids = ids.cpu()
    assert torch.equal(logits.gather(1, ids), logits.gather(1, ref_ids))
    assert all(len(set(row)) == 8 for row in ids.tolist())
    tied = (logits.gather(1, ref_ids)[:, :, None] == logits[:, None, :]).sum(-1).gt(1).any(-1)
    assert torch.equal(ids[~tied], ref_ids[~tied]) and (~tied).sum() > 10
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_projection_kernel_equals_float64_reference(dtype):
    """Inside static steps a one-row projection runs the per-pair kernel (`fused.linear`)."""
    from specmoe_ray.models import fused

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1000, generator=g).to(dtype), torch.randn(333, 1000, generator=g).to(dtype)
    with fused.active():
        out = fused.linear(x.cuda(), w.cuda()).double().cpu()
    ref = x.double() @ w.double().T
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel
