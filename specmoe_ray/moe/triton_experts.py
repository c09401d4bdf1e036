"""A Triton kernel for the experts of decode and verify steps: few rows per expert.

`torch._grouped_mm` is a good GEMM when every expert has many rows (prefill), but at decode a
step routes one token to A of E experts and the grouped GEMM reaches ~10% of the memory roofline
(benchmarks/RESULTS.md). Here one program per (expert, block of output features) returns at once
when its expert has no rows, and otherwise streams its block of the expert's weights exactly once
per 16 rows, multiplying every row the expert has: the weights are the bytes that matter, and
each is read once per step.

out[r] = x[r] @ w[e(r)]^T for rows sorted by expert, `ends[e]` = end offset of expert e's rows.
Rows and weights in bf16, fp16 or fp32 (fp32 multiplies in full precision, not TF32), float32
accumulation. Static shapes and no host sync, so CUDA graphs capture it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton; the kernel is for GPUs only
    triton = None

AVAILABLE = triton is not None

if AVAILABLE:

    @triton.jit
    def _experts_kernel(
        x_ptr,  # [n, K] rows sorted by expert
        w_ptr,  # [E, N, K] weights, K contiguous
        out_ptr,  # [n, N]
        ends_ptr,  # [E] int32: end offset of each expert's rows
        N,
        K,
        stride_we,
        stride_wn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        end = tl.load(ends_ptr + e)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        if end > start:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            w_base = w_ptr + e.to(tl.int64) * stride_we + rn[None, :] * stride_wn
            for m0 in range(start, end, BLOCK_M):
                rm = m0 + tl.arange(0, BLOCK_M)
                row_ok = rm < end
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + rk
                    xk = tl.load(
                        x_ptr + rm[:, None].to(tl.int64) * K + kk[None, :],
                        mask=row_ok[:, None] & (kk[None, :] < K),
                        other=0.0,
                    )
                    wk = tl.load(w_base + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
                    if IEEE:
                        acc += tl.dot(xk, wk, input_precision="ieee")
                    else:
                        acc += tl.dot(xk, wk)
                out = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
                tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (rn[None, :] < N))


def expert_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [n, K] (rows sorted by expert), w [E, N, K], ends [E] int32 -> [n, N]."""
    n, K = x.shape
    E, N, _ = w.shape
    out = torch.empty(n, N, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    x = x.contiguous()
    block_n, block_k = (32, 128) if x.dtype != torch.float32 else (32, 64)
    grid = (E, triton.cdiv(N, block_n))
    _experts_kernel[grid](
        x,
        w,
        out,
        ends,
        N,
        K,
        w.stride(0),
        w.stride(1),
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
        num_warps=4,
    )
    return out
