"""The target distribution a request samples from: temperature, top-k, top-p.

`target_probs` is what every emitted token follows, with or without speculation (plain
decoding is verification with no drafts, `spec/rejection.py`). Each request draws from its
own `torch.Generator`, so its output depends on its seed only, never on which other requests
share the batch.
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
    logits = logits.float() / temperature[:, None].float()  # float32 whatever the model dtype
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    # top_p >= 1 is off: a float32 cumsum reaches 1.0 before the tail and would cut it.
    probs = probs.masked_fill((mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, probs)


# `to_device` copies to GPUs from pinned memory without waiting (False: plain copies, which wait
# for the stream: the behaviour before session 19, kept for benchmarks/gpu.py's A/B switch).
PINNED = True


def to_device(values: list, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on device. To a GPU through pinned memory, not waited for: a plain
    `torch.tensor(values, device=...)` copies from pageable memory and then waits for the stream,
    so in the middle of a step it would leave the GPU idle while the host launches the rest."""
    t = torch.tensor(values, dtype=dtype)
    if PINNED and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
