"""The `specmoe` command."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(ns: argparse.Namespace) -> int:
    from specmoe_ray import Engine, SamplingParams, SpecMoEError

    try:
        params = SamplingParams(
            max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed
        )
        engine = Engine.from_pretrained(ns.model, num_shards=ns.num_shards, device=ns.device, dtype=ns.dtype)
    except (SpecMoEError, ValueError) as e:
        print(f"specmoe generate: {e}", file=sys.stderr)
        return 2
    with engine:
        if engine.tokenizer is None:
            print(
                f"specmoe generate: {ns.model} has no tokenizer; cannot encode a text prompt", file=sys.stderr
            )
            return 2
        try:
            rid = engine.add_request(ns.prompt, params)
        except SpecMoEError as e:
            print(f"specmoe generate: {e}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        printed = ""
        final = None
        while final is None:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                text = engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                # Print only what is stable: a partial UTF-8 character decodes to U+FFFD.
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(printed) :])
                    sys.stdout.flush()
                    printed = text
                if out.finished:
                    final = out
        elapsed = time.perf_counter() - start
        n = len(final.token_ids)
        print(
            f"\n[{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tokens/s, finish: {final.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="local HF checkpoint directory (config.json + safetensors)")
    g.add_argument("--num-shards", type=int, default=0, help="expert shards as Ray actors (0 = in-process)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
