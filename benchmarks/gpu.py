"""One run, one machine: transformers `generate` against our engine, with the memory roofline.

(a) A model of a given shape with random weights (`--shape qwen3-30b-a3b`: Qwen3-30B-A3B's exact
shape, ~61 GB of bf16), built once on the device by transformers; our engine runs on *the same
tensors* (no copy, no checkpoint on disk), experts in-process. Per batch size it times:

- `HF`: transformers' greedy `generate` (exactly --new-tokens tokens; the baseline);
- `eager`: our engine, plain eager steps (`step_graphs="off"`), no speculation;
- `graphs`: our engine with CUDA-graph steps (the default on GPUs), no speculation; decode
  steps run ahead, up to 4 per host sync (`decode_steps`, the default);
- `sync`: `graphs` with one host sync per step (`decode_steps=1`: what running ahead gains);
- `sampled`: `graphs` with every row sampled (temperature 1, seeded) instead of greedy: what
  sampling's verification costs beside argmax (`--temperature T` samples every engine run of (a),
  switches included: e.g. `--switch waits:sampling.PINNED=False` for verification's old waits,
  and (b)'s, whose speculation then carries a sampled acceptance rate; `--top-p P`: sampled runs
  draw from the nucleus of mass P, the sort and the filter kernels on every step);
- `--switch NAME:module.ATTR=value,...`: `graphs` with fast-path switches flipped while that
  variant runs (e.g. `--switch cublas:fused.MATVEC=False`), side by side with `graphs`; a NAME
  starting "draft-" switches the `draft` variant instead (its draft model's steps too), side by
  side with `draft` (e.g. `--switch draft-cublas:fused.DRAFT_PRELOAD_ROWS=1`);
- `ngram`: graphs + prompt-lookup drafts (k = --k);
- `draft`: graphs + a draft model: a random dense Qwen3 of Qwen3-0.6B's shape (the family's
  small model) with the target's vocabulary, k = --k. Random weights agree only by accident,
  so this row measures what drafting costs (and what the adaptive policy does about it), not
  a real acceptance rate: (b) has those.

(b) The shipped demo pair (`specmoe_ray/demo`, real acceptance rates): HF, no speculation,
draft model, n-gram, on its held-out text.

(c) Verify sweep: one forward of B sequences x T tokens (T = 1..8), replayed from its graph,
timed with CUDA events; the bytes it must read (every dense weight, the lm_head, the experts its
tokens *actually* routed to, counted from the routing, and the KV it reads), and the fraction of
the memory roofline (bytes / measured copy bandwidth) it reaches.

`--gpus 2 --layout replicas-split-peer --peer-waits`: each rank's microseconds waited for its
peers per peer sum at each batch (`peer_sum.WAIT_TIMES`): the faster rank waits for the slower.

The copy bandwidth is measured first (device-to-device copy of 2 x 1 GiB: read + write bytes).
Everything goes to --json, and a plot to --png (matplotlib, if installed).

    python benchmarks/gpu.py --shape small --device cpu            # seconds; checks the script
    python benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 8 32 --json q3.json --png q3.png
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import qwen3_30b_a3b_config, small_config  # noqa: E402

from specmoe_ray import Engine, SamplingParams  # noqa: E402
from specmoe_ray.engine.graph import StepGraphs  # noqa: E402
from specmoe_ray.models.args import ModelArgs  # noqa: E402
from specmoe_ray.models.loader import build_model  # noqa: E402
from specmoe_ray.models.transformer import rope_inv_freq  # noqa: E402
from specmoe_ray.moe.dispatch import LoopbackDispatch  # noqa: E402
from specmoe_ray.moe.experts import ExpertStore, LocalExperts  # noqa: E402
from specmoe_ray.spec.proposer import DraftModelProposer, NgramProposer  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 2 / best


# -- the shaped model, shared between HF and us --------------------------------------------------


def build_hf(shape: str, device: str, dtype: torch.dtype, seed: int, layers: int | None = None):
    from transformers import AutoModelForCausalLM

    cfg = qwen3_30b_a3b_config() if shape == "qwen3-30b-a3b" else small_config("qwen3_moe")
    if layers:  # the shape's layers, fewer of them (a quick look at per-layer costs)
        cfg.num_hidden_layers = layers
        if hasattr(cfg, "mlp_only_layers"):
            cfg.mlp_only_layers = [i for i in cfg.mlp_only_layers if i < layers]
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def model_on_hf_weights(hf_model):
    """Our Transformer over the HF model's own tensors (no copy) -> (model, args, HF state)."""
    cfg = hf_model.config.to_dict()
    args = ModelArgs.from_hf_config(cfg, source="in-memory HF model")
    state = hf_model.state_dict()
    with torch.device("meta"):
        model = build_model(args)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, assign=True, strict=True)
    model.inv_freq = rope_inv_freq(args.rope, args.head_dim).to(state["lm_head.weight"].device)
    return model.eval(), args, state


def draft_config(shape: str):
    """A dense Qwen3 draft with the target's vocabulary: Qwen3-0.6B's shape (the family's small
    model) for the 30B shape, a 2-layer toy for the small one."""
    import transformers

    if shape == "qwen3-30b-a3b":
        dims = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16)
        dims.update(num_key_value_heads=8, head_dim=128, vocab_size=151936)
    else:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        dims.update(num_key_value_heads=2, head_dim=16, vocab_size=small_config("qwen3_moe").vocab_size)
    return transformers.Qwen3Config(**dims, tie_word_embeddings=True, max_position_embeddings=40960)


def draft_proposer(a, device: str, dtype: torch.dtype, max_len: int) -> DraftModelProposer:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed + 1)
    with torch.device(device):
        hf_draft = AutoModelForCausalLM.from_config(draft_config(a.shape), dtype=dtype).eval()
    model, _, _ = model_on_hf_weights(hf_draft)
    step_graphs = "auto" if device != "cpu" else "padded"
    return DraftModelProposer(
        model, max(a.batch), max_len, step_graphs=step_graphs, max_tokens_per_seq=a.k + 1
    )


def engine_on_hf_weights(hf_model, **config) -> Engine:
    """Our engine over the HF model's own tensors (a Qwen3-MoE-style fused-experts model)."""
    model, args, state = model_on_hf_weights(hf_model)
    experts = {
        layer: LocalExperts(
            list(range(args.num_experts)),
            state[f"model.layers.{layer}.mlp.experts.gate_up_proj"],
            state[f"model.layers.{layer}.mlp.experts.down_proj"],
            args.num_experts,
        )
        for layer in args.moe_layers
    }
    backend = LoopbackDispatch(ExpertStore(experts))
    model.set_expert_backend(backend)
    return Engine(model, local_experts=backend, **config)


# -- timing ---------------------------------------------------------------------------------------


def timed(fn, repeats: int, device: str, engine: Engine | None = None) -> dict[str, Any]:
    """Warm up once (CUDA-graph captures, torch.compile), then time `repeats` calls of fn() -> tokens.
    With an engine, also its per-step numbers over the timed calls."""
    fn()
    before = engine.stats() if engine is not None else None
    times, tokens = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        n = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    out = {"tok_s": statistics.median(n / t for n, t in zip(tokens, times)), "times_s": times}
    if engine is not None:
        out.update(step_stats(engine, before))
    return out


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(1, vocab, (batch, length), generator=g).tolist()


def hf_run(model, rows: list[list[int]], new: int, device: str):
    ids = torch.tensor(rows, device=device)

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    return run


def ours_run(engine: Engine, rows, new: int, temperature: float = 0.0, top_p: float = 1.0):
    """Our engine's generate over rows: greedy, or sampled at temperature (seeded per row), from
    the nucleus of mass top_p (1: the whole vocabulary)."""
    seeds = range(len(rows)) if temperature else [None] * len(rows)
    params = [
        SamplingParams(max_tokens=new, temperature=temperature, top_p=top_p, ignore_eos=True, seed=s)
        for s in seeds
    ]

    def run() -> int:
        return sum(len(o.token_ids) for o in engine.generate(rows, params))

    return run


def step_stats(engine: Engine, before: dict) -> dict[str, Any]:
    now = engine.stats()
    steps = now["num_steps"] - before["num_steps"]
    static = now["num_static_steps"] - before["num_static_steps"]
    return {
        "ms_per_step": 1e3 * (now["verify_time_s"] - before["verify_time_s"]) / max(steps, 1),
        # Decode/verify steps only (graph replays): the prompt's eager prefill step left out.
        "ms_per_static_step": 1e3 * (now["static_time_s"] - before["static_time_s"]) / max(static, 1),
        "tokens_per_step": (now["num_generated_tokens"] - before["num_generated_tokens"]) / max(steps, 1),
        "acceptance_rate": now["acceptance_rate"],
    }


# -- (c) the verify sweep -------------------------------------------------------------------------


def step_bytes(engine: Engine, load_delta: dict[int, list[int]], kv_tokens: int) -> dict[str, float]:
    """Bytes one forward must read: dense weights + lm_head + the experts it touched + its KV."""
    args, elem = engine.args, engine.model.lm_head.weight.element_size()
    dense = sum(p.numel() for p in engine.model.parameters()) * elem
    dense -= args.vocab_size * args.hidden_size * elem  # the embedding: one row per token, not all
    expert = 3 * args.hidden_size * args.moe_intermediate_size * elem
    touched = sum(sum(1 for c in counts if c > 0) for counts in load_delta.values())
    kv = kv_tokens * len(engine.model.model.layers) * 2 * args.num_kv_heads * args.head_dim * elem
    return {
        "dense": dense,
        "experts": touched * expert,
        "kv": kv,
        "total": dense + touched * expert + kv,
        "experts_touched": touched,
    }


def verify_sweep(engine: Engine, batches, max_t: int, context: int, bandwidth: float, device: str):
    """Time one forward of B sequences x T tokens at `context` cached tokens each."""
    graphs = engine.graphs or StepGraphs(engine.model, engine.cache, engine.config.max_num_seqs, max_t, False)
    if graphs.max_tq < max_t:  # the engine's graphs cover k + 1 tokens; the sweep needs max_t
        graphs = StepGraphs(engine.model, engine.cache, engine.config.max_num_seqs, max_t, graphs.capture)
    g = torch.Generator().manual_seed(1)
    out = []
    for B in batches:
        slots = [engine.cache.allocate() for _ in range(B)]
        try:
            for T in range(1, max_t + 1):
                feeds = torch.randint(1, engine.args.vocab_size, (B, T), generator=g).tolist()
                key = graphs.key(B, T, context + T)
                args = (key, feeds, [context] * B, slots, [0] * B)
                before = engine.expert_load()
                graphs.run(*args)  # capture (first time) and one step to count the routing
                sync(device)
                after = engine.expert_load()
                delta = {
                    layer: [a - b for a, b in zip(after[layer], before.get(layer, [0] * len(after[layer])))]
                    for layer in after
                }
                times = []
                for _ in range(10):
                    sync(device)
                    t0 = time.perf_counter()
                    graphs.run(*args)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                b = step_bytes(engine, delta, B * (context + T))
                row = {
                    "batch": B,
                    "T": T,
                    "ms": 1e3 * t,
                    "bytes": b,
                    "roofline_ms": 1e3 * b["total"] / bandwidth,
                }
                row["roofline_pct"] = 100 * row["roofline_ms"] / row["ms"]
                out.append(row)
                print(
                    f"  verify B={B:3d} T={T}: {row['ms']:7.2f} ms  roofline {row['roofline_ms']:6.2f} ms "
                    f"({row['roofline_pct']:5.1f}%)  experts touched {b['experts_touched']}"
                )
        finally:
            for s in slots:
                engine.cache.free(s)
    return out


def profile_steps(engine: Engine, rows, device: str, steps: int = 8, trace: str | None = None) -> None:
    """torch.profiler over a few decode steps: where the host time of a step goes. With expert
    shards, each shard actor profiles its side of the same steps (tables printed after this
    one's); `trace`: Chrome traces, this process's at that path, the shards' beside it."""
    from torch.profiler import ProfilerActivity, profile

    for r in rows:
        engine.add_request(r, SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True))
    for _ in range(3):  # prefill, then steps that capture
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    group = engine.shard_group
    shards = group.profile(steps, os.path.dirname(trace) if trace else None) if group else []
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    print(f"profile: {1e3 * (time.perf_counter() - t0) / steps:.2f} ms per step (profiled)")
    for key in ("self_cpu_time_total",) + (("self_device_time_total",) if device != "cpu" else ()):
        print(prof.key_averages().table(sort_by=key, row_limit=24, max_name_column_width=72))
    if trace:
        os.makedirs(os.path.dirname(trace) or ".", exist_ok=True)
        prof.export_chrome_trace(trace)
    while engine.has_unfinished():
        engine.step()
    if shards:
        import ray

        # A shard counts forwards, not engine steps: run-ahead decode steps (`decode_steps`) send
        # several steps as one forward, so step on with short requests until every shard has
        # profiled its `steps` forwards (at most 4 * steps more).
        for _ in range(4 * steps):
            if len(ray.wait(shards, num_returns=len(shards), timeout=0)[0]) == len(shards):
                break
            engine.generate([rows[0]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        for table in ray.get(shards, timeout=180):
            print("expert shard", table)


# -- main -----------------------------------------------------------------------------------------


def bench_shape(a, device: str, dtype: torch.dtype, bandwidth: float) -> dict[str, Any]:
    hf = build_hf(a.shape, device, dtype, a.seed, a.layers)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"(a) random {a.shape} model: {n_params / 1e9:.2f}B params, {dtype}")
    vocab = hf.config.vocab_size
    rows = {b: prompts_for(b, a.prompt_len, vocab, a.seed) for b in a.batch}
    res: dict[str, Any] = {"params": n_params, "runs": [], "rows": rows}
    for b in a.batch if not a.skip_hf else []:
        r = timed(
            hf_run(hf, rows[b], a.new_tokens if not a.hf_tokens else a.hf_tokens, device), a.repeats, device
        )
        res["runs"].append({"who": "HF", "batch": b, **r})
        print(f"  HF      batch {b:3d}: {r['tok_s']:9.1f} tok/s")
    max_len = a.prompt_len + a.new_tokens + a.k + 2
    static = "auto" if device != "cpu" else "padded"
    variants = {
        "eager": dict(step_graphs="off"),
        "graphs": dict(step_graphs=static),
        "sync": dict(step_graphs=static, decode_steps=1),
        "sampled": dict(step_graphs=static, temperature=1.0),
        "ngram": dict(step_graphs=static, ngram=True),
        "draft": dict(step_graphs=static, draft=True),
        # The same draft with k chosen per step (0 included: a draft that never pays turns off).
        "adaptive": dict(step_graphs=static, draft=True, spec_policy="adaptive"),
    }
    known, variants = variants, {k: v for k, v in variants.items() if k in a.variants or k == "graphs"}
    for name in a.switch:  # ("draft-..." names: the draft variant, its proposer's steps switched too)
        variants[name] = dict(known["draft" if name.startswith("draft-") else "graphs"])
    sweep_engine = None
    for name, v in variants.items():
        with switched(a.switch.get(name, [])):
            engine = bench_variant(a, res, hf, rows, name, v, device, dtype, max_len)
        if name == "graphs":
            sweep_engine = engine
            if a.profile:
                trace = os.path.join(a.trace_dir, "engine-1gpu.json") if a.trace_dir else None
                profile_steps(engine, rows[a.profile_batch or min(a.batch)], device, trace=trace)
        else:
            del engine
            gc.collect()
    if not a.skip_sweep:
        print("(c) verify sweep (graph replay), context", a.context)
        res["verify"] = verify_sweep(sweep_engine, a.batch, 8, a.context, bandwidth, device)
    if any(g > 1 for g in a.gpus):  # expert shards load from a checkpoint: write this one
        del sweep_engine
        t0 = time.perf_counter()
        # From host memory: saving splits the fused expert tensors into per-expert ones (the
        # checkpoint format), which does not fit beside them on one 80 GB GPU.
        hf.to("cpu").save_pretrained(a.save_dir)
        print(f"  saved the random checkpoint to {a.save_dir} in {time.perf_counter() - t0:.0f}s")
    return res


def acceptance(r: dict) -> str:
    """A speculative run's acceptance rate, or that nothing was drafted (prompt lookup finds no
    repeats in a random model's sampled text)."""
    rate = r["acceptance_rate"]
    return "no drafts" if rate is None else f"acceptance {rate:.2f}"


def parse_switch(text: str) -> tuple[str, list[tuple[str, str, Any]]]:
    """--switch "NAME:module.ATTR=value,..." -> (NAME, [(module, ATTR, value)]): modules of
    specmoe_ray by their last name (fused, triton_kernels, triton_experts), values as Python
    literals (True, 0, {"block_n": 4}, ("qkv", "gate_up")); no flips: the default switches once
    more (noise)."""
    name, _, flips = text.partition(":")
    out = []
    for flip in filter(None, (f.strip() for f in split_top_level(flips))):
        target, _, value = flip.partition("=")
        module, _, attr = target.rpartition(".")
        if module not in SWITCH_MODULES or not attr or not value:
            raise argparse.ArgumentTypeError(
                f"--switch {text!r}: expected module.ATTR=value, module one of {sorted(SWITCH_MODULES)}"
            )
        mod = importlib.import_module(SWITCH_MODULES[module])
        if not hasattr(mod, attr):
            raise argparse.ArgumentTypeError(f"--switch {text!r}: {module} has no {attr}")
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            msg = f"--switch {text!r}: {value!r} is not a Python literal"
            raise argparse.ArgumentTypeError(msg) from None
        out.append((SWITCH_MODULES[module], attr, literal))
    if not name or name in ("eager", "graphs", "sync", "sampled", "ngram", "draft"):
        raise argparse.ArgumentTypeError(f"--switch {text!r}: give the variant a new NAME before ':'")
    return name, out


def add_switch_argument(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--switch NAME:module.ATTR=value,...` option (`parse_switch`)."""
    metavar = "NAME:module.ATTR=value,..."
    p.add_argument("--switch", type=parse_switch, action="append", default=[], metavar=metavar, help=help)


def variant_switches(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, list]:
    """The `--switch` variants by name, after the unswitched `default` (a clear error if named so)."""
    switches = dict(a.switch)
    if "default" in switches:
        p.error("--switch: the name 'default' is the unswitched variant's")
    return {"default": [], **switches}


def run_info(script: str, argv: list[str] | None, device: str, **more: str) -> dict[str, str]:
    """A run's command, date, device and versions: printed as the log's first line, and returned."""
    info = {
        "command": shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device != "cpu" else platform.processor() or "cpu",
        "torch": torch.__version__,
        **more,
    }
    print(json.dumps(info), flush=True)
    return info


def write_json(path: str | None, result: dict[str, Any]) -> dict[str, Any]:
    """result written to path (if any: `--json`), and returned."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def split_top_level(text: str) -> list[str]:
    """text split at the commas outside brackets (a value may be a dict, tuple or list)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


SWITCH_MODULES = {
    "engine": "specmoe_ray.engine.engine",
    "graph": "specmoe_ray.engine.graph",
    "fused": "specmoe_ray.models.fused",
    "sampling": "specmoe_ray.engine.sampling",
    "triton_sampling": "specmoe_ray.engine.triton_sampling",
    "l2_ahead": "specmoe_ray.models.l2_ahead",
    "triton_kernels": "specmoe_ray.models.triton_kernels",
    "triton_experts": "specmoe_ray.moe.triton_experts",
}


@contextlib.contextmanager
def switched(flips: list[tuple[str, str, Any]]):
    """The switches flipped for the block (they act when a step's graph is captured)."""
    saved = []
    try:
        for module, attr, value in flips:
            mod = importlib.import_module(module)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def bench_variant(a, res, hf, rows, name: str, v: dict, device: str, dtype, max_len: int) -> Engine:
    """One engine variant of (a) on the model's tensors, timed at each batch size."""
    temperature = v.pop("temperature", a.temperature)
    proposer = NgramProposer(device=device) if v.pop("ngram", False) else None
    if v.pop("draft", False):
        proposer = draft_proposer(a, device, dtype, max(max_len, a.context + 9))
    engine = engine_on_hf_weights(
        hf,
        max_num_seqs=max(a.batch),
        max_model_len=max(max_len, a.context + 9),
        proposer=proposer,
        num_speculative_tokens=a.k,
        **v,
    )
    for b in a.batch:
        r = timed(ours_run(engine, rows[b], a.new_tokens, temperature, a.top_p), a.repeats, device, engine)
        r["speculation_length"] = engine.stats()["speculation_length"]
        baseline = "draft" if name.startswith("draft-") else "graphs"
        base = [x["tok_s"] for x in res["runs"] if x["who"] == baseline and x["batch"] == b]
        if (name in a.switch or name in ("sampled", "adaptive")) and base:
            r["vs_graphs" if baseline == "graphs" else "vs_draft"] = r["tok_s"] / base[0]
        res["runs"].append({"who": name, "batch": b, "temperature": temperature, "top_p": a.top_p, **r})
        print(
            f"  {name:7s} batch {b:3d}: {r['tok_s']:9.1f} tok/s  {r['ms_per_step']:7.2f} ms/step  "
            f"({r['ms_per_static_step']:.2f} per decode/verify step)  {r['tokens_per_step']:.2f} tok/step"
            + (f"  {acceptance(r)}, k now {r['speculation_length']}" if proposer else "")
            + (f"  {r['vs_graphs']:.3f}x graphs" if "vs_graphs" in r else "")
            + (f"  {r['vs_draft']:.3f}x draft" if "vs_draft" in r else "")
        )
    return engine


def bench_gpus(a, device: str, rows: dict[int, list[list[int]]], one_device: list[dict]):
    """Our engine with experts over g devices (g > 1): the engine's own device holds shard 0
    (`local_shard`), g - 1 Ray actors the others, all from the checkpoint `bench_shape` wrote.
    one_device: the same process's one-device "graphs" runs, the baseline of the ratios. Yields
    each (device count, layout)'s runs as they finish (the caller saves them at once)."""
    import ray

    for g in sorted(x for x in a.gpus if x > 1):
        if device != "cpu" and torch.cuda.device_count() < g:
            print(f"  {g} GPUs: skipped, this machine has {torch.cuda.device_count()}")
            continue
        # Ray hands GPUs 0 .. g-2 to the shard actors (the first g - 1 it sees) and the engine
        # takes GPU g-1, Ray's no longer: every process sees every GPU, as in a deployment, so
        # peer sums' actors (`replica_peer_sum`) need no CUDA_VISIBLE_DEVICES of their own.
        # A cluster of its own (address "local"), whatever RAY_ADDRESS says: it sizes the GPUs.
        ray.init(
            address="local",
            num_gpus=g - 1 if device != "cpu" else 0,
            num_cpus=max(8, 2 * g),
            include_dashboard=0,
        )
        try:
            for layout in a.layout:
                try:
                    yield bench_layout(a, device, rows, one_device, g, layout)
                except Exception as e:  # one layout's failure (e.g. its startup) ends only that row
                    print(f"  {g} devices ({layout}): FAILED: {type(e).__name__}: {e}", flush=True)
                    yield []
        finally:
            ray.shutdown()


def bench_layout(
    a, device: str, rows: dict[int, list[list[int]]], one_device: list[dict], g: int, layout: str
) -> list[dict[str, Any]]:
    """`bench_gpus` for one layout: "coordinator" (the engine's GPU runs the trunk, every GPU
    holds experts, two exchanges per MoE layer) or "replicas" (`ShardOptions.replicate_trunk`:
    every GPU runs the trunk too, one all_reduce per MoE layer; "replicas-exact": of the pairs'
    outputs, `ShardOptions.replica_exact`; "replicas-split": every GPU holds a slice of every
    expert's intermediate size, `ShardOptions.replica_split`; "-heads": every GPU its share of the
    attention heads, `ShardOptions.replica_attention`; "-peer": the sums of graphed steps by peer
    loads, `ShardOptions.replica_peer_sum`)."""
    from specmoe_ray.moe import peer_sum
    from specmoe_ray.serving.shards import ShardOptions

    options = ShardOptions(
        local_shard=True,
        num_cpus=1,
        cuda_graphs=a.shard_steps == "auto",
        replicate_trunk=layout.startswith("replicas"),
        replica_exact=layout == "replicas-exact",
        replica_split="intermediate" if layout.startswith("replicas-split") else "experts",
        replica_peer_sum=256 if layout.endswith("-peer") else 0,
        replica_attention="heads" if "-heads" in layout else "replicated",
        # This process's SPECMOE_* switches (e.g. SPECMOE_SORTED_FUSED=0) for the shard actors too.
        env_vars={k: v for k, v in os.environ.items() if k.startswith("SPECMOE_")}
        | ({peer_sum.WAIT_TIMES_ENV: "1"} if a.peer_waits else {}),
    )
    t0 = time.perf_counter()
    print(f"  {g} devices ({layout}): starting the engine and {g - 1} shard(s)", flush=True)
    engine = Engine.from_pretrained(
        a.save_dir,
        num_shards=g,
        device=f"cuda:{g - 1}" if device != "cpu" else "cpu",
        dtype="bfloat16" if device != "cpu" else "float32",
        shard_options=options,
        step_graphs=a.shard_steps,
        max_num_seqs=max(a.batch),
        max_model_len=a.prompt_len + a.new_tokens + 8,
    )
    out = []
    who = f"{g} devices" + (f" ({layout})" if layout != "coordinator" else "")
    loads = ", ".join(
        f"rank {x['rank']} {x.get('load_s', '?')}s"
        + (" (read {read}s, copied {copy}s)".format(**x["load_times"]) if x.get("load_times") else "")
        for x in engine.stats()["shards"]["shards"]
    )
    print(f"  {who}: ready in {time.perf_counter() - t0:.0f}s (experts loaded: {loads})", flush=True)
    with engine:
        for b in a.batch:
            waited = engine.shard_group.peer_wait_times() if a.peer_waits else None
            r = timed(ours_run(engine, rows[b], a.new_tokens), a.repeats, device, engine)
            now = engine.shard_group.peer_wait_times() if a.peer_waits else None
            if now:  # each rank's waits for its peers over this batch's runs
                r["peer_waits_us"] = peer_waits(waited or [[(0, 0.0)] * len(w) for w in now], now)
            out.append({"who": who, "layout": layout, "batch": b, **r})
            tok_s, ms, static = r["tok_s"], r["ms_per_step"], r["ms_per_static_step"]
            one = next((x["tok_s"] for x in one_device if x["batch"] == b), None)
            vs = f"  {tok_s / one:.2f}x one device (graphs)" if one else ""
            print(
                f"  {who} batch {b:3d}: {tok_s:9.1f} tok/s  {ms:7.2f} ms/step  "
                f"({static:.2f} per decode/verify step){vs}"
            )
            if "peer_waits_us" in r:
                waits = "; ".join(
                    f"rank {i} {w['all']:.2f} (a forward's first sum {w['first']:.2f}, the others "
                    f"{w['rest']:.2f})"
                    for i, w in enumerate(r["peer_waits_us"])
                )
                print(f"    peer sums: us waited for the peers per sum: {waits}")
        if a.profile:  # rank 0's side, then each shard's
            name = f"engine-{g}gpus" + (f"-{layout}" if layout != "coordinator" else "")
            trace = os.path.join(a.trace_dir, f"{name}.json") if a.trace_dir else None
            profile_steps(engine, rows[a.profile_batch or min(a.batch)], device, trace=trace)
    return out


def peer_waits(before: list[list[tuple[int, float]]], after: list[list[tuple[int, float]]]) -> list[dict]:
    """Each rank's microseconds waited per peer sum between two `peer_wait_times` readings
    ([rank][position] of (sums, us)): over all its sums, a forward's first ones, the others."""
    out = []
    for rank_before, rank_after in zip(before, after):
        delta = [(n1 - n0, us1 - us0) for (n0, us0), (n1, us1) in zip(rank_before, rank_after)]

        def mean(rows):
            return sum(us for _, us in rows) / max(sum(n for n, _ in rows), 1)

        out.append({"all": mean(delta), "first": mean(delta[:1]), "rest": mean(delta[1:])})
    return out


def bench_demo(a, device: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from specmoe_ray.demo import DEMO_DIR, HELDOUT_FILE

    target, draft = os.path.join(DEMO_DIR, "target"), os.path.join(DEMO_DIR, "draft")
    with open(HELDOUT_FILE) as f:
        text = f.read()
    out: dict[str, Any] = {"runs": []}
    hf = AutoModelForCausalLM.from_pretrained(target).to(device).eval()
    for b in a.batch:
        with Engine.from_pretrained(target, device=device) as e:
            ids = e.tokenizer.encode(text, add_special_tokens=False)
        stride = max(1, (len(ids) - a.prompt_len) // b)
        rows = [ids[i * stride : i * stride + a.prompt_len] for i in range(b)]
        r = timed(hf_run(hf, rows, a.new_tokens, device), a.repeats, device)
        out["runs"].append({"who": "HF", "batch": b, **r})
        print(f"(b) demo HF       batch {b:3d}: {r['tok_s']:9.1f} tok/s")
        for name, d in (("plain", None), ("draft", draft), ("ngram", "ngram")):
            with Engine.from_pretrained(target, draft=d, device=device, num_speculative_tokens=a.k) as e:
                r = timed(ours_run(e, rows, a.new_tokens, a.temperature, a.top_p), a.repeats, device, e)
            out["runs"].append({"who": name, "batch": b, "temperature": a.temperature, "top_p": a.top_p, **r})
            acc = r["acceptance_rate"]
            print(
                f"(b) demo {name:8s} batch {b:3d}: {r['tok_s']:9.1f} tok/s  {r['ms_per_step']:6.2f} ms/step  "
                f"{r['tokens_per_step']:.2f} tok/step  acceptance {acc if acc is None else round(acc, 3)}"
                + (f"  (sampled, temperature {a.temperature}, top-p {a.top_p})" if a.temperature else "")
            )
    del hf
    return out


def plot(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    verify = results["shape"].get("verify", [])
    fig, axes = plt.subplots(1, 2 if verify else 1, figsize=(12 if verify else 6.5, 4.5), squeeze=False)
    ax1 = axes[0][0]
    runs = results["shape"]["runs"]
    whos = list(dict.fromkeys(r["who"] for r in runs))
    batches = sorted({r["batch"] for r in runs})
    width = 0.8 / len(whos)
    # experts over several GPUs ("2 devices", "2 devices (layout)"): ratios to one
    several = any(" devices" in w for w in whos)
    for i, who in enumerate(whos):
        vals = [next((r["tok_s"] for r in runs if r["who"] == who and r["batch"] == b), 0) for b in batches]
        xs = [j + i * width for j in range(len(batches))]
        label = f"{who} (1 device)" if several and who == "graphs" else who
        ax1.bar(xs, vals, width, label=label)
        if several and " devices" in who:
            for x, b, v in zip(xs, batches, vals):
                one = next((r["tok_s"] for r in runs if r["who"] == "graphs" and r["batch"] == b), 0)
                if one and v:
                    ax1.text(x, v, f"{v / one:.2f}x", ha="center", va="bottom", fontsize=7)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax1.set_ylabel("tokens/s")
    ax1.set_yscale("log")
    ax1.set_title(f"{results['shape_name']}: generate throughput")
    ax1.legend()
    if verify:
        plot_verify(axes[0][1], verify, batches)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def plot_verify(ax2, verify: list[dict[str, Any]], batches: list[int]) -> None:
    for b in batches:
        rows = [r for r in verify if r["batch"] == b]
        (line,) = ax2.plot([r["T"] for r in rows], [r["ms"] for r in rows], "o-", label=f"B={b} measured")
        ax2.plot(
            [r["T"] for r in rows],
            [r["roofline_ms"] for r in rows],
            "--",
            color=line.get_color(),
            label=f"B={b} roofline",
        )
    ax2.set_xlabel("tokens per sequence (T)")
    ax2.set_ylabel("ms per forward")
    ax2.set_title("verify forward vs memory roofline")
    ax2.legend(fontsize=7)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("small", "qwen3-30b-a3b"), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hf-tokens", type=int, default=0, help="tokens for HF's runs (default: --new-tokens)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--context", type=int, default=256, help="cached tokens per sequence in the verify sweep")
    p.add_argument("--k", type=int, default=3, help="draft tokens per step")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline in (a)")
    p.add_argument("--skip-sweep", action="store_true", help="no verify sweep (c)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "graphs", "sync", "ngram", "draft"],
        help="our engine's runs in (a) (eager graphs sync sampled ngram draft adaptive); draft: a random "
        "Qwen3-0.6B-shaped draft model; adaptive: that draft with spec_policy='adaptive'",
    )
    add_switch_argument(
        p, "a further (a) variant: graphs (NAME draft-...: draft) with these fast-path switches flipped"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="our engine's runs sample at this temperature, (a)'s and (b)'s (seeded per row; 0: greedy; "
        "transformers' stay greedy); `sampled` is 1",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sampled runs (temperature > 0: `sampled`, --temperature) draw from this nucleus (1: off)",
    )
    p.add_argument("--skip-shape", action="store_true", help="only (b), the demo pair")
    p.add_argument(
        "--gpus", type=int, nargs="+", default=[1], help="devices holding experts for (a): 1 = in-process"
    )
    p.add_argument("--save-dir", default="/tmp/specmoe-bench-ckpt", help="checkpoint for --gpus > 1")
    p.add_argument(
        "--layout",
        nargs="+",
        choices=[
            "coordinator",
            "replicas",
            "replicas-exact",
            "replicas-split",
            "replicas-peer",
            "replicas-heads-peer",
            "replicas-split-heads-peer",
            "replicas-split-peer",
        ],
        default=["coordinator"],
        help="--gpus > 1: the engine's GPU runs the trunk (coordinator) or every GPU does (replicas)",
    )
    p.add_argument(
        "--shard-steps",
        default="auto",
        choices=("off", "padded", "auto"),
        help="step_graphs with shards (auto: CUDA graphs, NCCL exchanges captured; ShardOptions.cuda_graphs)",
    )
    p.add_argument(
        "--profile", action="store_true", help="profile a few decode steps (graphs, smallest batch)"
    )
    p.add_argument("--profile-batch", type=int, help="the batch --profile profiles (default: the smallest)")
    p.add_argument("--trace-dir", help="--profile also writes Chrome traces here (engine and shards)")
    p.add_argument("--layers", type=int, help="the shape with this many layers (default: all of them)")
    p.add_argument(
        "--peer-waits",
        action="store_true",
        help="--gpus > 1, peer sums: time each rank's waits for its peers (peer_sum.WAIT_TIMES) and print "
        "them per batch",
    )
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    a.switch = dict(a.switch)
    if a.shape == "qwen3-30b-a3b" and a.device == "cpu":
        p.error("--shape qwen3-30b-a3b needs a GPU (~61 GB of bf16 weights)")
    if not 0.0 < a.top_p <= 1.0:
        p.error(f"--top-p must be in (0, 1], got {a.top_p}")
    device = a.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    import transformers

    info = run_info("gpu.py", argv, device, transformers=transformers.__version__)
    bandwidth = copy_bandwidth(device, 1.0 if device != "cpu" else 0.125)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")
    results: dict[str, Any] = {"info": info, "bandwidth_Bps": bandwidth, "shape_name": a.shape}
    rows = None
    if not a.skip_shape:
        results["shape"] = bench_shape(a, device, dtype, bandwidth)
        rows = results["shape"].pop("rows")  # prompts for the multi-device rows; not saved
        save_json(a.json, results)
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    if not a.skip_shape and any(g > 1 for g in a.gpus):
        print("(a) experts over several devices (engine + expert shards, NCCL on GPUs)")
        one = [r for r in results["shape"]["runs"] if r["who"] == "graphs"]
        for runs in bench_gpus(a, device, rows, one):
            results["shape"]["runs"] += runs
            save_json(a.json, results)  # a run cut short keeps what it measured
    if not a.skip_demo:
        results["demo"] = bench_demo(a, device)
    save_json(a.json, results)
    if a.png and "shape" in results:
        plot(results, a.png)
    return results


def save_json(path: str | None, results: dict[str, Any]) -> None:
    """Write results to path (if given) whole or not at all: a temporary file, then renamed."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
