"""Fused elementwise pieces of the decoder for GPUs.

At decode a layer's time goes to kernel count, not math: a float32 RMSNorm is eight small
kernels, rope five, the MoE combine three, and each costs ~2 us even inside a CUDA graph
(benchmarks/RESULTS.md). `fused(fn)` runs `fn` compiled by `torch.compile` (one Triton kernel
for the whole function, shapes dynamic so one compilation serves every batch bucket) when its
first argument is a CUDA tensor *and* the call is inside `active()`, which the static steps of
`engine/graph.py` enter while they warm up and capture a graph; everywhere else (eager prefill
steps, CPUs) it is plain eager torch: a compiled call's guards cost more host time per call than
the kernels it saves, which only a graph replay, running no Python, gets back. The compiled and
eager versions compute the same expression; if compilation fails (no Triton, an unsupported
torch), the function stays eager and a warning says so once.

`linear` is F.linear except inside `active()` on a GPU with one row (batch-1 decode), where a
matrix-vector Triton kernel streams the weight instead of cuBLAS's split-K GEMM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from specmoe_ray.moe import triton_experts

log = logging.getLogger(__name__)

ENABLED = True  # module switch (tests compare fused against eager)
# One-row projections inside static steps by `triton_experts.matvec` (see `linear`): since
# session 18 its kernel loads the weights before waiting for the kernel ahead (`MATVEC_KERNEL`
# "preload"), and beats cuBLAS in the step (H200, 48 layers at batch 1, with the experts' down
# projection preloaded too: 1.061x). Sessions 6-8: off, the per-pair kernel lost to cuBLAS.
MATVEC = True
# K/V written into the cache by the compiled q/k norm + rope (`qk_rope_write`) instead of an
# index_put kernel of its own (same ablation: 0.534 against 0.543 ms at batch 1; no change at
# batch 32).
FUSED_CACHE_WRITE = True
# Batch-1 static steps: each residual add + RMS norm inside the one-row projection after it
# (`triton_kernels.add_norm_matvec`; `DecoderLayer`). Opt-in until measured.
FUSED_NORM_MATVEC = False
# Opt-in: batch-1 static steps on GPUs with PDL run the residual add + RMS norm before q/k/v
# ("qkv") and before a dense MLP's gate/up ("gate_up") inside that projection's preloading
# kernel (`triton_experts.norm_matvec`: weights loaded before the wait, then each program norms
# the row itself), where the input is a plain tensor (a draft model's layers; not an MoE block's
# deferred output): two launches per dense layer fewer. Session 23, H200, the 0.6B-shaped
# draft's proposals: 0.98-1.01x (within the ~3% spread of repeated rounds): a launch fewer
# saves ~1 us, the norm after the wait costs about that (RESULTS.md).
NORM_PRELOAD: tuple[str, ...] = ()
# Batch-1 static steps: o_proj after the attention kernel by the matrix-vector kernel, which
# (with `triton_experts.PREFETCH`) asks L2 for its weights while the attention's few programs
# run, before waiting for their output (PDL). Opt-in: slower than cuBLAS in the step on an H100,
# with the prefetch or without (kernels.py ablations, RESULTS.md session 7).
MATVEC_O_PROJ = False
# Dense MLPs' (a draft model's layers, shared experts) gate and up projections of one row
# inside static steps by the experts' GLU kernel (`glu_linear`): one launch instead of a
# projection and `silu_mul` (two before `MLP.fuse_projections`, four with the separate silu and
# product). Off: the fused projection by `linear`, then the compiled `silu_mul`.
GLU_MATVEC = True
# A draft model's static steps (`spec.proposer.DraftModelProposer`, `preload_rows`): its
# projections of 2 .. this many rows (a few sequences' drafting steps) by
# `triton_experts.preload_rows` rather than cuBLAS. Session 23, H200, the 0.6B-shaped draft's
# proposals of k = 3: 1.34x at batch 2, 1.10x at 3 and 4, but 0.79x at 8 rows; the 30B target's
# steps gain nothing (2 rows: 1.01x) or lose (4 rows: 0.95x), so its `PRELOAD_ROWS` stays 1.
DRAFT_PRELOAD_ROWS = 4
# Opt-in, for the ablation: one-row projections inside static steps by cuBLAS on a column-major
# copy of the weight, kept beside it (twice the projections' memory), which cuBLAS serves with
# other kernels than the row-major split-K GEMM (o_proj: ~10 us for ~5.5 us of bytes on an
# H100). If it wins, the layout becomes the loader's, without the copy.
COLUMN_MAJOR = False
_COLUMN_MAJOR = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise
# Projections of 2 .. this many rows (verify steps) inside static steps by `triton_experts.
# rows_matmul` instead of cuBLAS; 1 = off. Opt-in until measured (kernels.py ablations).
MATMUL_ROWS = 1
# Static steps: an MoE block's output stays uncombined (`Pending`: expert rows and gate weights)
# until the next layer's residual add + norm, which combines, adds and norms in one compiled
# kernel (`combine_add_rms_norm`) instead of two (kernels.py ablation; RESULTS.md session 7).
DEFER_COMBINE = True
# The compiled pieces (add + norm, combine, ...) launched with programmatic dependent launch
# where this torch's inductor offers it (`triton.enable_pdl`), as our Triton kernels are
# (`triton_experts.PDL`): each may launch while the kernel ahead finishes, then waits for its
# output. Each setting has its own compilation, so a process can switch between them. Alone it
# gained nothing (session 13: 1.002x at batch 1, 1.005x at 32); with the preloading one-row
# projections (q/k/v after the compiled add + norm) 1.084x against their 1.061x (H200, 48 layers
# at batch 1, session 18): on.
INDUCTOR_PDL = True
RECOMPILE_LIMIT = 64
_state = threading.local()


@contextlib.contextmanager
def active():
    """Within this block, fused functions on CUDA tensors run compiled."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


@contextlib.contextmanager
def preload_rows(limit: int):
    """Within this block (this thread), static steps' projections of 2 .. limit rows run
    `triton_experts.preload_rows` (as `triton_experts.PRELOAD_ROWS` = limit would ask): a
    draft model's steps (`DRAFT_PRELOAD_ROWS`). Captured graphs keep the kernels chosen here."""
    saved = getattr(_state, "preload_rows", None)
    _state.preload_rows = limit
    try:
        yield
    finally:
        _state.preload_rows = saved


def preload_rows_limit() -> int:
    """Projections of up to this many rows preload (`preload_rows`, else `PRELOAD_ROWS`)."""
    limit = getattr(_state, "preload_rows", None)
    return triton_experts.PRELOAD_ROWS if limit is None else limit


def is_active() -> bool:
    """Whether the caller runs inside `active()` (a static step) with fusion enabled."""
    return ENABLED and getattr(_state, "depth", 0) > 0


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, matvec: bool = False
) -> torch.Tensor:
    """F.linear; inside static steps on GPUs a single row (batch-1 decode) runs
    `triton_experts.matvec` instead of cuBLAS with `MATVEC` (its kernel `MATVEC_KERNEL`, by
    default the one that loads the weights before waiting for the kernel ahead), or where the
    caller asks (matvec: `MATVEC_O_PROJ`); a few rows `preload_rows` (`PRELOAD_ROWS`) or
    `rows_matmul` (`MATMUL_ROWS`), both opt-in."""
    if (
        bias is None
        and x.dim() == 2
        and x.is_cuda
        and is_active()
        and triton_experts.AVAILABLE
        and weight.stride(1) == 1
    ):
        if COLUMN_MAJOR and x.shape[0] == 1 and not matvec:
            return torch.nn.functional.linear(x, column_major(weight))
        # The preloading kernel gains by PDL only (Hopper and later) and holds rows of at most
        # PRELOAD_MAX_K: elsewhere cuBLAS, unless the caller asks (matvec).
        preload = triton_experts.MATVEC_KERNEL == "preload"
        fits = triton_experts.preload_supported(weight) and triton_experts.preload_pays(x.device)
        ours = MATVEC and (not preload or fits)
        if (ours or matvec) and x.shape[0] == 1:
            return triton_experts.matvec(x, weight)
        if ours and preload and 1 < x.shape[0] <= preload_rows_limit():
            return triton_experts.preload_rows(x, weight)
        if 1 < x.shape[0] <= MATMUL_ROWS:
            return triton_experts.rows_matmul(x, weight)
    return torch.nn.functional.linear(x, weight, bias)


def glu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for weight = [gate; up] ([2I, K]) -> [n, I]: inside static
    steps on GPUs one row by `triton_experts.glu_matvec` (`GLU_MATVEC`), else `linear` and
    `silu_mul` (compiled inside static steps)."""
    if (
        GLU_MATVEC
        and x.dim() == 2
        and x.shape[0] == 1
        and x.is_cuda
        and is_active()
        and triton_experts.AVAILABLE
        and weight.stride(1) == 1
    ):
        return triton_experts.glu_matvec(x, weight)
    return silu_mul(linear(x, weight))


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """weight's values in column-major order (`COLUMN_MAJOR`), made once per weight."""
    w = _COLUMN_MAJOR.get(weight)
    if w is None:
        w = _COLUMN_MAJOR[weight] = weight.t().contiguous().t()
    return w


def inductor_pdl() -> bool:
    """Whether compiled pieces launch with PDL now: `INDUCTOR_PDL` and an inductor that has it."""
    if not INDUCTOR_PDL:
        return False
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.triton, "enable_pdl")


def fused(fn: Callable) -> Callable:
    compiled: dict[bool, Callable | None] = {}  # by `inductor_pdl()`

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        if not (ENABLED and x.is_cuda and getattr(_state, "depth", 0)):
            return fn(x, *args)
        pdl = inductor_pdl()
        if pdl not in compiled:
            # Sizes 0 and 1 always specialise, and each dtype and width (hidden, head_dim) is its
            # own graph: a handful of compilations per function, more than dynamo's default 8
            # in a process that runs several models (e.g. a bf16 target and an fp32 test model).
            cfg = torch._dynamo.config
            for name, limit in (("recompile_limit", RECOMPILE_LIMIT), ("accumulated_recompile_limit", 256)):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), limit))
            options = {"triton.enable_pdl": True} if pdl else None
            try:
                compiled[pdl] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
            except Exception as e:  # pragma: no cover - depends on the installed torch
                log.warning("torch.compile unavailable for %s (%s): running it eagerly", fn.__name__, e)
                compiled[pdl] = None
        run = compiled[pdl]
        if run is None:
            return fn(x, *args)
        try:
            return run(x, *args)
        except Exception as e:  # pragma: no cover - compilation errors surface at the first call
            log.warning("compiling %s failed (%s): running it eagerly", fn.__name__, e)
            compiled[pdl] = None
            return fn(x, *args)

    return wrapper


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@fused
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next norm in one: -> (rms_norm(x + residual), x + residual)."""
    x = x + residual
    return rms_norm.__wrapped__(x, weight, eps), x


@fused
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, hd]; cos, sin: [N, 1, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@fused
def qk_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
):
    """Per-head q/k norms (when given), rope on q and k, and K and V stacked for the cache:
    q [N, H, hd], k and v [N, Hkv, hd] -> q, kv [N, 2, Hkv, hd]."""
    if q_weight is not None:
        q, k = rms_norm.__wrapped__(q, q_weight, eps), rms_norm.__wrapped__(k, k_weight, eps)
    q, k = apply_rope.__wrapped__(q, cos, sin), apply_rope.__wrapped__(k, cos, sin)
    return q, torch.stack((k, v), dim=1)


@fused
def qk_rope_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """`qk_rope`, and the stacked K/V written into one layer's cache [slots, 2, Hkv, L, hd] at
    (slot, position) per token, in place, by the same compiled kernels -> q."""
    q, kv = qk_rope.__wrapped__(q, k, v, cos, sin, q_weight, k_weight, eps)
    cache[slots, :, :, positions] = kv
    return q


@fused
def combine(y: torch.Tensor, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Experts' outputs [T, A, D] weighted by the gate [T, A], summed -> [T, D] in like's dtype."""
    return (y * weights[..., None]).to(like.dtype).sum(1)


class Pending(NamedTuple):
    """An MoE block's output, not combined yet (`DEFER_COMBINE`): y [T, A, D] expert outputs,
    weights [T, A], like: a tensor of the output's dtype. weights None: y is the combined
    output's float32 sum [T, D] (trunk replicas' all_reduce), rounded to like's dtype there.
    peer: (a `moe.peer_sum.PeerSum`, slot, the sum's position in the forward): y is only this
    rank's share, in its shared slot; the ranks' shares are summed where the output is used
    (once: that takes the peers' signals)."""

    y: torch.Tensor
    weights: torch.Tensor | None
    like: torch.Tensor
    peer: Any = None

    def combined(self) -> torch.Tensor:
        if self.peer is not None:
            peer_sum, slot, position = self.peer
            return peer_sum.sum(slot, self.like, position)
        if self.weights is None:
            return self.y.to(self.like.dtype)
        return combine(self.y, self.weights, self.like)


def materialize(x):
    """x, or a `Pending` output combined."""
    return x.combined() if isinstance(x, Pending) else x


@fused
def combine_add_rms_norm(
    y: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
):
    """`add_rms_norm(combine(y, weights, residual), residual, weight, eps)` as one kernel: the
    combine unrolled over the experts (pointwise, so the norm's kernel computes it), products
    rounded to the output's dtype and summed in float32 as `combine`."""
    total = (y[:, 0] * weights[:, 0, None]).to(residual.dtype).float()
    for a in range(1, y.shape[1]):
        total = total + (y[:, a] * weights[:, a, None]).to(residual.dtype).float()
    return add_rms_norm.__wrapped__(total.to(residual.dtype), residual, weight, eps)


@fused
def sum_add_rms_norm(total: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """`add_rms_norm(total.to(residual.dtype), residual, weight, eps)` as one kernel: a float32
    combined output (`Pending` without weights) rounded, added and normed."""
    return add_rms_norm.__wrapped__(total.to(residual.dtype), residual, weight, eps)


@fused
def combine_rows(rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, like: torch.Tensor):
    """`combine` of y = rows[index] viewed [T, A, D] (an exchange's results, gathered back to
    pair order by the same kernel that weighs and sums them) -> [T, D]."""
    T, A = weights.shape
    return combine.__wrapped__(rows[index].view(T, A, rows.shape[-1]), weights, like)


@fused
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2I] (gate first) -> silu(gate) * up, [n, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@fused
def softmax_topk(logits: torch.Tensor, top_k: int, renorm: bool, like: torch.Tensor, cast: bool):
    """Softmax routing in float32: -> top-k weights (renormalised over the k if asked; in like's
    dtype if cast) and expert ids."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights.to(like.dtype) if cast else weights), expert_ids
