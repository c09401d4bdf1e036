"""A Triton kernel for the experts of decode and verify steps: few rows per expert.

`torch._grouped_mm` is a good GEMM when every expert has many rows (prefill), but at decode a
step routes one token to A of E experts and the grouped GEMM reaches ~10% of the memory roofline
(benchmarks/RESULTS.md). Here one program per (expert, block of output features) returns at once
when its expert has no rows, and otherwise streams its block of the expert's weights exactly once
per 16 rows, multiplying every row the expert has: the weights are the bytes that matter, and
each is read once per step.

out[r] = x[r] @ w[e(r)]^T for rows sorted by expert, expert e owning rows `offsets[e] .. offsets[e + 1]`
(rows before offsets[0], padding, are left unwritten).
Rows and weights in bf16, fp16 or fp32 (fp32 multiplies in full precision, not TF32), float32
accumulation. Static shapes and no host sync, so CUDA graphs capture it.

`pair_matmul` is the smallest steps' kernel (a few tokens, e.g. batch-1 decode): one program per
((token, expert) pair, block of output features), a matrix-vector product that reads the pair's
token row itself (no sort, no gather of rows, no scatter back: three kernels fewer per layer)
and, for the gate/up projection, applies silu(gate) * up before writing (one more fewer). Two
pairs of one expert read its weights twice, so it serves only steps with few pairs.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton; the kernel is for GPUs only
    triton = None

AVAILABLE = triton is not None
# Triton's interpreter runs the kernels on CPU tensors (numpy): tests only.
INTERPRETED = AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"


# Programmatic dependent launch (Hopper and later): each kernel is launched as soon as the one
# before it lets it, and its programs wait (`griddepcontrol.wait`) for that kernel's results
# before reading anything, so launch latency overlaps the previous kernel's tail inside a CUDA
# graph (kernels.py ablation, H200, 4 layers at batch 1: 0.532 against 0.543 ms; with cuBLAS
# one-row projections and the rope's cache write as well, 0.492; benchmarks/RESULTS.md, session 6).
PDL = True
PDL_SUPPORTED = AVAILABLE and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


_PDL_DEVICES: dict[int, bool] = {}  # CUDA device index -> Hopper or later (griddepcontrol)


def pdl_launch(device: torch.device) -> dict:
    """A kernel launch's extra arguments: with PDL on a CUDA device of compute capability 9 or
    more (older ones lack the instructions), the launch option and the kernels' `PDL` constexpr
    (`_grid_dependency`); else nothing."""
    if not (PDL and PDL_SUPPORTED and device.type == "cuda"):
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    hopper = _PDL_DEVICES.get(index)
    if hopper is None:
        hopper = _PDL_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return {"launch_pdl": True, "PDL": True} if hopper else {}


if AVAILABLE:

    @triton.jit
    def _grid_dependency(PDL: tl.constexpr):
        """First thing in every kernel launched by `pdl_launch`: wait for the previous kernel's
        writes, then let the next kernel launch (its programs wait in turn)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_rows(w, rn, stride_wn, K, STEP: tl.constexpr, LINES: tl.constexpr):
        """Ask L2 for rows rn of w (K elements each): one `prefetch.global.L2` per 128-byte line
        (STEP elements), LINES >= the lines of a row. Issued before `_grid_dependency`, it reads
        weights that do not depend on the kernel before while that kernel still runs."""
        col = tl.minimum(tl.arange(0, LINES) * STEP, K - 1)
        ptrs = w + rn[:, None].to(tl.int64) * stride_wn + col[None, :]
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )

    @triton.jit
    def _prefetch_expert(
        w_ptr, e, stride_we, rn, N, stride_wn, K, GLU: tl.constexpr, STEP: tl.constexpr, LINES: tl.constexpr
    ):
        """`_prefetch_rows` for rows rn (clamped to N) of expert e (GLU: its up rows too)."""
        w = w_ptr + e.to(tl.int64) * stride_we
        rows = tl.minimum(rn, N - 1)
        _prefetch_rows(w, rows, stride_wn, K, STEP, LINES)
        if GLU:
            _prefetch_rows(w + N * stride_wn, rows, stride_wn, K, STEP, LINES)


# Kernels whose weights are known before the kernel ahead of them finishes ask L2 for their
# block of weights first, then wait (PDL): the one-row projections (`matvec`; o_proj comes after
# the attention kernel, whose few programs leave HBM idle) and the experts' down projection (its
# experts were routed two kernels back, so its weights stream during the gate/up kernel's tail).
# Opt-in: slower in the step on an H100 (kernels.py ablations, RESULTS.md session 7).
PREFETCH = False


def prefetch_args(x: torch.Tensor, w: torch.Tensor, on: bool) -> dict:
    """The kernels' prefetch constexprs: lines of 128 bytes per weight row (0: off; only with
    PDL, on a GPU: the interpreter has no inline assembly)."""
    if not (on and "PDL" in pdl_launch(x.device)):
        return {}
    step = 128 // w.element_size()
    return {"PREFETCH_STEP": step, "PREFETCH_LINES": triton.next_power_of_2(triton.cdiv(w.shape[-1], step))}


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision: float32 multiplies in full precision ("ieee", not TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_on(device: torch.device):
    """Triton launches on the current CUDA device: make it `device`. CPU tensors run under
    Triton's interpreter (TRITON_INTERPRET=1: the CPU tests check the kernels' arithmetic)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


if AVAILABLE:

    @triton.jit
    def _experts_kernel(
        x_ptr,  # rows sorted by expert [n, K], or any rows read through src (GATHER)
        w_ptr,  # [E, N (x 2 with GLU: gate rows, then up rows), K] weights, K contiguous
        out_ptr,  # [n, N]: sorted position r's row at r, or at dst[r] (SCATTER)
        offs_ptr,  # [E + 1] int32: expert e's rows are offs[e] .. offs[e + 1]
        src_ptr,  # [n] int64 (GATHER): sorted position r reads row src[r] // GROUP of x
        dst_ptr,  # [n] int64 (SCATTER): sorted position r writes row dst[r] of out
        N,
        K,
        stride_x,
        stride_we,
        stride_wn,
        GROUP: tl.constexpr,
        GATHER: tl.constexpr,
        SCATTER: tl.constexpr,
        GLU: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32), else "tf32" (unused by 16-bit dots)
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
    ):
        _grid_dependency(PDL)
        e = tl.program_id(0)
        start = tl.load(offs_ptr + e)
        end = tl.load(offs_ptr + e + 1)
        if end > start:
            _expert_rows(x_ptr, w_ptr, out_ptr, src_ptr, dst_ptr, e, tl.program_id(1), start, end, N, K,
                         stride_x, stride_we, stride_wn, GROUP, GATHER, SCATTER, GLU, BLOCK_M, BLOCK_N,
                         BLOCK_K, PRECISION, False)  # fmt: skip

    @triton.jit
    def _expert_rows(
        x_ptr, w_ptr, out_ptr, src_ptr, dst_ptr, e, pid_n, start, end, N, K, stride_x, stride_we, stride_wn,
        GROUP: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, GLU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        SHARED_X: tl.constexpr,
    ):  # fmt: skip
        """`_experts_kernel`'s block: features pid_n * BLOCK_N .. of expert e's sorted rows start ..
        end. SHARED_X: x was written by other programs of this launch (read past this SM's L1)."""
        dtype = out_ptr.dtype.element_ty
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_base = w_ptr + e.to(tl.int64) * stride_we + rn[None, :] * stride_wn
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            row_ok = rm < end
            if GATHER:  # noqa: SIM108 (a constexpr branch)
                src = tl.load(src_ptr + rm, mask=row_ok, other=0) // GROUP
            else:
                src = rm
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                x_at = x_ptr + src[:, None].to(tl.int64) * stride_x + kk[None, :]
                x_ok = row_ok[:, None] & (kk[None, :] < K)
                if SHARED_X:
                    xk = tl.load(x_at, mask=x_ok, other=0.0, cache_modifier=".cg")
                else:
                    xk = tl.load(x_at, mask=x_ok, other=0.0)
                w_ok = (rn[None, :] < N) & (kk[:, None] < K)
                wk = tl.load(w_base + kk[:, None], mask=w_ok, other=0.0)
                acc += tl.dot(xk, wk, input_precision=PRECISION)
                if GLU:
                    wu = tl.load(w_base + N * stride_wn + kk[:, None], mask=w_ok, other=0.0)
                    up += tl.dot(xk, wu, input_precision=PRECISION)
            if GLU:
                acc = _silu_mul(acc, up, dtype)
            if SCATTER:  # noqa: SIM108 (a constexpr branch)
                dst = tl.load(dst_ptr + rm, mask=row_ok, other=0)
            else:
                dst = rm
            out = out_ptr + dst[:, None].to(tl.int64) * N + rn[None, :]
            tl.store(out, acc.to(dtype), mask=row_ok[:, None] & (rn[None, :] < N))

    @triton.jit
    def _sorted_mlp_kernel(
        x_ptr,  # [n / GROUP, D]: sorted position r reads row src[r] // GROUP
        gu_ptr,  # [E, 2I, D] gate rows, then up rows
        down_ptr,  # [E, D, I]
        h_ptr,  # [n, I] scratch: silu(gate) * up of each sorted position
        out_ptr,  # [n, D]: sorted position r's row at src[r] (pair order)
        offs_ptr,  # [E + 1] int32: expert e's sorted rows are offs[e] .. offs[e + 1]
        src_ptr,  # [n] int64: sorted position -> pair
        sync_ptr,  # int32 [2 + E] zeros: (unused), programs finished, gate/up blocks done per expert
        E,
        I,
        D,
        stride_x,
        stride_gue,
        stride_gun,
        stride_de,
        stride_dn,
        max_spins,  # a down block waits this many polls at most, then computes its gate/up itself
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N1: tl.constexpr,
        BLOCK_K1: tl.constexpr,
        BLOCK_N2: tl.constexpr,
        BLOCK_K2: tl.constexpr,
        PRECISION: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        DOWN_FIRST: tl.constexpr = False,  # tests: the down blocks on the first programs
    ):
        """`expert_matmul`'s two launches (gate/up gathering x, down scattering to pair order) in
        one: a program per block, every expert's gate/up blocks first (expert by expert), then
        the down blocks; a down block of expert e waits until e's gate/up blocks are counted
        done, so down blocks of the experts done first run during the gate/up blocks' tail
        instead of after the whole launch drains. GPUs start a grid's programs in order, so the
        gate/up blocks a down block waits for are running; CUDA does not promise that order: a
        down block still waiting after max_spins polls computes its expert's gate/up blocks
        itself (the same values, written again), so no order can hang the launch. The last
        program to finish zeroes the counters (graph replays)."""
        _grid_dependency(PDL)
        nb1 = tl.cdiv(I, BLOCK_N1)
        tiles1 = E * nb1
        t = tl.program_id(0)
        if DOWN_FIRST:
            t = (t + tiles1) % tl.num_programs(0)
        if t < tiles1:
            e = t // nb1
            start = tl.load(offs_ptr + e)
            end = tl.load(offs_ptr + e + 1)
            if end > start:
                _expert_rows(x_ptr, gu_ptr, h_ptr, src_ptr, src_ptr, e, t % nb1, start, end, I, D, stride_x,
                             stride_gue, stride_gun, GROUP, True, False, True, BLOCK_M, BLOCK_N1, BLOCK_K1,
                             PRECISION, False)  # fmt: skip
                tl.debug_barrier()  # every thread's h stored before the count says so
                tl.atomic_add(sync_ptr + 2 + e, 1, sem="release")
        else:
            nb2 = tl.cdiv(D, BLOCK_N2)
            e = (t - tiles1) // nb2
            start = tl.load(offs_ptr + e)
            end = tl.load(offs_ptr + e + 1)
            if end > start:
                done = tl.atomic_add(sync_ptr + 2 + e, 0, sem="acquire")
                spins = 0
                while (done < nb1) & (spins < max_spins):
                    done = tl.atomic_add(sync_ptr + 2 + e, 0, sem="acquire")
                    spins += 1
                if done < nb1:  # its gate/up blocks have not run: compute them here (never counted)
                    for j in range(nb1):
                        _expert_rows(x_ptr, gu_ptr, h_ptr, src_ptr, src_ptr, e, j, start, end, I, D, stride_x,
                                     stride_gue, stride_gun, GROUP, True, False, True, BLOCK_M, BLOCK_N1,
                                     BLOCK_K1, PRECISION, False)  # fmt: skip
                tl.debug_barrier()
                _expert_rows(h_ptr, down_ptr, out_ptr, src_ptr, src_ptr, e, (t - tiles1) % nb2, start, end, D,
                             I, I, stride_de, stride_dn, 1, False, True, False, BLOCK_M, BLOCK_N2, BLOCK_K2,
                             PRECISION, True)  # fmt: skip
        finished = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
        if finished == tl.num_programs(0) - 1:  # every other program is done
            rp = tl.arange(0, 128)
            for p0 in range(0, E + 2, 128):
                tl.store(sync_ptr + p0 + rp, tl.zeros((128,), tl.int32), mask=p0 + rp < E + 2)


# The sorted kernel's block sizes and warps (block_n, block_k, num_warps; unset: 32, 128 and 4,
# or 32, 64 and 4 for float32): benchmarks/kernels.py (5) sweeps them with --sweep.
# SORTED_DOWN_CONFIG, where set, replaces it for the down projection (no GLU; kernels.py (7)
# --sweep sweeps the two apart, for whole experts and halves of their intermediate size).
SORTED_CONFIG: dict[str, int] = {}
SORTED_DOWN_CONFIG: dict[str, int] = {}
# Both sorted projections in one launch (`expert_mlp_sorted`): a down block starts as soon as its
# expert's gate/up blocks are done, not when the whole gate/up launch has drained (kernels.py (7),
# H200, T = 32: ~5 us per layer less in every layout; 48 layers, batch 32, one GPU: 1.012x;
# RESULTS.md session 17). SPECMOE_SORTED_FUSED=0 in a process's environment turns it off there
# (shard actors started with it too: `ShardOptions.env_vars`).
SORTED_FUSED = os.environ.get("SPECMOE_SORTED_FUSED", "1") != "0"
# The one launch's down blocks (block_n, block_k; empty: SORTED_DOWN_CONFIG's, else gate/up's):
# its down programs share the launch's registers and warps with gate/up's, so their best blocks
# differ from the two launches' (kernels.py (7) --fused-sweep, H200, T = 32: 64 x 128 237.7 us
# per layer against 243.0 with gate/up's 32 x 128 and 242.6 for two launches; 48 layers at batch
# 32, one GPU: 1.012x; RESULTS.md session 17). The same block_k: the same sums as two launches.
SORTED_FUSED_DOWN_CONFIG: dict[str, int] = {"block_n": 64, "block_k": 128}
# Polls of the expert's counter before a down block computes its gate/up itself (a GPU starting
# the grid's programs out of order): a block of gate/up takes ~30-100 us, a poll ~0.5-1 us.
SORTED_FUSED_MAX_SPINS = 20000


def expert_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    src: torch.Tensor | None = None,
    dst: torch.Tensor | None = None,
    group: int = 1,
    glu: bool = False,
) -> torch.Tensor:
    """Rows sorted by expert times their expert's weights: w [E, N, K] (glu: [E, 2N, K], and
    out = silu(gate) * up), offsets [E + 1] int32 over the n sorted positions -> out [n, N].

    x [n, K] in sorted order, or (src, [n] int64) any rows: sorted position r reads row
    src[r] // group (the rows' gather folded into the loads). dst ([n] int64): position r's
    result goes to out[dst[r]] (the scatter back to pair order folded into the stores).
    Positions before offsets[0] (padding) and rows of x's K-contiguous layout only."""
    n = src.shape[0] if src is not None else x.shape[0]
    K = x.shape[1]
    E, rows, _ = w.shape
    N = rows // 2 if glu else rows
    out = torch.empty(n, N, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = SORTED_DOWN_CONFIG if SORTED_DOWN_CONFIG and not glu else SORTED_CONFIG
    block_n = cfg.get("block_n", 32)
    block_k = cfg.get("block_k", 128 if x.dtype != torch.float32 else 64)
    grid = (E, triton.cdiv(N, block_n))
    with launch_on(x.device):
        _experts_kernel[grid](
            x, w, out, offsets, src if src is not None else offsets, dst if dst is not None else offsets,
            N, K, x.stride(0), w.stride(0), w.stride(1),
            GROUP=group, GATHER=src is not None, SCATTER=dst is not None, GLU=glu,
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(x.dtype),
            num_warps=cfg.get("num_warps", 4), **pdl_launch(x.device),
        )  # fmt: skip
    return out


def expert_mlp_sorted(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offsets: torch.Tensor,
    order: torch.Tensor,
    group: int,
    sync: torch.Tensor,
    max_spins: int | None = None,
    down_first: bool = False,
) -> torch.Tensor:
    """`expert_matmul(expert_matmul(x, gate_up, offsets, src=order, group=group, glu=True), down,
    offsets, dst=order)` in one launch with the same blocks (the same sums, bit for bit): x
    [n / group, D], gate_up [E, 2I, D], down [E, D, I] -> [n, D] in pair order (positions
    before offsets[0]: unspecified). sync: int32 [2 + E] zeros, the caller's own (two launches
    running at once must not share it), left zero. max_spins (default `SORTED_FUSED_MAX_SPINS`):
    polls of a down block for its expert's gate/up blocks before it computes them itself;
    down_first (tests): the down blocks on the launch's first programs, as if started first."""
    if max_spins is None:
        max_spins = SORTED_FUSED_MAX_SPINS
    n, E = order.shape[0], gate_up.shape[0]
    _, two_i, D = gate_up.shape
    I = two_i // 2
    assert down.shape == (E, D, I) and sync.dtype == torch.int32 and sync.numel() >= 2 + E
    out = torch.empty(n, D, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    h = torch.empty(n, I, dtype=x.dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    up_cfg = SORTED_CONFIG
    down_cfg = SORTED_FUSED_DOWN_CONFIG or SORTED_DOWN_CONFIG or SORTED_CONFIG
    block_k = 128 if x.dtype != torch.float32 else 64
    bn1, bk1 = up_cfg.get("block_n", 32), up_cfg.get("block_k", block_k)
    bn2, bk2 = down_cfg.get("block_n", 32), down_cfg.get("block_k", block_k)
    grid = E * triton.cdiv(I, bn1) + E * triton.cdiv(D, bn2)
    with launch_on(x.device):
        _sorted_mlp_kernel[(grid,)](
            x, gate_up, down, h, out, offsets, order, sync, E, I, D, x.stride(0),
            gate_up.stride(0), gate_up.stride(1), down.stride(0), down.stride(1), max_spins,
            GROUP=group, BLOCK_M=16, BLOCK_N1=bn1, BLOCK_K1=bk1, BLOCK_N2=bn2, BLOCK_K2=bk2,
            PRECISION=dot_precision(x.dtype), num_warps=up_cfg.get("num_warps", 4), DOWN_FIRST=down_first,
            **pdl_launch(x.device),
        )  # fmt: skip
    return out


if AVAILABLE:

    @triton.jit
    def _silu_mul(gate, up, dtype: tl.constexpr):
        """silu(gate) * up in float32, rounded as the unfused path rounds: gate, up, silu(gate)."""
        gate = gate.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        return act * up.to(dtype).to(tl.float32)

    @triton.jit
    def _pair_kernel(
        x_ptr,  # [n / GROUP, K]: pair p reads row p // GROUP
        ids_ptr,  # [n] expert of each pair (< 0: none; the output row is zeros)
        w_ptr,  # [E, N (x 2 with GLU: gate rows, then up rows), K], K contiguous
        out_ptr,  # [n, N]
        N,
        K,
        stride_we,
        stride_wn,
        GROUP: tl.constexpr,
        GLU: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        PREFETCH_STEP: tl.constexpr = 64,  # elements per 128-byte line
        PREFETCH_LINES: tl.constexpr = 0,  # > 0: the block's weights into L2 first (`PREFETCH`)
    ):
        p = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if PREFETCH_LINES > 0:  # ids written before the kernel ahead of this one (`PREFETCH`)
            e = tl.load(ids_ptr + p)
            if e >= 0:
                _prefetch_expert(w_ptr, e, stride_we, rn, N, stride_wn, K, GLU, PREFETCH_STEP, PREFETCH_LINES)
        _grid_dependency(PDL)
        e = tl.load(ids_ptr + p)
        dtype = out_ptr.dtype.element_ty
        acc = _pair_block(x_ptr + (p // GROUP).to(tl.int64) * K, w_ptr, e, stride_we, rn, N, K, stride_wn,
                          GLU, BLOCK_N, BLOCK_K, dtype, False)  # fmt: skip
        tl.store(out_ptr + p.to(tl.int64) * N + rn, acc.to(dtype), mask=n_ok)

    @triton.jit
    def _pair_block(
        x_row, w_ptr, e, stride_we, rn, N, K, stride_wn,
        GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr,
        SHARED_X: tl.constexpr,
    ):  # fmt: skip
        """Features rn of one pair: x_row [K] @ w[e, rn]^T (GLU: silu(gate) * up), float32;
        zeros for e < 0. SHARED_X: x_row was written by other programs of this launch (read
        from L2, past this SM's L1)."""
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if e >= 0:
            w = w_ptr + e.to(tl.int64) * stride_we + rn[:, None].to(tl.int64) * stride_wn
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < K
                if SHARED_X:
                    xk = tl.load(x_row + kk, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                else:
                    xk = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)
                ok = n_ok[:, None] & k_ok[None, :]
                acc += tl.sum(tl.load(w + kk[None, :], mask=ok, other=0.0).to(tl.float32) * xk[None, :], 1)
                if GLU:
                    wu = tl.load(w + N * stride_wn + kk[None, :], mask=ok, other=0.0).to(tl.float32)
                    up += tl.sum(wu * xk[None, :], 1)
            if GLU:
                acc = _silu_mul(acc, up, dtype)
        return acc

    @triton.jit
    def _expert_mlp_kernel(
        x_ptr,  # [n / GROUP, D]: pair p reads row p // GROUP
        ids_ptr,  # [P] expert of each pair (< 0: none; its output row is zeros)
        gu_ptr,  # [E, 2I, D] gate rows, then up rows
        down_ptr,  # [E, D, I]
        h_ptr,  # [P, I] scratch: silu(gate) * up of each pair
        out_ptr,  # [P, D]
        sync_ptr,  # int32 [2 + P] zeros: tickets taken, programs finished, gate/up blocks done per pair
        P,
        I,
        D,
        stride_gue,
        stride_gun,
        stride_de,
        stride_dn,
        GROUP: tl.constexpr,
        BLOCK_N1: tl.constexpr,
        BLOCK_K1: tl.constexpr,
        BLOCK_N2: tl.constexpr,
        BLOCK_K2: tl.constexpr,
        TICKETS: tl.constexpr = True,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
    ):
        """Both projections of a few pairs in one launch: each program takes numbered blocks
        (tickets) in turn, the gate/up blocks of every pair first, then the down blocks; a down
        block of pair p waits until p's gate/up blocks are counted done. A ticket is taken only
        by a running program and gate/up blocks wait for nothing, so the waits end whatever the
        grid's size and order (TICKETS off: block = program id, the order GPUs start programs
        in). The last program to finish zeroes the counters (graph replays)."""
        _grid_dependency(PDL)
        dtype = out_ptr.dtype.element_ty
        nb1 = tl.cdiv(I, BLOCK_N1)
        tiles1 = P * nb1
        total = tiles1 + P * tl.cdiv(D, BLOCK_N2)
        if TICKETS:  # noqa: SIM108 (a constexpr branch)
            t = tl.atomic_add(sync_ptr, 1)
        else:  # one block per program, in program order (GPUs start a grid's programs in order)
            t = tl.program_id(0)
        while t < total:
            if t < tiles1:
                p1 = t // nb1
                rn1 = (t % nb1) * BLOCK_N1 + tl.arange(0, BLOCK_N1)
                e1 = tl.load(ids_ptr + p1)
                h = _pair_block(x_ptr + (p1 // GROUP).to(tl.int64) * D, gu_ptr, e1, stride_gue, rn1, I, D,
                                stride_gun, True, BLOCK_N1, BLOCK_K1, dtype, False)  # fmt: skip
                tl.store(h_ptr + p1.to(tl.int64) * I + rn1, h.to(dtype), mask=rn1 < I)
                tl.debug_barrier()  # every thread's h stored before the count says so
                tl.atomic_add(sync_ptr + 2 + p1, 1, sem="release")
            else:
                nb2 = tl.cdiv(D, BLOCK_N2)
                p2 = (t - tiles1) // nb2
                rn2 = ((t - tiles1) % nb2) * BLOCK_N2 + tl.arange(0, BLOCK_N2)
                done = tl.atomic_add(sync_ptr + 2 + p2, 0, sem="acquire")
                while done < nb1:
                    done = tl.atomic_add(sync_ptr + 2 + p2, 0, sem="acquire")
                tl.debug_barrier()
                e2 = tl.load(ids_ptr + p2)
                y = _pair_block(h_ptr + p2.to(tl.int64) * I, down_ptr, e2, stride_de, rn2, D, I, stride_dn,
                                False, BLOCK_N2, BLOCK_K2, dtype, True)  # fmt: skip
                tl.store(out_ptr + p2.to(tl.int64) * D + rn2, y.to(dtype), mask=rn2 < D)
            if TICKETS:  # noqa: SIM108 (a constexpr branch)
                t = tl.atomic_add(sync_ptr, 1)
            else:
                t = total
        finished = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
        if finished == tl.num_programs(0) - 1:  # every program is past its last ticket
            rp = tl.arange(0, 128)
            for p0 in range(0, P + 2, 128):
                tl.store(sync_ptr + p0 + rp, tl.zeros((128,), tl.int32), mask=p0 + rp < P + 2)


if AVAILABLE:

    @triton.jit
    def _preload_pair_kernel(
        x_ptr,  # [n / GROUP, K]: pair p reads row p // GROUP
        ids_ptr,  # [n] expert of each pair (< 0: none; the output row is zeros), final before the
        # kernel ahead of this one started (as `PREFETCH` asks); read again after waiting
        w_ptr,  # [E, N, K], K contiguous
        out_ptr,  # [n, N]
        N,
        K,
        stride_we,
        stride_wn,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # >= K: whole rows, loaded at once
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        ROWS: tl.constexpr = 1,  # > 1: one pair (expert ids[0]) for x's first ROWS rows (`preload_rows`)
        GLU: tl.constexpr = False,  # w holds gate rows, then up rows ([E, 2N, K]): silu(gate) * up
        NORM: tl.constexpr = False,  # x's rows are rms_norm(x + residual) * gamma, made here
        res_ptr=None,  # NORM: [n / GROUP, K] the residual stream
        gamma_ptr=None,  # NORM: [K] the norm's weight
        sum_ptr=None,  # NORM: [n / GROUP, K] <- x + residual (the next residual stream)
        eps=0.0,  # NORM: the norm's epsilon
    ):
        p = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        k_ok = rk < K
        ok = n_ok[:, None] & k_ok[None, :]
        rows = rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        # The block's weights into registers first: with PDL this program may run while the
        # kernel ahead still does, and the weights do not depend on it (the pair's expert was
        # known before that kernel started), so their bytes stream during its work.
        e0 = tl.load(ids_ptr + p)
        w = tl.load(w_ptr + tl.maximum(e0, 0).to(tl.int64) * stride_we + rows, mask=ok, other=0.0)
        up_rows = N * stride_wn + rows  # GLU: the up rows of the same features
        wu = w
        if GLU:
            wu = tl.load(w_ptr + tl.maximum(e0, 0).to(tl.int64) * stride_we + up_rows, mask=ok, other=0.0)
        if NORM:
            gamma = tl.load(gamma_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        _grid_dependency(PDL)
        e = tl.load(ids_ptr + p)
        if e != e0:  # never, as callers promise; read again rather than use another expert's
            w = tl.load(w_ptr + tl.maximum(e, 0).to(tl.int64) * stride_we + rows, mask=ok, other=0.0)
            if GLU:
                wu = tl.load(w_ptr + tl.maximum(e, 0).to(tl.int64) * stride_we + up_rows, mask=ok, other=0.0)
        dtype = out_ptr.dtype.element_ty
        for r in tl.static_range(ROWS):  # (ROWS = 1: row p // GROUP, output row p)
            x_row = (p // GROUP + r).to(tl.int64)
            xk = tl.load(x_ptr + x_row * K + rk, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:  # as `fused.add_rms_norm`, rounded where it rounds; every program norms the row
                s = (xk + tl.load(res_ptr + x_row * K + rk, mask=k_ok, other=0.0).to(tl.float32)).to(dtype)
                if (tl.program_id(1) == 0) & (p % GROUP == 0):
                    tl.store(sum_ptr + x_row * K + rk, s, mask=k_ok)
                sf = s.to(tl.float32)
                inv = tl.rsqrt(tl.sum(sf * sf, 0) / K + eps)
                xk = (gamma * (sf * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            # As `_pair_block` with one block of K: the same sum, bit for bit.
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.sum(w.to(tl.float32) * xk[None, :], 1)
            if GLU:
                up = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.sum(wu.to(tl.float32) * xk[None, :], 1)
                acc = _silu_mul(acc, up, dtype)
            acc = tl.where(e >= 0, acc, 0.0)
            tl.store(out_ptr + (p + r).to(tl.int64) * N + rn, acc.to(dtype), mask=n_ok)


PAIR_CONFIG = {"block_n": 8, "block_k": 256, "num_warps": 8}  # best on H100 (benchmarks/kernels.py)
# The experts' down projection by the per-pair kernel, where its blocks differ (K is the experts'
# 768, not 2048; kernels.py ablations "per-pair down ..."; n16 k256 w4: 1.000x at 48 layers).
PAIR_DOWN_CONFIG: dict[str, int] = {}


def pair_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    ids: torch.Tensor,
    group: int = 1,
    glu: bool = False,
    prefetch: bool = False,
    **config,
):
    """Pair p (expert ids[p], row x[p // group]) -> out[p] = x[p // group] @ w[ids[p]]^T, [n, N];
    glu: w holds gate rows then up rows ([E, 2N, K]) and out[p] = silu(gate) * up. ids < 0 give
    zero rows. prefetch: ids were final before the kernel ahead of this one started; each
    program asks L2 for its weights before waiting for that kernel (`PREFETCH`)."""
    out, N, K, cfg, grid = _pairs_setup(x, w, ids, glu, PAIR_CONFIG, config)
    if out.shape[0]:
        with launch_on(x.device):
            _launch_pairs(grid, x, ids, w, out, N, K, group, glu, cfg, prefetch_args(x, w, prefetch))
    return out


# Few-pairs projections whose weights are known before the kernel ahead of them ends (one-row
# projections, `MATVEC_KERNEL` "preload"; the experts' down projection, routed two kernels back,
# `PRELOAD_DOWN`) by `preload_matmul`: each program loads its whole block of weights into
# registers, then waits for that kernel (PDL), so the weights stream while it runs (o_proj's
# 16.8 MB during the attention kernel, whose 16 programs leave HBM idle for ~7 us: behind a 7 us
# kernel of 16 programs o_proj takes 4.3 us more, 94% of its bytes' time, against cuBLAS's 8.8).
# Session 7's prefetch into L2 (`PREFETCH`) lost: a one-row product from L2 is latency-bound too
# (session 17). H200, 48 layers at batch 1: 1.061x with both, 1.084x with the compiled pieces
# launched with PDL too (`fused.INDUCTOR_PDL`), 327.4 -> 355.0 tok/s (RESULTS.md, session 18).
PRELOAD_DOWN = True
PRELOAD_CONFIG = {"block_n": 4, "num_warps": 4}
# Longer rows stop fitting in registers: steps keep cuBLAS for them (`fused.linear`), `matvec`
# takes "pairs" and the down projection the per-pair kernel.
PRELOAD_MAX_K = 4096


# Projections of 2 .. this many rows inside static steps (a few sequences' decode, a verify
# step's draft tokens) by `preload_rows`: one program per block of features loads the block
# once, before the wait, and multiplies every row (1: off, cuBLAS). Opt-in: slower on an H200
# (session 19, 4 layers: verify T = 4 at batch 1 0.679 vs cuBLAS 0.646 ms, batch 8 0.958 at 8
# rows vs 0.897; likely: every program reads all the rows' activations again).
PRELOAD_ROWS = 1


def preload_supported(w: torch.Tensor) -> bool:
    return AVAILABLE and w.shape[-1] <= PRELOAD_MAX_K and w.stride(-1) == 1


def preload_pays(device: torch.device) -> bool:
    """Whether kernels on device launch with PDL (`pdl_launch`), without which a preloading
    kernel cannot run ahead of the kernel before it (and is only a per-pair kernel)."""
    return "PDL" in pdl_launch(device)


def preload_matmul(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, group: int = 1, **config):
    """`pair_matmul(x, w, ids, group)` (no GLU) with whole rows in one block, loaded before the
    program waits for the kernel ahead: ids must be final before that kernel started. Equal to
    `pair_matmul` with block_k = K rounded up to a power of two, bit for bit."""
    out, N, K, cfg, grid = _pairs_setup(x, w, ids, False, PRELOAD_CONFIG, config)
    if out.shape[0]:
        with launch_on(x.device):
            _preload_pair_kernel[grid](
                x.contiguous(), ids.contiguous(), w, out, N, K, w.stride(0), w.stride(1), GROUP=group,
                BLOCK_N=cfg["block_n"], BLOCK_K=triton.next_power_of_2(K), num_warps=cfg["num_warps"],
                **pdl_launch(x.device),
            )  # fmt: skip
    return out


# One token's pairs (batch-1 decode): gate/up and down projections in one launch
# (`expert_mlp`), one kernel boundary fewer per MoE layer. Opt-in: slower on an H100 (48 layers,
# batch 1: 0.90x with 4 programs per SM, 0.71x with 2, 0.93x a program per block; session 8).
FUSED_MLP = False
MLP_CONFIG = {"block_n1": 8, "block_k1": 256, "block_n2": 8, "block_k2": 256, "num_warps": 8}
# Programs per SM, each taking blocks by ticket until none are left; 0: one program per block,
# no tickets (a down block then waits on programs started before it: GPUs start a grid's
# programs in order, but CUDA does not promise it).
MLP_PROGRAMS = 4
_SYNC: dict[tuple[torch.device, int], torch.Tensor] = {}
_SMS: dict[torch.device, int] = {}


def expert_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    group: int = 1,
    sync: torch.Tensor | None = None,
    **config,
) -> torch.Tensor:
    """`pair_matmul(pair_matmul(x, gate_up, ids, group, glu=True), down, ids)` in one kernel with
    the same blocks (the same sums, bit for bit): pair p (expert ids[p], row x[p // group]) ->
    out[p], [P, D]. sync: the launch's counters, int32 [2 + P] zeros, left zero (a caller's own,
    as two launches running at once must not share them; default: one per device and P, for
    launches that stream order keeps apart)."""
    P = ids.shape[0]
    _, two_i, D = gate_up.shape
    I = two_i // 2
    assert down.shape[1:] == (D, I) and gate_up.stride(2) == down.stride(2) == 1, (gate_up.shape, down.shape)
    cfg = {**MLP_CONFIG, **config}
    out = torch.empty(P, D, dtype=x.dtype, device=x.device)
    if P == 0:
        return out
    h = torch.empty(P, I, dtype=x.dtype, device=x.device)
    if sync is None:
        key = (x.device, P)
        sync = _SYNC.get(key)
        if sync is None:
            sync = _SYNC[key] = torch.zeros(2 + P, dtype=torch.int32, device=x.device)
    assert sync.dtype == torch.int32 and sync.numel() >= 2 + P, (sync.dtype, sync.shape, P)
    tiles = P * (triton.cdiv(I, cfg["block_n1"]) + triton.cdiv(D, cfg["block_n2"]))
    sms = _SMS.get(x.device)
    if sms is None:
        sms = _SMS[x.device] = (
            torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        )
    with launch_on(x.device):
        _expert_mlp_kernel[(min(tiles, MLP_PROGRAMS * sms) if MLP_PROGRAMS else tiles,)](
            x.contiguous(), ids.contiguous(), gate_up, down, h, out, sync, P, I, D,
            gate_up.stride(0), gate_up.stride(1), down.stride(0), down.stride(1),
            GROUP=group, BLOCK_N1=cfg["block_n1"], BLOCK_K1=cfg["block_k1"], BLOCK_N2=cfg["block_n2"],
            BLOCK_K2=cfg["block_k2"], TICKETS=MLP_PROGRAMS > 0, num_warps=cfg["num_warps"],
            **pdl_launch(x.device),
        )  # fmt: skip
    return out


def _pairs_setup(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, glu: bool, defaults: dict, config):
    """A few-pairs kernel's output [P, N] (empty), N, K, blocks and grid (a program per pair
    and block of output features)."""
    P = ids.shape[0]
    _, rows, K = w.shape
    N = rows // 2 if glu else rows
    cfg = {**defaults, **config}
    out = torch.empty(P, N, dtype=x.dtype, device=x.device)
    return out, N, K, cfg, (P, triton.cdiv(N, cfg["block_n"]))


def _launch_pairs(grid, x, ids, w, out, N, K, group, glu, cfg, prefetch: dict) -> None:
    _pair_kernel[grid](
        x.contiguous(),
        ids.contiguous(),
        w,
        out,
        N,
        K,
        w.stride(0),
        w.stride(1),
        GROUP=group,
        GLU=glu,
        BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"],
        **pdl_launch(x.device),
        **prefetch,
    )


_ZERO_IDS: dict[torch.device, torch.Tensor] = {}
# The one-row projections' kernel: "preload" (`preload_matmul`: whole rows of weights loaded
# before waiting for the kernel ahead; rows longer than PRELOAD_MAX_K take "pairs"), "pairs"
# (`pair_matmul`: CUDA-core dot products per 8 features) or "dedup" (`dedup_matmul`:
# tensor-core products, pipelined loads), and its blocks (benchmarks/kernels.py (3) sweeps them
# against cuBLAS).
MATVEC_KERNEL = "preload"
# The per-pair kernel's blocks as a matrix-vector product: whole rows of K <= 2048 in one
# block, 4 features per program: 10.2 us for q/k/v and 10.7 for o_proj against cuBLAS's 11.0
# and 11.5 alone (H100, kernels.py (3), session 8; n8 k256 w8, the experts' blocks: 11.1 and
# 15.5). "dedup" keeps its own blocks.
MATVEC_CONFIG: dict[str, int] = {"block_n": 4, "block_k": 2048, "num_warps": 4}


def _zero_ids(device: torch.device) -> torch.Tensor:
    """One pair on expert 0, per device (the one-weight kernels' ids: no kernel writes them, so
    their weights may load before the kernel ahead ends)."""
    ids = _ZERO_IDS.get(device)
    if ids is None:
        ids = _ZERO_IDS[device] = torch.zeros(1, dtype=torch.long, device=device)
    return ids


def preload_rows(x: torch.Tensor, weight: torch.Tensor, **config) -> torch.Tensor:
    """x [R, K] @ weight [N, K]^T -> [R, N] for a few rows (`PRELOAD_ROWS`; weight as
    `preload_supported` asks): a program per block of features, its whole rows of weights loaded
    before waiting for the kernel ahead (PDL), then every row's products in turn (row r: the same
    sums, bit for bit, as `matvec` of that row alone)."""
    R, ids = x.shape[0], _zero_ids(x.device)
    w = weight.unsqueeze(0)
    (N, K), cfg = weight.shape, {**PRELOAD_CONFIG, **config}
    out = torch.empty(R, N, dtype=x.dtype, device=x.device)
    with launch_on(x.device):
        _preload_pair_kernel[(1, triton.cdiv(N, cfg["block_n"]))](
            x.contiguous(), ids, w, out, N, K, w.stride(0), w.stride(1), GROUP=1,
            BLOCK_N=cfg["block_n"], BLOCK_K=triton.next_power_of_2(K), num_warps=cfg["num_warps"],
            ROWS=R, **pdl_launch(x.device),
        )  # fmt: skip
    return out


def matvec(x: torch.Tensor, weight: torch.Tensor, kernel: str | None = None, **config) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T -> [1, N] by a few-pairs kernel (one pair, expert 0): kernel
    (default `MATVEC_KERNEL`) "preload", "pairs" or "dedup". In batch-1 steps (`fused.MATVEC`)
    "preload" beats cuBLAS; the other two match it alone but lost in the step (sessions 6-8)."""
    ids = _zero_ids(x.device)
    kernel = kernel or MATVEC_KERNEL
    if kernel == "preload" and preload_supported(weight):
        return preload_matmul(x, weight.unsqueeze(0), ids, **config)
    if kernel == "dedup":
        fn, blocks = dedup_matmul, {}  # (its own blocks: tensor-core products need >= 16 features)
    else:
        fn, blocks = pair_matmul, MATVEC_CONFIG
    # Expert 0 of one: no id the kernel ahead writes, so the weights may stream before it ends.
    return fn(x, weight.unsqueeze(0), ids, prefetch=PREFETCH, **{**blocks, **config})


# Opt-in: one-row GLU projections (`glu_matvec`: a dense MLP's gate/up at batch 1) by the
# preloading kernel, gate and up rows loaded before the wait, where `MATVEC_KERNEL` is "preload"
# (else the experts' per-pair GLU kernel). Session 23, H200, the 0.6B-shaped draft's proposals:
# 0.98-1.01x over four blocks (n2-n8, 4-8 warps), within the spread (RESULTS.md).
GLU_PRELOAD = False
GLU_PRELOAD_CONFIG: dict[str, int] = {}  # its blocks, where they differ from PRELOAD_CONFIG's


def glu_preload_supported(weight: torch.Tensor) -> bool:
    """Whether a GLU weight [2I, K] (gate and up: twice a plain row's registers) fits the
    preloading kernel."""
    return preload_supported(weight) and 2 * weight.shape[-1] <= PRELOAD_MAX_K


def glu_matvec(x: torch.Tensor, weight: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """x [1, K] and weight [2I, K] (gate rows, then up rows: the experts' layout) ->
    silu(x @ gate^T) * (x @ up^T), [1, I] in one launch (silu and the product in float32 before
    the one rounding): kernel (default `MATVEC_KERNEL`) "preload" where the weight fits it
    (`glu_preload_supported`; gate and up rows loaded before waiting for the kernel ahead), else
    the experts' per-pair GLU kernel on one pair (default without PDL)."""
    if kernel is None:  # (without PDL a preloading kernel cannot run ahead: `preload_pays`)
        kernel = MATVEC_KERNEL if GLU_PRELOAD and preload_pays(x.device) else "pairs"
    if kernel == "preload" and glu_preload_supported(weight):
        return _preload_one_row(x, weight, glu=True)[0]
    return pair_matmul(x, weight.unsqueeze(0), _zero_ids(x.device), glu=True, prefetch=PREFETCH)


def norm_matvec(
    x: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    glu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's residual add + RMS norm and the projection after it in one preloading launch
    (batch-1 decode of dense layers: `DecoderLayer`): s = x + residual (x, residual [1, K]),
    h = rms_norm(s) * gamma, out = h @ weight^T ([1, N]; glu: weight [2I, K] is gate then up and
    out = silu(gate) * up, [1, I]) -> out, s (the next residual stream). Each program norms the
    row itself (K elements, from L2) after loading its weights; the first writes s. weight as
    `preload_supported` (`glu_preload_supported`) asks."""
    assert x.shape == residual.shape == (1, weight.shape[-1]), (x.shape, residual.shape, weight.shape)
    return _preload_one_row(x, weight, glu=glu, norm=(residual, gamma, eps))


def _preload_one_row(x: torch.Tensor, weight: torch.Tensor, glu: bool = False, norm: tuple | None = None):
    """`_preload_pair_kernel` on one row and one weight [N (x 2: glu), K] -> out [1, N], and
    x + residual (norm: (residual, gamma, eps); else None)."""
    rows, K = weight.shape
    N = rows // 2 if glu else rows
    assert (glu_preload_supported if glu else preload_supported)(weight), weight.shape
    cfg = {**PRELOAD_CONFIG, **GLU_PRELOAD_CONFIG} if glu else PRELOAD_CONFIG
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    total, extra = None, {}
    if norm is not None:
        residual, gamma, eps = norm
        total = torch.empty_like(x)
        extra = dict(NORM=True, res_ptr=residual.contiguous(), gamma_ptr=gamma, sum_ptr=total, eps=eps)
    w = weight.unsqueeze(0)
    with launch_on(x.device):
        _preload_pair_kernel[(1, triton.cdiv(N, cfg["block_n"]))](
            x.contiguous(), _zero_ids(x.device), w, out, N, K, w.stride(0), w.stride(1), GROUP=1,
            BLOCK_N=cfg["block_n"], BLOCK_K=triton.next_power_of_2(K), num_warps=cfg["num_warps"],
            GLU=glu, **extra, **pdl_launch(x.device),
        )  # fmt: skip
    return out, total


_ROW_IDS: dict[tuple[torch.device, int], torch.Tensor] = {}


def rows_matmul(x: torch.Tensor, weight: torch.Tensor, **config) -> torch.Tensor:
    """x [R, K] @ weight [N, K]^T -> [R, N] for a few rows (R <= 16, e.g. a verify step's
    tokens): `dedup_matmul` with every row on "expert" 0, so one program per block of features
    multiplies all R rows (a tensor-core product, the weights read once); the other R - 1
    programs of the grid return at once."""
    key = (x.device, x.shape[0])
    ids = _ROW_IDS.get(key)
    if ids is None:
        ids = _ROW_IDS[key] = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return dedup_matmul(x, weight.unsqueeze(0), ids, **config)


if AVAILABLE:

    @triton.jit
    def _dedup_kernel(
        x_ptr,  # [n / GROUP, K]: pair p reads row p // GROUP
        ids_ptr,  # [P] expert of each pair (< 0: none; the output row is zeros)
        w_ptr,  # [E, N (x 2 with GLU: gate rows, then up rows), K], K contiguous
        out_ptr,  # [P, N]
        P,
        N,
        K,
        stride_we,
        stride_wn,
        GROUP: tl.constexpr,
        GLU: tl.constexpr,
        PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32), else "tf32" (unused by 16-bit dots)
        P_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        PREFETCH_STEP: tl.constexpr = 64,  # elements per 128-byte line
        PREFETCH_LINES: tl.constexpr = 0,  # > 0: the block's weights into L2 first (`PREFETCH`)
        PRELOAD: tl.constexpr = False,  # (not GLU; BLOCK_K >= K) whole rows loaded before the wait
    ):
        p = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dtype = out_ptr.dtype.element_ty
        rp = tl.arange(0, P_PAD)
        # PRELOAD (`DEDUP_DOWN_PRELOAD`): ids final before the kernel ahead started, as for
        # `PREFETCH`; the program that will compute its expert's pairs loads its block of weights
        # into registers first, used after the wait if its expert is still the same. Else unused.
        e0 = tl.full([], -1, tl.int64)
        w_pre = tl.zeros((BLOCK_N, BLOCK_K), w_ptr.dtype.element_ty)
        if PRELOAD:
            ids0 = tl.load(ids_ptr + rp, mask=rp < P, other=-2)
            e0 = tl.load(ids_ptr + p).to(tl.int64)
            if (e0 >= 0) & (tl.min(tl.where(ids0 == e0, rp, P_PAD), 0) == p):
                rk = tl.arange(0, BLOCK_K)
                rows = rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
                w_ok = n_ok[:, None] & (rk < K)[None, :]
                w_pre = tl.load(w_ptr + e0 * stride_we + rows, mask=w_ok, other=0.0)
            else:
                e0 = tl.full([], -1, tl.int64)
        if PREFETCH_LINES > 0:  # ids written before the kernel ahead of this one (`PREFETCH`)
            all_ids = tl.load(ids_ptr + rp, mask=rp < P, other=-2)
            e = tl.load(ids_ptr + p)
            if (e >= 0) & (tl.min(tl.where(all_ids == e, rp, P_PAD), 0) == p):  # computes e's pairs
                _prefetch_expert(w_ptr, e, stride_we, rn, N, stride_wn, K, GLU, PREFETCH_STEP, PREFETCH_LINES)
        _grid_dependency(PDL)
        all_ids = tl.load(ids_ptr + rp, mask=rp < P, other=-2)
        e = tl.load(ids_ptr + p)
        match = all_ids == e
        first = tl.min(tl.where(match, rp, P_PAD), 0)
        if e < 0:
            tl.store(out_ptr + p.to(tl.int64) * N + rn, tl.zeros((BLOCK_N,), dtype=dtype), mask=n_ok)
        elif first == p:  # the expert's first pair computes all its pairs; the others return
            rank = tl.cumsum(match.to(tl.int32), 0) - 1  # of each pair among the expert's pairs
            count = tl.sum(match.to(tl.int32), 0)
            w = w_ptr + e.to(tl.int64) * stride_we + rn[:, None].to(tl.int64) * stride_wn
            for m0 in range(0, count, BLOCK_M):
                rm = m0 + tl.arange(0, BLOCK_M)
                sel = match[None, :] & (rank[None, :] == rm[:, None])
                pair = tl.sum(tl.where(sel, rp[None, :], 0), 1)  # the pair of each row
                r_ok = rm < count
                x_rows = x_ptr + (pair // GROUP).to(tl.int64)[:, None] * K
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = kk < K
                    xk = tl.load(x_rows + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    ok = n_ok[:, None] & k_ok[None, :]
                    if PRELOAD:  # (one block of K)
                        if e == e0:  # noqa: SIM108 (a runtime branch)
                            wg = tl.trans(w_pre)
                        else:
                            wg = tl.trans(tl.load(w + kk[None, :], mask=ok, other=0.0))
                    else:
                        wg = tl.trans(tl.load(w + kk[None, :], mask=ok, other=0.0))
                    acc += tl.dot(xk, wg, input_precision=PRECISION)
                    if GLU:
                        wu = tl.trans(tl.load(w + N * stride_wn + kk[None, :], mask=ok, other=0.0))
                        up += tl.dot(xk, wu, input_precision=PRECISION)
                if GLU:
                    acc = _silu_mul(acc, up, dtype)
                dst = out_ptr + pair.to(tl.int64)[:, None] * N + rn[None, :]
                tl.store(dst, acc.to(dtype), mask=r_ok[:, None] & n_ok[None, :])


# Steps of several tokens route several pairs to one expert (a sequence's draft tokens often
# share experts): `dedup_matmul` reads each distinct expert's weights once per step, as the
# sorted kernel does, but without the sort, gather and scatter. H100, Qwen3-30B-A3B experts:
# equal to the per-pair kernel at distinct experts, 1.25x faster at T = 4 and 1.8x at T = 8 with
# overlapping routing (benchmarks/RESULTS.md). DEDUP False: the per-pair kernel instead.
DEDUP = True
DEDUP_CONFIG = {"block_n": 32, "block_k": 128, "num_warps": 4}
# One token's pairs (batch-1 decode) by the deduplicating kernel too; off (the default): by the
# per-pair kernel, as no expert repeats (kernels.py ablations "per-pair experts ...", H100,
# 4 layers at B = 1, T = 1: 0.542 and 0.553 ms against 0.557 and 0.563 for dedup; session 8).
DEDUP_ONE_ROW = False
# The down projection's blocks, where they differ (its K is the experts' 768, not 2048: fewer,
# shorter rows; kernels.py (2) sweeps it apart from gate/up). H100 (session 8, kernels.py (2),
# us per layer, gate/up's blocks -> these): T = 4 106.2 -> 106.6 independent routing, 53.0 ->
# 52.3 overlapping; T = 8 169.9 -> 168.3 and 62.3 -> 58.7; T = 2 within 0.5 us.
DEDUP_DOWN_CONFIG: dict[str, int] = {"block_n": 64, "block_k": 64, "num_warps": 4}
# Several tokens' down projection (verify steps, batch 2-8 decode) by the deduplicating kernel with
# whole rows (K = the experts' intermediate size, <= PRELOAD_MAX_K) in one block of this many
# features, each expert's block loaded before waiting for the gate/up kernel (PDL), as
# `PRELOAD_DOWN` does for one token's pairs. 0: off. Opt-in: ~2x slower on an H200 (session 19,
# 4 layers: verify T = 4 at batch 1 1.17-1.29 vs 0.646 ms, batch 8 1.96-2.16 vs 0.897; not
# profiled: whole-K blocks for tensor-core products hold far more registers per program).
DEDUP_DOWN_PRELOAD = 0


def dedup_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    ids: torch.Tensor,
    group: int = 1,
    glu: bool = False,
    prefetch: bool = False,
    preload: bool = False,
    **config,
):
    """As `pair_matmul` (pair p: expert ids[p], row x[p // group]; ids < 0 give zero rows;
    prefetch as there), each distinct expert's weights read once: the grid is still one program
    per (pair, block of features), but the first pair of an expert computes all of its pairs, 16
    rows per tensor-core product, and the others return at once. For few pairs (all ids are
    scanned per program). preload (not glu): whole rows in one block (block_k = K rounded up),
    each computing program's block loaded before waiting for the kernel ahead (ids final before
    that kernel started, as for prefetch); the same sums as without it with those blocks."""
    if preload:  # whole rows in one block, loaded before the wait (`DEDUP_DOWN_PRELOAD`)
        config = {**config, "block_k": triton.next_power_of_2(w.shape[-1])}
    out, N, K, cfg, grid = _pairs_setup(x, w, ids, glu, DEDUP_CONFIG, config)
    P = out.shape[0]
    if P == 0:
        return out
    with launch_on(x.device):
        _dedup_kernel[grid](
            x.contiguous(), ids.contiguous(), w, out, P, N, K, w.stride(0), w.stride(1),
            GROUP=group, GLU=glu, PRECISION=dot_precision(x.dtype), P_PAD=triton.next_power_of_2(P),
            BLOCK_M=16, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
            PRELOAD=preload, **pdl_launch(x.device), **prefetch_args(x, w, prefetch and not preload),
        )  # fmt: skip
    return out


def expert_pairs(
    x: torch.Tensor,
    w: torch.Tensor,
    ids: torch.Tensor,
    group: int = 1,
    glu: bool = False,
    one_row: bool = False,
):
    """The experts' few-pairs kernel: `dedup_matmul`, or `pair_matmul` with DEDUP off (or for
    one token's pairs, one_row, with DEDUP_ONE_ROW off: its experts are distinct). The down
    projection (glu off) runs right after the gate/up one on the same ids: it may prefetch."""
    if not DEDUP or (one_row and not DEDUP_ONE_ROW):
        if PRELOAD_DOWN and not glu and preload_supported(w) and (preload_pays(x.device) or INTERPRETED):
            # (ids routed before gate/up's kernel; interpreted: tests, which have no PDL)
            return preload_matmul(x, w, ids, group=group)
        config = {} if glu else PAIR_DOWN_CONFIG
        return pair_matmul(x, w, ids, group=group, glu=glu, prefetch=PREFETCH and not glu, **config)
    if DEDUP_DOWN_PRELOAD and not glu and preload_supported(w) and (preload_pays(x.device) or INTERPRETED):
        block_n = DEDUP_DOWN_PRELOAD
        return dedup_matmul(x, w, ids, group=group, preload=True, block_n=block_n, num_warps=4)
    config = {} if glu else DEDUP_DOWN_CONFIG
    return dedup_matmul(x, w, ids, group=group, glu=glu, prefetch=PREFETCH and not glu, **config)


# Sorting a step's (token, expert) pairs by key: torch's stable sort of a few hundred int64 keys
# is a segmented radix sort of ~26 us on an H100 (benchmarks/RESULTS.md, session 5: one per MoE
# layer and step, two with expert shards). `stable_sort` ranks each key by comparing it with all
# the others (n^2 compares, one kernel): for the few pairs of decode and verify steps.
STABLE_SORT = True
SORT_MAX = 4096  # above it, torch.sort (prefill)

if AVAILABLE:

    @triton.jit
    def _sort_keys(ids_ptr, table_ptr, j, ok, E_GLOBAL, MAP: tl.constexpr):
        """Keys j: the ids, or (MAP) table[id] with id -1 read at table[E_GLOBAL] (-1: padding)."""
        k = tl.load(ids_ptr + j, mask=ok, other=0)
        if MAP:
            k = tl.load(table_ptr + tl.where(k < 0, E_GLOBAL, k), mask=ok, other=-1)
        return k

    @triton.jit
    def _rank_sort_kernel(
        keys_ptr,  # [n] int64
        table_ptr,  # [E_GLOBAL + 1] int64 (MAP): key = table[keys[i]]
        sorted_ptr,  # [n] out
        order_ptr,  # [n] int64 out
        offs_ptr,  # [E_LOCAL + 1] int32 out (OFFSETS): keys below e, for e = 0 .. E_LOCAL
        counts_ptr,  # [1 + E_LOCAL] int64 (COUNT): counts[1 + e] += keys equal to e
        n,
        E_GLOBAL,
        E_LOCAL,
        MAP: tl.constexpr,
        OFFSETS: tl.constexpr,
        COUNT: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_E: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
    ):
        """pos[i] = #{j: key[j] < key[i]} + #{j < i: key[j] == key[i]} (stable); then
        sorted[pos[i]] = key[i] and order[pos[i]] = i. With OFFSETS, the programs after the
        keys' ones each write the offsets of BLOCK_E of the keys 0 .. E_LOCAL (and their counts),
        comparing every key with each of them: beside the ranking, not after it."""
        _grid_dependency(PDL)
        pid = tl.program_id(0)
        key_blocks = tl.cdiv(n, BLOCK_I)
        if pid < key_blocks:
            i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
            i_ok = i < n
            ki = _sort_keys(keys_ptr, table_ptr, i, i_ok, E_GLOBAL, MAP)
            pos = tl.zeros([BLOCK_I], dtype=tl.int32)
            for j0 in range(0, n, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                kj = _sort_keys(keys_ptr, table_ptr, j, j < n, E_GLOBAL, MAP)
                tie = (kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None])
                before = (kj[None, :] < ki[:, None]) | tie
                pos += tl.sum((before & (j[None, :] < n)).to(tl.int32), axis=1)
            tl.store(sorted_ptr + pos, ki, mask=i_ok)
            tl.store(order_ptr + pos, i.to(tl.int64), mask=i_ok)
        elif OFFSETS:
            e = (pid - key_blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
            below = tl.zeros([BLOCK_E], dtype=tl.int32)
            same = tl.zeros([BLOCK_E], dtype=tl.int64)
            for j0 in range(0, n, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                j_ok = j < n
                kj = _sort_keys(keys_ptr, table_ptr, j, j_ok, E_GLOBAL, MAP)
                below += tl.sum(((kj[None, :] < e[:, None]) & j_ok[None, :]).to(tl.int32), axis=1)
                if COUNT:
                    same += tl.sum(((kj[None, :] == e[:, None]) & j_ok[None, :]).to(tl.int64), axis=1)
            tl.store(offs_ptr + e, below, mask=e <= E_LOCAL)
            if COUNT:
                held = e < E_LOCAL
                before = tl.load(counts_ptr + 1 + e, mask=held, other=0)
                tl.store(counts_ptr + 1 + e, before + same, mask=held)


def sortable(ids: torch.Tensor) -> bool:
    """Whether `sort_pairs` (one kernel) sorts these pairs: few of them, on a GPU (or Triton's
    interpreter, for callers that run Triton kernels there: tests)."""
    return STABLE_SORT and AVAILABLE and (ids.is_cuda or INTERPRETED) and 0 < ids.shape[0] <= SORT_MAX


def sort_pairs(
    ids: torch.Tensor, table: torch.Tensor | None, num_local: int, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's pairs sorted by the expert that computes them, in one kernel: ids [n] global
    expert ids (-1: padding), table [E + 1] global -> local id (-1: held elsewhere; its last
    entry, -1, serves id -1) or None (local == global) -> (local ids sorted, stably; order [n]
    int64: sorted position -> pair; offsets [num_local + 1] int32: local expert e's rows are
    offsets[e] .. offsets[e + 1], rows before offsets[0] are skipped). counts [1 + num_local]:
    += pairs per local expert at 1 + e (slot 0 untouched). As torch.sort + searchsorted."""
    n = ids.shape[0]
    ids = ids.contiguous()
    local = torch.empty_like(ids)
    order = torch.empty(n, dtype=torch.long, device=ids.device)
    offsets = torch.empty(num_local + 1, dtype=torch.int32, device=ids.device)
    block_i, block_e = (32 if n <= 256 else 64), 16
    grid = triton.cdiv(n, block_i) + triton.cdiv(num_local + 1, block_e)  # keys' programs, offsets'
    with launch_on(ids.device):
        _rank_sort_kernel[(grid,)](
            ids, table if table is not None else ids, local, order, offsets,
            counts if counts is not None else ids, n, 0 if table is None else table.shape[0] - 1, num_local,
            MAP=table is not None, OFFSETS=True, COUNT=counts is not None,
            BLOCK_I=block_i, BLOCK_J=128, BLOCK_E=block_e, **pdl_launch(ids.device),
        )  # fmt: skip
    return local, order, offsets


def stable_sort(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.sort(keys, stable=True)` of a 1-D integer tensor -> (sorted keys, int64 order): one
    Triton kernel (`rank_sort`) where the keys are few and on a GPU (STABLE_SORT), else torch's."""
    n = keys.shape[0]
    if STABLE_SORT and AVAILABLE and keys.is_cuda and 0 < n <= SORT_MAX:
        return rank_sort(keys)
    return torch.sort(keys, stable=True)


def rank_sort(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorting kernel of `stable_sort` (1-D integer keys, n > 0)."""
    n = keys.shape[0]
    keys = keys.contiguous()
    out = torch.empty_like(keys)
    order = torch.empty(n, dtype=torch.long, device=keys.device)
    block_i = 32 if n <= 256 else 64
    with launch_on(keys.device):
        _rank_sort_kernel[(triton.cdiv(n, block_i),)](
            keys, keys, out, order, keys, keys, n, 0, 0, MAP=False, OFFSETS=False, COUNT=False,
            BLOCK_I=block_i, BLOCK_J=128, BLOCK_E=64, **pdl_launch(keys.device),
        )  # fmt: skip
    return out, order
