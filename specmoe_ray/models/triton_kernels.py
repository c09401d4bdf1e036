"""Triton kernels for the static (CUDA-graph) steps: decode attention and softmax routing.

Both replace several small library kernels that, at decode sizes, cost far more than their
bytes (benchmarks/RESULTS.md, kernel table of a batch-1 step): SDPA over a gathered copy of the
cache (a gather plus a ~11 us attention kernel for 512 KB of keys) and top-k routing (softmax,
a radix top-k and a bitonic sort, ~10 us for 128 numbers per token).

- `decode_attention`: queries of a padded batch (B sequences x Tq tokens) attend to their
  sequence's keys read straight from the cache (`KVCache.kv[layer]`, by slot: no gathered
  copy), causal by position, optionally within a sliding window. One program per (sequence,
  KV head) holds the G query heads of that KV head for all Tq tokens (grouped-query attention
  without expanding K/V); long caches split the keys over several programs (flash-decoding)
  and a second kernel merges them (or, `SPLIT_MERGE_LAST`, each head's last program). Online
  softmax in float32. With `new` (`ROPE_IN_ATTENTION`, static steps) it also applies the
  per-head q/k norms and rope and writes the step's K/V into the cache first, replacing the
  compiled norm + rope + cache-write kernels before it.
- `softmax_topk`: one program per token: float32 softmax over the experts, then k rounds of
  arg-max, weights renormalised over the k if asked. `router_topk` (`ROUTER_TOPK`, steps of
  <= 4 tokens): the router's logits too (and the add + norm before, `ROUTER_TOPK_NORM`):
  programs of 2 experts each, the last to finish routes every token.

Used only on CUDA inside static steps (`fused.active()`), where CPU tests check the same
static batches against SDPA and torch.topk; `tests/gpu` checks the kernels against them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from specmoe_ray.moe.triton_experts import INTERPRETED, dot_precision, launch_on, pdl_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton
    triton = None

AVAILABLE = triton is not None
if AVAILABLE:
    from specmoe_ray.moe.triton_experts import _grid_dependency
# Switches for benchmarks/kernels.py's ablations (each kernel off = the library path it replaces).
ATTENTION = ROUTING = True
COUNT_IN_ROUTING = True  # the routing kernel counts the expert load (else the backend's scatter)
# The attention kernel reads each program's first block of past keys and values before waiting
# for the kernel ahead (PDL), as the projections preload their weights (session 18). Opt-in: no
# gain on an H200 (session 19, 4 layers: batch 1 0.424 vs 0.425 ms, verify T = 4 0.655 vs 0.646).
ATTENTION_PRELOAD = False
# Keys per program at least before a cache is split over several programs (+ one merge kernel):
# fewer keys per program, more programs at small batches (with SPLIT_MERGE_LAST: measured,
# RESULTS.md session 7).
SPLIT_KEYS = 64
# ... up to this many programs in all (sequences x KV heads x splits; 128: no split at B x Hkv
# >= 128, e.g. batch 32 with 4 KV heads).
ATTENTION_PROGRAMS = 128
# Static steps: the attention kernel also applies the q/k norms and rope and writes the step's
# K/V into the cache (`NewKeys`), instead of a compiled norm + rope + cache-write function of
# 2-3 kernels before it (kernels.py ablation; RESULTS.md session 7).
ROPE_IN_ATTENTION = True
# Static steps of <= ROUTER_TOPK_MAX_TOKENS tokens: the router's logits and their softmax +
# top-k in one kernel (`router_topk`: its last program to finish routes), instead of cuBLAS
# plus the routing kernel (kernels.py ablation; RESULTS.md session 7).
ROUTER_TOPK = True
# Attention split over several programs per head (long caches, SPLIT_KEYS): the head's last
# program to finish merges the parts (a counter per head, `decode_attention(counters=)`)
# instead of a merge kernel after it.
SPLIT_MERGE_LAST = True
ROUTER_TOPK_MAX_TOKENS = 4
# With ROUTER_TOPK: the residual add + RMS norm before an MoE block inside that kernel too (each
# program norms the few rows itself; `DecoderLayer`).
ROUTER_TOPK_NORM = True
# `router_topk` with at least this many rows (ROUTER_TOPK_MAX_TOKENS raised to serve them)
# multiplies by tensor cores (tl.dot, 16 experts per program); fewer: products on CUDA cores.
ROUTER_TOPK_DOT_ROWS = 16
# `router_topk` reads whole rows at once up to this many products per program (BLOCK_T x
# BLOCK_R x BLOCK_D; 0: always 512 columns at a time, session 6's kernel).
ROUTER_TOPK_ONE_PASS = 16384
# `router_topk` reading whole rows (ONE_PASS: one token's router at batch 1) loads its router
# rows and the norm's weight before waiting for the kernel ahead (PDL), as the one-row
# projections do (`triton_experts.MATVEC_KERNEL` "preload"): H200, 48 layers at batch 1, 1.022x
# and 1.017x (2.80 -> 2.75 ms per step; RESULTS.md, session 18).
ROUTER_TOPK_PRELOAD = True
# The routing kernels pick each of the k experts by one reduction over packed (value, expert)
# keys instead of two (maximum, then its lowest expert). Opt-in until measured (kernels.py).
TOPK_PACKED = False

if AVAILABLE:

    @triton.jit
    def _norm_rope(rows, ok, w_ptr, cos_rows, sin_rows, eps, like_ptr, HD: tl.constexpr, NORM: tl.constexpr):
        """Rows [M] of HD (pointers to each row's start) -> float32 [M, HD]: the per-head RMS
        norm (NORM; rounded to the model's dtype as `fused.rms_norm`), then rope by rotating
        halves (`fused.apply_rope`) with each row's cos and sin."""
        rd = tl.arange(0, HD)
        partner = (rd + HD // 2) % HD
        dt = like_ptr.dtype.element_ty
        x = tl.load(rows[:, None] + rd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        xp = tl.load(rows[:, None] + partner[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        if NORM:
            r = tl.rsqrt(tl.sum(x * x, 1) / HD + eps)[:, None]
            x = (x * r).to(dt).to(tl.float32) * tl.load(w_ptr + rd).to(tl.float32)[None, :]
            xp = (xp * r).to(dt).to(tl.float32) * tl.load(w_ptr + partner).to(tl.float32)[None, :]
            x, xp = x.to(dt).to(tl.float32), xp.to(dt).to(tl.float32)
        cos = tl.load(cos_rows[:, None] + rd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        sin = tl.load(sin_rows[:, None] + rd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        return x * cos + tl.where(rd[None, :] < HD // 2, -xp, xp) * sin

    @triton.jit
    def _attention_kernel(
        q_ptr,  # [B * Tq, H, HD] (ROPE: before the norm and rope)
        kv_ptr,  # [slots, 2, Hkv, Lmax, HD]
        slots_ptr,  # [B]
        qpos_ptr,  # [B, Tq]
        out_ptr,  # [B * Tq, H, HD] (SPLITS == 1)
        part_ptr,  # [B, Hkv, SPLITS, BLOCK_M, HD] float32 (SPLITS > 1)
        ml_ptr,  # [B, Hkv, SPLITS, 2, BLOCK_M] float32: running max, sum
        k_ptr,  # ROPE: the step's keys [B * Tq, Hkv, HD] before norm and rope, and values (same strides)
        v_ptr,
        qw_ptr,  # ROPE and NORM: the q and k norms' weights [HD]
        kw_ptr,
        cos_ptr,  # ROPE: [B * Tq, HD] each
        sin_ptr,
        wslots_ptr,  # ROPE: [B * Tq] each token's cache slot and position to write
        wpos_ptr,
        counters_ptr,  # MERGE_LAST: [B * Hkv] int32 programs of each (sequence, KV head) done; 0 after
        stride_qn,
        stride_qh,
        stride_s,
        stride_c,
        stride_h,
        stride_l,
        stride_kn,
        stride_kh,
        stride_cn,
        Tq,
        G,
        window,
        scale,
        chunk,
        eps,
        HD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SPLITS: tl.constexpr,
        WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32), else "tf32" (unused by 16-bit dots)
        ROPE: tl.constexpr = False,
        NORM: tl.constexpr = False,
        BLOCK_T: tl.constexpr = 1,  # ROPE: >= Tq
        MERGE_LAST: tl.constexpr = False,  # SPLITS > 1: the last program of a head merges
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        PRELOAD: tl.constexpr = False,  # the first block of past keys/values before the wait
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        z = tl.program_id(2)
        rd = tl.arange(0, HD)
        # PRELOAD (`ATTENTION_PRELOAD`): this program's first block of keys and values, read
        # before waiting for the kernel ahead: the step's positions and slots came from the host
        # before the step, and the cache rows before the step's first new position were written
        # by earlier steps. A block that reaches the new rows (written by this kernel or the one
        # ahead) is read again below. Else unused zeros (the loop must see the names).
        k_pre = tl.zeros((BLOCK_L, HD), kv_ptr.dtype.element_ty)
        v_pre = tl.zeros((BLOCK_L, HD), kv_ptr.dtype.element_ty)
        first_new = tl.full([], 0, tl.int64)
        if PRELOAD:
            first_new = tl.load(qpos_ptr + b * Tq)
            kp0 = z * chunk + tl.arange(0, BLOCK_L)
            hi0 = tl.minimum(tl.load(qpos_ptr + b * Tq + Tq - 1) + 1, z * chunk + chunk)
            base0 = kv_ptr + tl.load(slots_ptr + b).to(tl.int64) * stride_s + kvh * stride_h
            offs0 = kp0[:, None] * stride_l + rd[None, :]
            k_pre = tl.load(base0 + offs0, mask=(kp0 < hi0)[:, None], other=0.0)
            v_pre = tl.load(base0 + stride_c + offs0, mask=(kp0 < hi0)[:, None], other=0.0)
        _grid_dependency(PDL)
        H = tl.num_programs(1) * G
        rm = tl.arange(0, BLOCK_M)  # row = g * Tq + t
        row_ok = rm < G * Tq
        g, t = rm // Tq, rm % Tq
        n = b * Tq + t
        hq = kvh * G + g
        # The step's positions and slot first: their loads overlap the rope's below.
        qpos = tl.load(qpos_ptr + b * Tq + t, mask=row_ok, other=-1)
        end = tl.load(qpos_ptr + b * Tq + Tq - 1) + 1  # positions ascend within a sequence
        slot = tl.load(slots_ptr + b).to(tl.int64)
        if ROPE:
            # This sequence's new keys for this KV head: normed, roped, written into the cache
            # with their values (every program of the head writes the same rows), then a
            # barrier: the reads below see them. Then the queries, normed and roped.
            tt = tl.arange(0, BLOCK_T)
            t_ok = tt < Tq
            nt = b * Tq + tt
            k_rows = k_ptr + nt * stride_kn + kvh * stride_kh
            c_rows = nt * stride_cn
            k_new = _norm_rope(
                k_rows, t_ok, kw_ptr, cos_ptr + c_rows, sin_ptr + c_rows, eps, kv_ptr, HD, NORM
            )
            w_slot = tl.load(wslots_ptr + nt, mask=t_ok, other=0).to(tl.int64)
            w_pos = tl.load(wpos_ptr + nt, mask=t_ok, other=0).to(tl.int64)
            dst = (
                kv_ptr + w_slot[:, None] * stride_s + kvh * stride_h + w_pos[:, None] * stride_l + rd[None, :]
            )
            tl.store(dst, k_new.to(kv_ptr.dtype.element_ty), mask=t_ok[:, None])
            v_new = tl.load(
                v_ptr + (nt * stride_kn + kvh * stride_kh)[:, None] + rd[None, :], mask=t_ok[:, None]
            )
            tl.store(dst + stride_c, v_new, mask=t_ok[:, None])
            tl.debug_barrier()
            q_rows = q_ptr + n * stride_qn + hq * stride_qh
            c_rows = n * stride_cn
            q = _norm_rope(q_rows, row_ok, qw_ptr, cos_ptr + c_rows, sin_ptr + c_rows, eps, kv_ptr, HD, NORM)
            q = q.to(kv_ptr.dtype.element_ty)
        else:
            q_rows = q_ptr + n[:, None] * stride_qn + hq[:, None] * stride_qh
            q = tl.load(q_rows + rd[None, :], mask=row_ok[:, None], other=0.0)
        k_base = kv_ptr + slot * stride_s + kvh * stride_h
        lo = z * chunk
        hi = tl.minimum(end, lo + chunk)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HD), tl.float32)
        for start in range(lo, hi, BLOCK_L):
            kp = start + tl.arange(0, BLOCK_L)
            k_ok = kp < hi
            offs = kp[:, None] * stride_l + rd[None, :]
            preloaded = False
            if PRELOAD:
                preloaded = (start == lo) & (start + BLOCK_L <= first_new)
            if preloaded:  # noqa: SIM108 (a runtime branch)
                k = k_pre
            else:
                k = tl.load(k_base + offs, mask=k_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            ok = k_ok[None, :] & (kp[None, :] <= qpos[:, None])
            if WINDOW:
                ok = ok & (kp[None, :] > qpos[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if preloaded:  # noqa: SIM108 (a runtime branch)
                v = v_pre
            else:
                v = tl.load(k_base + stride_c + offs, mask=k_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if SPLITS == 1:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            dst = out_ptr + n[:, None] * (H * HD) + hq[:, None] * HD + rd[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            base = (b * tl.num_programs(1) + kvh) * SPLITS + z
            tl.store(part_ptr + (base * BLOCK_M + rm[:, None]) * HD + rd[None, :], acc)
            tl.store(ml_ptr + (base * 2) * BLOCK_M + rm, m_i)
            tl.store(ml_ptr + (base * 2 + 1) * BLOCK_M + rm, l_i)
            if MERGE_LAST:  # no merge kernel: the head's last program to finish merges
                tl.debug_barrier()  # every thread's part stored before the counter says so
                head = b * tl.num_programs(1) + kvh
                if tl.atomic_add(counters_ptr + head, 1, sem="acq_rel") == SPLITS - 1:
                    _merge_parts(
                        part_ptr, ml_ptr, out_ptr, b, kvh, tl.num_programs(1), Tq, G, HD, BLOCK_M, SPLITS
                    )
                    tl.store(counters_ptr + head, 0)  # ready for the next launch (graph replays)

    @triton.jit
    def _merge_parts(
        part_ptr,
        ml_ptr,
        out_ptr,
        b,
        kvh,
        Hkv,
        Tq,
        G,
        HD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        """One (sequence, KV head)'s SPLITS partial softmax sums -> its rows of out."""
        H = Hkv * G
        rm = tl.arange(0, BLOCK_M)
        rd = tl.arange(0, HD)
        first = (b * Hkv + kvh) * SPLITS
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for z in tl.static_range(SPLITS):  # unrolled: the parts' loads are issued together
            m = tl.maximum(m, tl.load(ml_ptr + ((first + z) * 2) * BLOCK_M + rm, cache_modifier=".cg"))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HD), tl.float32)
        for z in tl.static_range(SPLITS):
            w = tl.exp(tl.load(ml_ptr + ((first + z) * 2) * BLOCK_M + rm, cache_modifier=".cg") - m_safe)
            l_sum += w * tl.load(ml_ptr + ((first + z) * 2 + 1) * BLOCK_M + rm, cache_modifier=".cg")
            part = tl.load(
                part_ptr + ((first + z) * BLOCK_M + rm[:, None]) * HD + rd[None, :], cache_modifier=".cg"
            )
            acc += w[:, None] * part
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        row_ok = rm < G * Tq
        n = b * Tq + rm % Tq
        hq = kvh * G + rm // Tq
        dst = out_ptr + n[:, None] * (H * HD) + hq[:, None] * HD + rd[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _merge_kernel(
        part_ptr,
        ml_ptr,
        out_ptr,
        Tq,
        G,
        HD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        SPLITS: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
    ):
        _grid_dependency(PDL)
        _merge_parts(
            part_ptr,
            ml_ptr,
            out_ptr,
            tl.program_id(0),
            tl.program_id(1),
            tl.num_programs(1),
            Tq,
            G,
            HD,
            BLOCK_M,
            SPLITS,
        )

    @triton.jit
    def _top_k(p, re, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr, PACKED: tl.constexpr):
        """Rows of p [R, BLOCK_E] (probabilities >= 0; columns < 0 are never picked) -> their K
        largest values (float32 [R, BLOCK_K]) and columns (int64), the lowest column first among
        equal values. Per pick: the maximum, then the lowest column holding it (two reductions);
        PACKED (`TOPK_PACKED`): one reduction over the value's bits and its column packed in one
        int64 key (non-negative floats order as their bits do)."""
        rk = tl.arange(0, BLOCK_K)[None, :]
        vals = tl.zeros((p.shape[0], BLOCK_K), tl.float32)
        idx = tl.zeros((p.shape[0], BLOCK_K), tl.int64)
        if PACKED:
            bits = p.to(tl.int32, bitcast=True).to(tl.int64)
            key = tl.where(p >= 0, (bits << 32) | (BLOCK_E - 1 - re)[None, :], -1)
            for i in tl.static_range(K):
                best = tl.max(key, 1)
                col = BLOCK_E - 1 - (best & 0xFFFFFFFF)
                val = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                vals = tl.where(rk == i, val[:, None], vals)
                idx = tl.where(rk == i, col[:, None], idx)
                key = tl.where(key == best[:, None], -1, key)
        else:
            for i in tl.static_range(K):
                best = tl.max(p, 1)
                at = tl.min(tl.where(p == best[:, None], re[None, :], BLOCK_E), 1)  # lowest among ties
                vals = tl.where(rk == i, best[:, None], vals)
                idx = tl.where(rk == i, at[:, None].to(tl.int64), idx)
                p = tl.where(re[None, :] == at[:, None], -1.0, p)
        return vals, idx

    @triton.jit
    def _softmax_topk_kernel(
        logits_ptr,  # [T, E]
        w_ptr,  # [T, K]
        ids_ptr,  # [T, K] int64
        counts_ptr,  # [E] int64 tokens routed to each expert, cumulative (COUNT)
        mask_ptr,  # [T] int64 0/1: the token counts (MASKED; padding does not)
        E,
        K: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
        RENORM: tl.constexpr,
        COUNT: tl.constexpr,
        MASKED: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        PACKED: tl.constexpr = False,  # `_top_k`'s one reduction per pick (`TOPK_PACKED`)
    ):
        _grid_dependency(PDL)
        t = tl.program_id(0).to(tl.int64)
        re = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + t * E + re, mask=re < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, 0))
        p = p / tl.sum(p, 0)
        p = tl.where(re < E, p, -1.0)
        rk = tl.arange(0, BLOCK_K)
        vals, idx = _top_k(p[None, :], re, BLOCK_E, BLOCK_K, K, PACKED)
        vals, idx = tl.reshape(vals, (BLOCK_K,)), tl.reshape(idx, (BLOCK_K,))
        if RENORM:
            vals = vals / tl.sum(vals, 0)
        tl.store(w_ptr + t * K + rk, vals.to(w_ptr.dtype.element_ty), mask=rk < K)
        tl.store(ids_ptr + t * K + rk, idx, mask=rk < K)
        if COUNT:  # the expert load counters, here rather than in a scatter kernel of their own
            one = tl.load(mask_ptr + t) if MASKED else 1
            tl.atomic_add(counts_ptr + idx, tl.zeros((BLOCK_K,), tl.int64) + one, mask=rk < K)


def attention_supported(q: torch.Tensor, head_dim: int, rows: int) -> bool:
    """rows: query rows per (sequence, KV head), G * Tq; one program holds them all (<= 64)."""
    return ATTENTION and AVAILABLE and q.is_cuda and head_dim in (64, 128, 256) and rows <= 64


def routing_supported(logits: torch.Tensor) -> bool:
    return ROUTING and AVAILABLE and logits.is_cuda


class NewKeys(NamedTuple):
    """A step's keys and values before the cache (`decode_attention`'s `new`): k, v [B * Tq,
    Hkv, hd] as projected (before the k norm and rope; last dim contiguous, same strides), cos
    and sin [B * Tq, 1 or none, hd], the q and k norms' weights [hd] (None: no per-head norm)
    and eps, each token's cache slot and position to write [B * Tq]."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    write_slots: torch.Tensor
    positions: torch.Tensor


def rope_in_attention(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, head_dim: int, rows: int) -> bool:
    """`ROPE_IN_ATTENTION` serves this step: the attention kernel would (`attention_supported`;
    or Triton's interpreter, for tests), rope over the whole head, rows of contiguous heads."""
    return (
        ROPE_IN_ATTENTION
        and ATTENTION
        and AVAILABLE
        and (q.is_cuda or INTERPRETED)
        and head_dim in (64, 128, 256)
        and rows <= 64
        and cos.shape[-1] == head_dim
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    slots: torch.Tensor,
    query_positions: torch.Tensor,
    kv_len: int,
    window: int | None,
    new: NewKeys | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B * Tq, H, hd] (padded batch, rope applied), kv [slots, 2, Hkv, Lmax, hd] one layer of
    the cache, slots [B], query_positions [B, Tq], kv_len: keys per sequence at most (the step's
    bucket; the loop stops at each sequence's last query) -> [B * Tq, H * hd], softmax(q k^T /
    sqrt(hd)) v over keys at positions <= the query's (and > position - window).

    new: the step's keys and values are not in the cache yet, and q and k are not normed nor
    roped: the kernel does both and writes K/V into the cache first (`ROPE_IN_ATTENTION`).
    counters: int32 zeros, at least B * Hkv, of the caller's (one per attention layer): with
    SPLIT_MERGE_LAST, split heads merge in their last program, not in a kernel after."""
    B, Tq = query_positions.shape
    q = q if q.stride(2) == 1 else q.contiguous()
    H, hd = q.shape[1], q.shape[2]
    Hkv = kv.shape[2]
    G = H // Hkv
    block_m = max(16, triton.next_power_of_2(G * Tq))
    block_l = 64 if hd <= 128 else 32
    # Enough programs to keep the GPU's memory busy: split long caches over several (flash-decoding).
    splits = max(1, min(16, kv_len // SPLIT_KEYS, ATTENTION_PROGRAMS // (B * Hkv)))
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), block_l) * block_l
    out = torch.empty(B * Tq, H * hd, dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty(B, Hkv, splits, block_m, hd, dtype=torch.float32, device=q.device)
        ml = torch.empty(B, Hkv, splits, 2, block_m, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    if new is not None:
        cos, sin = new.cos.reshape(B * Tq, hd), new.sin.reshape(B * Tq, hd)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        norm = new.q_weight is not None
        rope = (
            new.k, new.v, new.q_weight if norm else q, new.k_weight if norm else q, cos, sin,
            new.write_slots, new.positions,
        )  # fmt: skip
        rope_strides = (new.k.stride(0), new.k.stride(1), cos.stride(0))
        eps = new.eps
    else:
        norm, rope, rope_strides, eps = False, (q,) * 8, (0, 0, 0), 0.0
    merge_last = SPLIT_MERGE_LAST and splits > 1 and counters is not None and counters.numel() >= B * Hkv
    with launch_on(q.device):
        _attention_kernel[(B, Hkv, splits)](
            q,
            kv,
            slots,
            query_positions,
            out,
            part,
            ml,
            *rope,
            counters if merge_last else q,
            q.stride(0),
            q.stride(1),
            kv.stride(0),
            kv.stride(1),
            kv.stride(2),
            kv.stride(3),
            *rope_strides,
            Tq,
            G,
            window or 0,
            hd**-0.5,
            chunk,
            eps,
            HD=hd,
            BLOCK_M=block_m,
            BLOCK_L=block_l,
            SPLITS=splits,
            WINDOW=window is not None,
            PRECISION=dot_precision(q.dtype),
            ROPE=new is not None,
            NORM=norm,
            BLOCK_T=max(2, triton.next_power_of_2(Tq)),
            MERGE_LAST=merge_last,
            PRELOAD=ATTENTION_PRELOAD,
            num_warps=4,
            **pdl_launch(q.device),
        )
        if splits > 1 and not merge_last:
            _merge_kernel[(B, Hkv)](
                part,
                ml,
                out,
                Tq,
                G,
                HD=hd,
                BLOCK_M=block_m,
                SPLITS=splits,
                num_warps=4,
                **pdl_launch(q.device),
            )
    return out


def softmax_topk(
    logits: torch.Tensor,
    top_k: int,
    renorm: bool,
    dtype: torch.dtype,
    counts: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
):
    """logits [T, E] -> weights [T, k] (softmax in float32, renormalised over the k if asked,
    in `dtype`) and int64 expert ids [T, k], largest first. counts ([E] int64): each token's k
    experts counted into it (tokens whose int64 `token_mask` is 0 count nothing)."""
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=dtype, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    if T:
        with launch_on(logits.device):
            _softmax_topk_kernel[(T,)](
                logits.contiguous(),
                weights,
                ids,
                ids if counts is None else counts,
                ids if token_mask is None else token_mask,
                E,
                K=top_k,
                BLOCK_E=triton.next_power_of_2(E),
                BLOCK_K=triton.next_power_of_2(top_k),
                RENORM=renorm,
                COUNT=counts is not None,
                MASKED=token_mask is not None,
                PACKED=TOPK_PACKED,
                **pdl_launch(logits.device),
            )
    return weights, ids


if AVAILABLE:

    @triton.jit
    def _add_norm_matvec_kernel(
        x_ptr,  # [K] one token's layer output
        res_ptr,  # [K] the residual stream
        gamma_ptr,  # [K] the norm's weight
        w_ptr,  # [N, K] the projection after the norm, K contiguous
        out_ptr,  # [N]
        sum_ptr,  # [K] <- x + residual (the next residual stream; program 0 writes it)
        h_ptr,  # [K] <- the normed row (NORMED; program 0 writes it)
        N,
        K,
        eps,
        NORMED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
    ):
        _grid_dependency(PDL)
        pid = tl.program_id(0)
        dtype = x_ptr.dtype.element_ty
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        ss = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            s = (a + tl.load(res_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(sum_ptr + kk, s, mask=k_ok)
            s = s.to(tl.float32)
            ss += s * s
        r = tl.rsqrt(tl.sum(ss, 0) / K + eps)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        w_rows = w_ptr + rn[:, None].to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            s = (a + tl.load(res_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            g = tl.load(gamma_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            # Rounded as `rms_norm` rounds: the normed row, then its product with the weight.
            h = (g * (s * r).to(dtype).to(tl.float32)).to(dtype)
            if NORMED:  # noqa: SIM102 (a constexpr branch, then a runtime one)
                if pid == 0:
                    tl.store(h_ptr + kk, h, mask=k_ok)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], 1)
        tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


NORM_MATVEC_CONFIG = {"block_n": 8, "block_k": 256, "num_warps": 8}  # (kernels.py (3) sweeps it)


def add_norm_matvec(
    x: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    normed: bool,
    **config,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One token (x, residual [1, K]): s = x + residual, h = rms_norm(s) * gamma, out = h @ weight^T
    ([1, N]) in one kernel, where `add_rms_norm` and a projection are two (batch-1 decode).
    -> out, h (if `normed`: for other consumers of the normed row) and s (the next residual)."""
    N, K = weight.shape
    assert x.shape == residual.shape == (1, K) and weight.stride() == (K, 1), (x.shape, weight.stride())
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x)
    h = torch.empty_like(x) if normed else total  # (not written without `normed`)
    cfg = {**NORM_MATVEC_CONFIG, **config}
    with launch_on(x.device):
        _add_norm_matvec_kernel[(triton.cdiv(N, cfg["block_n"]),)](
            x, residual, gamma, weight, out, total, h, N, K, eps, NORMED=normed,
            BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
            **pdl_launch(x.device),
        )  # fmt: skip
    return out, (h if normed else None), total


if AVAILABLE:

    @triton.jit
    def _router_topk_kernel(
        x_ptr,  # [T, D] the normed tokens (NORM: the attention's output, before the add + norm)
        r_ptr,  # [E, D] the router's weight
        logits_ptr,  # [T, E] out, in the tokens' dtype (as the router's matmul would give them)
        done_ptr,  # [1] int32 programs finished; 0 before and after the launch
        w_ptr,  # [T, K] out
        ids_ptr,  # [T, K] int64 out
        counts_ptr,  # [E] int64 (COUNT)
        mask_ptr,  # [T] int64 0/1 (MASKED)
        res_ptr,  # NORM: [T, D] the residual stream
        gamma_ptr,  # NORM: [D] the norm's weight
        h_ptr,  # NORM: [T, D] out, the normed tokens (program 0 writes them)
        sum_ptr,  # NORM: [T, D] out, x + residual (the next residual stream; program 0)
        T,
        E,
        D,
        stride_x,
        stride_r,
        eps,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,  # experts (logits) per program
        BLOCK_D: tl.constexpr,
        BLOCK_E: tl.constexpr,  # >= E
        BLOCK_K: tl.constexpr,
        RENORM: tl.constexpr,
        COUNT: tl.constexpr,
        MASKED: tl.constexpr,
        NORM: tl.constexpr = False,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
        ONE_PASS: tl.constexpr = False,  # BLOCK_D >= D: every row read once, in one round of loads
        PACKED: tl.constexpr = False,  # `_top_k`'s one reduction per pick (`TOPK_PACKED`)
        DOT: tl.constexpr = False,  # the products by tensor cores (`ROUTER_TOPK_DOT_ROWS`)
        PRECISION: tl.constexpr = "tf32",  # tl.dot's input_precision ("ieee" for float32)
        PRELOAD: tl.constexpr = False,  # (ONE_PASS only) weights loaded before waiting
    ):
        """Each program: BLOCK_R experts' logits for all T tokens (NORM: of rms_norm(x +
        residual), each program norming the few rows itself, program 0 writing them out). The
        last program to finish (a counter of finished programs, reset by it) reads every logit
        and routes each token as `_softmax_topk_kernel` does. PRELOAD (with ONE_PASS): the
        program's router rows and the norm's weight are loaded before it waits for the kernel
        ahead (they do not depend on it: `ROUTER_TOPK_PRELOAD`)."""
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < E
        # PRELOAD (ONE_PASS: the loop below runs once, over these columns); else unused zeros
        # (the loop must see the names).
        rd = tl.arange(0, BLOCK_D)
        w_pre = tl.zeros((BLOCK_R, BLOCK_D), r_ptr.dtype.element_ty)
        g_pre = tl.zeros((BLOCK_D,), tl.float32)
        if PRELOAD:
            w_ok = r_ok[:, None] & (rd < D)[None, :]
            w_pre = tl.load(r_ptr + rr[:, None].to(tl.int64) * D + rd[None, :], mask=w_ok, other=0.0)
            if NORM:
                g_pre = tl.load(gamma_ptr + rd, mask=rd < D, other=0.0).to(tl.float32)
        _grid_dependency(PDL)
        rt = tl.arange(0, BLOCK_T)
        t_ok = rt < T
        dt = logits_ptr.dtype.element_ty
        first = tl.program_id(0) == 0
        if NORM and not ONE_PASS:  # the rows' mean square, of the sum rounded to the model's dtype
            ss = tl.zeros((BLOCK_T,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                ok = t_ok[:, None] & (rd < D)[None, :]
                xt = tl.load(x_ptr + rt[:, None] * stride_x + rd[None, :], mask=ok, other=0.0)
                rs = tl.load(res_ptr + rt[:, None] * stride_r + rd[None, :], mask=ok, other=0.0)
                sm = (xt.to(tl.float32) + rs.to(tl.float32)).to(dt).to(tl.float32)
                ss += tl.sum(sm * sm, 1)
            inv = tl.rsqrt(ss / D + eps)
        acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            ok = t_ok[:, None] & d_ok[None, :]
            xt = tl.load(x_ptr + rt[:, None] * stride_x + rd[None, :], mask=ok, other=0.0).to(tl.float32)
            if NORM:  # h = gamma * (sum * inv) as `fused.rms_norm` (rounded where torch rounds)
                rs = tl.load(res_ptr + rt[:, None] * stride_r + rd[None, :], mask=ok, other=0.0)
                sm = (xt + rs.to(tl.float32)).to(dt)
                if ONE_PASS:  # the whole rows are here: their mean square now (as torch adds)
                    inv = tl.rsqrt(tl.sum(sm.to(tl.float32) * sm.to(tl.float32), 1) / D + eps)
                if PRELOAD:  # noqa: SIM108 (a constexpr branch)
                    g = g_pre
                else:
                    g = tl.load(gamma_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
                h = ((sm.to(tl.float32) * inv[:, None]).to(dt).to(tl.float32) * g[None, :]).to(dt)
                if first:
                    tl.store(sum_ptr + rt[:, None] * D + rd[None, :], sm, mask=ok)
                    tl.store(h_ptr + rt[:, None] * D + rd[None, :], h, mask=ok)
                xt = h.to(tl.float32)
            if PRELOAD:  # noqa: SIM108 (a constexpr branch)
                w = w_pre
            else:
                w = tl.load(
                    r_ptr + rr[:, None].to(tl.int64) * D + rd[None, :],
                    mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
            if DOT:  # x and the weight share the model's dtype here: exact back from float32
                acc += tl.dot(xt.to(dt), tl.trans(w), input_precision=PRECISION)
            else:
                acc += tl.sum(xt[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        out = logits_ptr + rt[:, None] * E + rr[None, :]
        tl.store(out, acc.to(logits_ptr.dtype.element_ty), mask=t_ok[:, None] & r_ok[None, :])
        tl.debug_barrier()  # every thread's logits stored before the counter says so
        finished = tl.atomic_add(done_ptr, 1, sem="acq_rel")
        if finished == tl.num_programs(0) - 1:
            re = tl.arange(0, BLOCK_E)
            e_ok = re < E
            ok = t_ok[:, None] & e_ok[None, :]
            lg = tl.load(
                logits_ptr + rt[:, None] * E + re[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg"
            ).to(tl.float32)
            m = tl.where(t_ok, tl.max(lg, 1), 0.0)
            p = tl.exp(lg - m[:, None])
            p = p / tl.where(t_ok, tl.sum(p, 1), 1.0)[:, None]
            p = tl.where(e_ok[None, :], p, -1.0)
            rk = tl.arange(0, BLOCK_K)
            vals, idx = _top_k(p, re, BLOCK_E, BLOCK_K, K, PACKED)
            if RENORM:
                total = tl.sum(vals, 1)
                vals = vals / tl.where(total > 0, total, 1.0)[:, None]  # (padding rows: 0)
            k_ok = t_ok[:, None] & (rk < K)[None, :]
            dst = rt[:, None] * K + rk[None, :]
            tl.store(w_ptr + dst, vals.to(w_ptr.dtype.element_ty), mask=k_ok)
            tl.store(ids_ptr + dst, idx, mask=k_ok)
            if COUNT:
                one = (
                    tl.load(mask_ptr + rt, mask=t_ok, other=0)
                    if MASKED
                    else tl.where(t_ok, 1, 0).to(tl.int64)
                )
                tl.atomic_add(
                    counts_ptr + idx, tl.zeros((BLOCK_T, BLOCK_K), tl.int64) + one[:, None], mask=k_ok
                )
            tl.store(done_ptr, 0)  # ready for the next launch (graph replays)


def router_topk_supported(x: torch.Tensor) -> bool:
    """`ROUTER_TOPK` serves these tokens: few of them, on a GPU (or Triton's interpreter: tests)."""
    return (
        ROUTER_TOPK
        and ROUTING
        and AVAILABLE
        and (x.is_cuda or INTERPRETED)
        and 0 < x.shape[0] <= ROUTER_TOPK_MAX_TOKENS
        and x.stride(-1) == 1
    )


def router_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    done: torch.Tensor,
    top_k: int,
    renorm: bool,
    dtype: torch.dtype,
    counts: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """`softmax_topk(x @ weight^T, ...)` in one kernel: x [T, D] (T <= ROUTER_TOPK_MAX_TOKENS),
    weight [E, D]; done: an int32 [1] zero tensor of the caller's (the kernel counts its
    finished programs there and leaves it 0; one per router, as two launches must not share it)
    -> (weights, ids). norm = (residual [T, D], the norm's weight [D], eps): x is the layer's
    attention output, routed as `add_rms_norm(x, residual, ...)` -> (weights, ids, the normed
    tokens, x + residual)."""
    T, D = x.shape
    E = weight.shape[0]
    weight = weight if weight.stride(-1) == 1 and weight.stride(0) == D else weight.contiguous()
    logits = torch.empty(T, E, dtype=x.dtype, device=x.device)
    weights = torch.empty(T, top_k, dtype=dtype, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.long, device=x.device)
    if norm is not None:
        residual, gamma, eps = norm
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        h, total = (
            torch.empty(T, D, dtype=x.dtype, device=x.device),
            torch.empty(T, D, dtype=x.dtype, device=x.device),
        )
        extra, stride_r = (residual, gamma, h, total), residual.stride(0)
    else:
        extra, stride_r, eps = (x,) * 4, 0, 0.0
    dot = T >= ROUTER_TOPK_DOT_ROWS and weight.dtype == x.dtype
    if dot:  # [T, D] x [D, 16 experts] per program by tl.dot, 128 columns at a time
        block_r, block_t, block_d, one_pass = 16, max(16, triton.next_power_of_2(T)), 128, False
    else:
        block_r, block_t = 2, max(2, triton.next_power_of_2(T))
        # Whole rows per load where the [T, R, D] product fits the registers (D <= 4096 at T <= 2):
        # one round of loads, not a loop of dependent ones (H100: 11 us per layer with 512 wide).
        block_d = triton.next_power_of_2(D)
        one_pass = block_t * block_r * block_d <= ROUTER_TOPK_ONE_PASS
        if not one_pass:  # columns at a time: as many as that budget allows (512 without one)
            budget = ROUTER_TOPK_ONE_PASS // (block_t * block_r)
            block_d = max(32, min(512, budget)) if ROUTER_TOPK_ONE_PASS else 512
    with launch_on(x.device):
        _router_topk_kernel[(triton.cdiv(E, block_r),)](
            x, weight, logits, done, weights, ids,
            ids if counts is None else counts, ids if token_mask is None else token_mask, *extra,
            T, E, D, x.stride(0), stride_r, eps,
            K=top_k, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_D=block_d,
            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k), RENORM=renorm,
            COUNT=counts is not None, MASKED=token_mask is not None, NORM=norm is not None,
            ONE_PASS=one_pass, num_warps=8 if not dot and block_t * block_r * block_d > 8192 else 4,
            PACKED=TOPK_PACKED, DOT=dot, PRECISION=dot_precision(x.dtype),
            PRELOAD=ROUTER_TOPK_PRELOAD and one_pass, **pdl_launch(x.device),
        )  # fmt: skip
    if norm is not None:
        return weights, ids, h, total
    return weights, ids
