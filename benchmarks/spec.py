"""Speculative decoding throughput: our `Engine` with and without drafts, against transformers.

In one run, on the same target/draft pair and the same prompts, greedy (temperature 0) tokens/s of:

  1. our engine, no speculation;
  2. our engine with the draft model, for each `--k`;
  3. our engine with the n-gram (prompt lookup) proposer, for each `--k`;
  4. our engine with the draft model and `spec_policy="adaptive"` (k chosen per step, at most max(--k));
  5. transformers `generate`, plain greedy;
  6. transformers assisted generation, `generate(assistant_model=draft, do_sample=False)`, batch 1 only
     (HF supports no more): once with HF's own settings (by default up to 20 tokens, drafting stops
     below 0.4 confidence), then once per `--k` with a constant k and no early stop.

Every run generates exactly `--new-tokens` tokens per sequence (ours: `ignore_eos=True`; HF:
`min_new_tokens`). Throughput is generated tokens / wall time of one whole `generate` call, median of
`--repeats` timed calls after one warm-up. Acceptance numbers of ours come from the counters behind
`engine.stats()`, over the timed calls only.

Without `--target`, a small random MoE target (as decode.py builds it) and a small random dense draft
with the same vocabulary are built: with random weights acceptance is low, so that run tests the
harness. `--draft self` drafts with the target itself: acceptance ~1, the upper bound of what a draft
can give. Prompts are a repeated random pattern with noise (something for the n-gram proposer to
find), or, when the target has a tokenizer, Python source from the standard library.

    python benchmarks/spec.py                              # random pair, CPU: ~20 s on 2 idle cores
    python benchmarks/spec.py --draft self --threads 1     # steadier on a shared 2-core box
    python benchmarks/spec.py --target specmoe_ray/demo/target --draft specmoe_ray/demo/draft
    python benchmarks/spec.py --target /ckpt/moe --draft /ckpt/dense --device cuda --batch 1 8 --k 2 4 6
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
from decode import (
    DTYPES,
    PAD_ID,
    first_mismatch,
    free_memory,
    hf_greedy_run,
    machine_info,
    report_run,
    small_config,
    time_runs,
)

# Text prompts: the source of these stdlib modules, via inspect. The demo pair (specmoe_ray/demo) was
# trained on the standard library; these four are among the files it held out (its heldout.txt).
SOURCE_MODULES = ("base64", "difflib", "shelve", "_strptime")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# -- the checkpoints ---------------------------------------------------------------------------


def draft_config(vocab_size: int, max_position_embeddings: int):
    """A small random dense Llama: D=128, 2 layers (about a tenth of the small target's work)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
    )


def save_random(config, path: str, seed: int, dtype: torch.dtype) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"built random {type(model).__name__} ({num_params / 1e6:.1f}M params) in {path}")
    del model
    free_memory()
    return path


def resolve_checkpoints(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
    """(target dir, draft dir): the given ones, or random ones written under tmp."""
    from specmoe_ray.models.loader import read_config

    dtype = DTYPES[args.dtype]
    if args.target:
        target = args.target
    else:
        target = save_random(small_config("qwen3_moe"), os.path.join(tmp, "target"), args.seed, dtype)
    if args.draft == "self":
        return target, target
    if args.draft:
        return target, args.draft
    targs, _ = read_config(target)
    cfg = draft_config(targs.vocab_size, targs.max_position_embeddings)
    return target, save_random(cfg, os.path.join(tmp, "draft"), args.seed + 1, dtype)


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


# -- prompts -----------------------------------------------------------------------------------


def pattern_prompt(row: int, prompt_len: int, vocab_size: int, seed: int) -> list[int]:
    """A random pattern of 6-16 tokens repeated to prompt_len, about 10% of tokens replaced at random."""
    g = torch.Generator().manual_seed(seed * 1000 + row)
    period = int(torch.randint(6, 17, (1,), generator=g))
    pattern = torch.randint(1, vocab_size, (period,), generator=g)
    ids = pattern.repeat(prompt_len // period + 1)[:prompt_len]
    noise = torch.rand(prompt_len, generator=g) < 0.1
    ids[noise] = torch.randint(1, vocab_size, (int(noise.sum()),), generator=g)
    return ids.tolist()


def source_prompt(row: int, prompt_len: int, tokenizer, modules: list[str]) -> list[int]:
    """prompt_len tokens of a module's Python source, from the start of a top-level def or class."""
    module = importlib.import_module(modules[row % len(modules)])
    source = inspect.getsource(module)
    lines = source.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(("def ", "class "))] or [0]
    first = starts[(row // len(modules)) % len(starts)]
    chars = 16 * prompt_len  # plenty for prompt_len tokens, short enough to stay under model_max_length
    ids = tokenizer.encode("".join(lines[first:])[:chars], add_special_tokens=False)
    if len(ids) < prompt_len:  # near the end of a short module: take the module's start instead
        ids = tokenizer.encode(source[:chars], add_special_tokens=False)
    return ids[:prompt_len]


def make_prompts(args, target: str, vocab_size: int) -> tuple[dict[int, list[list[int]]], Any]:
    """Every batch's rows; row i is the same prompt at every batch size. Also the tokenizer, if any."""
    tokenizer = None
    if has_tokenizer(target):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    rows = []
    for i in range(max(args.batch)):
        if tokenizer is not None:
            rows.append(source_prompt(i, args.prompt_len, tokenizer, args.source_modules))
        else:
            rows.append(pattern_prompt(i, args.prompt_len, vocab_size, args.seed))
    return {b: rows[:b] for b in args.batch}, tokenizer


# -- transformers ------------------------------------------------------------------------------


class ForwardCounter:
    """Counts forward calls of a module (for HF: target passes, so tokens per step)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self) -> None:
        self.handle.remove()


def load_hf(args, path: str):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = args.device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype], **kwargs)
    return model.to(args.device).eval()


def bench_hf(args, target: str, draft: str, prompts: dict[int, list[list[int]]]) -> list[dict[str, Any]]:
    """Plain greedy at every batch; assisted generation at batch 1 (HF's settings, then per k)."""
    model = load_hf(args, target)
    impl = {
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    print(f"HF target: {type(model).__name__}, {impl}")
    counter = ForwardCounter(model)
    out = []

    def measure(label: str, batch: int, **gen_kwargs) -> dict[str, Any]:
        run = hf_greedy_run(model, prompts[batch], args.new_tokens, args.device, **gen_kwargs)

        calls0 = counter.calls
        r = time_runs(run, args.repeats, args.device)
        forwards = (counter.calls - calls0) / (args.repeats + 1)  # per generate call, warm-up included
        r["row0"] = r.pop("result")
        # Tokens each sequence gains per target forward: HF's mean accepted length.
        r.update(batch=batch, forwards_per_call=forwards, mean_accepted_length=args.new_tokens / forwards)
        report_run(label, batch, r)
        return r

    try:
        for batch in prompts:
            r = measure("HF greedy", batch)
            out.append({"engine": "HF greedy", "draft": "-", "k": 0, **r})
        if 1 in prompts:
            assistant = load_hf(args, draft)
            acfg = assistant.generation_config
            try:
                # HF's own settings first (the checkpoint's generation_config, else HF's defaults:
                # up to 20 tokens, drafting stops below 0.4 confidence), before they are overridden.
                default_k = f"<={acfg.num_assistant_tokens}" if acfg.num_assistant_tokens else "HF's"
                r = measure("HF assisted, HF settings", 1, assistant_model=assistant)
                out.append({"engine": "HF assisted (HF settings)", "draft": "model", "k": default_k, **r})
                for k in args.k:
                    # A fixed k and no confidence-based early stop: the same drafting as our fixed policy.
                    acfg.num_assistant_tokens = k
                    acfg.num_assistant_tokens_schedule = "constant"
                    acfg.assistant_confidence_threshold = 0.0
                    r = measure(f"HF assisted k={k}", 1, assistant_model=assistant)
                    out.append({"engine": "HF assisted", "draft": "model", "k": k, **r})
            finally:
                del assistant
    finally:
        counter.remove()
    for r in out:
        r["impl"] = impl
    return out  # the models are freed with this frame; the caller collects them


# -- ours --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    engine: str  # the label in the table
    draft: str | None  # a checkpoint dir, "ngram" or None
    draft_kind: str  # "-", "model", "ngram"
    k: int
    policy: str = "fixed"


COUNTERS = ("num_steps", "num_generated_tokens", "num_drafted", "num_accepted", "num_verify_rows")
TIMERS = ("draft_time_s", "verify_time_s")


def snapshot(engine) -> dict[str, float]:
    """The counters `engine.stats()` summarises (acceptance rate, mean accepted length, ...)."""
    m = engine.metrics
    return {name: getattr(m, name) for name in COUNTERS + TIMERS}


def summarise(deltas: list[dict[str, float]]) -> dict[str, Any]:
    """Acceptance and step numbers over the timed calls, computed as engine.stats() computes them."""
    total = {name: sum(d[name] for d in deltas) for name in COUNTERS + TIMERS}
    n = len(deltas)
    drafted, rows = total["num_drafted"], total["num_verify_rows"]
    spent = total["draft_time_s"] + total["verify_time_s"]
    return {
        "acceptance_rate": total["num_accepted"] / drafted if drafted else None,
        "mean_accepted_length": total["num_generated_tokens"] / rows if rows else None,
        "tokens_per_step": total["num_generated_tokens"] / total["num_steps"] if total["num_steps"] else None,
        "drafts_per_row": drafted / rows if rows else None,  # the k actually drafted, on average
        "draft_time_s": total["draft_time_s"] / n,
        "verify_time_s": total["verify_time_s"] / n,
        "draft_share": total["draft_time_s"] / spent if spent else None,
        "steps_per_call": total["num_steps"] / n,
    }


def bench_ours(args, target: str, setup: Setup, prompts: dict[int, list[list[int]]]) -> list[dict[str, Any]]:
    from specmoe_ray.engine.engine import Engine
    from specmoe_ray.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        target,
        draft=setup.draft,
        num_speculative_tokens=setup.k,
        spec_policy=setup.policy,
        num_shards=args.num_shards,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.new_tokens,
        max_num_seqs=max(prompts),
    )
    label = setup.engine if setup.draft is None else f"{setup.engine} {setup.draft_kind} k={setup.k}"
    print(f"{label}: engine ready in {time.perf_counter() - t0:.1f}s")
    out = []
    try:
        for batch, rows in prompts.items():
            deltas = []

            def run(rows=rows, deltas=deltas):
                before = snapshot(engine)
                outputs = engine.generate(rows, params)
                after = snapshot(engine)
                deltas.append({name: after[name] - before[name] for name in after})
                return sum(len(o.token_ids) for o in outputs), outputs[0].token_ids

            r = time_runs(run, args.repeats, args.device)
            r["row0"] = r.pop("result")
            r.update(summarise(deltas[1:]))  # the warm-up call is left out
            r["engine_stats"] = engine.stats()  # cumulative, warm-up included
            r["batch"] = batch
            report_run(label, batch, r)
            out.append({"engine": setup.engine, "draft": setup.draft_kind, "k": setup.k, **r})
    finally:
        engine.shutdown()
    return out


# -- reporting ---------------------------------------------------------------------------------


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        "batch",
        "engine",
        "draft",
        "k",
        "tok/s",
        "vs HF greedy",
        "vs ours no-spec",
        "accept rate",
        "mean acc len",
        "drafts/step",
        "draft time",
        "row0 = HF greedy",
    )
    lines = []
    for r in rows:
        match = "yes" if r["row0_match"] else f"no (first diff at token {r['row0_first_mismatch']})"
        lines.append(
            (
                str(r["batch"]),
                r["engine"],
                r["draft"],
                str(r["k"]),
                f"{r['tok_s']:.1f}",
                fmt(r["vs_hf_greedy"], ".2f", "x"),
                fmt(r["vs_ours_nospec"], ".2f", "x"),
                fmt(r.get("acceptance_rate"), ".2f"),
                fmt(r.get("mean_accepted_length"), ".2f"),
                fmt(r.get("drafts_per_row"), ".2f"),
                fmt(None if r.get("draft_share") is None else 100 * r["draft_share"], ".0f", "%"),
                match,
            )
        )
    left = {1, 2, len(head) - 1}
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    line_fmt = "| " + " | ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths)) + " |"
    print(line_fmt.format(*head))
    rule = ("-" * (w + 2) if i in left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
    print("|" + "|".join(rule) + "|")
    for ln in lines:
        print(line_fmt.format(*ln))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="MoE target checkpoint directory; default: build a small random one")
    p.add_argument(
        "--draft",
        help="draft checkpoint directory, or 'self' (the target drafts for itself); "
        "default: build a small random dense draft with the target's vocabulary",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4], help="speculation lengths to measure")
    p.add_argument("--num-shards", type=int, default=0, help="expert shards (Ray actors); 0 = in-process")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source-modules",
        nargs="+",
        default=list(SOURCE_MODULES),
        help="modules whose source gives the text prompts, when the target has a tokenizer",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is steadier on a small machine that others share",
    )
    p.add_argument("--json", metavar="OUT.json", help="write every number here")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    if min(args.batch) < 1 or args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--batch, --new-tokens, --prompt-len and --repeats must be >= 1")
    if min(args.k) < 1:
        p.error("--k must be >= 1 (the no-speculation run is always measured)")
    if args.num_shards < 0:
        p.error("--num-shards must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    for name in ("target", "draft"):
        path = getattr(args, name)
        if path and path != "self" and not os.path.isfile(os.path.join(path, "config.json")):
            p.error(f"--{name} {path}: no config.json there (a local HF checkpoint directory is needed)")
    args.batch = sorted(set(args.batch))
    args.k = sorted(set(args.k))
    return args


def print_header(args, command: str, info: dict[str, Any]) -> None:
    print(f"$ {command}")
    machine = info.get("gpu") or info["cpu"]
    print(
        f"machine: {machine} ({info['cpu_count']} CPUs) | torch {info['torch']} | transformers "
        f"{info['transformers']} | ray {info['ray']} | torch threads {info['torch_threads']} | "
        f"load avg {info['load_average_1m']:.2f}"
    )
    if args.device == "cpu":
        print(
            "note: CPU timings on a shared machine are noisy (another busy process can slow torch 10-100x); "
            "compare rows of one run, and rerun when a row is flagged as noisy"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/spec.py", *argv])
    info = machine_info(args.device)
    print_header(args, command, info)

    tmp = tempfile.mkdtemp(prefix="specmoe-spec-")
    started_ray = False
    try:
        from specmoe_ray.models.loader import read_config

        target, draft = resolve_checkpoints(args, tmp)
        targs, _ = read_config(target)
        dargs, _ = read_config(draft)
        if args.prompt_len + args.new_tokens > targs.max_position_embeddings:
            raise SystemExit(
                f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the target's "
                f"max_position_embeddings ({targs.max_position_embeddings})"
            )
        moe = f" E={targs.num_experts} top{targs.num_experts_per_tok}" if targs.is_moe else " dense"
        config = f"{targs.model_type} D={targs.hidden_size} L={targs.num_layers}{moe}"
        draft_desc = "the target itself" if draft == target else f"{dargs.model_type} D={dargs.hidden_size}"
        draft_desc += f" L={dargs.num_layers}" if draft != target else ""
        prompts, tokenizer = make_prompts(args, target, targs.vocab_size)
        kind = "repeated pattern + noise"
        if tokenizer is not None:
            kind = f"Python source of {', '.join(args.source_modules)}"
        print(f"target: {target} ({config}) | draft: {draft} ({draft_desc}) | {args.dtype} {args.device}")
        print(
            f"prompts: {kind}, {args.prompt_len} tokens + {args.new_tokens} new, greedy; "
            f"median of {args.repeats} after 1 warm-up"
        )
        if tokenizer is not None:
            print(f"row 0 prompt ends: {tokenizer.decode(prompts[max(args.batch)][0][-24:])!r}")

        results = bench_hf(args, target, draft, prompts)
        free_memory()  # HF's weights go before ours load
        if args.num_shards > 0:
            import ray

            if not ray.is_initialized():
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, args.num_shards),
                    include_dashboard=False,
                    log_to_driver=False,
                )
                started_ray = True
        setups = [Setup("ours", None, "-", 0)]
        setups += [Setup("ours", draft, "model", k) for k in args.k]
        setups += [Setup("ours", "ngram", "ngram", k) for k in args.k]
        setups += [Setup("ours adaptive", draft, "model", max(args.k), "adaptive")]
        for setup in setups:
            results += bench_ours(args, target, setup, prompts)
            free_memory()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    hf_greedy = {r["batch"]: r for r in results if r["engine"] == "HF greedy"}
    nospec = {r["batch"]: r for r in results if r["engine"] == "ours" and r["k"] == 0}
    rows = []
    for r in results:
        b = r["batch"]
        mismatch = first_mismatch(hf_greedy[b]["row0"], r["row0"])
        r.update(
            config=config,
            vs_hf_greedy=r["tok_s"] / hf_greedy[b]["tok_s"],
            vs_ours_nospec=r["tok_s"] / nospec[b]["tok_s"],
            row0_match=mismatch is None,
            row0_first_mismatch=mismatch,
        )
        rows.append(r)
    rows.sort(key=lambda r: r["batch"])  # stable: HF first, then ours, in the order measured
    print()
    print_table(rows)
    print(
        "accept rate: accepted / drafted tokens; mean acc len: tokens emitted per sequence per verify step "
        "(HF: per target forward, warm-up included); drafts/step: tokens drafted per sequence per step; "
        "draft time: share of our step time spent proposing"
    )
    if tokenizer is not None:
        row0 = nospec[min(args.batch)]["row0"]
        print(f"our greedy row 0 continues: {tokenizer.decode(row0)!r}")
    report = {"command": command, "machine": info, "args": vars(args), "target": target, "draft": draft}
    report["results"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
