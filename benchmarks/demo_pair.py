"""The demo pair with no speculation, its draft model and n-gram lookup, side by side.

The demo pair (`specmoe_ray/demo`: a 4-layer MoE target and a 2-layer draft trained on the same
text, so the acceptance is real) is small enough that the host's work per step, not the GPU's,
sets its speed: the benchmark for host-side changes of the speculative step. One process builds
one engine per method (`plain`, `draft`, `ngram`) and variant (`default`, then each `--switch
NAME:module.ATTR=value,...` as in gpu.py, whose engines run with their switches set; `--switch
again:` reruns the defaults: the spread between identical engines), all once, then times
interleaved rounds: each round runs every engine's greedy `generate` of the same prompts in
turn; the median over `--rounds` per engine. Every engine's tokens are checked equal to the
default variant's `plain` ones (greedy speculation is lossless). Prints tokens/s, each method's
ratio to `plain` of its variant and each variant's ratio to `default`, per batch size.

    python benchmarks/demo_pair.py --device cpu --batch 1 2 --rounds 1 --new-tokens 8  # checks it
    python benchmarks/demo_pair.py --batch 1 8 32 --switch defer:engine.DEFER_DRAFT_READ=True --switch again:
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import add_switch_argument, run_info, switched, sync, variant_switches, write_json  # noqa: E402

from specmoe_ray import Engine, SamplingParams  # noqa: E402
from specmoe_ray.demo import DEMO_DIR, HELDOUT_FILE  # noqa: E402

METHODS = ("plain", "draft", "ngram")


def demo_rows(engine: Engine, batch: int, length: int) -> list[list[int]]:
    """batch prompts of `length` tokens from the held-out text, spread over it."""
    with open(HELDOUT_FILE) as f:
        ids = engine.tokenizer.encode(f.read(), add_special_tokens=False)
    stride = max(1, (len(ids) - length) // batch)
    return [ids[i * stride : i * stride + length] for i in range(batch)]


def line(entry: dict[str, dict], vs_default: bool) -> str:
    """One variant's methods: tokens/s, ratio to plain, acceptance and k (and to default)."""
    parts = []
    for m in METHODS:
        e = entry[m]
        text = f"{m} {e['tok_s']:9.1f} tok/s"
        if m != "plain":
            text += f" ({e['vs_plain']:.3f}x plain, acceptance {e['acceptance']:.2f}, k now {e['k_now']})"
        parts.append(text)
    if vs_default:
        parts.append("vs default: " + " ".join(f"{m} {entry[m]['vs_default']:.3f}x" for m in METHODS))
    return "  ".join(parts)


def bench_batch(a, engines: dict, batch: int) -> dict[str, Any]:
    rows = demo_rows(engines["default", "plain"][0], batch, a.prompt_len)
    params = [SamplingParams(max_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)] * batch

    def run(engine: Engine, flips) -> list[list[int]]:
        with switched(flips):
            return [o.token_ids for o in engine.generate(rows, params)]

    tokens = {key: run(e, flips) for key, (e, flips) in engines.items()}  # (and captures the graphs)
    want = tokens["default", "plain"]
    differ = sorted(f"{v}/{m}" for (v, m), t in tokens.items() if t != want)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in engines}
    for _ in range(a.rounds):
        for key, (engine, flips) in engines.items():
            sync(a.device)
            t0 = time.perf_counter()
            n = sum(len(t) for t in run(engine, flips))
            sync(a.device)
            times[key].append(n / (time.perf_counter() - t0))
    tok_s = {key: statistics.median(t) for key, t in times.items()}
    out: dict[str, Any] = {"batch": batch, "tokens_differ": differ, "variants": {}}
    for variant in dict.fromkeys(v for v, _ in engines):
        entry = {}
        for method in METHODS:
            engine = engines[variant, method][0]
            now = engine.stats()
            entry[method] = {
                "tok_s": tok_s[variant, method],
                "rounds_tok_s": times[variant, method],
                "vs_plain": tok_s[variant, method] / tok_s[variant, "plain"],
                "vs_default": tok_s[variant, method] / tok_s["default", method],
                "acceptance": now["acceptance_rate"] if method != "plain" else None,
                "k_now": now["speculation_length"],
            }
        out["variants"][variant] = entry
        print(f"  batch {batch:3d} {variant:8s}: {line(entry, variant != 'default')}", flush=True)
    if differ:
        print(f"  batch {batch:3d}: greedy tokens differ from default/plain's: {differ}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--k", type=int, default=3, help="drafts per sequence and step (draft model, n-gram)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--spec-policy",
        choices=["fixed", "adaptive"],
        default="fixed",
        help="k per step: always --k, or chosen from measured acceptance and cost (0 included)",
    )
    add_switch_argument(p, "a further variant: its engines run with these fast-path switches flipped")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    if a.k < 1 or a.rounds < 1 or a.new_tokens < 1 or a.prompt_len < 1 or min(a.batch) < 1:
        p.error("--k, --rounds, --new-tokens, --prompt-len and each --batch must be >= 1")
    variants = variant_switches(p, a)
    info = run_info("demo_pair.py", argv, a.device)
    target, draft = os.path.join(DEMO_DIR, "target"), os.path.join(DEMO_DIR, "draft")
    engines = {}
    for variant, flips in variants.items():
        for method, d in zip(METHODS, (None, draft, "ngram")):
            with switched(flips):
                engines[variant, method] = (
                    Engine.from_pretrained(
                        target,
                        draft=d,
                        device=a.device,
                        num_speculative_tokens=a.k,
                        spec_policy=a.spec_policy,
                        max_num_seqs=max(a.batch),
                        max_model_len=a.prompt_len + a.new_tokens + a.k + 8,
                    ),
                    flips,
                )
    try:
        rows = [bench_batch(a, engines, b) for b in a.batch]
    finally:
        for engine, _ in engines.values():
            engine.shutdown()
    result = {"info": info, "k": a.k, "spec_policy": a.spec_policy, "new_tokens": a.new_tokens, "rows": rows}
    return write_json(a.json, result)


if __name__ == "__main__":
    main()
