"""Text of growing outputs (`engine/detok.py`): equal to decoding the whole output, by decoding only
a window of its last tokens; stop strings and the HTTP stream's deltas built on it."""

from __future__ import annotations

import os
import random

import pytest

from specmoe_ray.demo import DEMO_DIR
from specmoe_ray.engine.detok import MAX_WINDOW, IncrementalText
from specmoe_ray.engine.sequence import SamplingParams, Sequence
from specmoe_ray.serving.ingress import Detokenizer


@pytest.fixture(scope="module")
def tok():
    """The demo's byte-level BPE tokenizer (multi-byte characters span several tokens)."""
    from specmoe_ray.engine.setup import load_tokenizer

    return load_tokenizer(os.path.join(DEMO_DIR, "target"))


class CountingTokenizer:
    """The real tokenizer, recording how many tokens each decode was given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def token_lists(tok, n: int, length: int):
    """Real text (ASCII, accents, CJK, a check mark, the end-of-text special token between) and
    random ids (byte pieces that never form characters included)."""
    with open(os.path.join(DEMO_DIR, "heldout.txt")) as f:
        text = f.read() + " héllo wörld ✓ 日本語 " * 5
    ids = tok(text)["input_ids"] * 6
    rng = random.Random(0)
    for i in range(n):
        if i % 2:
            start = rng.randrange(len(ids) - length)
            seq = ids[start : start + length]
            # <|endoftext|> between two characters: skipped by the decode
            at = next(j for j in range(rng.randrange(length), length) if _boundary(tok, seq, j))
            seq.insert(at, 0)
        else:
            seq = [rng.randrange(len(tok)) for _ in range(length)]
        yield rng, seq


def _boundary(tok, seq: list[int], j: int) -> bool:
    return not tok.decode(seq[:j]).endswith("\ufffd") and not tok.decode(seq[j:]).startswith("\ufffd")


def test_incremental_text_equals_the_whole_decode(tok):
    """Real text always; random ids (bytes that may never form characters) until a window has
    to be taken with half a character (`exact` False: callers then decode whole)."""
    counting = CountingTokenizer(tok)
    for k, (rng, seq) in enumerate(token_lists(tok, 120, 300)):
        text, i = IncrementalText(counting), 0
        while i < len(seq) and text.exact:
            n = rng.randrange(1, 6)
            got = text.extend(seq[i : i + n])
            i += n
            whole = tok.decode(seq[:i], skip_special_tokens=True)
            assert whole.startswith(got) or not text.exact  # whole characters, a few behind
            if not whole.endswith("\ufffd") and text.exact:
                assert got == whole
        assert text.exact or k % 2 == 0, "real text stays exact"
    # Each decode saw a window of the last tokens, not the output so far.
    assert max(counting.sizes) <= MAX_WINDOW + 5


def test_stop_string_inside_a_long_token_cuts_at_its_first_character(tok):
    """A stop string found in the text a new token added, however long that token's text: the
    64-character token of '#'s cut at its first '#' (the output's text before it)."""
    prefix = tok("x = 1\n")["input_ids"]
    long_token = max(range(len(tok)), key=lambda i: len(tok.decode([i])))
    assert tok.decode([long_token]) == "#" * 64
    seq = Sequence("r", [5, 6], SamplingParams(max_tokens=20, stop=["#"]), 64, ())
    for t in prefix + [long_token]:
        seq.append(t, tok)
    assert seq.finish_reason is not None and seq.finish_reason.value == "stop"
    assert seq.stop_text == "x = 1\n"


@pytest.mark.parametrize("stop", [[], ["wörld"]])
def test_stream_deltas_add_up_to_the_final_text(tok, stop):
    """The ingress' text deltas (incremental while running, the whole decode at the end) add up
    to the output's text, cut at a stop string when one ended it; none ends in half a character."""
    for rng, seq in token_lists(tok, 40, 200):
        # As the engine: the output ends with the token that completed a stop string.
        ends = [i for i in range(1, len(seq) + 1) if any(s in tok.decode(seq[:i]) for s in stop)]
        seq = seq[: ends[0]] if ends else seq
        detok, deltas, i = Detokenizer(tok, stop), [], 0
        whole = tok.decode(seq, skip_special_tokens=True)
        cut = min((j for s in stop if (j := whole.find(s)) >= 0), default=None)
        while i < len(seq):
            n = rng.randrange(1, 6)
            i += n
            finish = None if i < len(seq) else ("stop" if cut is not None else "length")
            deltas.append(detok.push(seq[i - n : i], finish))
        assert "".join(deltas) == (whole if cut is None else whole[:cut])
        assert detok.full_text == whole
        assert not any(d.endswith("\ufffd") for d in deltas[:-1] if d)
