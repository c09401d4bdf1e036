"""A draft model's proposals (`DraftModelProposer.propose`), fast-path variants side by side.

One process builds one proposer per variant, all on the same seeded random weights (gpu.py's
draft model: Qwen3-0.6B's shape with the target's vocabulary for `--shape qwen3-30b-a3b`, a
2-layer toy for `small`), sets each variant's switches while its proposals run (its step graphs
are captured with them: `--switch NAME:module.ATTR=value,...` as in gpu.py; `default` is always
first, `--switch again:` reruns the defaults, the spread between identical configurations), and
times interleaved rounds: each round runs every variant's `--calls` proposals in turn, the
median over `--rounds` rounds per variant. Acceptance 0: after each proposal every sequence
grows by a token that is not its first draft, so the next proposal rolls the draft cache back
and feeds that token, as after a verify step that rejected every draft. Prints ms per proposal
and each variant's ratio to `default` per batch size, and checks that the variants' greedy
drafts agree (same weights, same inputs: a variant that changes them is reported).

    python benchmarks/draft.py --shape small --device cpu --batch 1 2 --rounds 2 --calls 2  # checks it
    python benchmarks/draft.py --batch 1 2 4 8 --switch cublas:fused.DRAFT_PRELOAD_ROWS=1 --switch again:
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import types
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import add_switch_argument, draft_proposer, run_info, switched, sync, variant_switches, write_json  # noqa: E402

from specmoe_ray.spec.proposer import DraftRequest  # noqa: E402


def proposals(proposer, batch: int, k: int, temperature: float, seed: int, tag: str):
    """A callable proposing k drafts for `batch` sequences of 32 random tokens that grow by one
    rejected token per call -> the proposal's drafts (host lists)."""
    rng = random.Random(seed)
    V = proposer.vocab_size
    seqs = [[rng.randrange(V) for _ in range(32)] for _ in range(batch)]

    def call() -> list[list[int]]:
        requests = [
            DraftRequest(f"{tag}-{b}", s, k, temperature=temperature, seed=b) for b, s in enumerate(seqs)
        ]
        drafts = proposer.propose(requests).host_tokens
        for s, d in zip(seqs, drafts):
            s.append((d[0] + 1) % V if d else 0)  # (the sequence's list only grows, as the engine's)
        return drafts

    return call


def bench_batch(a, proposers: dict, batch: int) -> dict[str, Any]:
    calls = {}
    for name, (proposer, flips) in proposers.items():
        with switched(flips):
            call = proposals(proposer, batch, a.k, a.temperature, a.seed + batch, f"{name}-{batch}")
            calls[name] = (call, flips, [call() for _ in range(a.warmup)])  # (captures the graphs)
    drafts = {name: first for name, (_, _, first) in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(a.rounds):
        for name, (call, flips, _) in calls.items():
            with switched(flips):
                sync(a.device)
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    call()
                sync(a.device)
            times[name].append((time.perf_counter() - t0) / a.calls * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["default"]
    print(
        f"  batch {batch:3d}: "
        + "  ".join(f"{n} {m:.3f} ms ({base / m:.3f}x)" for n, m in med.items())
        + f"   [ms per proposal of k = {a.k}; median of {a.rounds} rounds x {a.calls}]",
        flush=True,
    )
    differ = [n for n, d in drafts.items() if d != drafts["default"]]
    if a.temperature == 0.0 and differ:
        print(f"  batch {batch:3d}: greedy drafts differ from default's: {differ}", flush=True)
    return {
        "batch": batch,
        "ms": med,
        "vs_default": {n: base / m for n, m in med.items()},
        "rounds_ms": times,
        "drafts_differ": differ if a.temperature == 0.0 else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["qwen3-30b-a3b", "small"], default="qwen3-30b-a3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--k", type=int, default=3, help="drafts per sequence and proposal")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy drafts; else sampled, seeded")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=10, help="proposals per variant and round")
    p.add_argument("--warmup", type=int, default=8, help="proposals per variant before the rounds")
    p.add_argument("--seed", type=int, default=0)
    add_switch_argument(p, "a further variant: these fast-path switches flipped while its proposals run")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    if a.shape == "qwen3-30b-a3b" and a.device == "cpu":
        p.error("--shape qwen3-30b-a3b wants a GPU (a 0.6B draft; --shape small checks the script on CPU)")
    if a.k < 1 or a.rounds < 1 or a.calls < 1 or a.warmup < 1 or min(a.batch) < 1:
        p.error("--k, --rounds, --calls, --warmup and each --batch must be >= 1")
    variants = variant_switches(p, a)
    info = run_info("draft.py", argv, a.device)
    dtype = torch.bfloat16 if a.device != "cpu" else torch.float32
    args = types.SimpleNamespace(shape=a.shape, seed=a.seed, batch=a.batch, k=a.k)
    max_len = 32 + a.warmup + a.rounds * a.calls + a.k + 2  # each proposal grows a sequence by one
    proposers = {}
    for name, flips in variants.items():
        with switched(flips):
            proposers[name] = (draft_proposer(args, a.device, dtype, max_len), flips)
    rows = [bench_batch(a, proposers, b) for b in a.batch]
    return write_json(a.json, {"info": info, "k": a.k, "temperature": a.temperature, "rows": rows})


if __name__ == "__main__":
    main()
