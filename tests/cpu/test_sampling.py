"""Plain sampling follows the filtered target distribution; seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPTS, chi2_pvalue, hf_logits, reference_probs

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.engine.sampling import make_generator
from specmoe_ray.spec.proposer import empty_proposal
from specmoe_ray.spec.rejection import verify


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> np.ndarray:
    """n tokens the way the engine emits them without drafts: verification with k = 0."""
    rows = logits[None, None].expand(n, 1, -1)
    gens = [make_generator(seed + i, "cpu") for i in range(n)]
    result = verify(rows, empty_proposal(n, "cpu"), [params] * n, gens)
    return np.bincount(result.tokens[:, 0].numpy(), minlength=logits.shape[-1])


CASES = [(0.7, 0, 1.0), (1.3, 12, 1.0), (1.0, 0, 0.8), (0.9, 20, 0.9)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_sampled_tokens_follow_filtered_distribution(checkpoints, temperature, top_k, top_p):
    logits = hf_logits(checkpoints("qwen3_moe"), PROMPTS[1])[-1]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    counts = draw(logits, params, 20_000)
    ref = reference_probs(logits.numpy(), temperature, top_k, top_p)
    assert counts[ref == 0].sum() == 0, "sampled a token the filters exclude"
    stat, p = chi2_pvalue(counts, ref)
    assert p > 1e-3, f"chi-square {stat:.1f}, p={p:.2g}"


def test_chi_square_has_power(checkpoints):
    """The same check rejects a sampler that is only slightly off (temperature 1.0 for 1.15)."""
    logits = hf_logits(checkpoints("qwen3_moe"), PROMPTS[1])[-1]
    counts = draw(logits, SamplingParams(temperature=1.0), 20_000)
    _, p_right = chi2_pvalue(counts, reference_probs(logits.numpy(), 1.0, 0, 1.0))
    _, p_wrong = chi2_pvalue(counts, reference_probs(logits.numpy(), 1.15, 0, 1.0))
    assert p_right > 1e-3 and p_wrong < 1e-6, (p_right, p_wrong)


def test_seeded_requests_reproduce_and_ignore_batch_company(checkpoints):
    path = checkpoints("qwen2_moe")
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    with Engine.from_pretrained(path, max_model_len=128) as engine:
        alone = engine.generate([PROMPTS[0]], p)[0].token_ids
        crowd = engine.generate(
            [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
            [
                SamplingParams(max_tokens=16, temperature=0.8, seed=1),
                p,
                SamplingParams(max_tokens=5, temperature=0.0),
            ],
        )[1].token_ids
        other_seed = engine.generate([PROMPTS[0]], p.model_copy(update={"seed": 99}))[0].token_ids
        unseeded = [
            engine.generate([PROMPTS[0]], p.model_copy(update={"seed": None}))[0].token_ids for _ in range(2)
        ]
    assert alone == crowd
    assert other_seed != alone
    assert unseeded[0] != unseeded[1]
