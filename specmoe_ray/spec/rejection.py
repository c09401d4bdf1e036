"""Verification of draft tokens: the accept/resample rule of speculative decoding.

Implements speculative sampling from Leviathan, Kalman and Matias, "Fast Inference from
Transformers via Speculative Decoding" (ICML 2023), and Chen et al., "Accelerating Large
Language Model Decoding with Speculative Sampling" (2023). A draft proposes tokens from a
distribution q, the target scores every position in one pass giving p, and each draft token x
is kept with probability min(1, p(x) / q(x)); at the first rejection a token is drawn from
norm(max(0, p - q)). The emitted tokens then follow p exactly, whatever q is. Greedy rows
(temperature 0) keep the longest prefix equal to the target's argmax instead.

Glossary:
- *accepted*: draft tokens the target keeps; always a prefix of the row's drafts.
- *recovered*: the token sampled from the residual norm(max(0, p - q)) at the first rejected
  position (greedy: the target's argmax there).
- *bonus*: the extra token sampled from the target at position num_draft when every draft
  token is accepted (greedy: the target's argmax there).
Each row emits num_accepted + 1 tokens: its accepted drafts, then one recovered or bonus token.

Shapes: B = sequences, k = most drafts of any sequence this step, V = vocabulary,
S = support size of a sparse draft distribution.

Randomness: a sampling row draws exactly num_draft + 1 uniforms from its own generator per
call (one per draft position, then one for the recovered or bonus token), however many it
accepts. So its tokens and its generator's next state depend only on its own inputs and seed,
never on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses

import torch

from specmoe_ray.engine import triton_sampling
from specmoe_ray.engine.sampling import (
    filtering,
    host_to_device,
    inverse_cdf,
    sample_plain,
    target_probs,
    to_device,
)


@dataclasses.dataclass(slots=True)
class DraftProposal:
    """Draft tokens for B sequences; k = most drafts of any sequence this step."""

    tokens: torch.Tensor  # [B, k] long, -1 past num_draft[b]
    num_draft: torch.Tensor  # [B] long, 0..k
    sparse_ids: torch.Tensor  # [B, k, S] long: support of the draft distribution at each position, -1 padding
    sparse_probs: torch.Tensor  # [B, k, S] float32: its probabilities (sum 1 over valid entries); the draft
    # token was sampled from exactly this sparse distribution. A greedy draft
    # position is one-hot: ids[..., 0] = token, probs[..., 0] = 1.
    host_tokens: list[list[int]] | None = None  # each row's drafts on the host, where the proposer
    # made them there (prompt lookup): no device read needed for them
    host_num_draft: list[int] | None = None  # each row's draft count on the host, where the drafts
    # themselves are not read yet (`DraftModelProposer.propose(read=False)`)


@dataclasses.dataclass(slots=True)
class VerifyResult:
    tokens: torch.Tensor  # [B, k + 1] long: accepted drafts then one recovered or bonus token, -1 padded
    num_accepted: torch.Tensor  # [B] long: draft tokens accepted
    # number of emitted tokens per row = num_accepted + 1


def verify(
    target_logits: torch.Tensor,  # [B, k + 1, V] float32; row b position i = target logits after
    # the context plus the first i draft tokens of sequence b
    proposal: DraftProposal,
    params: list,  # B SamplingParams (temperature, top_k, top_p; temperature 0 = greedy)
    generators: list[torch.Generator | None],  # B generators; None only for greedy rows
) -> VerifyResult:
    """Accept a prefix of each row's drafts and add one recovered or bonus token.

    Greedy rows keep the longest prefix of drafts equal to the target's argmax; sampling rows
    use the accept/resample rule against p = `target_probs` (the distribution plain sampling
    uses, temperature, top-k and top-p included). Positions past num_draft[b] are ignored.
    """
    B, K1, V = target_logits.shape
    k = K1 - 1
    if proposal.tokens.shape != (B, k):
        raise ValueError(
            f"target_logits {tuple(target_logits.shape)} needs draft tokens [{B}, {k}], "
            f"got {tuple(proposal.tokens.shape)}"
        )
    if len(params) != B or len(generators) != B:
        raise ValueError(f"need {B} params and generators, got {len(params)} and {len(generators)}")
    dev = target_logits.device
    if k == 0:  # plain decoding: no drafts
        return VerifyResult(
            tokens=_sample_targets(target_logits[:, 0], params, generators)[:, None],
            num_accepted=torch.zeros(B, dtype=torch.long, device=dev),
        )
    drafts = proposal.tokens.to(dev)  # [B, k]
    num_draft = proposal.num_draft.to(dev)  # [B]

    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows and triton_sampling.supported(target_logits):  # every row greedy: one kernel on GPUs
        tokens, num_accepted = triton_sampling.greedy_verify(target_logits.argmax(dim=-1), drafts, num_draft)
        return VerifyResult(tokens=tokens, num_accepted=num_accepted)
    groups = _by_filtering(rows, params, V)
    if not rows or len(rows) < B or len(groups) > 1:  # greedy rows (sampling rows overwrite theirs below)
        argmax = target_logits.argmax(dim=-1)  # [B, k + 1]
        match = (drafts == argmax[:, :k]) & (torch.arange(k, device=dev) < num_draft[:, None])
        num_accepted = match.long().cumprod(dim=-1).sum(dim=-1)  # [B]
        final = argmax.gather(1, num_accepted[:, None])[:, 0]  # [B] recovered or bonus token
    if rows:
        # Each row's count of random draws must be known on the host. num_draft is chosen there
        # (by the speculation policy), so this is no device sync when it lives on the CPU.
        if proposal.host_tokens is not None:
            num_draft_host = [len(t) for t in proposal.host_tokens]
        elif proposal.host_num_draft is not None:
            num_draft_host = proposal.host_num_draft
        else:
            num_draft_host = proposal.num_draft.tolist()
    for group in groups:
        r = to_device(group, dev) if len(group) < B else None
        acc_r, final_r = _verify_sampled(
            target_logits.float() if r is None else target_logits[r].float(),
            drafts if r is None else drafts[r],
            *[t.to(dev) if r is None else t.to(dev)[r] for t in (proposal.sparse_ids, proposal.sparse_probs)],
            [params[i] for i in group],
            [generators[i] for i in group],
            [num_draft_host[i] for i in group],
        )
        if r is None:
            num_accepted, final = acc_r, final_r
        else:
            num_accepted = num_accepted.index_copy(0, r, acc_r)
            final = final.index_copy(0, r, final_r)

    positions = torch.arange(K1, device=dev)  # [k + 1]
    padded = torch.cat([drafts, drafts.new_full((B, 1), -1)], dim=1)  # [B, k + 1]
    tokens = torch.where(positions < num_accepted[:, None], padded, -1)
    tokens.scatter_(1, num_accepted[:, None], final[:, None])
    return VerifyResult(tokens=tokens, num_accepted=num_accepted)


def _by_filtering(rows: list[int], params: list, vocab_size: int) -> list[list[int]]:
    """The sampling rows in up to two groups: temperature only, then top-k / top-p on (each row's
    path depends on its own parameters, never on the batch's)."""
    plain = [i for i in rows if not filtering([params[i]], vocab_size)]
    return [g for g in (plain, [i for i in rows if i not in plain]) if g]


def _sample_targets(
    logits: torch.Tensor,  # [B, V]: the target's logits after each row's context
    params: list,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row with no drafts -> [B] long: the argmax (greedy rows) or one draw from
    `target_probs` with the row's one uniform, as `_verify_sampled` draws a row with no drafts.
    Rows without top-k and top-p take `sample_plain` (one kernel on GPUs), the rest the sort:
    which, by each row's own parameters."""
    B, V = logits.shape
    dev = logits.device
    rows = [i for i, p in enumerate(params) if not p.greedy]
    groups = _by_filtering(rows, params, V)
    tokens = logits.argmax(dim=-1) if len(rows) < B or len(groups) > 1 else None
    for group in groups:
        sel = to_device(group, dev) if len(group) < B else None
        x = logits if sel is None else logits[sel]
        u = _draw_uniforms([generators[i] for i in group], [0] * len(group), 1, dev)[:, 0]  # [R]
        temperature = to_device([params[i].temperature for i in group], dev, torch.float32)
        if not filtering([params[group[0]]], V):
            picked = sample_plain(x, temperature, u)
        else:
            top_k = to_device([params[i].top_k for i in group], dev)
            top_p = to_device([params[i].top_p for i in group], dev, torch.float32)
            picked = inverse_cdf(target_probs(x, temperature, top_k, top_p, plain=False), u)
        tokens = picked if sel is None else tokens.index_copy(0, sel, picked)
    return tokens


def _verify_sampled(
    logits: torch.Tensor,  # [R, k + 1, V] float32
    drafts: torch.Tensor,  # [R, k] long, -1 padded
    q_ids: torch.Tensor,  # [R, k, S] long, -1 padded
    q_probs: torch.Tensor,  # [R, k, S] float
    params: list,
    generators: list[torch.Generator | None],
    num_draft: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/resample rule for R sampling rows, k >= 1 -> num_accepted [R], final token [R]."""
    R, K1, V = logits.shape
    k = K1 - 1
    dev = logits.device
    n = to_device(num_draft, dev)  # [R]
    valid = torch.arange(k, device=dev) < n[:, None]  # [R, k]

    temperature = to_device([p.temperature for p in params], dev, torch.float32)
    filtered = filtering(params, V)
    if not filtered and triton_sampling.supported(logits):  # three launches on GPUs
        u = _draw_uniforms(generators, num_draft, K1, dev)
        return triton_sampling.verify_plain(logits, temperature, drafts, n, q_ids, q_probs, u)
    top_k = to_device([p.top_k for p in params], dev)
    top_p = to_device([p.top_p for p in params], dev, torch.float32)
    p = target_probs(
        logits.reshape(R * K1, V),
        temperature.repeat_interleave(K1),
        top_k.repeat_interleave(K1),
        top_p.repeat_interleave(K1),
        filtered=filtered,
        plain=not all(filtering([q], V) for q in params),
    ).view(R, K1, V)

    u = _draw_uniforms(generators, num_draft, K1, dev)  # [R, k + 1] float64
    if triton_sampling.supported(p):  # the rule from p in two launches on GPUs
        return triton_sampling.verify_plain(p, None, drafts, n, q_ids, q_probs, u)
    x = drafts.clamp(min=0)  # [R, k]
    p_x = p[:, :k].gather(-1, x[..., None])[..., 0].double()  # [R, k]
    q_x = (q_probs.double() * (q_ids == x[..., None])).sum(dim=-1)  # [R, k]
    # u < p/q without dividing; q_x > 0 for a token sampled from q, and u < 1 keeps p >= q accepted.
    accept = (u[:, :k] * q_x < p_x) & valid
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # [R]

    # At position a = num_accepted: residual p - q after a rejection, p itself for the bonus.
    a = num_accepted
    p_a = p.gather(1, a[:, None, None].expand(R, 1, V))[:, 0].double()  # [R, V]
    rejected = a < n  # [R]
    a_q = a.clamp(max=k - 1)[:, None, None]
    ids_a = q_ids.gather(1, a_q.expand(R, 1, q_ids.shape[-1]))[:, 0]  # [R, S]
    probs_a = q_probs.gather(1, a_q.expand(R, 1, q_ids.shape[-1]))[:, 0].double()
    probs_a = probs_a * rejected[:, None]  # bonus rows subtract nothing
    dist = _recovered_or_bonus_probs(p_a, ids_a, probs_a)  # [R, V], unnormalised

    # Inverse-CDF sample with the row's last uniform.
    final = inverse_cdf(dist, u.gather(1, n[:, None])[:, 0])
    return num_accepted, final


def _recovered_or_bonus_probs(
    p: torch.Tensor,  # [R, V] float64: target distribution at the final position
    q_ids: torch.Tensor,  # [R, S] long, -1 padded: draft support there (all -1 or zero-prob for bonus rows)
    q_probs: torch.Tensor,  # [R, S] float64: draft probabilities there (zeros for bonus rows)
) -> torch.Tensor:
    """max(0, p - q), or p where that has no mass -> [R, V] float64, not normalised."""
    q_probs = q_probs.masked_fill(q_ids < 0, 0.0)
    residual = p.scatter_add(-1, q_ids.clamp(min=0), -q_probs).clamp(min=0.0)
    return torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)


def _draw_uniforms(
    generators: list[torch.Generator | None], num_draft: list[int], width: int, device: torch.device
) -> torch.Tensor:
    """num_draft[r] + 1 uniforms from row r's own generator, left-aligned -> [R, width] float64."""
    draws = []
    for g, m in zip(generators, num_draft, strict=True):
        if g is None:
            raise ValueError("a sampling row (temperature > 0) needs its own torch.Generator")
        draws.append(torch.rand(m + 1, generator=g, device=g.device, dtype=torch.float64))
    if all(m + 1 == width for m in num_draft):  # every row draws its whole width (k = 0: one each)
        u = draws[0] if len(draws) == 1 else torch.cat(draws)
        return host_to_device(u, device).view(len(draws), width)
    # Row r's draws at its first num_draft[r] + 1 places: laid out where they were drawn (on the
    # host: one copy; a boolean mask on the device would count its places there, a wait mid-step).
    home = draws[0].device
    u = torch.ones(len(draws), width, dtype=torch.float64, device=home)
    where = torch.tensor([r * width + j for r, m in enumerate(num_draft) for j in range(m + 1)])
    u.view(-1)[host_to_device(where, home)] = torch.cat(draws)
    return host_to_device(u, device)


def sparse_from_probs(probs: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [..., V] -> ids [..., N] long, probs [..., N] float32, N = min(top_n, V).

    Keeps the top_n most likely tokens and renormalises; zero-probability entries become
    padding (id -1, prob 0). Drafts sample from exactly this sparse distribution, so that the
    q used in verification is the distribution the token really came from.
    """
    top, ids = torch.topk(probs.float(), min(top_n, probs.shape[-1]), dim=-1)
    ids = ids.masked_fill(top <= 0, -1)
    return ids, top / top.sum(dim=-1, keepdim=True)


def sample_sparse(ids: torch.Tensor, probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token per row of sparse distributions by inverse CDF: ids [..., S] (-1 padding), probs
    [..., S], u [...] float64 uniforms in [0, 1) -> tokens [...] long. The first support entry
    whose running mass exceeds u * total; padding (mass 0) is never drawn."""
    weights = probs.double().masked_fill(ids < 0, 0.0)
    cdf = weights.cumsum(dim=-1)
    j = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:], right=True)
    # (never past the last entry with mass, as the Triton draw of `triton_sampling.top_n`)
    last = torch.where(weights > 0, torch.arange(ids.shape[-1], device=ids.device), 0).amax(-1, keepdim=True)
    return ids.gather(-1, torch.minimum(j, last))[..., 0]


def sample_sparse_one(ids: torch.Tensor, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token from a sparse distribution, one uniform from `generator`: ids [S], probs [S] ->
    token, 0-dim long (on the distribution's device)."""
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
    return sample_sparse(ids, probs, host_to_device(u, ids.device))
