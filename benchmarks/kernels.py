"""Where a step's GPU time goes, kernel by kernel, and the expert kernels' block sizes.

(1) `--layers` layers of the Qwen3-30B-A3B shape (random bf16 weights; every layer costs the
same, so a few show the per-layer picture in seconds), our engine's CUDA graph of one step of B
sequences x T tokens at --context cached tokens: replay time, then torch.profiler over replays
(and over the same static step run eagerly, whose kernels are the same) grouped by kernel name:
launches and GPU microseconds per step. Then whole engine steps at batch 1 (host included).

(2) The expert stage alone at T tokens (random top-8 routing, 4 layers' weights in turn so no
weights stay in L2), each variant replayed from a CUDA graph: the sorted Triton kernel, the
per-pair kernel for several block sizes, the deduplicated per-pair kernel (an expert's pairs
read its weights once), the grouped GEMM; floor = the distinct experts' bytes /
copy bandwidth.

(3) One-row dense projections (q/k/v, o_proj, router): cuBLAS against the per-pair kernel as a
matrix-vector product, block sizes swept with --sweep.

(4) Rank 0's bookkeeping of a static expert exchange (no collective): the send buffer packed by
torch ops (`pack_static`) against the Triton kernel (`pack_pairs`), plus the results' gather,
for 2 and 4 shards at batch 1, 8 and 32.

(5) The sorted expert path of a batch-32 decode step (256 pairs: sort_pairs + gate_up + down),
as one GPU holding all 128 experts and as one of 2 or 4 shards (64 or 32 experts; its static
exchange's 256 rows: its own pairs, then padding, id -1); the sorted kernel's block sizes swept
with --sweep (`triton_experts.SORTED_CONFIG`); and as a trunk replica calls them (the 32 tokens
and all 256 pairs, those held elsewhere skipped).

(6) A trunk replica's step on one GPU without its peer (`moe/replica.py`, rank 0 of 2, a process
group of one: its all_reduce sums nothing): the same 8-layer step graph as (1) at --batch, with
all 128 experts in-process, then as a replica holding experts 0-63 (partial sums; `exact`). A
2-GPU step's time minus this one's is what the collective costs, peer skew included. Last, the
trunk alone (routing, no expert stage): the part of a layer every replica repeats.

(7) `--split`: one of 2 GPUs' expert stage at --expert-tokens tokens, experts split by expert
(64 whole ones) or by intermediate size (all 128, half of I each), beside one GPU's.
With --sweep, the gate/up and the down projection's blocks swept apart (`SORTED_CONFIG`,
`SORTED_DOWN_CONFIG`) at the last --expert-tokens, per layout; with --tables, each layout's
kernels there (profiled eagerly).

(8) `--l2`: weights read ahead into L2 (`models/l2_ahead.py`): o_proj [2048 x 4096] and q/k/v
[5120 x 2048] by cuBLAS for one row, L2 flushed before each: cold, right after a bulk prefetch,
and behind a one-program spin kernel (the attention's stand-in) with and without the prefetch on
a side stream; and the prefetch's own time per chunk size.

    python benchmarks/kernels.py --layers 4 --batch 1 --tq 1 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import qwen3_30b_a3b_config  # noqa: E402
from gpu import copy_bandwidth, engine_on_hf_weights, ours_run, profile_steps, prompts_for  # noqa: E402

from specmoe_ray.engine.graph import StepGraphs  # noqa: E402
from specmoe_ray.models import fused, l2_ahead, triton_kernels  # noqa: E402
from specmoe_ray.moe import triton_experts  # noqa: E402
from specmoe_ray.moe.experts import LocalExperts  # noqa: E402

if triton_experts.AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _busy_kernel(out_ptr, ns, PDL: tl.constexpr):
        """A stand-in for the attention kernel ahead of o_proj: few programs busy for ns
        nanoseconds (no memory traffic), launched as our kernels are (PDL: wait for the kernel
        ahead, then let the next one launch)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        start = _globaltimer()
        now = start
        while now - start < ns:
            now = _globaltimer()
        tl.store(out_ptr + tl.program_id(0), now - start)

    @triton.jit
    def _globaltimer():
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of fn() replayed from a CUDA graph (captured after a warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_replay_ms(graphs: StepGraphs, key, reps: int = 20) -> float:
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs._graphs[key].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(fn, steps: int) -> tuple[list[tuple[str, int, float]], float]:
    """Profile `steps` calls of fn: [(kernel name, launches per step, us per step)], total us."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    count, total = defaultdict(int), defaultdict(float)
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.elapsed_us() > 0:
            count[e.name] += 1
            total[e.name] += e.time_range.elapsed_us()
    rows = sorted(((n, count[n] / steps, total[n] / steps) for n in count), key=lambda r: -r[2])
    return rows, sum(total.values()) / steps


def print_table(title: str, rows, total: float, layers: int, top: int = 30) -> None:
    launches = sum(r[1] for r in rows)
    print(f"  {title}: {launches:.0f} kernels ({launches / layers:.1f} per layer), {total:.0f} us of kernels")
    for name, n, us in rows[:top]:
        print(f"    {us:8.1f} us  {100 * us / max(total, 1e-9):5.1f}%  x{n:5.1f}  {name[:100]}")


PAIR_BLOCKS = {
    (n, k, w): {"block_n": n, "block_k": k, "num_warps": w}
    for n, k, w in [(4, 2048, 4), (4, 1024, 4), (16, 256, 8), (16, 256, 4), (8, 512, 4), (8, 256, 8)]
}


def random_engine(a):
    """(config, our engine) of --layers layers of the 30B shape, random bf16 weights (seed 0)."""
    from transformers import AutoModelForCausalLM

    cfg = qwen3_30b_a3b_config()
    cfg.num_hidden_layers = a.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return cfg, engine_on_hf_weights(hf, max_num_seqs=max(a.batch), max_model_len=a.context + 16)


def step_profile(a, bandwidth: float) -> None:
    cfg, engine = random_engine(a)
    graphs = StepGraphs(engine.model, engine.cache, max(a.batch), max(a.tq), capture=True)
    print(f"(1) {a.layers} layers of qwen3-30b-a3b, context {a.context}")
    for B in a.batch:
        slots = [engine.cache.allocate() for _ in range(B)]
        for T in a.tq:
            feeds = torch.randint(1, cfg.vocab_size, (B, T)).tolist()
            key = graphs.key(B, T, a.context + T)
            args = (key, feeds, [a.context] * B, slots, [0] * B)
            graphs.run(*args)  # capture
            ms = graph_replay_ms(graphs, key)
            print(f" B={B} T={T}: replay {ms:.3f} ms ({1e3 * ms / a.layers:.1f} us per layer)")
            rows, total = kernel_table(lambda key=key: graphs._graphs[key].replay(), 5)
            if rows:
                print_table("replay", rows, total, a.layers)
            rows, total = kernel_table(lambda key=key: graphs._run(*graphs._static[key]), 5)
            print_table("same step, eager", rows, total, a.layers)
        for s in slots:
            engine.cache.free(s)
    print(
        " ablations (replay ms, median of 5 interleaved rounds; each one kernel back to the path it"
        " replaces; 'all' captured twice: the spread between those two is noise):"
    )
    variants = {
        "all": [],
        "no attention kernel": [(triton_kernels, "ATTENTION", False)],
        "no routing kernel": [(triton_kernels, "ROUTING", False)],
        "load counted apart from routing": [(triton_kernels, "COUNT_IN_ROUTING", False)],
        "one-row projections by the per-pair kernel (no preload)": [
            (triton_experts, "MATVEC_KERNEL", "pairs")
        ],
        "one-row projections by the per-pair kernel n8 k256 w8 (session 7)": [
            (triton_experts, "MATVEC_KERNEL", "pairs"),
            (triton_experts, "MATVEC_CONFIG", PAIR_BLOCKS[8, 256, 8]),
        ],
        "one-row projections by the per-pair kernel n4 k1024 w4": [
            (triton_experts, "MATVEC_KERNEL", "pairs"),
            (triton_experts, "MATVEC_CONFIG", PAIR_BLOCKS[4, 1024, 4]),
        ],
        "per-pair experts (no dedup)": [(triton_experts, "DEDUP", False)],
        "dedup experts for one token's pairs": [(triton_experts, "DEDUP_ONE_ROW", True)],
        "dedup down projection with gate/up's blocks (session 7)": [
            (triton_experts, "DEDUP_DOWN_CONFIG", {})
        ],
        "dedup down n64 k128 w4": [
            (triton_experts, "DEDUP_DOWN_CONFIG", {"block_n": 64, "block_k": 128, "num_warps": 4})
        ],
        "experts' projections in one launch (opt-in)": [(triton_experts, "FUSED_MLP", True)],
        "experts' projections in one launch, 2 programs per SM": [
            (triton_experts, "FUSED_MLP", True),
            (triton_experts, "MLP_PROGRAMS", 2),
        ],
        "experts' projections in one launch, 8 programs per SM": [
            (triton_experts, "FUSED_MLP", True),
            (triton_experts, "MLP_PROGRAMS", 8),
        ],
        "experts' projections in one launch, a program per block": [
            (triton_experts, "FUSED_MLP", True),
            (triton_experts, "MLP_PROGRAMS", 0),
        ],
        "experts' projections in one launch, down n16": [
            (triton_experts, "FUSED_MLP", True),
            (triton_experts, "MLP_CONFIG", {**triton_experts.MLP_CONFIG, "block_n2": 16}),
        ],
        # Session 17: the sorted one launch won once its down blocks were widened (they share the
        # launch's warps and registers with gate/up's); the same for one token's pairs.
        **{
            f"experts' projections in one launch, a program per block, down n{n} k{k}": [
                (triton_experts, "FUSED_MLP", True),
                (triton_experts, "MLP_PROGRAMS", 0),
                (triton_experts, "MLP_CONFIG", {**triton_experts.MLP_CONFIG, "block_n2": n, "block_k2": k}),
            ]
            for n, k in [(16, 256), (32, 256), (32, 128), (64, 128)]
        },
        "per-pair gate/up n4 k2048 w4": [(triton_experts, "PAIR_CONFIG", PAIR_BLOCKS[4, 2048, 4])],
        "per-pair gate/up n4 k1024 w4": [(triton_experts, "PAIR_CONFIG", PAIR_BLOCKS[4, 1024, 4])],
        "per-pair gate/up n16 k256 w8": [(triton_experts, "PAIR_CONFIG", PAIR_BLOCKS[16, 256, 8])],
        "per-pair down n4 k1024 w4": [(triton_experts, "PAIR_DOWN_CONFIG", PAIR_BLOCKS[4, 1024, 4])],
        "per-pair down n16 k256 w4": [(triton_experts, "PAIR_DOWN_CONFIG", PAIR_BLOCKS[16, 256, 4])],
        "per-pair down n8 k512 w4": [(triton_experts, "PAIR_DOWN_CONFIG", PAIR_BLOCKS[8, 512, 4])],
        "cache write by index_put (not in the rope)": [(fused, "FUSED_CACHE_WRITE", False)],
        "one-row projections by dedup (opt-in)": [
            (fused, "MATVEC", True),
            (triton_experts, "MATVEC_KERNEL", "dedup"),
        ],
        "attention split every 256 keys": [(triton_kernels, "SPLIT_KEYS", 256)],
        "split attention merged by a kernel": [(triton_kernels, "SPLIT_MERGE_LAST", False)],
        "norm + rope + cache write before attention": [(triton_kernels, "ROPE_IN_ATTENTION", False)],
        "router by cuBLAS + routing kernel": [(triton_kernels, "ROUTER_TOPK", False)],
        "one-kernel router up to 32 tokens (tensor cores from 16)": [
            (triton_kernels, "ROUTER_TOPK_MAX_TOKENS", 32)
        ],
        "one-kernel router up to 32 tokens, tensor cores from 8": [
            (triton_kernels, "ROUTER_TOPK_MAX_TOKENS", 32),
            (triton_kernels, "ROUTER_TOPK_DOT_ROWS", 8),
        ],
        "one-kernel router up to 32 tokens, CUDA cores (session 10)": [
            (triton_kernels, "ROUTER_TOPK_MAX_TOKENS", 32),
            (triton_kernels, "ROUTER_TOPK_DOT_ROWS", 1 << 20),
        ],
        "one-kernel router up to 32 tokens, add + norm before it": [
            (triton_kernels, "ROUTER_TOPK_MAX_TOKENS", 32),
            (triton_kernels, "ROUTER_TOPK_NORM", False),
        ],
        "attention up to 256 programs": [(triton_kernels, "ATTENTION_PROGRAMS", 256)],
        "attention up to 512 programs": [(triton_kernels, "ATTENTION_PROGRAMS", 512)],
        "attention up to 512 programs, split every 32 keys": [
            (triton_kernels, "ATTENTION_PROGRAMS", 512),
            (triton_kernels, "SPLIT_KEYS", 32),
        ],
        "one-kernel router 512 columns at a time (session 6)": [(triton_kernels, "ROUTER_TOPK_ONE_PASS", 0)],
        "top-k picks by packed (value, expert) keys (opt-in)": [(triton_kernels, "TOPK_PACKED", True)],
        "add + norm before the one-kernel router": [(triton_kernels, "ROUTER_TOPK_NORM", False)],
        "MoE combine apart from the next add + norm": [(fused, "DEFER_COMBINE", False)],
        "session 6's defaults (session 7's kernel-count switches off)": [
            (triton_kernels, "ROPE_IN_ATTENTION", False),
            (triton_kernels, "ROUTER_TOPK", False),
            (triton_kernels, "ROUTER_TOPK_NORM", False),
            (fused, "DEFER_COMBINE", False),
            (triton_kernels, "SPLIT_KEYS", 256),
            (triton_kernels, "SPLIT_MERGE_LAST", False),
        ],
        # Session 18's defaults: weights loaded into registers before waiting for the kernel ahead
        # (PDL): one-row projections (`MATVEC_KERNEL` "preload"), the experts' down projection.
        "one-row projections by cuBLAS (session 17)": [(fused, "MATVEC", False)],
        "o_proj alone preloaded, q/k/v by cuBLAS": [(fused, "MATVEC", False), (fused, "MATVEC_O_PROJ", True)],
        **{
            f"one-row projections preloaded n{bn} w{nw}": [
                (triton_experts, "PRELOAD_CONFIG", {"block_n": bn, "num_warps": nw})
            ]
            for bn, nw in [(2, 4), (4, 8), (8, 8)]
        },
        "experts' down not preloaded": [(triton_experts, "PRELOAD_DOWN", False)],
        "router rows not preloaded": [(triton_kernels, "ROUTER_TOPK_PRELOAD", False)],
        "attention's first past keys preloaded (opt-in)": [(triton_kernels, "ATTENTION_PRELOAD", True)],
        **{
            f"several tokens' down projection preloaded n{n} (opt-in)": [
                (triton_experts, "DEDUP_DOWN_PRELOAD", n)
            ]
            for n in (16, 32)
        },
        **{
            f"projections of <= {n} rows preloaded (opt-in)": [(triton_experts, "PRELOAD_ROWS", n)]
            for n in (4, 8, 16)
        },
        "session 17's defaults (no preloads, compiled pieces without PDL)": [
            (fused, "MATVEC", False),
            (triton_experts, "PRELOAD_DOWN", False),
            (fused, "INDUCTOR_PDL", False),
        ],
        "o_proj by the matrix-vector kernel (session 7)": [
            (fused, "MATVEC", False),
            (fused, "MATVEC_O_PROJ", True),
            (triton_experts, "MATVEC_KERNEL", "pairs"),
        ],
        "experts' down weights prefetched into L2 (opt-in)": [
            (triton_experts, "PREFETCH", True),
            (triton_experts, "PRELOAD_DOWN", False),
        ],
        "o_proj by the matrix-vector kernel + prefetch, down prefetched (opt-in)": [
            (fused, "MATVEC", False),
            (fused, "MATVEC_O_PROJ", True),
            (triton_experts, "MATVEC_KERNEL", "pairs"),
            (triton_experts, "PREFETCH", True),
            (triton_experts, "PRELOAD_DOWN", False),
        ],
        "one-row projections by the matrix-vector kernel + prefetch (opt-in)": [
            (triton_experts, "MATVEC_KERNEL", "pairs"),
            (triton_experts, "PREFETCH", True),
        ],
        # Session 18: with q/k/v preloading during the add + norm ahead of it, its weights from L2
        # might now pay (session 17 measured it behind cuBLAS's q/k/v).
        "next q/k/v read ahead during the attention (opt-in)": [(l2_ahead, "MODE", "qkv+1@attention")],
        "next q/k/v read ahead from the MoE block's start (opt-in)": [(l2_ahead, "MODE", "qkv+1@moe")],
        "o_proj read ahead into L2 during the attention (opt-in)": [(l2_ahead, "MODE", "o@attention")],
        "o_proj read ahead into L2 from the layer's start (opt-in)": [(l2_ahead, "MODE", "o@start")],
        "o_proj + next q/k/v read ahead during the attention (opt-in)": [
            (l2_ahead, "MODE", "o@attention,qkv+1@attention")
        ],
        "o_proj during the attention, next q/k/v during the experts (opt-in)": [
            (l2_ahead, "MODE", "o@attention,qkv+1@moe")
        ],
        "one-row projections by cuBLAS on column-major weights (opt-in)": [(fused, "COLUMN_MAJOR", True)],
        "add + norm inside the projections (opt-in)": [(fused, "FUSED_NORM_MATVEC", True)],
        "projections of <= 16 rows by rows_matmul (opt-in)": [(fused, "MATMUL_ROWS", 16)],
        "no programmatic dependent launches": [
            (triton_experts, "PDL", False),
            (fused, "INDUCTOR_PDL", False),
        ],
        "compiled pieces without programmatic dependent launch": [(fused, "INDUCTOR_PDL", False)],
        "torch's sort for > 64 pairs": [(triton_experts, "STABLE_SORT", False)],
        "session 5's defaults (per-pair one-row, index_put, no PDL)": [
            (triton_experts, "MATVEC_KERNEL", "pairs"),
            (triton_experts, "PRELOAD_DOWN", False),
            (fused, "INDUCTOR_PDL", False),
            (fused, "FUSED_CACHE_WRITE", False),
            (triton_experts, "PDL", False),
        ],
        "all (again)": [],
    }
    if a.only:  # the named variants (substrings), with "all" and "all (again)"
        variants = {n: f for n, f in variants.items() if not f or any(w in n for w in a.only)}
    for B in a.batch:
        slots = [engine.cache.allocate() for _ in range(B)]
        for T in a.tq:
            feeds = torch.randint(1, cfg.vocab_size, (B, T)).tolist()
            captured = {}
            for name, flags in variants.items():  # the switches act when a graph is captured
                saved = [(mod, k, getattr(mod, k)) for mod, k, _ in flags]
                for mod, k, v in flags:
                    setattr(mod, k, v)
                g2 = StepGraphs(engine.model, engine.cache, B, max(a.tq), capture=True)
                key = g2.key(B, T, a.context + T)
                g2.run(key, feeds, [a.context] * B, slots, [0] * B)
                for mod, k, v in saved:
                    setattr(mod, k, v)
                captured[name] = (g2, key)
            times = defaultdict(list)
            for _ in range(5):  # interleaved: clock and temperature drift reach every variant alike
                for name, (g2, key) in captured.items():
                    times[name].append(graph_replay_ms(g2, key))
            print(f"  B={B} T={T}: " + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in times.items()))
            del captured
        for s in slots:
            engine.cache.free(s)
    rows = prompts_for(1, 32, cfg.vocab_size, 0)
    run = ours_run(engine, rows, 64)
    run()
    before = engine.stats()
    t0 = time.perf_counter()
    n = run()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    steps = engine.stats()["num_steps"] - before["num_steps"]
    print(f" engine batch 1: {n / dt:.1f} tok/s, {1e3 * dt / steps:.3f} ms per step (host included)")
    profile_steps(engine, rows, "cuda")


def routed_ids(T: int, E: int, A: int, overlap: bool, g: torch.Generator) -> torch.Tensor:
    """[T * A] expert ids: each token's A distinct experts drawn from all E (independent), or
    from one pool of 2A shared by the step's tokens (overlap: consecutive tokens of a sequence
    often share experts, which a per-pair kernel reads once per pair)."""
    pool = torch.randperm(E, device="cuda", generator=g)[: 2 * A] if overlap else None
    rows = []
    for _ in range(T):
        if pool is None:
            rows.append(torch.randperm(E, device="cuda", generator=g)[:A])
        else:
            rows.append(pool[torch.randperm(2 * A, device="cuda", generator=g)[:A]])
    return torch.stack(rows).reshape(-1)


def random_experts(held: int, E: int, D: int, I: int, n_layers: int, g: torch.Generator) -> list:
    """n_layers layers of experts 0 .. held - 1 of E (random bf16, Qwen3-30B-A3B's scale)."""
    return [
        LocalExperts(
            list(range(held)),
            torch.randn(held, 2 * I, D, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
            torch.randn(held, D, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
            E,
        )
        for _ in range(n_layers)
    ]


def expert_variants(a, bandwidth: float) -> None:
    E, D, I, A, n_layers = 128, 2048, 768, 8, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = random_experts(E, E, D, I, n_layers, g)
    expert_bytes = 3 * D * I * 2
    blocks = [(8, 256, 8)] + (
        [(bn, bk, w) for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8)] if a.sweep else []
    )
    print("(2) expert stage, qwen3-30b-a3b experts, us per layer (graph replay)")
    for overlap in (False, True):
        for T in a.expert_tokens:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
            ids = routed_ids(T, E, A, overlap, g)
            distinct = ids.unique().numel()
            floor = 1e3 * distinct * expert_bytes / bandwidth  # ms
            xs = x[:, None].expand(T, A, D).reshape(-1, D)
            ref = layers[0](xs, ids).float()

            def sorted_path(x=x, ids=ids):
                for layer in layers:
                    layer.triton_max_pairs = 0
                    layer(x, ids, A)

            def grouped(x=x, ids=ids):
                for layer in layers:
                    layer.triton, layer.triton_max_pairs = False, 0
                    layer(x, ids, A)
                    layer.triton = True

            res = {"sorted": graph_ms(sorted_path) / n_layers, "grouped": graph_ms(grouped) / n_layers}
            sort_us = {  # the sort of the step's pairs alone (not part of the per-pair kernels)
                "torch.sort": 1e3 * graph_ms(lambda ids=ids: torch.sort(ids, stable=True)),
                "rank_sort": 1e3 * graph_ms(lambda ids=ids: triton_experts.rank_sort(ids)),
            }
            sorts = ", ".join(f"{k} {v:.1f} us" for k, v in sort_us.items())
            print(f" T={T:2d}: sorting {T * A} pairs: {sorts}")
            for bn, bk, w in blocks:

                def pairs(cfg=(bn, bk, w), x=x, ids=ids):
                    cfg = dict(zip(("block_n", "block_k", "num_warps"), cfg))
                    for layer in layers:
                        h = triton_experts.pair_matmul(x, layer.gate_up, ids, group=A, glu=True, **cfg)
                        triton_experts.pair_matmul(h, layer.down, ids, **cfg)

                res[f"pairs n{bn} k{bk} w{w}"] = graph_ms(pairs) / n_layers
            dedup_blocks = [(16, 128, 4), (16, 256, 4), (32, 128, 4)]
            if a.sweep:
                dedup_blocks = [(bn, bk, w) for bn in (16, 32, 64) for bk in (64, 128, 256) for w in (4, 8)]
            for bn, bk, w in dedup_blocks:

                def dedup(cfg=(bn, bk, w), x=x, ids=ids):
                    cfg = dict(zip(("block_n", "block_k", "num_warps"), cfg))
                    for layer in layers:
                        h = triton_experts.dedup_matmul(x, layer.gate_up, ids, group=A, glu=True, **cfg)
                        triton_experts.dedup_matmul(h, layer.down, ids, **cfg)

                res[f"dedup n{bn} k{bk} w{w}"] = graph_ms(dedup) / n_layers
            # The down projection's blocks apart (`DEDUP_DOWN_CONFIG`), gate/up at the default.
            down_blocks = [(16, 128, 4), (64, 128, 4), (64, 64, 4), (32, 256, 4), (64, 256, 8), (128, 64, 8)]
            for bn, bk, w in down_blocks:

                def dedup_down(cfg=(bn, bk, w), x=x, ids=ids):
                    cfg = dict(zip(("block_n", "block_k", "num_warps"), cfg))
                    for layer in layers:
                        h = triton_experts.dedup_matmul(x, layer.gate_up, ids, group=A, glu=True)
                        triton_experts.dedup_matmul(h, layer.down, ids, **cfg)

                res[f"dedup, down n{bn} k{bk} w{w}"] = graph_ms(dedup_down) / n_layers
            errs = []
            for fn in (triton_experts.pair_matmul, triton_experts.dedup_matmul):
                h = fn(x, layers[0].gate_up, ids, group=A, glu=True)
                errs.append(((fn(h, layers[0].down, ids).float() - ref).norm() / ref.norm()).item())
            best = min(res, key=res.get)
            kind = "overlapping" if overlap else "independent"
            print(
                f" T={T:2d} ({kind} routing): {distinct} experts, {T * A} pairs, floor {1e3 * floor:.1f} us;"
                f" rel err vs sorted: pairs {errs[0]:.1e}, dedup {errs[1]:.1e}"
            )
            for name, ms in sorted(res.items(), key=lambda kv: kv[1]):
                mark = "  <- best" if name == best else ""
                print(f"    {1e3 * ms:8.1f} us  {100 * floor / ms:5.1f}% of floor  {name}{mark}")


def dense_matvecs(a, bandwidth: float) -> None:
    """(3) One-row projections of the 30B shape (batch-1 decode): cuBLAS against the per-pair
    kernel as a matrix-vector product (`triton_experts.matvec`) over block sizes."""
    D = 2048
    shapes = {"q/k/v": (5120, D), "o_proj": (D, 4096), "router": (128, D)}
    # (kernel, block_n, block_k, warps): "pairs" sums CUDA-core products (whole K in one block
    # issues every load at once), "dedup" runs tensor-core products with pipelined loads.
    blocks_k = (256, 512, 1024, 2048)
    configs = [("pairs", bn, bk, w) for bn in (2, 4, 8, 16) for bk in blocks_k for w in (2, 4, 8)]
    configs += [("dedup", bn, bk, w) for bn in (16, 32, 64) for bk in (64, 128, 256) for w in (4, 8)]
    if not a.sweep:
        configs = [("pairs", 8, 256, 8), ("pairs", 4, 2048, 4), ("dedup", 32, 128, 4), ("dedup", 16, 256, 4)]
    g = torch.Generator(device="cuda").manual_seed(1)
    print("(3) one-row projections, us each (4 weight copies in turn; floor = weight bytes / copy bandwidth)")
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(4)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
        floor = 1e3 * N * K * 2 / bandwidth  # ms
        ref = torch.nn.functional.linear(x, ws[0]).float()

        def cublas(x=x, ws=ws):
            for w in ws:
                torch.nn.functional.linear(x, w)

        def triton_matvec(kernel, cfg, x=x, ws=ws):
            for w in ws:
                triton_experts.matvec(x, w, kernel, **cfg)

        cols = [w.t().contiguous().t() for w in ws]  # the same values, column-major

        def cublas_cols(x=x, cols=cols):
            for w in cols:
                torch.nn.functional.linear(x, w)

        def mv(x=x, ws=ws):
            for w in ws:
                torch.mv(w, x[0])

        res = {"cuBLAS": graph_ms(cublas) / 4, "cuBLAS, column-major weight": graph_ms(cublas_cols) / 4}
        res["torch.mv"] = graph_ms(mv) / 4
        for kernel, bn, bk, nw in configs:
            cfg = {"block_n": bn, "block_k": bk, "num_warps": nw}
            out = triton_experts.matvec(x, ws[0], kernel, **cfg).float()
            if ((out - ref).norm() / ref.norm()).item() > 1e-2:
                print(f"  {name}: {kernel} {cfg} WRONG")
                continue
            res[f"{kernel} n{bn} k{bk} w{nw}"] = graph_ms(lambda k=kernel, c=cfg: triton_matvec(k, c)) / 4
        if name != "o_proj":  # q/k/v and the router follow a norm: add + norm + projection in one
            res_x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
            gamma = torch.ones(K, device="cuda", dtype=torch.bfloat16)

            def norm_matvec(cfg, x=x, ws=ws, res_x=res_x, gamma=gamma):
                for w in ws:
                    triton_kernels.add_norm_matvec(x, res_x, gamma, 1e-6, w, True, **cfg)

            for bn, bk, nw in [(8, 256, 8), (4, 2048, 4), (16, 256, 4), (4, 512, 4), (8, 1024, 8)]:
                cfg = {"block_n": bn, "block_k": bk, "num_warps": nw}
                res[f"add+norm+matvec n{bn} k{bk} w{nw}"] = graph_ms(lambda c=cfg: norm_matvec(c)) / 4

            def norm_then_matvec(x=x, ws=ws, r=res_x, gm=gamma):
                with fused.active():  # the engine's path now: compiled add + norm, then `linear`
                    for w in ws:
                        fused.linear(fused.add_rms_norm(x, r, gm, 1e-6)[0], w)

            res["add+norm, then linear (engine now)"] = graph_ms(norm_then_matvec) / 4
        four = {}
        if name != "router":  # a verify step's 4 rows: cuBLAS against `rows_matmul`
            x4 = torch.randn(4, K, device="cuda", dtype=torch.bfloat16, generator=g)

            def four_rows(cfg, x4=x4, ws=ws):
                for w in ws:
                    if cfg is None:
                        torch.nn.functional.linear(x4, w)
                    else:
                        triton_experts.rows_matmul(x4, w, **cfg)

            four["cuBLAS"] = graph_ms(lambda: four_rows(None)) / 4
            for bn, bk, nw in [(32, 128, 4), (16, 256, 4), (64, 128, 8)]:
                cfg = {"block_n": bn, "block_k": bk, "num_warps": nw}
                four[f"rows_matmul n{bn} k{bk} w{nw}"] = graph_ms(lambda c=cfg: four_rows(c)) / 4
        for bn, nw in [(2, 4), (4, 4), (4, 8), (8, 8), (16, 8)]:
            cfg = {"block_n": bn, "num_warps": nw}
            res[f"preload n{bn} w{nw}"] = graph_ms(lambda c=cfg: triton_matvec("preload", c)) / 4
        if name != "router":
            preload_behind_a_busy_kernel(name, x, ws, floor)
        ranked = sorted(res.items(), key=lambda kv: kv[1])[:6]
        for baseline in ("cuBLAS", "add+norm, then linear (engine now)"):
            if baseline in res and baseline not in dict(ranked):
                ranked.append((baseline, res[baseline]))
        print(f"  {name} [{N} x {K}]: floor {1e3 * floor:.1f} us")
        for label, ms in ranked:
            print(f"    {1e3 * ms:8.1f} us  {100 * floor / ms:5.1f}% of floor  {label}")
        for label, ms in sorted(four.items(), key=lambda kv: kv[1]):
            print(f"    {1e3 * ms:8.1f} us  {100 * floor / ms:5.1f}% of floor  4 rows: {label}")


def preload_behind_a_busy_kernel(name: str, x, ws, floor: float, busy_us: float = 7.0) -> None:
    """(3b) A projection right after a kernel of 16 programs busy for busy_us without memory
    traffic (as o_proj after the attention kernel at batch 1): us each beyond the busy kernel
    alone. Kernels that load their weights before waiting for it (`triton_experts.PRELOAD`)
    stream them during it; the others start after it."""
    out = torch.zeros(16, dtype=torch.long, device="cuda")
    pdl = triton_experts.pdl_launch(x.device)

    def run(project=None, x=x, ws=ws):
        for w in ws:
            _busy_kernel[(16,)](out, int(busy_us * 1e3), num_warps=4, **pdl)
            if project is not None:
                project(w)

    alone = graph_ms(run) / 4
    res = {"cuBLAS": graph_ms(lambda: run(lambda w: F.linear(x, w))) / 4}
    res["pairs n4 k2048 w4"] = graph_ms(lambda: run(lambda w: triton_experts.matvec(x, w, "pairs"))) / 4
    for bn, nw in [(2, 4), (4, 4), (4, 8), (8, 8), (16, 8)]:
        cfg = {"block_n": bn, "num_warps": nw}
        res[f"preload n{bn} w{nw}"] = (
            graph_ms(lambda c=cfg: run(lambda w: triton_experts.matvec(x, w, "preload", **c))) / 4
        )
    print(f"  {name} after a {busy_us:.0f} us kernel of 16 programs ({1e3 * alone:.1f} us alone): beyond it")
    for label, ms in sorted(res.items(), key=lambda kv: kv[1]):
        extra = max(ms - alone, 1e-6)
        print(f"    {1e3 * extra:8.1f} us  {100 * floor / extra:6.1f}% of floor  {label}")


def exchange_packing(a) -> None:
    from specmoe_ray.moe import triton_dispatch
    from specmoe_ray.moe.dispatch import pack_static

    D, E, A = 2048, 128, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    print("(4) static exchange bookkeeping on rank 0 (graph replay, us per MoE layer)")
    for S in (2, 4):
        table = (torch.arange(E, device="cuda") % S)[:, None].clone()  # one replica, round robin
        replicas = torch.ones(E, dtype=torch.long, device="cuda")
        rotation = torch.zeros((), dtype=torch.long, device="cuda")
        for T in (1, 8, 32):
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
            ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:A] for _ in range(T)])
            ids = ids.reshape(-1)
            counts = torch.zeros(S, dtype=torch.long, device="cuda")
            results = torch.randn(S * T * A, D, device="cuda", dtype=torch.bfloat16, generator=g)
            args = (x, ids, None, table, replicas, rotation, counts, S, T * A, A, 0)
            us = {}
            for name, pack in (("torch", pack_static), ("triton", triton_dispatch.pack_pairs)):

                def run(pack=pack, args=args, results=results):
                    return results[pack(*args)[1]]

                us[name] = 1e3 * graph_ms(run)
            print(f"  {S} shards, batch {T:2d}: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))


def sharded_experts(a, bandwidth: float) -> None:
    E, D, I, A, T, n_layers = 128, 2048, 768, 8, 32, 4
    g = torch.Generator(device="cuda").manual_seed(1)
    expert_bytes = 3 * D * I * 2
    configs = [{}]
    if a.sweep:
        configs += [
            {"block_n": bn, "block_k": bk, "num_warps": w}
            for bn in (16, 32, 64)
            for bk in (64, 128, 256)
            for w in (4, 8)
            if (bn, bk, w) != (32, 128, 4)
        ]
    print(f"(5) sorted expert path at batch {T} ({T * A} rows), us per layer (graph replay)")
    for held in (128, 64, 32):
        layers = random_experts(held, E, D, I, n_layers, g)
        ids = routed_ids(T, E, A, False, g)
        mine = ids[ids < held]  # the pairs a shard holding experts 0 .. held - 1 receives
        rows = torch.full((T * A,), -1, dtype=torch.long, device="cuda")
        rows[: mine.numel()] = mine
        x = torch.randn(T * A, D, device="cuda", dtype=torch.bfloat16, generator=g)
        floor = 1e3 * mine.unique().numel() * expert_bytes / bandwidth  # ms
        res = {}
        for cfg in configs:
            triton_experts.SORTED_CONFIG = cfg

            def run(x=x, rows=rows, layers=layers):
                for layer in layers:
                    layer(x, rows)

            name = (
                " ".join(f"{k} {v}" for k, v in cfg.items()) or "default (block_n 32, block_k 128, 4 warps)"
            )
            res[name] = graph_ms(run) / n_layers
        triton_experts.SORTED_CONFIG = {}
        # Trunk replicas call the same experts with the step's tokens and all of its pairs (the
        # ones held elsewhere skipped by the kernels), not a packed exchange buffer.
        tokens = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)

        def replica(x=tokens, ids=ids, layers=layers):
            for layer in layers:
                layer(x, ids, A)

        res["trunk replicas' call (x [T, D], all pairs, default blocks)"] = graph_ms(replica) / n_layers
        touched = mine.unique().numel()
        print(f"  {held} experts held, {mine.numel()} pairs, {touched} experts: floor {1e3 * floor:.1f} us")
        shown = sorted(res.items(), key=lambda kv: kv[1])[:6]
        shown += [kv for kv in res.items() if kv[0].startswith("trunk") and kv not in shown]
        for name, ms in shown:
            print(f"    {1e3 * ms:8.1f} us  {100 * floor / ms:5.1f}% of floor  {name}")
        del layers
        torch.cuda.empty_cache()


class NoExperts:
    """An expert backend that computes nothing (zeros): the step's trunk alone, for (6)."""

    combines = True

    def __call__(self, layer, x, expert_ids, counted=False, weights=None):
        return torch.zeros_like(x)


def replica_alone(a) -> None:
    import datetime
    import socket

    import torch.distributed as dist

    from specmoe_ray.moe.experts import ExpertStore
    from specmoe_ray.moe.placement import PlacementPlan
    from specmoe_ray.moe.replica import ReplicaDispatch

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dev = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=60),
            device_id=dev,
        )
    cfg, engine = random_engine(a)
    model, full = engine.model, engine.local_experts
    E, held = cfg.num_experts, cfg.num_experts // 2
    plan = PlacementPlan.contiguous(model.args.moe_layers, E, 2)
    half = ExpertStore(
        {
            layer: LocalExperts(list(range(held)), ex.gate_up[:held], ex.down[:held], E)
            for layer, ex in ((int(k), v) for k, v in full.store.by_layer.items())
        }
    )
    backends = {
        "one GPU, all 128 experts": full,
        "replica rank 0 of 2, no peer (partial sums)": ReplicaDispatch(plan, half, 0, "cuda"),
        "replica rank 0 of 2, no peer (exact)": ReplicaDispatch(plan, half, 0, "cuda", exact=True),
        "trunk alone (no expert stage: routing, then zeros)": NoExperts(),
    }
    print(f"(6) a trunk replica's step without its peer, {a.layers} layers, context {a.context}")
    for B in a.batch:
        slots = [engine.cache.allocate() for _ in range(B)]
        feeds = torch.randint(1, cfg.vocab_size, (B, 1)).tolist()
        for name, backend in backends.items():
            model.set_expert_backend(backend)
            graphs = StepGraphs(model, engine.cache, B, 1, capture=True)
            key = graphs.key(B, 1, a.context + 1)
            graphs.run(key, feeds, [a.context] * B, slots, [0] * B)  # capture
            ms = min(graph_replay_ms(graphs, key) for _ in range(3))
            print(f"  B={B}: {1e3 * ms / a.layers:6.1f} us per layer  {name}")
            if name.endswith("(partial sums)"):
                rows, total = kernel_table(lambda g=graphs, k=key: g._graphs[k].replay(), 5)
                print_table("replica, replay", rows, total, a.layers, top=22)
            graphs.drop()
        for s in slots:
            engine.cache.free(s)
    model.set_expert_backend(full)
    dist.destroy_process_group()


def split_experts(a, bandwidth: float) -> None:
    """(7) One of 2 GPUs' expert stage as trunk replicas call it (x [T, D], all T x 8 pairs), by
    experts (64 of 128 whole experts held, `PlacementPlan`) against by intermediate size (every
    expert, half its I: each GPU reads half of every touched expert), beside one GPU's."""
    E, D, I, A, n_layers = 128, 2048, 768, 8, 4
    g = torch.Generator(device="cuda").manual_seed(2)
    layouts = {
        "one GPU (128 experts, I 768)": random_experts(E, E, D, I, n_layers, g),
        "by experts (64 experts, I 768)": random_experts(E // 2, E, D, I, n_layers, g),
        "by intermediate size (128 experts, I 384)": random_experts(E, E, D, I // 2, n_layers, g),
    }
    print("(7) one of 2 GPUs' experts, as a trunk replica calls them, us per layer (graph replay)")
    for T in a.expert_tokens:
        ids = routed_ids(T, E, A, False, g)
        tokens = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        for name, layers in layouts.items():

            def run(x=tokens, ids=ids, layers=layers):
                for layer in layers:
                    layer(x, ids, A)

            fused = triton_experts.SORTED_FUSED
            triton_experts.SORTED_FUSED = False  # two launches first (the one-launch row below)
            try:
                ms = min(graph_ms(run) for _ in range(3)) / n_layers
            finally:
                triton_experts.SORTED_FUSED = fused
            print(f"  T={T:3d} {1e3 * ms:8.1f} us  {name}")
            if a.tables and a.expert_tokens[-1] == T:  # eager, no PDL: each kernel's own time
                triton_experts.PDL = False
                try:
                    rows, total = kernel_table(run, 5)
                finally:
                    triton_experts.PDL = True
                print_table(f"T={T} {name}, eager, no PDL, {n_layers} layers", rows, total, n_layers, top=8)
                projections_apart(layers, tokens, ids, A, name)
            if layers[0].triton and layers[0].triton_max_pairs < T * A:  # the sorted path
                triton_experts.SORTED_FUSED = False
                two = layers[0](tokens, ids, A)
                triton_experts.SORTED_FUSED = True  # both projections in one launch
                try:
                    one = layers[0](tokens, ids, A)
                    ms = min(graph_ms(run) for _ in range(3)) / n_layers
                finally:
                    triton_experts.SORTED_FUSED = fused
                held = ids < len(layers[0].expert_ids)  # (experts 0 .. held - 1; other rows: unspecified)
                same = "same rows" if torch.equal(one[held], two[held]) else "ROWS DIFFER"
                print(f"  T={T:3d} {1e3 * ms:8.1f} us  {name}, one launch (SORTED_FUSED; {same})")
    if a.sweep:
        split_sweep(layouts, a.expert_tokens[-1], E, D, A, g)
    if a.fused_sweep:
        fused_down_sweep(layouts, a.expert_tokens[-1], E, A, g)


def projections_apart(layers: list, x: torch.Tensor, ids: torch.Tensor, A: int, name: str) -> None:
    """(7) --tables: the sorted path's sort, gate/up and down launches timed apart (graph replay,
    us per layer), each against its share of the bytes' floor."""
    E = len(layers[0].expert_ids)
    tables = [None if layer.identity else layer.to_local for layer in layers]
    sort = [triton_experts.sort_pairs(ids, table, E) for table in tables]
    hs = [
        triton_experts.expert_matmul(x, layer.gate_up, offs, src=order, group=A, glu=True)
        for layer, (_, order, offs) in zip(layers, sort)
    ]

    def sorts():
        for table in tables:
            triton_experts.sort_pairs(ids, table, E)

    def gate_up():
        for layer, (_, order, offs) in zip(layers, sort):
            triton_experts.expert_matmul(x, layer.gate_up, offs, src=order, group=A, glu=True)

    def down():
        for layer, h, (_, order, offs) in zip(layers, hs, sort):
            triton_experts.expert_matmul(h, layer.down, offs, dst=order)

    us = {k: 1e3 * min(graph_ms(f) for _ in range(3)) / len(layers) for k, f in
          (("sort", sorts), ("gate/up", gate_up), ("down", down))}  # fmt: skip
    print(f"    {name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items()))


def fused_down_sweep(layouts: dict, T: int, E: int, A: int, g: torch.Generator) -> None:
    """(7) --fused-sweep: `SORTED_FUSED`'s one launch with its down blocks (its down programs
    share the launch's registers and warps with gate/up's: their best blocks differ from the two
    launches') and gate/up's blocks and warps swept together, per layout, beside the two
    launches; the defaults and the best 5."""
    ids = routed_ids(T, E, A, False, g)
    tokens = torch.randn(T, layouts[next(iter(layouts))][0].gate_up.shape[2], device="cuda",
                         dtype=torch.bfloat16, generator=g)  # fmt: skip
    ups = [{}] + [{"block_n": bn, "block_k": bk, "num_warps": w}
                  for bn, bk, w in [(16, 128, 4), (64, 128, 4), (32, 256, 4), (32, 128, 8)]]  # fmt: skip
    down_blocks = [(32, 128), (64, 64), (128, 64), (128, 128), (64, 256), (256, 64)]
    downs = [{}] + [{"block_n": bn, "block_k": bk} for bn, bk in down_blocks]
    saved = triton_experts.SORTED_CONFIG, triton_experts.SORTED_FUSED_DOWN_CONFIG

    def label(cfg: dict, default: str) -> str:
        if not cfg:
            return default
        warps = f" {cfg['num_warps']}w" if "num_warps" in cfg else ""
        return f"{cfg['block_n']}x{cfg['block_k']}{warps}"

    print(f"(7) --fused-sweep at T={T}: us per layer, one launch by gate/up's blocks (default 32x128 4w)"
          f" / down's (default {label(saved[1], 'gate/up')})")  # fmt: skip
    for name, layers in layouts.items():

        def run(layers=layers):
            for layer in layers:
                layer(tokens, ids, A)

        fused = triton_experts.SORTED_FUSED
        triton_experts.SORTED_FUSED = False
        two = min(graph_ms(run) for _ in range(2)) / len(layers)
        res = {}
        triton_experts.SORTED_FUSED = True
        try:
            for up in ups:
                for down in downs:
                    triton_experts.SORTED_CONFIG = up
                    triton_experts.SORTED_FUSED_DOWN_CONFIG = down or saved[1]
                    key = f"{label(up, 'default')} / {label(down, 'default')}"
                    try:
                        res[key] = min(graph_ms(run) for _ in range(2)) / len(layers)
                    except Exception as e:  # e.g. out of shared memory
                        print(f"    {name} {key}: {type(e).__name__}")
        finally:
            triton_experts.SORTED_FUSED = fused
            triton_experts.SORTED_CONFIG, triton_experts.SORTED_FUSED_DOWN_CONFIG = saved
        best = sorted(res.items(), key=lambda kv: kv[1])[:5]
        default = res.get("default / default", float("nan"))
        print(f"  {name}: two launches {1e3 * two:.1f}, one launch at the defaults {1e3 * default:.1f};"
              " best: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in best))  # fmt: skip


def split_sweep(layouts: dict, T: int, E: int, D: int, A: int, g: torch.Generator) -> None:
    """(7) --sweep: the gate/up projection's blocks (`SORTED_CONFIG`, down at its default) and
    the down projection's (`SORTED_DOWN_CONFIG`, gate/up at its default) apart, per layout of
    (7), at T tokens; the best 4 of each beside the defaults. Two launches (`SORTED_FUSED` off;
    --fused-sweep sweeps the one launch)."""
    ids = routed_ids(T, E, A, False, g)
    tokens = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    blocks = [(bn, bk, w) for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for w in (4, 8)]
    print(f"(7) --sweep at T={T}: us per layer; gate/up blocks with down at its default, then down's")
    fused, triton_experts.SORTED_FUSED = triton_experts.SORTED_FUSED, False
    for name, layers in layouts.items():

        def run(layers=layers):
            for layer in layers:
                layer(tokens, ids, A)

        for which in ("SORTED_CONFIG", "SORTED_DOWN_CONFIG"):
            res = {}
            for bn, bk, w in blocks:
                setattr(triton_experts, which, {"block_n": bn, "block_k": bk, "num_warps": w})
                try:
                    res[f"{bn} x {bk}, {w} warps"] = min(graph_ms(run) for _ in range(2)) / len(layers)
                except Exception as e:  # e.g. out of shared memory
                    print(f"    {which} {bn} x {bk}, {w} warps: {type(e).__name__}")
                setattr(triton_experts, which, {})
            default = res["32 x 128, 4 warps"]
            best = sorted(res.items(), key=lambda kv: kv[1])[:4]
            print(
                f"  {name}, {which}: default 32 x 128, 4 warps {1e3 * default:.1f} us; best: "
                + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in best)
            )
    triton_experts.SORTED_FUSED = fused


def l2_ahead_probe(bandwidth: float) -> None:
    """(8) One-row projections from L2 vs HBM, and the bulk prefetch's speed."""
    if not l2_ahead.supported(torch.device("cuda")):
        print("(8) skipped: the bulk L2 prefetch needs compute capability 9+")
        return
    flush = torch.empty(192 << 20, dtype=torch.uint8, device="cuda")  # > L2: evicts everything
    base = min(graph_ms(flush.zero_) for _ in range(3))

    def timed(fn) -> float:  # us past the flush
        return 1e3 * (min(graph_ms(lambda: (flush.zero_(), fn())) for _ in range(3)) - base)

    spin = 14000  # cycles: ~7 us at ~2 GHz, an attention kernel's span at batch 1
    print(f"(8) weights ahead in L2: us past a {flush.numel() >> 20} MB flush ({1e3 * base:.1f} us)")
    print(f"  a {spin}-cycle spin kernel alone: {timed(lambda: torch.cuda._sleep(spin)):.1f} us")
    for name, (N, K) in {"o_proj": (2048, 4096), "q/k/v": (5120, 2048)}.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        nbytes = w.numel() * w.element_size()
        print(f"  {name} [{N} x {K}], {nbytes / 1e6:.1f} MB (floor {1e6 * nbytes / bandwidth:.1f} us):")
        for label, us in l2_ahead_runs(timed, w, x, spin).items():
            print(f"    {us:7.1f} us  {label}")


def l2_ahead_runs(timed, w: torch.Tensor, x: torch.Tensor, spin: int) -> dict[str, float]:
    side = torch.cuda.Stream()

    def beside():  # the spin kernel, the prefetch on a side stream forked before it, then x @ w
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            l2_ahead.prefetch(w)
        torch.cuda._sleep(spin)
        F.linear(x, w)
        torch.cuda.current_stream().wait_stream(side)

    out = {
        "cold (from HBM)": timed(lambda: F.linear(x, w)),
        "right after a prefetch (same stream)": timed(lambda: (l2_ahead.prefetch(w), F.linear(x, w))),
        "spin, then cold": timed(lambda: (torch.cuda._sleep(spin), F.linear(x, w))),
        "spin with the prefetch beside it, then from L2": timed(beside),
    }
    for chunk in (4096, 16384, 65536):
        for lanes in (8, 32):
            out[f"the prefetch kernel alone, {chunk} B x {lanes} per program"] = timed(
                lambda c=chunk, n=lanes: l2_ahead.prefetch(w, c, n)
            )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--tq", type=int, nargs="+", default=[1, 4])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--expert-tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--sweep", action="store_true", help="sweep the kernels' block sizes")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--skip-experts", action="store_true")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-exchange", action="store_true")
    p.add_argument("--skip-sharded", action="store_true")
    p.add_argument("--only", nargs="+", default=[], help="(1)'s ablations: only variants naming one of these")
    p.add_argument(
        "--split", action="store_true", help="(7): experts split by expert or by intermediate size"
    )
    p.add_argument("--fused-sweep", action="store_true", help="(7): SORTED_FUSED's down blocks swept")
    p.add_argument("--tables", action="store_true", help="(7): kernel tables at the last --expert-tokens")
    p.add_argument("--l2", action="store_true", help="(8): weights read ahead into L2")
    p.add_argument("--replica", action="store_true", help="(6): a trunk replica's step without its peer")
    p.add_argument(
        "--pdl",
        action="store_true",
        help="programmatic dependent launch for every kernel from the start: ours (triton_experts.PDL) "
        "and torch.compile's (inductor's triton.enable_pdl, where this torch has it); compare a run "
        "with and one without",
    )
    a = p.parse_args(argv)
    if a.pdl:
        triton_experts.PDL = fused.INDUCTOR_PDL = True
        print(f"PDL: our kernels {triton_experts.PDL_SUPPORTED}, torch.compile's {fused.inductor_pdl()}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    bandwidth = copy_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    if not a.skip_experts:
        expert_variants(a, bandwidth)
        torch.cuda.empty_cache()
    if not a.skip_dense:
        dense_matvecs(a, bandwidth)
    if not a.skip_exchange:
        exchange_packing(a)
    if not a.skip_sharded:
        sharded_experts(a, bandwidth)
    if not a.skip_step:
        step_profile(a, bandwidth)
    if a.replica:
        replica_alone(a)
    if a.split:
        split_experts(a, bandwidth)
    if a.l2:
        l2_ahead_probe(bandwidth)


if __name__ == "__main__":
    main()
