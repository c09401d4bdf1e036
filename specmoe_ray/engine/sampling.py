"""The target distribution a request samples from: temperature, top-k, top-p.

`target_probs` is what every emitted token follows, with or without speculation (plain
decoding is verification with no drafts, `spec/rejection.py`). Each request draws from its
own `torch.Generator`, so its output depends on its seed only, never on which other requests
share the batch. A step's last draw per row is `inverse_cdf` (from `plain_probs` when top-k
and top-p are off: `sample_plain`), one Triton kernel on GPUs (`engine/triton_sampling.py`).
"""

from __future__ import annotations

import torch

from specmoe_ray.engine import triton_sampling


def plain_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; temperature [B] (> 0) -> softmax(logits / temperature) [B, V] float32."""
    return torch.softmax(logits.float() / temperature[:, None].float(), dim=-1)


def filtering(params: list, vocab_size: int) -> bool:
    """Whether any of these rows (SamplingParams or alike) has top-k or top-p on (host data)."""
    return any(0 < p.top_k < vocab_size or p.top_p < 1.0 for p in params)


def target_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    filtered: bool = True,
    plain: bool = True,
) -> torch.Tensor:
    """logits [B, V] float; temperature [B] (> 0), top_k [B] (0 = off), top_p [B] -> probs [B, V].

    Order as in HF transformers and vLLM: temperature, then top-k, then top-p on the
    renormalised top-k distribution (keep the smallest set whose mass reaches top_p). A row with
    both off gets `plain_probs`, whatever the other rows ask. The host may say more: no row asks
    (`filtered=False`: no sort over the vocabulary), or every row does (`plain=False`: no plain
    softmax beside the sort's).
    """
    if not filtered:
        return plain_probs(logits, temperature)
    V = logits.shape[-1]
    z = logits.float() / temperature[:, None].float()  # float32 whatever the model dtype
    sorted_logits, sorted_idx = torch.sort(z, dim=-1, descending=True, stable=True)
    if triton_sampling.supported(sorted_logits):  # what follows the sort in two launches on GPUs
        kept = triton_sampling.sorted_probs(sorted_logits, sorted_idx, top_k, top_p)
        return kept if not plain else _with_plain(kept, logits, temperature, top_k, top_p)
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    kept = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(kept, dim=-1) - kept  # mass of strictly more likely tokens
    # top_p >= 1 is off: a float32 cumsum reaches 1.0 before the tail and would cut it.
    kept = kept.masked_fill((mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    kept = torch.zeros_like(kept).scatter_(-1, sorted_idx, kept)
    return kept if not plain else _with_plain(kept, logits, temperature, top_k, top_p)


def _with_plain(kept, logits, temperature, top_k, top_p) -> torch.Tensor:
    """Filtered rows' probabilities kept, the other rows' `plain_probs` (a row's probabilities
    then depend on its own parameters only, not on whether others filter)."""
    V = logits.shape[-1]
    on = ((top_k > 0) & (top_k < V)) | (top_p < 1.0)  # [B]: rows that filter
    return torch.where(on[:, None], kept, plain_probs(logits, temperature))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [R, V] >= 0 (any float dtype, summed in float64), u [R] float64 in [0, 1) -> [R]
    long: the first token whose running mass exceeds u * total. A zero-mass token is never chosen
    (its step of the CDF is flat) and u < 1 keeps the target below the total. One Triton kernel on
    GPUs (which reads float32 weights as they are: no float64 copy of the vocabulary)."""
    if triton_sampling.supported(weights):
        return triton_sampling.inverse_cdf(weights, u)
    cdf = weights.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0].clamp(
        max=weights.shape[-1] - 1
    )


def sample_plain(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`inverse_cdf` of `plain_probs`: logits [R, V], temperature [R], u [R] float64 -> [R] long.
    On GPUs one kernel from the logits (no probabilities in memory)."""
    if triton_sampling.supported(logits):
        return triton_sampling.inverse_cdf(logits, u, temperature.float())
    return inverse_cdf(plain_probs(logits, temperature), u)


# `to_device` copies to GPUs from pinned memory without waiting (False: plain copies, which wait
# for the stream: the behaviour before session 19, kept for benchmarks/gpu.py's A/B switch).
PINNED = True


def to_device(values: list, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on device. To a GPU through pinned memory, not waited for: a plain
    `torch.tensor(values, device=...)` copies from pageable memory and then waits for the stream,
    so in the middle of a step it would leave the GPU idle while the host launches the rest."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A tensor on device, copied as `to_device` copies when it is on the host and device a GPU."""
    if PINNED and t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator. The engine keeps them on the host whatever its device: a draw
    is then a host call, and a step's uniforms reach the GPU in one copy (`rejection`), where a
    CUDA generator would launch a kernel per row (~20 us of host time each, ~38 us of GPU time
    for 32 rows: RESULTS.md, session 20). Tests may still hand verification CUDA generators."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
