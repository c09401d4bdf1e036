"""Host time per sequence and step of the proposers' token-list work, at long contexts: prompt
lookup (`NgramProposer.lookup`) and the draft cache's prefix reuse (`proposer.common_prefix`),
each against the plain Python scan it replaced, side by side in one process; and the draft
pool's wire per step at batch 32 (`serving/draft_pool.py`: each sequence's new tokens only,
against its whole token list as msgpack integers, packed, unpacked and rebuilt on the replica);
and an output's text as it grows (`engine/detok.py`: streamed deltas, stop strings) against
decoding the whole output each time.

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


def cached_prefix(base: list[int]) -> int:
    """A cache entry kept by reference (`proposer._Cached`) against the same list grown."""
    from specmoe_ray.spec.proposer import _Cached

    n = len(base) - 3
    return _Cached(base, n, [7, 8], base[n - 1]).common_prefix(base, n + 1)


def copied_prefix(base: list[int]) -> int:
    """The same step before: the entry a copy of the tokens and drafts, then an element loop."""
    n = len(base) - 3
    return scan_prefix(base[:n] + [7, 8], base, n + 1)


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


def pool_wire(L: int, batch: int, calls: int) -> dict:
    """One step's requests to a pool replica at batch `batch`, every sequence L tokens long and
    2 tokens longer than at its last call: bytes and host us (client + replica), whole lists
    (the wire before session 22) against new tokens only, in steady state."""
    import msgpack

    from specmoe_ray.serving.draft_pool import HeldTokens, TokenLedger, decode_requests, encode_requests
    from specmoe_ray.spec.proposer import DraftRequest

    rng = random.Random(L)
    seqs = [[rng.randrange(151936) for _ in range(L - 4)] for _ in range(batch)]
    ledger, held = TokenLedger(), HeldTokens(capacity=4 * batch)

    def send(check: bool = False) -> int:  # one step: each sequence 2 tokens longer
        for q in seqs:
            q += [1, 2]
        reqs = [DraftRequest(f"s{b}", q, 3) for b, q in enumerate(seqs)]
        wire = [ledger.row(r, "A") for r in reqs]
        payload = encode_requests([w for w, _ in wire], [])
        got, missing = held.resolve(decode_requests(payload)[0])
        ledger.settle([r.seq_id for r in reqs], [e for _, e in wire], missing)
        assert not missing and (not check or [g.tokens for g in got] == seqs)
        return len(payload)

    send(check=True)  # the first call: whole lists
    send(check=True)

    def whole() -> int:
        rows = [[f"s{b}", q, 3, 0.0, 0, 1.0, None] for b, q in enumerate(seqs)]
        payload = msgpack.packb({"requests": rows, "release": []})
        got = [DraftRequest(*row) for row in msgpack.unpackb(payload)["requests"]]
        assert got[0].tokens == seqs[0]
        return len(payload)

    o, w = per_call_us(calls, send), per_call_us(calls, whole)
    info = dict(what="pool wire", tokens="random", context=L, ours_us=o, scan_us=w)
    info.update(ours_bytes=send(check=True), whole_bytes=whole())
    print(
        f"  pool wire, batch {batch}, L={L:<6d}     : ours {o:8.1f}  whole {w:8.1f}  {w / o:6.1f}x;"
        f" bytes {info['ours_bytes']} vs {info['whole_bytes']}"
    )
    return info


def stream_text(L: int, calls: int) -> dict | None:
    """The text of an output of L tokens grown by 2 more (a streamed chunk, a stop-string check):
    `IncrementalText` against decoding the whole output (the demo's tokenizer and text)."""
    tokens = text_tokens(L + 2 * (calls + 2))
    if tokens is None:
        return None
    from specmoe_ray.demo import DEMO_DIR
    from specmoe_ray.engine.detok import IncrementalText
    from specmoe_ray.engine.setup import load_tokenizer

    tok = load_tokenizer(os.path.join(DEMO_DIR, "target"))
    text, n = IncrementalText(tok), L
    text.extend(tokens[:L])

    def incremental() -> str:
        nonlocal n
        n += 2
        return text.extend(tokens[n - 2 : n])

    def whole() -> str:
        return tok.decode(tokens[:n], skip_special_tokens=True)

    o, w = per_call_us(calls, incremental), per_call_us(calls, whole)
    assert text.text == whole() or whole().endswith("\ufffd")
    print(f"  output text, L={L:<6d} (+2 tokens)   : ours {o:8.1f}  whole {w:8.1f}  {w / o:6.1f}x")
    return dict(what="output text", tokens="demo text", context=L, ours_us=o, scan_us=w)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192, 32768], help="tokens per sequence")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--batch", type=int, default=32, help="sequences per pool call (the wire's lines)")
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
        # The engine's (and the pool's) case: the same list, grown; the old way copied it into
        # the cache entry each step (`tokens + drafts[:-1]`) and compared element by element.
        base = texts["random"]
        info = dict(what="prefix, same list", tokens="random", context=L)
        row(rows, f"draft cache, list grown, L={L}", a.calls, cached_prefix, copied_prefix, base, **info)
        rows.append(pool_wire(L, a.batch, a.calls))
        if (text_row := stream_text(L, a.calls)) is not None:
            rows.append(text_row)
    return rows


if __name__ == "__main__":
    main()
