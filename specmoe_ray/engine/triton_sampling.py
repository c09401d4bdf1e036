"""Two Triton kernels for the last draw of a sampled step: inverse-CDF sampling of one token per
row, from softmax(logits / temperature) or from given non-negative weights.

In torch the same draw is a softmax, a float64 cumulative sum over the vocabulary, a scaled
uniform and a `searchsorted` (plus a divide and casts): at batch 1 some eight launches of host
time, and at more rows torch's row-wise scan of 152k numbers alone costs ~230 us on an H200
(RESULTS.md, session 20); one program per row, reading its row three times, takes ~140 us.
Here each row is cut into chunks of `CHUNK` numbers: the first kernel, one program per (row,
chunk), writes the chunk's maximum and its mass relative to it (float64 sum of float32
exp(z - max)); the second, one program per row, scales the chunks' masses to the row's maximum,
finds the chunk where the running mass passes u * total and walks that chunk alone. The token is
the first whose running mass exceeds u * total (`torch.searchsorted(cdf, u * cdf[-1],
right=True)`), never a zero-mass one: where rounding leaves the walk short of the target, the
chunk's (the row's) last token with mass.

Used on CUDA only (`supported`); CPU tests run it under Triton's interpreter against float64
math, and tests/gpu against the torch path of `engine/sampling.py`.
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


def supported(x: torch.Tensor) -> bool:
    """The engine's draws take the kernel on GPUs (tests call `inverse_cdf` under the interpreter)."""
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
            t = tl.load(t_ptr + r)
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
        last_c = tl.max(tl.where(mass > 0, cs, -1), 0)
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
        token = tl.minimum(start + tl.sum(below, 0), tl.max(last, 0))
        tl.store(out_ptr + r, token.to(tl.int64))


def inverse_cdf(x: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V], u [R] float64 in [0, 1) -> [R] int64: the first token whose running mass exceeds
    u * total, the mass being softmax(x / temperature) (temperature [R] float32 given: x are
    logits) or x itself (non-negative weights, any float dtype)."""
    R, V = x.shape
    out = torch.empty(R, dtype=torch.long, device=x.device)
    if R:
        softmax = temperature is not None
        block = min(BLOCK, triton.next_power_of_2(V))
        chunk = block * triton.cdiv(triton.cdiv(V, CHUNKS), block)
        C = triton.cdiv(V, chunk)
        maxes = torch.empty(R, C, dtype=torch.float32, device=x.device)
        mass = torch.empty(R, C, dtype=torch.float64, device=x.device)
        t = temperature if softmax else maxes  # (not read)
        meta = dict(CHUNK=chunk, SOFTMAX=softmax, BLOCK=block, num_warps=4)
        with launch_on(x.device):
            _chunk_mass_kernel[(R, C)](x, x.stride(0), t, maxes, mass, V, C, **meta)
            _pick_kernel[(R,)](
                x, x.stride(0), t, maxes, mass, u.contiguous(), out, V, C,
                BLOCK_C=triton.next_power_of_2(C), **meta,
            )  # fmt: skip
    return out
