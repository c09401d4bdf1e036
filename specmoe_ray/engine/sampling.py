"""Token sampling: temperature, top-k, top-p, greedy, with a generator per request.

`target_probs` is the distribution a request samples from; speculative verification uses
the same function, so accepted tokens follow exactly what plain sampling would give.
Each request draws from its own `torch.Generator`, so its output depends on its seed only,
never on which other requests share the batch.
"""

from __future__ import annotations

import torch


def target_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] float; temperature [B] (> 0), top_k [B] (0 = off), top_p [B] -> probs [B, V].

    Order as in HF transformers and vLLM: temperature, then top-k, then top-p on the
    renormalised top-k distribution (keep the smallest set whose mass reaches top_p).
    """
    V = logits.shape[-1]
    logits = logits / temperature[:, None]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, probs)


def sample(logits: torch.Tensor, params: list, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row. params[i]: SamplingParams; generators[i]: the row's generator."""
    greedy = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev = logits.device
        probs = target_probs(
            logits[rows],
            torch.tensor([params[i].temperature for i in rows], device=dev, dtype=logits.dtype),
            torch.tensor([params[i].top_k for i in rows], device=dev),
            torch.tensor([params[i].top_p for i in rows], device=dev, dtype=logits.dtype),
        )
        for j, i in enumerate(rows):
            greedy[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return greedy.tolist()  # the step's one host sync


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
