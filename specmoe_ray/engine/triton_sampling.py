"""Triton kernels for verification: inverse-CDF sampling of one token per row, from
softmax(logits / temperature) or from given non-negative weights (`inverse_cdf`), speculative
sampling's whole rule (`verify_plain`), greedy rows' rule (`greedy_verify`), and top-k / top-p
after torch's sort (`sorted_probs`).

In torch a draw is a softmax, a float64 cumulative sum over the vocabulary, a scaled uniform and
a `searchsorted` (plus a divide and casts): at batch 1 some eight launches of host time, and at
more rows torch's row-wise scan of 152k numbers alone costs ~230 us on an H200 (RESULTS.md,
session 20); one program per row, reading its row three times, takes ~140 us. Here each row is
cut into chunks of `CHUNK` numbers: the first kernel, one program per (row, chunk), writes the
chunk's maximum and its mass relative to it (float64 sum of float32 exp(z - max)); the second,
one program per row, scales the chunks' masses to the row's maximum, finds the chunk where the
running mass passes u * total and walks that chunk alone. The token is the first whose running
mass exceeds u * total (`torch.searchsorted(cdf, u * cdf[-1], right=True)`), never a zero-mass
one: where rounding leaves the walk short of the target, the chunk's last token with mass.

`verify_plain` runs the chunk kernel over every position of every row, then one program per row
(`_verify_kernel`) tests its drafts (u * q(x) < p(x), p from the chunks' maxima and masses), and
draws the last token from max(0, p - q) (the chunks' masses less the draft support's overlap,
then the chosen chunk walked with q subtracted) or from p for the bonus: some 60 torch launches
of `rejection._verify_sampled` in three. Rows with top-k / top-p pass their probabilities
instead of logits (p = x). Greedy rows with drafts take `greedy_verify`: the accepted prefix and
the tokens to emit in one small kernel after torch's argmax.

`sorted_probs` filters in the sorted order, chunked likewise: the chunks' masses over ranks
below k, then per (row, chunk) the chunk holding the last token whose mass before it is below
top_p of the total, that chunk's kept mass, and the chunk's probabilities scattered back.

Used on CUDA only (`supported`); CPU tests run them under Triton's interpreter against float64
math and the torch path, and tests/gpu and the lossless test against the torch path on GPUs.
"""

from __future__ import annotations

import torch

from specmoe_ray.moe.triton_experts import launch_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton
    triton = None

AVAILABLE = triton is not None
# Switch for benchmarks/gpu.py (`--switch torch-draw:triton_sampling.SAMPLE=False`): off = torch.
SAMPLE = True
BLOCK = 1024  # elements per iteration of a program
CHUNKS = 64  # a row is cut into at most this many chunks (of whole blocks)
TOP_CHUNK = 4096  # `top_n`: numbers per program of its first kernel
TOP_MAX = 64  # `top_n` for at most this many tokens (its loops unroll n times), else torch
TOP_WARPS = (4, 4)  # `top_n`: warps of its two kernels (8 and 8 for 1-2 rows: 29 vs 39 us, H200)


def supported(x: torch.Tensor) -> bool:
    """Verification takes these kernels on GPUs (tests call them under the interpreter too)."""
    return SAMPLE and AVAILABLE and x.is_cuda and x.stride(-1) == 1


if AVAILABLE:

    @triton.jit
    def _mass(x_ptr, offs, end, t, m, SOFTMAX: tl.constexpr):
        """Elements offs (< end) of a row as float64 masses: exp(x / t - m) (in float32, as torch's
        softmax), or x itself (weights)."""
        if SOFTMAX:
            z = tl.load(x_ptr + offs, mask=offs < end, other=float("-inf")).to(tl.float32) / t
            return tl.exp(z - tl.maximum(m, -3.0e38)).to(tl.float64)  # (a chunk of -inf: m = -inf)
        return tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float64)

    @triton.jit
    def _chunk_mass_kernel(
        x_ptr,  # [R, V] logits (SOFTMAX) or non-negative weights, last dim contiguous
        stride_r,
        t_ptr,  # [R] float32 temperatures (SOFTMAX)
        max_ptr,  # [R, C] float32 <- each chunk's maximum of x / t (SOFTMAX)
        mass_ptr,  # [R, C] float64 <- each chunk's mass (relative to its maximum)
        V,
        C,
        ROWS_PER_T,  # rows sharing a temperature (a sequence's k + 1 positions)
        CHUNK: tl.constexpr,
        SOFTMAX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        r = tl.program_id(0)
        c = tl.program_id(1)
        x = x_ptr + r.to(tl.int64) * stride_r
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        lanes = tl.arange(0, BLOCK)
        t = 1.0
        m = 0.0
        if SOFTMAX:
            t = tl.load(t_ptr + r // ROWS_PER_T)
            top = tl.full((BLOCK,), float("-inf"), tl.float32)
            for v0 in range(0, CHUNK, BLOCK):
                offs = start + v0 + lanes
                z = tl.load(x + offs, mask=offs < end, other=float("-inf")).to(tl.float32) / t
                top = tl.maximum(top, z)
            m = tl.max(top, 0)
            tl.store(max_ptr + r * C + c, m)
        total = tl.zeros((BLOCK,), tl.float64)  # (every lane holds the same sum)
        for v0 in range(0, CHUNK, BLOCK):
            total += tl.sum(_mass(x, start + v0 + lanes, end, t, m, SOFTMAX), 0)
        tl.store(mass_ptr + r * C + c + lanes, total, mask=lanes < 1)

    @triton.jit
    def _pick_kernel(
        x_ptr,
        stride_r,
        t_ptr,
        max_ptr,  # [R, C] (`_chunk_mass_kernel`)
        mass_ptr,  # [R, C]
        u_ptr,  # [R] float64 uniforms in [0, 1)
        out_ptr,  # [R] int64 <- tokens
        V,
        C,
        CHUNK: tl.constexpr,
        SOFTMAX: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0)
        x = x_ptr + r.to(tl.int64) * stride_r
        cs = tl.arange(0, BLOCK_C)
        mass = tl.load(mass_ptr + r * C + cs, mask=cs < C, other=0.0)
        t = 1.0
        if SOFTMAX:
            t = tl.load(t_ptr + r)
            maxes = tl.load(max_ptr + r * C + cs, mask=cs < C, other=float("-inf"))
            top = tl.max(maxes, 0)
            scale = tl.where(maxes > float("-inf"), tl.exp(maxes - top), 0.0).to(tl.float64)
            mass = mass * scale
        run = tl.cumsum(mass, 0)
        target = tl.load(u_ptr + r) * tl.sum(mass, 0)
        # The chunk the target falls in: the first whose running mass passes it (else the last
        # chunk with mass), then the target within that chunk, in the chunk's own units.
        last_c = tl.max(tl.where(mass > 0, cs, 0), 0)  # (0 without mass, NaN: inside the row)
        c = tl.minimum(tl.sum(((run <= target) & (cs < C)).to(tl.int32), 0), last_c)
        here = cs == c
        goal = target - tl.sum(tl.where(here, run - mass, 0.0), 0)
        m = 0.0
        if SOFTMAX:
            m = tl.sum(tl.where(here, maxes, 0.0), 0)
            goal = goal / tl.sum(tl.where(here, scale, 0.0), 0)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        lanes = tl.arange(0, BLOCK)
        below = tl.zeros((BLOCK,), tl.int32)
        last = tl.full((BLOCK,), -1, tl.int32)  # last place with mass (rounding's guard)
        walked = tl.zeros((BLOCK,), tl.float64)
        for v0 in range(0, CHUNK, BLOCK):
            offs = start + v0 + lanes
            e = _mass(x, offs, end, t, m, SOFTMAX)
            below += ((walked + tl.cumsum(e, 0) <= goal) & (offs < end)).to(tl.int32)
            last = tl.maximum(last, tl.where(e > 0, offs, -1))
            walked += tl.sum(e, 0)
        # (>= 0: a row without mass, NaN logits of a broken model, still gets a token id)
        token = tl.maximum(tl.minimum(start + tl.sum(below, 0), tl.max(last, 0)), 0)
        tl.store(out_ptr + r, token.to(tl.int64))


if AVAILABLE:

    @triton.jit
    def _p(at, mask, t, top, total, SOFTMAX: tl.constexpr):
        """p at these places (float64): softmax of logits (exp(x / t - top) / total), or x."""
        if SOFTMAX:
            z = tl.load(at, mask=mask, other=float("-inf")).to(tl.float32) / t
            return tl.exp(z - top).to(tl.float64) / total
        return tl.load(at, mask=mask, other=0.0).to(tl.float64)

    @triton.jit
    def _verify_kernel(
        x_ptr,  # [R * K1, V] float32 logits (or probabilities), row r * K1 + i = sequence r's position i
        stride_r,
        t_ptr,  # [R] float32 temperatures
        max_ptr,  # [R * K1, C] (`_chunk_mass_kernel`)
        mass_ptr,  # [R * K1, C]
        drafts_ptr,  # [R, K1 - 1] int64
        n_ptr,  # [R] int64 drafts of each sequence
        qid_ptr,  # [R, K1 - 1, S] int64 draft supports, -1 padding
        qp_ptr,  # [R, K1 - 1, S] float32 their probabilities
        u_ptr,  # [R, K1] float64 uniforms: one per draft, then the final draw's at place n
        acc_ptr,  # [R] int64 <- drafts accepted
        out_ptr,  # [R] int64 <- the recovered or bonus token
        V,
        C,
        S,
        K1: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
        SOFTMAX: tl.constexpr,  # x are logits (else probabilities: p = x, as the torch rule's)
    ):
        r = tl.program_id(0)
        t = 1.0
        if SOFTMAX:
            t = tl.load(t_ptr + r)
        n = tl.load(n_ptr + r).to(tl.int32)
        ii = tl.arange(0, BLOCK_K)  # positions
        cs = tl.arange(0, BLOCK_C)  # chunks
        ss = tl.arange(0, BLOCK_S)  # draft support
        # Each position's maximum and mass (float64, in units of exp(z - top)).
        at = (r * K1 + ii)[:, None] * C + cs[None, :]
        ok = (ii[:, None] < K1) & (cs[None, :] < C)
        masses = tl.load(mass_ptr + at, mask=ok, other=0.0)  # [BLOCK_K, BLOCK_C]
        top = tl.zeros((BLOCK_K,), tl.float32)
        total = tl.full((BLOCK_K,), 1.0, tl.float64)  # (probabilities: p(x) = x[x], undivided)
        if SOFTMAX:
            maxes = tl.load(max_ptr + at, mask=ok, other=float("-inf"))
            top = tl.max(maxes, 1)
            scale = tl.where(maxes > float("-inf"), tl.exp(maxes - tl.maximum(top, -3.0e38)[:, None]), 0.0)
            masses = masses * scale.to(tl.float64)
            total = tl.sum(masses, 1)

        # Draft i is kept with probability min(1, p(x) / q(x)): u * q(x) < p(x).
        row = x_ptr + (r * K1 + ii).to(tl.int64) * stride_r  # [BLOCK_K]
        drafted = ii < n
        x = tl.load(drafts_ptr + r * (K1 - 1) + ii, mask=drafted, other=0)
        p_x = _p(row + x, drafted, t, top, total, SOFTMAX)
        support = drafted[:, None] & (ss[None, :] < S)
        q_at = (r * (K1 - 1) + ii)[:, None] * S + ss[None, :]
        q_ids = tl.load(qid_ptr + q_at, mask=support, other=-1)
        q_x = tl.sum(tl.where(q_ids == x[:, None], tl.load(qp_ptr + q_at, mask=support, other=0.0), 0.0), 1)
        u = tl.load(u_ptr + r * K1 + ii, mask=ii < K1, other=1.0)
        kept = u * q_x.to(tl.float64) < p_x  # (false for NaN: rejected, as torch's rule)
        a = tl.min(tl.where(drafted & ~kept, ii, n), 0)  # first rejected

        # At position a: the residual max(0, p - q) after a rejection, p itself for the bonus.
        here = ii == a
        top_a = tl.sum(tl.where(here, top, 0.0), 0)
        total_a = tl.sum(tl.where(here, total, 0.0), 0)
        p_c = tl.sum(tl.where(here[:, None], masses, 0.0), 0) / total_a  # [BLOCK_C] chunks' p mass
        row_a = x_ptr + (r * K1 + a).to(tl.int64) * stride_r
        q_ok = (ss < S) & (ss * 0 + a < n)  # (broadcast first: Triton's interpreter)
        q_ids = tl.load(qid_ptr + (r * (K1 - 1) + a) * S + ss, mask=q_ok, other=-1)
        q_ok = q_ids >= 0
        q_p = tl.load(qp_ptr + (r * (K1 - 1) + a) * S + ss, mask=q_ok, other=0.0).to(tl.float64)
        overlap = tl.minimum(_p(row_a + tl.maximum(q_ids, 0), q_ok, t, top_a, total_a, SOFTMAX), q_p)
        in_chunk = (q_ids // CHUNK)[:, None] == cs[None, :]
        res_c = tl.maximum(p_c - tl.sum(tl.where(in_chunk, overlap[:, None], 0.0), 0), 0.0)
        q_on = 1.0  # (0: p - q without mass, p drawn instead)
        if tl.sum(res_c, 0) <= 0:
            res_c = p_c
            q_on = 0.0
        target = tl.load(u_ptr + r * K1 + n) * tl.sum(res_c, 0)
        run = tl.cumsum(res_c, 0)
        last_c = tl.max(tl.where(res_c > 0, cs, 0), 0)  # (as `_pick_kernel`)
        c = tl.minimum(tl.sum(((run <= target) & (cs < C)).to(tl.int32), 0), last_c)
        goal = target - tl.sum(tl.where(cs == c, run - res_c, 0.0), 0)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        lanes = tl.arange(0, BLOCK)
        below = tl.zeros((BLOCK,), tl.int32)
        last = tl.full((BLOCK,), -1, tl.int32)
        walked = tl.zeros((BLOCK,), tl.float64)
        for v0 in range(0, CHUNK, BLOCK):
            offs = start + v0 + lanes
            p_v = _p(row_a + offs, offs < end, t, top_a, total_a, SOFTMAX)
            # q at these places, one support entry at a time: a [BLOCK, S] comparison spills
            # registers at S = 32 (a draft model's support; 4.5x slower at batch 1).
            q_v = tl.zeros((BLOCK,), tl.float64)
            for s in range(0, S):
                id_s = tl.load(qid_ptr + (r * (K1 - 1) + a) * S + s, mask=a < n, other=-1)
                p_s = tl.load(qp_ptr + (r * (K1 - 1) + a) * S + s, mask=(a < n) & (id_s >= 0), other=0.0)
                q_v += tl.where(offs == id_s, p_s.to(tl.float64) * q_on, 0.0)
            e = tl.maximum(p_v - q_v, 0.0)
            below += ((walked + tl.cumsum(e, 0) <= goal) & (offs < end)).to(tl.int32)
            last = tl.maximum(last, tl.where(e > 0, offs, -1))
            walked += tl.sum(e, 0)
        tl.store(acc_ptr + r, a.to(tl.int64))
        token = tl.maximum(tl.minimum(start + tl.sum(below, 0), tl.max(last, 0)), 0)  # (as `_pick_kernel`)
        tl.store(out_ptr + r, token.to(tl.int64))


def _chunks(V: int) -> tuple[int, int, int]:
    """(block, chunk, number of chunks) of a row of V numbers: whole blocks, <= CHUNKS chunks."""
    block = min(BLOCK, triton.next_power_of_2(V))
    chunk = block * triton.cdiv(triton.cdiv(V, CHUNKS), block)
    return block, chunk, triton.cdiv(V, chunk)


def inverse_cdf(x: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V], u [R] float64 in [0, 1) -> [R] int64: the first token whose running mass exceeds
    u * total, the mass being softmax(x / temperature) (temperature [R] float32 given: x are
    logits) or x itself (non-negative weights, any float dtype)."""
    R, V = x.shape
    out = torch.empty(R, dtype=torch.long, device=x.device)
    if R:
        softmax = temperature is not None
        block, chunk, C = _chunks(V)
        maxes = torch.empty(R, C, dtype=torch.float32, device=x.device)
        mass = torch.empty(R, C, dtype=torch.float64, device=x.device)
        t = temperature if softmax else maxes  # (not read)
        meta = dict(CHUNK=chunk, SOFTMAX=softmax, BLOCK=block, num_warps=4)
        with launch_on(x.device):
            _chunk_mass_kernel[(R, C)](x, x.stride(0), t, maxes, mass, V, C, 1, **meta)
            _pick_kernel[(R,)](
                x, x.stride(0), t, maxes, mass, u.contiguous(), out, V, C,
                BLOCK_C=triton.next_power_of_2(C), **meta,
            )  # fmt: skip
    return out


def verify_plain(
    logits: torch.Tensor,  # [R, K1, V] float32, last dim contiguous (or probabilities: below)
    temperature: torch.Tensor | None,  # [R] float32; None: `logits` are the target's probabilities
    drafts: torch.Tensor,  # [R, K1 - 1] int64, -1 past n
    n: torch.Tensor,  # [R] int64
    q_ids: torch.Tensor,  # [R, K1 - 1, S] int64, -1 padding
    q_probs: torch.Tensor,  # [R, K1 - 1, S] float32
    u: torch.Tensor,  # [R, K1] float64: u[r, :n[r]] one per draft, u[r, n[r]] the final draw's
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's rule, k >= 1, in three launches -> (drafts accepted [R], recovered
    or bonus token [R]): the chunks' maxima and masses at every position, then one program per
    row tests its drafts (u * q(x) < p(x)), and draws its last token from max(0, p - q) (p for
    the bonus) as `inverse_cdf` draws. p = softmax(logits / temperature) for rows of temperature
    only; top-k / top-p rows pass `sampling.target_probs`' probabilities (temperature None)."""
    R, K1, V = logits.shape
    x = logits.reshape(R * K1, V)
    S = q_ids.shape[-1]
    softmax = temperature is not None
    block, chunk, C = _chunks(V)
    maxes = torch.empty(R * K1, C, dtype=torch.float32, device=x.device)
    mass = torch.empty(R * K1, C, dtype=torch.float64, device=x.device)
    accepted = torch.empty(R, dtype=torch.long, device=x.device)
    final = torch.empty(R, dtype=torch.long, device=x.device)
    t = temperature if softmax else maxes  # (not read)
    if R:
        with launch_on(x.device):
            _chunk_mass_kernel[(R * K1, C)](
                x, x.stride(0), t, maxes, mass, V, C, K1, CHUNK=chunk, SOFTMAX=softmax, BLOCK=block,
                num_warps=4,
            )  # fmt: skip
            _verify_kernel[(R,)](
                x, x.stride(0), t, maxes, mass, drafts.contiguous(), n.contiguous(),
                q_ids.contiguous(), q_probs.float().contiguous(), u.contiguous(), accepted, final, V, C, S,
                K1=K1, CHUNK=chunk, BLOCK=block, BLOCK_C=triton.next_power_of_2(C),
                BLOCK_K=triton.next_power_of_2(K1), BLOCK_S=triton.next_power_of_2(S), SOFTMAX=softmax,
                num_warps=4,
            )  # fmt: skip
    return accepted, final


if AVAILABLE:

    @triton.jit
    def _sorted_z(s_ptr, offs, end, top):
        """Sorted values offs (< end: rank below the row's k) as float32 exp(z - top), 0 past."""
        z = tl.load(s_ptr + offs, mask=offs < end, other=float("-inf"))
        return tl.exp(z - top)

    @triton.jit
    def _sorted_row(s_ptr, k_ptr, V):
        """This program's row and chunk, its sorted row, its k (V when off) and its maximum."""
        r = tl.program_id(0)
        s = s_ptr + r.to(tl.int64) * V
        k = tl.load(k_ptr + r)
        k = tl.where((k > 0) & (k < V), k, V)
        top = tl.maximum(tl.load(s), -3.0e38)  # (a row of -inf: no mass, as a chunk of -inf)
        return r, tl.program_id(1), s, k, top

    @triton.jit
    def _sorted_mass_kernel(
        s_ptr,  # [R, V] float32 z = logits / temperature sorted descending (stable), contiguous
        k_ptr,  # [R] int64 top_k (0 = off)
        mass_ptr,  # [R, C] float64 <- each chunk's mass exp(z - z_max) over ranks below k
        V,
        C,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        r, c, s, k, top = _sorted_row(s_ptr, k_ptr, V)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, k)
        lanes = tl.arange(0, BLOCK)
        total = tl.zeros((BLOCK,), tl.float64)
        for v0 in range(0, CHUNK, BLOCK):
            total += tl.sum(_sorted_z(s, start + v0 + lanes, end, top).to(tl.float64), 0)
        tl.store(mass_ptr + r * C + c + lanes, total, mask=lanes < 1)

    @triton.jit
    def _sorted_keep_kernel(
        s_ptr,  # [R, V] sorted z (`_sorted_mass_kernel`)
        idx_ptr,  # [R, V] int64 the sort's indices (a permutation of 0..V-1 per row)
        k_ptr,  # [R] int64 top_k (0 = off)
        p_ptr,  # [R] float32 top_p (>= 1: off)
        mass_ptr,  # [R, C] float64 (`_sorted_mass_kernel`)
        out_ptr,  # [R, V] float32 <- the kept tokens' probabilities, in vocabulary order
        V,
        C,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        r, c, s, k, top = _sorted_row(s_ptr, k_ptr, V)
        p = tl.load(p_ptr + r)
        cs = tl.arange(0, BLOCK_C)
        mass = tl.load(mass_ptr + r * C + cs, mask=cs < C, other=0.0)
        # Token j is kept while the top-k mass of tokens before it is below top_p of their total.
        limit = tl.where(p < 1.0, p.to(tl.float64) * tl.sum(mass, 0), float("inf"))
        before = tl.cumsum(mass, 0) - mass
        cut = tl.max(tl.where((before < limit) & (mass > 0) & (cs < C), cs, 0), 0)  # the last kept's chunk
        before_cut = tl.sum(tl.where(cs == cut, before, 0.0), 0)
        lanes = tl.arange(0, BLOCK)
        # The kept mass of the cut chunk (each program walks it: the total divides every token).
        kept = tl.zeros((BLOCK,), tl.float64)
        walked = tl.zeros((BLOCK,), tl.float64)
        end = tl.minimum(cut * CHUNK + CHUNK, k)
        for v0 in range(0, CHUNK, BLOCK):
            e = _sorted_z(s, cut * CHUNK + v0 + lanes, end, top).to(tl.float64)
            ahead = before_cut + walked + tl.cumsum(e, 0) - e
            kept += tl.sum(tl.where(ahead < limit, e, 0.0), 0)
            walked += tl.sum(e, 0)
        total = before_cut + kept
        # This program's chunk, written back to the vocabulary's order.
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, k)
        walked = tl.zeros((BLOCK,), tl.float64)
        before_c = tl.sum(tl.where(cs == c, before, 0.0), 0)
        for v0 in range(0, CHUNK, BLOCK):
            offs = start + v0 + lanes
            e = _sorted_z(s, offs, end, top).to(tl.float64)
            ahead = before_c + walked + tl.cumsum(e, 0) - e
            walked += tl.sum(e, 0)
            prob = tl.where(ahead < limit, e / total, 0.0)  # (chunks past the cut: none)
            mine = offs < tl.minimum(start + CHUNK, V)
            at = tl.load(idx_ptr + r.to(tl.int64) * V + offs, mask=mine, other=0)
            tl.store(out_ptr + r.to(tl.int64) * V + at, prob.to(tl.float32), mask=mine)


def sorted_probs(
    sorted_z: torch.Tensor, sorted_idx: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p after the sort, in two launches: sorted_z [R, V] float32 (logits /
    temperature, descending, stable), sorted_idx [R, V] int64, top_k [R] (0 = off), top_p [R]
    -> [R, V] float32 probabilities in vocabulary order (`sampling.target_probs`' rule, masses
    summed in float64: a token whose mass before it is within ~1e-7 of top_p may fall either
    side). Replaces some 10 torch launches over the whole vocabulary (a softmax, a cumulative
    sum, masks, a scatter: ~100 us of GPU time at batch 1, where a long row gets one block)."""
    R, V = sorted_z.shape
    out = torch.empty(R, V, dtype=torch.float32, device=sorted_z.device)
    if R:
        block, chunk, C = _chunks(V)
        mass = torch.empty(R, C, dtype=torch.float64, device=sorted_z.device)
        z, idx = sorted_z.float().contiguous(), sorted_idx.contiguous()
        k, p = top_k.long().contiguous(), top_p.float().contiguous()
        with launch_on(z.device):
            _sorted_mass_kernel[(R, C)](z, k, mass, V, C, CHUNK=chunk, BLOCK=block, num_warps=4)
            _sorted_keep_kernel[(R, C)](
                z, idx, k, p, mass, out, V, C, CHUNK=chunk, BLOCK=block, BLOCK_C=triton.next_power_of_2(C),
                num_warps=4,
            )  # fmt: skip
    return out


if AVAILABLE:

    @triton.jit
    def _top_keys(x_ptr, offs, V):
        """int64 keys of x[offs] (< V), unique and ordered as (value descending, index ascending):
        the value's float32 bits made monotone above, the complement of the index below; places
        past V the smallest int64."""
        z = tl.load(x_ptr + offs, mask=offs < V, other=0.0).to(tl.float32) + 0.0  # (-0.0 -> 0.0)
        b = z.to(tl.int32, bitcast=True)
        b = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        keys = (b.to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)
        return tl.where(offs < V, keys, -0x7FFFFFFFFFFFFFFF - 1)

    @triton.jit
    def _take_top(keys, N: tl.constexpr):
        """The N largest keys (distinct), largest first: [N] int64 (held in registers: a store
        read back by the program's other threads would need a barrier)."""
        ns = tl.arange(0, N)
        out = tl.full((N,), -0x7FFFFFFFFFFFFFFF - 1, tl.int64)
        for i in tl.static_range(N):
            top = tl.max(keys, 0)
            out = tl.where(ns == i, top, out)
            keys = tl.where(keys == top, -0x7FFFFFFFFFFFFFFF - 1, keys)
        return out

    @triton.jit
    def _chunk_top_kernel(
        x_ptr,  # [R, V] logits, last dim contiguous
        stride_r,
        cand_ptr,  # [R, C * N] int64 <- each chunk's N largest keys
        V,
        C,
        N: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        r = tl.program_id(0)
        c = tl.program_id(1)
        keys = _top_keys(x_ptr + r.to(tl.int64) * stride_r, c * CHUNK + tl.arange(0, CHUNK), V)
        tl.store(cand_ptr + (r * C + c) * N + tl.arange(0, N), _take_top(keys, N))

    @triton.jit
    def _merge_top_kernel(
        x_ptr,
        stride_r,
        t_ptr,  # [R] float32 temperatures
        cand_ptr,  # [R, C * N] (`_chunk_top_kernel`)
        u_ptr,  # [R] float64 uniforms in [0, 1)
        ids_ptr,  # [R, N] int64 <- token ids, largest logit first; -1 where the mass is 0
        probs_ptr,  # [R, N] float32 <- softmax over the first n of logits / temperature
        tok_ptr,  # [R] int64 <- the token drawn from them by inverse CDF with u
        C,
        n,  # entries wanted (<= N)
        N: tl.constexpr,
        BLOCK: tl.constexpr,  # >= C * N
    ):
        r = tl.program_id(0)
        lanes = tl.arange(0, BLOCK)
        keys = tl.load(cand_ptr + r * C * N + lanes, mask=lanes < C * N, other=-0x7FFFFFFFFFFFFFFF - 1)
        top = _take_top(keys, N)  # the row's N largest keys
        ns = tl.arange(0, N)
        idx = 0x7FFFFFFF - (top & 0xFFFFFFFF)
        real = (top > -0x7FFFFFFFFFFFFFFF - 1) & (ns < n)  # (a row shorter than n: padding)
        z = tl.load(x_ptr + r.to(tl.int64) * stride_r + idx, mask=real, other=float("-inf")).to(tl.float32)
        z = z / tl.load(t_ptr + r)
        first = tl.max(z, 0)  # (the first's: keys keep the logits' order)
        e = tl.exp(z - tl.maximum(first, -3.0e38))
        p = e / tl.sum(e, 0)
        ids = tl.where(real & (p > 0), idx, -1)
        p = tl.where(real & (p > 0), p, 0.0)
        tl.store(ids_ptr + r * N + ns, ids)
        tl.store(probs_ptr + r * N + ns, p)
        # The draw (`rejection.sample_sparse`): the first entry whose running mass exceeds
        # u * total, never past the last entry with mass (>= 0: a NaN row still gets a token id).
        w = p.to(tl.float64)
        last = tl.max(tl.where(w > 0, ns, 0), 0)
        j = tl.minimum(tl.sum((tl.cumsum(w, 0) <= tl.load(u_ptr + r) * tl.sum(w, 0)).to(tl.int32), 0), last)
        tl.store(tok_ptr + r, tl.maximum(tl.sum(tl.where(ns == j, ids, 0), 0), 0))


def top_n(
    logits: torch.Tensor, temperature: torch.Tensor, n: int, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A draft's sparse distribution for rows of temperature only and its draw, in two launches:
    logits [R, V], temperature [R], u [R] float64 -> ids [R, n] int64 (largest logit first; ties
    by lower index; -1 where the mass is 0), probs [R, n] float32 = softmax over those n of
    logits / temperature (the full softmax's top n renormalised, `rejection.sparse_from_probs`,
    without the full softmax), tokens [R] drawn from them as `rejection.sample_sparse` draws.
    torch.topk takes ~100-140 us of GPU time over a 152k vocabulary at any batch up to 32, and
    the torch path ~25 launches of host time (RESULTS.md, session 21): here each chunk of 4096
    picks its n largest, then one program per row merges, normalises and draws."""
    R, V = logits.shape
    N = triton.next_power_of_2(n)
    chunk = min(TOP_CHUNK, triton.next_power_of_2(V))
    C = triton.cdiv(V, chunk)
    dev = logits.device
    cand = torch.empty(R, C * N, dtype=torch.long, device=dev)
    ids = torch.empty(R, N, dtype=torch.long, device=dev)
    probs = torch.empty(R, N, dtype=torch.float32, device=dev)
    tokens = torch.empty(R, dtype=torch.long, device=dev)
    if R:
        with launch_on(dev):
            warps = (8, 8) if R <= 2 and TOP_WARPS == (4, 4) else TOP_WARPS
            _chunk_top_kernel[(R, C)](
                logits, logits.stride(0), cand, V, C, N=N, CHUNK=chunk, num_warps=warps[0]
            )  # fmt: skip
            _merge_top_kernel[(R,)](
                logits, logits.stride(0), temperature.float().contiguous(), cand, u.contiguous(), ids, probs,
                tokens, C, n, N=N, BLOCK=triton.next_power_of_2(C * N), num_warps=warps[1],
            )  # fmt: skip
    return ids[:, :n], probs[:, :n], tokens


if AVAILABLE:

    @triton.jit
    def _greedy_kernel(
        drafts_ptr,  # [B, K1 - 1] int64, -1 past n
        n_ptr,  # [B] int64 drafts of each row
        argmax_ptr,  # [B, K1] int64 the target's argmax at each position
        tokens_ptr,  # [B, K1] int64 <- accepted drafts, then the argmax after them, then -1
        acc_ptr,  # [B] int64 <- drafts accepted
        K1: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        ii = tl.arange(0, BLOCK_K)
        n = tl.load(n_ptr + b)
        best = tl.load(argmax_ptr + b * K1 + ii, mask=ii < K1, other=-1)
        drafts = tl.load(drafts_ptr + b * (K1 - 1) + ii, mask=ii < K1 - 1, other=-1)
        miss = (ii >= n) | (drafts != best)  # (place n always misses: at most n accepted)
        a = tl.min(tl.where(miss & (ii < K1), ii, K1 - 1), 0)
        final = tl.sum(tl.where(ii == a, best, 0), 0)
        tokens = tl.where(ii < a, drafts, tl.where(ii == a, final, -1))
        tl.store(tokens_ptr + b * K1 + ii, tokens, mask=ii < K1)
        tl.store(acc_ptr + b, a.to(tl.int64))


def greedy_verify(
    argmax: torch.Tensor, drafts: torch.Tensor, n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rows' rule in one launch: argmax [B, K1] (the target's), drafts [B, K1 - 1], n [B]
    int64 -> (tokens [B, K1]: the longest prefix of drafts equal to the argmax, then the argmax
    after it, -1 padded; drafts accepted [B]). Some 14 small torch launches otherwise: a small
    model's speculative steps are bound by the host's launches."""
    B, K1 = argmax.shape
    tokens = torch.empty(B, K1, dtype=torch.long, device=argmax.device)
    accepted = torch.empty(B, dtype=torch.long, device=argmax.device)
    if B:
        with launch_on(argmax.device):
            _greedy_kernel[(B,)](
                drafts.contiguous(), n.contiguous(), argmax.contiguous(), tokens, accepted,
                K1=K1, BLOCK_K=triton.next_power_of_2(K1), num_warps=1,
            )  # fmt: skip
    return tokens, accepted
