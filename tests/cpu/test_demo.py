"""The shipped demo pair: transformers-exact, and its draft really accepted on held-out text."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

from conftest import hf_greedy

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.demo import CARD_FILE, DRAFT_DIR, HELDOUT_FILE, TARGET_DIR


def heldout_prompts(num: int, prompt_len: int, gen_len: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from specmoe_ray.demo.train import EOS, acceptance_prompts, encode_stream

    root = Path(sysconfig.get_paths()["stdlib"])
    names = [n for n in Path(HELDOUT_FILE).read_text().split() if (root / n).is_file()]
    assert len(names) >= 10, f"too few held-out files present in {root}: {names}"
    tok = Tokenizer.from_file(str(Path(TARGET_DIR) / "tokenizer.json"))
    texts = [(root / n).read_text(encoding="utf-8", errors="replace") for n in names]
    stream = encode_stream(tok, texts, tok.token_to_id(EOS))
    return acceptance_prompts(tok, stream, num, prompt_len, gen_len)


def stated_acceptance() -> float:
    card = Path(CARD_FILE).read_text()
    match = re.search(r"\| greedy \(temperature 0\) \| ([0-9.]+) \|", card)
    assert match, "CARD.md states no greedy acceptance rate"
    return float(match.group(1))


def test_demo_greedy_equals_transformers():
    prompts = heldout_prompts(3, 48, 0)
    ref = hf_greedy(TARGET_DIR, prompts, 32)
    with Engine.from_pretrained(TARGET_DIR, draft=DRAFT_DIR, dtype="float32", max_model_len=1024) as engine:
        got = [
            o.token_ids
            for o in engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        ]
    assert got == ref


def test_demo_acceptance_on_heldout_text_matches_the_card():
    stated = stated_acceptance()
    prompts = heldout_prompts(16, 64, 64)
    with Engine.from_pretrained(
        TARGET_DIR,
        draft=DRAFT_DIR,
        dtype="float32",
        num_speculative_tokens=4,
        max_model_len=1024,
        max_num_seqs=16,
    ) as engine:
        engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
        stats = engine.stats()
    assert stats["acceptance_rate"] >= stated - 0.1, (stats, stated)
    assert stats["mean_accepted_length"] > 2.0, stats
