"""Decode throughput: our `Engine` against transformers' own `generate`, same model, same run.

Both sides get the same random prompts (seeded token ids) and generate exactly `--new-tokens`
greedy tokens per sequence: HF with `min_new_tokens = max_new_tokens` over a left-padded batch,
ours with `ignore_eos=True` and `max_tokens`. Throughput is end-to-end (prefill + decode):
generated tokens / wall time of one whole `generate` call, median over `--repeats` timed runs
after one warm-up. HF runs first and is freed before our engines load, so a model as large as
the GPU's memory allows fits one side at a time.

    python benchmarks/decode.py                                   # small random qwen3_moe on CPU
    python benchmarks/decode.py --arch mixtral --batch 1 --num-shards 0
    python benchmarks/decode.py --shape qwen3-30b-a3b --device cuda --dtype bfloat16 --save-dir /ckpt
    python benchmarks/decode.py --model /ckpt --device cuda --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PAD_ID = 0  # prompts draw from [1, vocab), so padding never looks like a prompt token


# -- the checkpoint ----------------------------------------------------------------------------


def small_config(arch: str):
    """A random MoE of `arch` sized so a CPU run takes seconds: D=256, 4 layers, 16 experts top-2."""
    import transformers

    common = dict(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
    )
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=32,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_experts=16,
            norm_topk_prob=True,
        )
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_experts=16,
            shared_expert_intermediate_size=256,
        )
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=128, num_local_experts=16)
    if arch == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=128, num_experts=16)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def qwen3_30b_a3b_config():
    """Qwen3-30B-A3B's exact shape (its published config.json), random weights."""
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=PAD_ID,
    )


def build_checkpoint(args: argparse.Namespace, out_dir: str) -> str:
    """Write a random-weight HF checkpoint of `--arch` (or `--shape`) to out_dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    if args.shape == "qwen3-30b-a3b":
        # ~61 GB of bf16 weights: initialised directly on the GPU (no meta device, no host copy).
        cfg = qwen3_30b_a3b_config()
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(small_config(args.arch), dtype=DTYPES[args.dtype])
    t0 = time.perf_counter()
    model.save_pretrained(out_dir)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"built random {type(model).__name__} ({num_params / 1e6:.1f}M params) in {out_dir} "
        f"[save {time.perf_counter() - t0:.1f}s]"
    )
    del model
    free_memory()
    return out_dir


# -- measuring ---------------------------------------------------------------------------------


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int, ragged: bool) -> list[list[int]]:
    """Seeded random prompts; row 0 is always full length (it is the row compared token by token)."""
    g = torch.Generator().manual_seed(seed + batch)
    lengths = [prompt_len] * batch
    if ragged:
        shortest = max(1, prompt_len // 2)
        lengths[1:] = torch.randint(shortest, prompt_len + 1, (batch - 1,), generator=g).tolist()
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def time_runs(fn: Callable[[], tuple[int, Any]], repeats: int, device: str) -> dict[str, Any]:
    """Warm up once, then time `repeats` calls of fn() -> (tokens generated, result)."""
    fn()
    times, tokens, result = [], [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        n, result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    return {
        "times_s": times,
        "tokens": tokens,
        "median_s": statistics.median(times),
        "tok_s": statistics.median(n / t for n, t in zip(tokens, times, strict=True)),
        "result": result,
    }


def report_run(who: str, batch: int, r: dict[str, Any]) -> None:
    lo, hi = min(r["times_s"]), max(r["times_s"])
    noisy = "  <- noisy: is something else running?" if hi > 1.5 * lo else ""
    print(
        f"  {who:7s} batch {batch:3d}: {r['tok_s']:9.1f} tok/s  "
        f"(median {r['median_s']:.3f}s, runs {lo:.3f}-{hi:.3f}s){noisy}"
    )


def hf_greedy_run(model, rows: list[list[int]], new_tokens: int, device: str, **gen_kwargs):
    """A closure running transformers' greedy `generate` on the left-padded batch:
    -> (tokens generated, row 0's tokens)."""
    ids, mask = left_pad(rows, device)

    def run():
        with torch.inference_mode():
            seqs = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=PAD_ID,
                **gen_kwargs,
            )
        generated = seqs[:, ids.shape[1] :]
        return generated.numel(), generated[0].tolist()

    return run


def bench_hf(args, path: str, prompts: dict[int, list[list[int]]]) -> dict[int, dict[str, Any]]:
    """transformers' generate on each batch: greedy, exactly N new tokens, left-padded."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if args.hf_experts:
        kwargs["experts_implementation"] = args.hf_experts
    if importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = args.device  # loads straight onto the GPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype], **kwargs)
    model.to(args.device).eval()
    impl = {
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    print(f"HF model: {type(model).__name__}, {impl}")
    out = {}
    for batch, rows in prompts.items():
        run = hf_greedy_run(model, rows, args.new_tokens, args.device)
        r = time_runs(run, args.repeats, args.device)
        r["row0"] = r.pop("result")
        out[batch] = r
        report_run("HF", batch, r)
    out["impl"] = impl
    return out  # the model is freed with this frame; the caller collects it


def bench_ours(args, path: str, num_shards: int, prompts: dict[int, list[list[int]]]) -> dict[int, Any]:
    """Our Engine on each batch: greedy, ignore_eos, exactly N tokens per sequence."""
    from specmoe_ray.engine.engine import Engine
    from specmoe_ray.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        path,
        num_shards=num_shards,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.new_tokens,
        max_num_seqs=max(prompts),
    )
    print(f"engine with {num_shards} shard(s) ready in {time.perf_counter() - t0:.1f}s")
    out = {}
    try:
        for batch, rows in prompts.items():

            def run(rows=rows):
                outputs = engine.generate(rows, params)
                return sum(len(o.token_ids) for o in outputs), outputs[0].token_ids

            r = time_runs(run, args.repeats, args.device)
            r["row0"] = r.pop("result")
            r["stats"] = engine.stats()
            out[batch] = r
            report_run(f"ours/{num_shards}", batch, r)
    finally:
        engine.shutdown()
    return out


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- reporting ---------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    import ray
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    if info.get("cpu") is None:
        info["cpu"] = platform.processor() or platform.machine()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("config", "batch", "shards", "HF tok/s", "ours tok/s", "ours/HF", "row0 greedy = HF")
    lines = [
        (
            r["config"],
            str(r["batch"]),
            str(r["shards"]),
            f"{r['hf_tok_s']:.1f}",
            f"{r['ours_tok_s']:.1f}",
            f"{r['ratio']:.2f}x",
            "yes" if r["row0_match"] else f"no (first diff at token {r['row0_first_mismatch']})",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:{'<' if i in (0, 6) else '>'}{w}}}" for i, w in enumerate(widths)) + " |"
    print(fmt.format(*head))
    rule = ("-" * (w + 1) + ":" if 0 < i < 6 else "-" * (w + 2) for i, w in enumerate(widths))
    print("|" + "|".join(rule) + "|")
    for ln in lines:
        print(fmt.format(*ln))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local HF checkpoint directory; default: build a random one")
    p.add_argument("--arch", choices=ARCHS, default="qwen3_moe", help="architecture of the random checkpoint")
    p.add_argument(
        "--shape",
        choices=("small", "qwen3-30b-a3b"),
        default="small",
        help="random checkpoint size: small (CPU, seconds) or Qwen3-30B-A3B's (~61 GB bf16, CUDA)",
    )
    p.add_argument("--save-dir", help="write the random checkpoint here and keep it (default: a temp dir)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument(
        "--ragged",
        action="store_true",
        help="rows 1.. get random prompt lengths in [prompt_len/2, prompt_len] (HF pads them)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        nargs="+",
        default=[0, 2],
        help="expert shards (Ray actors); 0 = experts in the engine's process",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hf-experts",
        default=None,
        help="transformers experts_implementation (eager, grouped_mm, ...); default: HF's choice",
    )
    p.add_argument("--json", metavar="OUT.json", help="write every number here")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    if args.shape == "qwen3-30b-a3b":
        if args.model:
            p.error("--shape builds a random checkpoint; it cannot be combined with --model")
        if args.device != "cuda":
            p.error(
                "--shape qwen3-30b-a3b builds ~61 GB of bf16 weights: it needs --device cuda "
                "(it is never built on CPU)"
            )
        if args.dtype != "bfloat16":
            p.error("--shape qwen3-30b-a3b is built in bfloat16: pass --dtype bfloat16")
        args.arch = "qwen3_moe"
    if min(args.batch) < 1 or args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--batch, --new-tokens, --prompt-len and --repeats must be >= 1")
    if min(args.num_shards) < 0:
        p.error("--num-shards must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/decode.py", *argv])
    info = machine_info(args.device)
    print(f"$ {command}")
    machine = info.get("gpu") or info["cpu"]
    print(
        f"machine: {machine} ({info['cpu_count']} CPUs) | torch {info['torch']} | transformers "
        f"{info['transformers']} | ray {info['ray']} | torch threads {info['torch_threads']} | "
        f"load avg {info['load_average_1m']:.2f}"
    )

    tmp, started_ray = None, False
    if args.model:
        path = args.model
    elif args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        path = build_checkpoint(args, args.save_dir)
    else:
        tmp = tempfile.mkdtemp(prefix="specmoe-bench-")
        path = build_checkpoint(args, tmp)
    try:
        from specmoe_ray.models.loader import read_config

        margs, _ = read_config(path)
        config = (
            f"{margs.model_type} D={margs.hidden_size} L={margs.num_layers} "
            f"E={margs.num_experts} top{margs.num_experts_per_tok} {args.dtype} {args.device}"
        )
        print(
            f"config: {config}; prompt {args.prompt_len} + {args.new_tokens} new tokens; "
            f"median of {args.repeats} after 1 warm-up"
        )
        prompts = {
            b: make_prompts(b, args.prompt_len, margs.vocab_size, args.seed, args.ragged) for b in args.batch
        }

        hf = bench_hf(args, path, prompts)
        free_memory()  # HF's weights go before ours load
        if max(args.num_shards) > 0:
            import ray

            if not ray.is_initialized():
                # A cluster of our own (address="local"), not one another process left running;
                # each shard reserves 1 logical CPU (ShardOptions.num_cpus), so never fewer than that.
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, max(args.num_shards)),
                    include_dashboard=False,
                    log_to_driver=False,
                )
                started_ray = True
        ours = {}
        for s in args.num_shards:
            ours[s] = bench_ours(args, path, s, prompts)
            free_memory()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for s in args.num_shards:
        for b in args.batch:
            h, o = hf[b], ours[s][b]
            mismatch = first_mismatch(h["row0"], o["row0"])
            rows.append(
                {
                    "config": config,
                    "batch": b,
                    "shards": s,
                    "hf_tok_s": h["tok_s"],
                    "ours_tok_s": o["tok_s"],
                    "ratio": o["tok_s"] / h["tok_s"],
                    "row0_match": mismatch is None,
                    "row0_first_mismatch": mismatch,
                    "hf_times_s": h["times_s"],
                    "ours_times_s": o["times_s"],
                    "hf_tokens": h["tokens"],
                    "ours_tokens": o["tokens"],
                    "ours_stats": o["stats"],
                }
            )
    print()
    print_table(rows)
    report = {"command": command, "machine": info, "args": vars(args), "hf_impl": hf["impl"], "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
