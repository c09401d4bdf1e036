"""Host time per sequence and step of the proposers' token-list work, at long contexts: prompt
lookup (`NgramProposer.lookup`) and the draft cache's prefix reuse (`proposer.common_prefix`),
each against the plain Python scan it replaced, side by side in one process.

Every speculative step hands each proposer the sequence's whole token list (DESIGN: a proposer
needs no notice of accepted drafts and survives moving replicas). A scan in Python costs ~0.1 us
per token and step: at 8k tokens and batch 32, ~100 ms of host time per step for prompt lookup
and ~30 ms for the prefix, against a GPU step of ~10 ms (RESULTS.md, session 22).

Token lists: random ids of Qwen3's vocabulary (prompt lookup's worst case: no suffix recurs, so
every start is scanned), and the demo's held-out text tokenized and repeated (real repeats).

    python benchmarks/lookup.py                       # contexts 1k, 8k, 32k
    python benchmarks/lookup.py --context 512 --calls 3   # quick (tests run it smaller)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specmoe_ray.spec.proposer import NgramProposer, common_prefix  # noqa: E402


def scan_lookup(tokens: list[int], k: int, min_n: int = 1, max_n: int = 4) -> list[int]:
    """Prompt lookup's rule as the plain scan of every start (the baseline; tests' reference)."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        for start in range(L - n - 1, -1, -1):  # latest first, the suffix itself excluded
            if tokens[start : start + n] == tokens[L - n :]:
                return tokens[start + n : start + n + k]
    return []


def scan_prefix(a: list[int], b: list[int], limit: int) -> int:
    """The longest common prefix (at most limit) by an element loop (the baseline)."""
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def per_call_us(calls: int, fn, *args) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - t0) / calls * 1e6


def text_tokens(length: int) -> list[int] | None:
    """The demo's held-out text as token ids, repeated to length (None without the demo)."""
    from specmoe_ray.demo import DEMO_DIR

    path = os.path.join(DEMO_DIR, "heldout.txt")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    with open(path) as f:
        text = f.read()
    ids = Tokenizer.from_file(os.path.join(DEMO_DIR, "target", "tokenizer.json")).encode(text).ids
    return (ids * (length // len(ids) + 1))[:length]


def row(rows: list[dict], label: str, calls: int, ours, scan, *args, **info) -> None:
    """Both functions timed on the same arguments (after checking that they agree)."""
    assert ours(*args) == scan(*args), label
    o, s = per_call_us(calls, ours, *args), per_call_us(calls, scan, *args)
    rows.append(dict(**info, ours_us=o, scan_us=s))
    print(f"  {label:32s}: ours {o:8.1f}  scan {s:9.1f}  {s / o:6.1f}x")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192, 32768], help="tokens per sequence")
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args(argv)
    rng = random.Random(0)
    lookup, rows = NgramProposer().lookup, []
    print("host us per sequence and step (one call each), ours against the plain scan")
    for L in a.context:
        texts = {"random": [rng.randrange(151936) for _ in range(L)], "demo text": text_tokens(L)}
        for name, tokens in texts.items():
            if tokens is not None:
                info = dict(what="lookup", tokens=name, context=L)
                row(rows, f"prompt lookup, {name}, L={L}", a.calls, lookup, scan_lookup, tokens, 3, **info)
        # The draft cache's common case: the cache holds the tokens and k - 1 = 2 drafts, of
        # which the target rejected the second (a different token in its place, then one more).
        cached, tokens = texts["random"] + [7, 8], texts["random"] + [7, 9, 10]
        info = dict(what="prefix", tokens="random", context=L)
        row(
            rows,
            f"draft cache prefix, L={L}",
            a.calls,
            common_prefix,
            scan_prefix,
            cached,
            tokens,
            L + 1,
            **info,
        )
    return rows


if __name__ == "__main__":
    main()
