"""CUDA and NCCL paths (run on a GPU machine: `python -m pytest tests/gpu`)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_greedy

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.serving.shards import ShardOptions

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    # An exception in a thread (the shard group's watcher: `_break`) fails the test.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

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


def graphed_shard_engine(path: str, local: bool, **kwargs) -> Engine:
    """An engine on the last GPU with expert shards on the others (and on its own GPU if
    `local`), steps and shard forwards captured in CUDA graphs; Ray already started."""
    n = torch.cuda.device_count()
    return Engine.from_pretrained(
        path,
        device=f"cuda:{n - 1}",
        num_shards=n if local else n - 1,
        max_model_len=128,
        shard_options=ShardOptions(local_shard=local, cuda_graphs=True, collective_timeout_s=30),
        **kwargs,
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_cuda_graph_steps(checkpoints):
    """`ShardOptions.cuda_graphs`: the engine replays static steps with their NCCL exchanges from
    CUDA graphs and every shard replays its side of a forward: == transformers (float32)."""
    import ray

    ray.init(num_gpus=torch.cuda.device_count() - 1, num_cpus=8, include_dashboard=False)
    try:
        path = checkpoints("qwen3_moe")
        ref = hf_greedy(path, PROMPTS, NEW)
        for local in (False, True):
            with graphed_shard_engine(path, local, draft="ngram") as engine:
                got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
                assert engine.graphs is not None and engine.graphs.capture
                assert engine.graphs.num_replays > 3
            assert got == ref, local
    finally:
        ray.shutdown()


BUCKET_PROMPTS = [[(7 * i + j) % 95 + 1 for j in range(n)] for i, n in enumerate((32, 29, 27, 31))]


def wide_checkpoint(tmp_path) -> str:
    from conftest import make_checkpoint

    return make_checkpoint(
        str(tmp_path / "wide"),
        "qwen3_moe",
        seed=3,
        hidden_size=512,
        head_dim=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        moe_intermediate_size=128,
        intermediate_size=256,
        initializer_range=0.05,
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_cuda_graph_prompt_buckets(tmp_path):
    """Prompts prefill in captured prompt-bucket steps (Tq a power of two) with exchanges of
    ~0.5 MB per shard (hidden 512). The 30B benchmark's first capture with shards failed
    (session 4: "operation failed due to a previous error during capture") where the small
    decode exchanges of `test_nccl_cuda_graph_steps` pass. == transformers (float32)."""
    import ray

    path = wide_checkpoint(tmp_path)
    prompts = BUCKET_PROMPTS
    ref = hf_greedy(path, prompts, NEW)
    ray.init(num_gpus=torch.cuda.device_count() - 1, num_cpus=8, include_dashboard=False)
    try:
        for local in (True, False):
            with graphed_shard_engine(path, local) as engine:
                got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
                assert engine.graphs.capture, "the capture failed: steps fell back to eager"
                assert any(tq >= 16 for _, tq, _ in engine.graphs.captured), engine.graphs.captured
                assert engine.metrics.num_recoveries == 0
            assert got == ref, local
    finally:
        ray.shutdown()


def test_capture_failure_falls_back_to_eager_static_steps(checkpoints):
    """A step that cannot be captured (here: a host sync inside the capture, injected) leaves
    the engine serving the same static steps eagerly, with the same tokens."""
    path = checkpoints("qwen3_moe")
    with Engine.from_pretrained(path, device="cuda", max_model_len=128) as engine:
        forward = engine.model.forward

        def syncing_forward(*args, **kwargs):
            if torch.cuda.is_current_stream_capturing():
                torch.cuda.current_stream().synchronize()  # not allowed while capturing
            return forward(*args, **kwargs)

        engine.model.forward = syncing_forward
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        assert not engine.graphs.capture and engine.graphs.num_graphs == 0
        assert engine.metrics.num_static_steps > 3
    assert got == hf_greedy(path, PROMPTS, NEW)


@pytest.mark.parametrize(
    "flips",
    [
        [("fused", "FUSED_CACHE_WRITE", False)],
        [("fused", "MATVEC", False)],  # one-row projections by cuBLAS (session 17's default)
        [("triton_experts", "MATVEC_KERNEL", "pairs")],
        [("triton_experts", "MATVEC_KERNEL", "dedup")],
        [("fused", "FUSED_NORM_MATVEC", True)],
        [("fused", "MATMUL_ROWS", 16)],
        [("triton_experts", "DEDUP", False)],
        [("triton_kernels", "COUNT_IN_ROUTING", False)],
        [("triton_experts", "PDL", False)],
        [("fused", "INDUCTOR_PDL", False)],  # the compiled pieces launched without PDL
        # Session 7's defaults, each back off, then all of them (session 6's defaults).
        [("fused", "DEFER_COMBINE", False)],
        [("triton_kernels", "ROPE_IN_ATTENTION", False)],
        [("triton_kernels", "ROUTER_TOPK", False)],
        [("triton_kernels", "ROUTER_TOPK_NORM", False)],
        [("triton_kernels", "SPLIT_MERGE_LAST", False)],
        [("triton_kernels", "SPLIT_KEYS", 256)],
        [
            ("triton_kernels", "ROPE_IN_ATTENTION", False),
            ("triton_kernels", "ROUTER_TOPK", False),
            ("triton_kernels", "ROUTER_TOPK_NORM", False),
            ("fused", "DEFER_COMBINE", False),
            ("triton_kernels", "SPLIT_KEYS", 256),
            ("triton_kernels", "SPLIT_MERGE_LAST", False),
        ],
        [("fused", "COLUMN_MAJOR", True)],
        [("triton_kernels", "TOPK_PACKED", True)],
        [("triton_experts", "DEDUP_ONE_ROW", True)],
        [("triton_kernels", "ROUTER_TOPK_ONE_PASS", 0)],
        [("triton_experts", "FUSED_MLP", True)],
        [("triton_experts", "SORTED_FUSED", False)],
        [("triton_experts", "DEDUP_DOWN_CONFIG", {})],
        # Session 10's batch-32 candidates: the one-kernel router for up to 32 rows (tensor
        # cores from 16 rows, or CUDA cores), the attention over up to 512 programs.
        [("triton_kernels", "ROUTER_TOPK_MAX_TOKENS", 32)],
        [
            ("triton_kernels", "ROUTER_TOPK_MAX_TOKENS", 32),
            ("triton_kernels", "ROUTER_TOPK_DOT_ROWS", 1 << 20),
        ],
        [("triton_kernels", "ATTENTION_PROGRAMS", 512)],
        # Opt-in: weights asked of L2 before waiting for the kernel ahead.
        [("fused", "MATVEC", False), ("fused", "MATVEC_O_PROJ", True)],
        [("triton_experts", "PREFETCH", True), ("triton_experts", "PRELOAD_DOWN", False)],
        [
            ("fused", "MATVEC", False),
            ("fused", "MATVEC_O_PROJ", True),
            ("triton_experts", "MATVEC_KERNEL", "pairs"),
            ("triton_experts", "PREFETCH", True),
        ],
        [("triton_experts", "MATVEC_KERNEL", "pairs"), ("triton_experts", "PREFETCH", True)],
        [
            ("triton_experts", "MATVEC_KERNEL", "pairs"),
            ("triton_experts", "PREFETCH", True),
            ("triton_experts", "DEDUP", False),
        ],
        # Session 18's defaults: weights loaded into registers before waiting for the kernel
        # ahead (one-row projections, the experts' down projection), each back off, then all
        # three with the compiled pieces' PDL (session 17's defaults).
        [("triton_experts", "PRELOAD_DOWN", False)],
        [("triton_kernels", "ROUTER_TOPK_PRELOAD", False)],
        [("triton_experts", "PRELOAD_ROWS", 16)],  # opt-in: a few rows' projections preloaded too
        [("triton_kernels", "ATTENTION_PRELOAD", True)],  # opt-in: the first past keys too
        [("triton_experts", "DEDUP_DOWN_PRELOAD", 16)],  # opt-in: several tokens' down projection
        [
            ("fused", "MATVEC", False),
            ("triton_experts", "PRELOAD_DOWN", False),
            ("fused", "INDUCTOR_PDL", False),
        ],
        # Opt-in: weights read ahead into L2 on a side stream (forked and joined inside the graphs).
        [("l2_ahead", "MODE", "o@attention,qkv+1@attention")],
        [("l2_ahead", "MODE", "o@start,router@start,qkv+1@moe")],
        # Session 22: the dense layer's gate/up as the matvec and the compiled silu * up.
        [("fused", "GLU_MATVEC", False)],
        # Session 23's opt-ins: a dense layer's add + norm inside its preloading q/k/v and gate/up
        # (layer 1 of the test model is dense), and its one-row gate/up preloaded.
        [("fused", "NORM_PRELOAD", ("qkv", "gate_up"))],
        [("triton_experts", "GLU_PRELOAD", True)],
    ],
    ids=lambda flips: "+".join(f"{switch}={value}" for _, switch, value in flips),
)
def test_fast_path_switches_give_the_tokens_of_transformers(tmp_path, monkeypatch, flips):
    """Each kernel switch of the static steps (kernels.py ablates them) flipped from its default:
    batch-1 decode and n-gram verify steps, replayed from graphs, == transformers (float32).
    Heads of 64, so the attention kernel (and its switches) serve the steps."""
    from specmoe_ray.models import fused, l2_ahead, triton_kernels
    from specmoe_ray.moe import triton_experts

    modules = {"fused": fused, "triton_kernels": triton_kernels, "triton_experts": triton_experts}
    modules["l2_ahead"] = l2_ahead
    for module, switch, value in flips:
        monkeypatch.setattr(modules[module], switch, value)
    path = wide_checkpoint(tmp_path)
    for prompts, draft in (([PROMPTS[1]], None), (PROMPTS, "ngram")):
        with Engine.from_pretrained(path, device="cuda", draft=draft, max_model_len=128) as engine:
            got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
            assert engine.graphs.num_replays > 3
        assert got == hf_greedy(path, prompts, NEW), (flips, draft)


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


@pytest.mark.parametrize("down_first", [False, True])
@pytest.mark.parametrize("half", [False, True])
def test_sorted_experts_in_one_launch_equal_two_launches(half, down_first, monkeypatch):
    """`triton_experts.SORTED_FUSED` on a GPU (its down blocks spin on their expert's gate/up
    counter while other programs run, which the CPU interpreter's one-by-one programs never
    do): a batch-32 step's 256 pairs over 128 experts (half: the replicas' split, I 384), bf16,
    eagerly and replayed from a CUDA graph (counters reset in between) == the two launches bit
    for bit, and close to float64 math. down_first: the down blocks on the first programs (as a
    GPU starting them out of order would), each giving up after 100 polls and computing its
    expert's gate/up itself, while the gate/up blocks run too."""
    import functools

    import torch.nn.functional as F

    from specmoe_ray.moe import triton_experts
    from specmoe_ray.moe.experts import LocalExperts

    if down_first:
        one_launch = functools.partial(triton_experts.expert_mlp_sorted, max_spins=100, down_first=True)
        monkeypatch.setattr(triton_experts, "expert_mlp_sorted", one_launch)

    g = torch.Generator().manual_seed(1)
    E, D, I, T, A = 128, 512, 384 if half else 768, 32, 8
    gate_up = torch.randn(E, 2 * I, D, generator=g) / D**0.5
    down = torch.randn(E, D, I, generator=g) / I**0.5
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)]).reshape(-1)
    experts = LocalExperts(list(range(E)), gate_up.cuda().bfloat16(), down.cuda().bfloat16(), E)
    xd, idsd = x.cuda().bfloat16(), ids.cuda()
    monkeypatch.setattr(triton_experts, "SORTED_FUSED", False)
    two = experts(xd, idsd, group=A)
    monkeypatch.setattr(triton_experts, "SORTED_FUSED", True)
    eager = experts(xd, idsd, group=A)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = experts(xd, idsd, group=A)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(captured.clone())
    torch.cuda.synchronize()
    assert torch.equal(eager, two)
    assert all(torch.equal(r, two) for r in replays)
    assert not experts._sorted_sync.any()
    ref = torch.empty(T * A, D, dtype=torch.float64)
    for p, e in enumerate(ids.tolist()):
        gate, up = F.linear(x[p // A].double(), gate_up[e].double()).chunk(2)
        ref[p] = F.linear(F.silu(gate) * up, down[e].double())
    rel = ((eager.double().cpu() - ref).norm() / ref.norm()).item()
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_bfloat16_graphs_after_a_one_gpu_engine_on_another_gpu(tmp_path):
    """What the 30B benchmark did before its capture with shards failed (session 4): a bf16
    one-GPU engine with graphs on GPU 0 first, then, in the same process, a bf16 engine with
    shards on the last GPU capturing its steps. The capture must hold, and the graphed steps
    give the tokens of the same static steps run eagerly ("padded")."""
    import ray

    path = wide_checkpoint(tmp_path)
    with Engine.from_pretrained(path, device="cuda:0", dtype="bfloat16", max_model_len=128) as engine:
        engine.generate(BUCKET_PROMPTS, GREEDY)
        assert engine.graphs.capture and engine.graphs.num_replays > 3
    ray.init(num_gpus=torch.cuda.device_count() - 1, num_cpus=8, include_dashboard=False)
    try:
        got = {}
        for steps in ("padded", "auto"):
            with graphed_shard_engine(path, True, dtype="bfloat16", step_graphs=steps) as engine:
                got[steps] = [o.token_ids for o in engine.generate(BUCKET_PROMPTS, GREEDY)]
                assert engine.metrics.num_recoveries == 0, steps
                if steps == "auto":
                    assert engine.graphs.capture, "the capture failed: steps fell back to eager"
                    assert engine.graphs.num_replays > 3
        assert got["auto"] == got["padded"]
    finally:
        ray.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_trunk_replicas_equal_one_gpu_and_transformers(tmp_path, checkpoints):
    """`ShardOptions.replicate_trunk` over NCCL: every GPU runs the trunk and its own experts,
    one sum per MoE layer (graphed steps: peer sums, the default; else NCCL's all_reduce).
    Eager, padded and captured steps (the replicas capture and
    replay theirs) with n-gram drafts: float32 == transformers. bfloat16 (hidden 512, prompt
    buckets captured too): `replica_exact` == the one-GPU engine's graphed steps bit for bit,
    and the float32 partial sums' graphed steps == their own padded steps."""
    import ray

    n = torch.cuda.device_count()
    ray.init(num_gpus=n - 1, num_cpus=8, include_dashboard=False)
    options = dict(replicate_trunk=True, cuda_graphs=True, collective_timeout_s=30)
    try:
        path = checkpoints("qwen3_moe")
        ref = hf_greedy(path, PROMPTS, NEW)
        for steps in ("off", "padded", "auto"):
            with Engine.from_pretrained(
                path,
                device=f"cuda:{n - 1}",
                num_shards=n,
                draft="ngram",
                max_model_len=128,
                step_graphs=steps,
                shard_options=ShardOptions(**options),
            ) as engine:
                got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
                assert engine.metrics.num_recoveries == 0, steps
                if steps == "auto":
                    assert engine.graphs.capture and engine.graphs.num_replays > 3
                    assert engine.shard_group.dispatch.peer is not None  # on by default (graphs)
            assert got == ref, steps
        wide = wide_checkpoint(tmp_path)
        runs = {}
        for name, shards, exact, steps in (
            ("one GPU", 0, False, "auto"),
            ("exact", n, True, "auto"),
            ("partial sums", n, False, "auto"),
            ("partial sums, padded", n, False, "padded"),
        ):
            with Engine.from_pretrained(
                wide,
                device=f"cuda:{n - 1}",
                dtype="bfloat16",
                num_shards=shards,
                max_model_len=128,
                step_graphs=steps,
                shard_options=ShardOptions(**options, replica_exact=exact),
            ) as engine:
                runs[name] = [o.token_ids for o in engine.generate(BUCKET_PROMPTS, GREEDY)]
                assert engine.metrics.num_recoveries == 0, name
                if steps == "auto":
                    assert engine.graphs.capture and engine.graphs.num_replays > 3
                    assert any(tq >= 16 for _, tq, _ in engine.graphs.captured)
                    if shards:  # peer sums by default, NCCL's with replica_exact
                        assert (engine.shard_group.dispatch.peer is None) == exact
        assert runs["exact"] == runs["one GPU"]
        assert runs["partial sums"] == runs["partial sums, padded"]
    finally:
        ray.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    "split, peer_rows, attention",
    [
        ("intermediate", 0, "replicated"),
        ("intermediate", 64, "replicated"),
        ("experts", 64, "replicated"),
        ("intermediate", 64, "heads"),
        ("experts", 0, "heads"),
    ],
)
def test_nccl_trunk_replicas_split_by_intermediate_size(tmp_path, checkpoints, split, peer_rows, attention):
    """`ShardOptions.replica_split = "intermediate"` over NCCL: every GPU holds every expert's
    slice of its intermediate size and computes every pair's share; one all_reduce sums them
    (peer_rows: static steps sum by peer loads inside the next add + norm instead,
    `replica_peer_sum`, `moe/peer_sum.py`; with whole experts too, each rank's share then its
    own experts' pairs; heads: `replica_attention`, each of 2 GPUs half the attention heads and
    their KV cache, each layer's attention output summed too, by peer loads with peer_rows).
    float32 with captured steps and n-gram drafts (verify rows included) == transformers;
    bfloat16 (prompt buckets captured too): graphed steps == the same group's padded steps.
    Peer sums' waits timed (`peer_sum.WAIT_TIMES`): every rank counted the same sums."""
    import os

    import ray

    from specmoe_ray.moe import peer_sum

    gpus = torch.cuda.device_count()
    n = 2 if attention == "heads" else gpus  # (the test models' 2 key/value heads split over 2)
    ray.init(num_gpus=gpus - 1, num_cpus=8, include_dashboard=False)
    options = ShardOptions(
        replicate_trunk=True,
        replica_split=split,
        replica_peer_sum=peer_rows,
        replica_attention=attention,
        cuda_graphs=True,
        collective_timeout_s=30,
        env_vars={peer_sum.WAIT_TIMES_ENV: "1"} if peer_rows else {},
    )
    try:
        path = checkpoints("qwen3_moe")
        ref = hf_greedy(path, PROMPTS, NEW)
        with Engine.from_pretrained(
            path,
            device=f"cuda:{gpus - 1}",
            num_shards=n,
            draft="ngram",
            max_model_len=128,
            shard_options=options,
        ) as engine:
            got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
            assert engine.graphs.capture and engine.graphs.num_replays > 3
            assert (engine.shard_group.dispatch.peer is not None) == bool(peer_rows)
            assert engine.metrics.num_recoveries == 0
            shards = engine.stats()["shards"]["shards"]
            waits = engine.shard_group.peer_wait_times()
        if peer_rows:  # every rank waited for the same sums at each position of a forward (read
            assert len(waits) == n, waits  # by rank 0 through its mappings of the peers' memory)
            for position in zip(*waits):
                counts = {sums for sums, _ in position}
                assert len(counts) == 1 and counts.pop() > 0, waits
            assert all(us >= 0 for rank in waits for _, us in rank), waits
        else:
            assert waits is None
        assert got == ref
        if split == "intermediate":  # every expert on every shard
            assert all(len(s["held"]) and all(len(v) == 8 for v in s["held"].values()) for s in shards)
        wide = wide_checkpoint(tmp_path)
        runs = {}
        for steps in ("auto", "padded"):
            with Engine.from_pretrained(
                wide,
                device=f"cuda:{gpus - 1}",
                dtype="bfloat16",
                num_shards=n,
                max_model_len=128,
                step_graphs=steps,
                shard_options=options,
            ) as engine:
                runs[steps] = [o.token_ids for o in engine.generate(BUCKET_PROMPTS, GREEDY)]
                assert engine.metrics.num_recoveries == 0, steps
        assert runs["auto"] == runs["padded"]
    finally:
        os.environ.pop(peer_sum.WAIT_TIMES_ENV, None)  # (env_vars reach the engine's process too)
        ray.shutdown()


@pytest.fixture
def ray_on_gpus():
    """Ray with every GPU but one (the engine's, the last) for shard actors -> the GPU count."""
    import ray

    n = torch.cuda.device_count()
    ray.init(num_gpus=n - 1, num_cpus=8, include_dashboard=False)
    yield n
    ray.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    "layout, peer_rows", [("replicas", 0), ("replicas", 64), ("local-shard", 0), ("replicas-heads", 64)]
)
def test_nccl_killed_shard_is_replaced_and_the_step_replayed(checkpoints, ray_on_gpus, layout, peer_rows):
    """Shard actors killed mid-generation over NCCL (graphed steps): once with
    the engine stepping on at once (the actor dies during a step or between steps), once after
    the group's watcher reported it. NCCL's collectives would wait for the dead rank until the
    watchdog ends the process; the watcher aborts the communicator instead, and the engine rolls
    the step back, re-forms the group on the freed GPU, refills its KV cache and replays the
    step: transformers' tokens, two recoveries, no process torn down, CUDA graphs still on.
    peer_rows: graphed steps sum by peer loads (`replica_peer_sum`), whose waits the watcher
    ends (`PeerSum.abort`) instead of a trap after the timeout. local-shard: the engine alone
    runs the trunk, its GPU holding shard 0, and exchanges tokens with the actor. replicas-heads:
    2 GPUs each half the attention heads (`replica_attention`), the new actor's half of the KV
    cache refilled."""
    import time

    import ray
    from conftest import generate_stepwise

    path, n = checkpoints("qwen3_moe"), ray_on_gpus
    options = ShardOptions(
        replicate_trunk=layout.startswith("replicas"),
        local_shard=layout == "local-shard",
        cuda_graphs=True,
        collective_timeout_s=20,
        replica_peer_sum=peer_rows,
        replica_attention="heads" if layout == "replicas-heads" else "replicated",
    )
    shards = 2 if layout == "replicas-heads" else n  # (the test model's 2 key/value heads)
    reports = []

    def kill(wait: bool):
        def run(e):
            group = e.shard_group
            ray.kill(group.actors[0], no_restart=True)
            deadline = time.monotonic() + 20
            while wait and group.failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
            reports.append(group.failure)

        return run

    with Engine.from_pretrained(
        path, device=f"cuda:{n - 1}", num_shards=shards, max_model_len=128, shard_options=options
    ) as engine:
        # 64 tokens: decode steps run up to 4 tokens ahead (graphs).
        many = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        got = generate_stepwise(engine, PROMPTS, many, at={4: kill(False), 8: kill(True)})
        recoveries = engine.metrics.num_recoveries
        graphs_kept = engine.shard_group.options.cuda_graphs and engine.graphs.capture
    assert got == hf_greedy(path, PROMPTS, 64)
    assert recoveries == 2, reports
    assert graphs_kept  # dead shards (the watcher saw them): the new groups capture anew
    assert reports[1] is not None and reports[1].startswith("shard 1 (rank 1) stopped: "), reports


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("peer_rows", [0, 64])
def test_nccl_stopped_shard_is_replaced_before_the_timeouts(checkpoints, ray_on_gpus, peer_rows):
    """A trunk replica's process stopped (SIGSTOP) mid-generation: its GPU peers wait in NCCL's
    collectives or the peer sums' spin waits, which would end this process at the collective
    timeout (NCCL's watchdog; the waits' trap). The group's watcher sees the step run past half
    the timeout, asks the actors, names the one that does not answer and ends the waits; the
    step is replayed on a re-formed group: transformers' tokens, one recovery, the process
    alive."""
    import os
    import signal

    import ray
    from conftest import generate_stepwise

    path, n = checkpoints("qwen3_moe"), ray_on_gpus
    options = ShardOptions(
        replicate_trunk=True, cuda_graphs=True, collective_timeout_s=40, replica_peer_sum=peer_rows
    )

    def stop(e):
        pid = ray.get(e.shard_group.actors[0].info.remote(), timeout=30)["pid"]
        os.kill(pid, signal.SIGSTOP)

    with Engine.from_pretrained(
        path, device=f"cuda:{n - 1}", num_shards=n, max_model_len=128, shard_options=options
    ) as engine:
        many = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        got = generate_stepwise(engine, PROMPTS, many, at={4: stop})
        recoveries = engine.metrics.num_recoveries
    assert got == hf_greedy(path, PROMPTS, 32)
    assert recoveries == 1


@pytest.mark.parametrize("k", [0, 3])
def test_sampling_kernel_draws_the_tokens_of_torch(k, monkeypatch):
    """A sampled step's last draw in one Triton kernel (`engine/triton_sampling.py`) against the
    torch path it replaces (`SAMPLE` off), same logits and seeds: temperature-only rows (the
    kernel's softmax), top-k / top-p rows (their filters after the sort, `sorted_probs`, and the
    draw from their weights) and k = 3 drafts. Float32 masses round
    otherwise than torch's softmax, so a uniform within ~1e-6 of a CDF step may fall either side:
    all but a few of 512 rows agree."""
    from specmoe_ray.engine import triton_sampling
    from specmoe_ray.engine.sampling import make_generator
    from specmoe_ray.spec import rejection
    from specmoe_ray.spec.proposer import empty_proposal, one_hot_proposal

    dev, B, V = torch.device("cuda"), 512, 32000
    logits = 3 * torch.randn(B, k + 1, V, device=dev, generator=torch.Generator(device=dev).manual_seed(k))
    params = [
        SamplingParams(
            temperature=0.5 + b % 3 * 0.5, top_k=0 if b % 2 else 40, top_p=1.0 if b % 4 < 2 else 0.9
        )
        for b in range(B)
    ]
    proposal = (
        empty_proposal(B, dev)
        if k == 0
        else one_hot_proposal([[b % V, 7, 9][: b % 4] for b in range(B)], dev)
    )
    runs = []
    for kernel in (True, False):
        monkeypatch.setattr(triton_sampling, "SAMPLE", kernel)
        result = rejection.verify(logits, proposal, params, [make_generator(b, dev) for b in range(B)])
        runs.append(rejection_rows(result))
    same = sum(a == b for a, b in zip(*runs))
    assert same >= B - 3, f"{B - same} of {B} rows differ"


def test_greedy_verify_kernel_keeps_the_drafts_of_torch(monkeypatch):
    """Greedy rows with drafts: the one-kernel rule (`triton_sampling.greedy_verify`) against the
    torch path (`SAMPLE` off), same logits and drafts (some equal to the argmax): the same tokens
    and counts, exactly."""
    from specmoe_ray.engine import triton_sampling
    from specmoe_ray.spec import rejection
    from specmoe_ray.spec.proposer import one_hot_proposal

    dev, B, k, V = torch.device("cuda"), 256, 3, 32000
    logits = torch.randn(B, k + 1, V, device=dev, generator=torch.Generator(device=dev).manual_seed(5))
    best = logits.argmax(-1).tolist()
    drafts = [[t if (b + i) % 5 else t + 1 for i, t in enumerate(best[b][: b % (k + 1)])] for b in range(B)]
    greedy = [SamplingParams(temperature=0.0)] * B
    runs = []
    for kernel in (True, False):
        monkeypatch.setattr(triton_sampling, "SAMPLE", kernel)
        result = rejection.verify(logits, one_hot_proposal(drafts, dev), greedy, [None] * B)
        runs.append((result.tokens.tolist(), result.num_accepted.tolist()))
    assert runs[0] == runs[1]
    assert 0 < sum(runs[0][1]) < sum(len(d) for d in drafts)


def rejection_rows(result) -> list[list[int]]:
    return [row[: n + 1] for row, n in zip(result.tokens.tolist(), result.num_accepted.tolist())]


def test_verification_queues_behind_the_forward_without_waiting(monkeypatch):
    """A step's proposal (prompt lookup, a draft model's sampling between its forwards) and
    verification (greedy rows with drafts, sampling rows with top-k / top-p, ragged drafts, no
    drafts) launch behind the forward without a host wait: torch's
    sync debug mode turns any synchronizing CUDA call into an error, until the step's one read
    (and does so for the plain copies used before, `sampling.PINNED` off). Greedy rows keep
    exactly the drafts the forced argmaxes allow."""
    from specmoe_ray.engine import sampling
    from specmoe_ray.engine.sampling import make_generator
    from specmoe_ray.spec import rejection
    from specmoe_ray.spec.proposer import DraftRequest, empty_proposal, one_hot_proposal, sample_drafts

    dev, V = torch.device("cuda"), 1000
    drafts = [[1, 2, 3], [4], [], [5, 6]]
    logits = torch.randn(4, 4, V, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    logits[1, 0, 4] = logits[1, 1, 7] = 50.0  # row 1: draft 4 kept, bonus 7
    logits[3, 0, 5] = logits[3, 1, 9] = 50.0  # row 3: 5 kept, 6 rejected for 9
    params = [
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=50),
        SamplingParams(temperature=0.0),
    ]
    gens = [make_generator(1, dev), None, make_generator(2, dev), None]
    plain = [make_generator(3, dev), None, make_generator(4, dev), None]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(10_000_000)  # (the GPU still busy, as with a step's forward)
        proposal = one_hot_proposal(drafts, dev)
        result = rejection.verify(logits, proposal, params, gens)
        decoded = rejection.verify(logits[:, :1], empty_proposal(4, dev), params, plain)  # k = 0
        # k = 0, temperature only: the one-kernel draw from the logits (`triton_sampling`)
        hot = [SamplingParams(temperature=0.7)] * 4
        sampled = rejection.verify(
            logits[:, :1], empty_proposal(4, dev), hot, [make_generator(b, dev) for b in range(4)]
        )
        greedy = rejection.verify(
            logits, one_hot_proposal(drafts, dev), [params[1]] * 4, [None] * 4
        )  # 1 kernel
        # A draft model's token per row (greedy and sampled rows), as between its forwards.
        reqs = [DraftRequest(str(b), [1], 1, p.temperature, p.top_k, p.top_p) for b, p in enumerate(params)]
        drafted, _, _ = sample_drafts(logits[:, 0], reqs, 8, {})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    tokens, accepted = result.tokens.tolist(), result.num_accepted.tolist()
    assert tokens[1] == [4, 7, -1, -1] and accepted[1] == 1
    assert tokens[3] == [5, 9, -1, -1] and accepted[3] == 1
    for b in (0, 2):  # sampling rows: a prefix of the drafts, then one token of the vocabulary
        a = accepted[b]
        assert a <= len(drafts[b]) and tokens[b][:a] == drafts[b][:a] and 0 <= tokens[b][a] < V
    assert decoded.num_accepted.tolist() == [0] * 4 and all(0 <= t < V for t in decoded.tokens[:, 0].tolist())
    assert all(0 <= t < V for t in sampled.tokens[:, 0].tolist())
    assert greedy.tokens.tolist()[1] == [4, 7, -1, -1] and greedy.tokens.tolist()[3] == [5, 9, -1, -1]
    drafted = drafted.tolist()
    assert drafted[1] == 4 and drafted[3] == 5 and all(0 <= t < V for t in drafted)

    monkeypatch.setattr(sampling, "PINNED", False)  # the check sees a wait where there is one
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            rejection.verify(logits, one_hot_proposal(drafts, dev), params, gens)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_draft_few_row_steps_preload_and_keep_the_drafts(checkpoints, monkeypatch):
    """`fused.DRAFT_PRELOAD_ROWS`: a draft model's static steps of 2 .. 4 rows (2 or 3 sequences
    drafting) project by `triton_experts.preload_rows` (the proposer's steps only: the target's
    `PRELOAD_ROWS` stays 1); the drafts (greedy, float32) equal those of cuBLAS's steps
    (DRAFT_PRELOAD_ROWS = 1) and of eager steps."""
    from specmoe_ray.models import fused
    from specmoe_ray.models.loader import load_trunk
    from specmoe_ray.moe import triton_experts
    from specmoe_ray.spec.proposer import DraftModelProposer, DraftRequest

    rows = []
    kernel = triton_experts.preload_rows
    monkeypatch.setattr(
        triton_experts, "preload_rows", lambda x, w, **k: rows.append(x.shape[0]) or kernel(x, w, **k)
    )
    path = checkpoints("qwen3")
    seqs = [[5, 9, 17, 3, 60, 2], [7, 7, 7, 7], [30, 31, 32, 33, 34]]
    got, calls = {}, {}
    for name, limit, graphs in (("preload", 4, "auto"), ("cublas", 1, "auto"), ("eager", 4, "off")):
        monkeypatch.setattr(fused, "DRAFT_PRELOAD_ROWS", limit)
        proposer = DraftModelProposer(load_trunk(path, device="cuda"), 4, 64, step_graphs=graphs)
        requests = [[DraftRequest(f"{B}-{b}", list(s), 3) for b, s in enumerate(seqs[:B])] for B in (2, 3)]
        got[name] = [proposer.propose(r).host_tokens for r in requests]
        calls[name] = list(rows)
        rows.clear()
    assert calls["preload"] and set(calls["preload"]) <= {2, 3, 4}, calls
    assert calls["cublas"] == calls["eager"] == [] and triton_experts.PRELOAD_ROWS == 1
    assert got["preload"] == got["cublas"] == got["eager"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafts_read_after_verification_on_cuda_graphs(tmp_path, monkeypatch, temperature):
    """`engine.DEFER_DRAFT_READ` on CUDA graphs: the verify step's graph takes the draft model's
    drafts from the device, launched before the host has read them (the draft's GPU time from
    events): the same tokens as reading them first (greedy: transformers'; seeded sampling:
    equal), the same acceptance, and the draft's time measured."""
    from specmoe_ray.engine import engine as engine_module

    path = wide_checkpoint(tmp_path)
    lengths = (NEW, 7, NEW - 3)
    params = [
        SamplingParams(max_tokens=n, temperature=temperature, seed=i, ignore_eos=True)
        for i, n in enumerate(lengths)
    ]
    runs, stats = {}, {}
    for defer in (True, False):
        monkeypatch.setattr(engine_module, "DEFER_DRAFT_READ", defer)
        with Engine.from_pretrained(
            path, device="cuda", draft=path, num_speculative_tokens=3, max_model_len=128
        ) as engine:
            runs[defer] = [o.token_ids for o in engine.generate(PROMPTS, params)]
            stats[defer] = engine.stats()
            assert engine.graphs.num_replays > 3 and engine._defers_draft_read() == defer
    assert runs[True] == runs[False]
    keys = ("acceptance_rate", "mean_accepted_length", "num_steps")
    assert [stats[True][k] for k in keys] == [stats[False][k] for k in keys]
    assert stats[True]["draft_time_s"] > 0 and stats[True]["acceptance_rate"] > 0.6
    if temperature == 0.0:
        assert runs[True] == [r[:n] for r, n in zip(hf_greedy(path, PROMPTS, NEW), lengths)]
