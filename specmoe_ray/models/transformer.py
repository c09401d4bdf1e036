"""One decoder for every supported architecture, dense or MoE.

Tokens travel *packed*: a step's tokens from all sequences form one `[N, D]` tensor, so
norms, projections and the MoE path see only real tokens (a sequence in prefill adds its
whole prompt, one in decode adds 1 token, one being verified adds k + 1). Only attention
pads, per sequence, to read its slot of the KV cache.

Module names mirror Hugging Face's, so a checkpoint's tensor names are our state-dict keys.
The MoE experts are not parameters here: each MoE block calls an `ExpertBackend` given from
outside (in-process experts, or expert shards over a process group), which keeps this file
free of any transport. DeepSeek's attention (MLA) and cache live in `deepseek.py`, which
subclasses `Transformer`; the MoE block here serves every architecture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from specmoe_ray.models import fused, l2_ahead, triton_kernels
from specmoe_ray.models.args import ModelArgs, RopeArgs
from specmoe_ray.models.fused import add_rms_norm, combine, linear, qk_rope, rms_norm
from specmoe_ray.models.kv_cache import KVCache
from specmoe_ray.moe import triton_experts
from specmoe_ray.moe.router import TopKRouter, make_router

# N = packed tokens of a step, B = sequences, Tq = most new tokens of one sequence,
# D = hidden, H = heads, Hkv = kv heads, hd = head dim, A = experts per token, L = kv length


class ExpertBackend(Protocol):
    """Runs the routed experts of one MoE layer: `[T, D]` tokens, `[T, A]` expert ids ->
    `[T, A, D]` unweighted expert outputs (the MoE block combines them with the gate weights).
    A backend with `combines = True` also takes `weights=` ([T, A]) and returns the combined
    `[T, D]` itself (`fused.combine`'s arithmetic, in top-k slot order), or a `fused.Pending`
    of its float32 sum, rounded to the model's dtype by the next add + norm."""

    def __call__(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, counted: bool = False
    ) -> torch.Tensor: ...


@dataclasses.dataclass(slots=True)
class ForwardBatch:
    """Host-built metadata of one forward step; see `build_forward_batch`."""

    tokens: torch.Tensor  # [N] token ids
    positions: torch.Tensor  # [N] position of each token in its sequence
    write_slots: torch.Tensor  # [N] KV-cache slot each token writes to
    read_slots: torch.Tensor  # [B] KV-cache slot of each sequence
    pad_index: torch.Tensor  # [B * Tq] index into the packed tokens, N for padding
    unpad_index: torch.Tensor  # [N] index into the padded [B * Tq] layout
    query_positions: torch.Tensor  # [B, Tq] position of each padded query (0 for padding)
    kv_len: int  # L: keys to read per sequence
    max_new: int  # Tq
    logits_index: torch.Tensor  # [M] packed tokens whose logits are wanted
    # True when every sequence has exactly max_new tokens (packed == padded: no pad/unpad gathers);
    # the static batches of CUDA-graph steps are built so.
    padded: bool = False
    # Attention masks built during one forward, shared by its layers (see `attention_mask`).
    masks: dict = dataclasses.field(default_factory=dict)
    # The forward's weights read ahead into L2 (`l2_ahead.L2Ahead`; None: off).
    ahead: Any = None


def build_forward_batch(
    seq_tokens: list[list[int]],
    seq_starts: list[int],
    seq_slots: list[int],
    logits_from: list[int],
    device: torch.device | str,
) -> ForwardBatch:
    """Pack the new tokens of B sequences.

    seq_tokens[b]: the tokens sequence b adds this step, at positions seq_starts[b] onward;
    seq_slots[b]: its KV-cache slot; logits_from[b]: logits are returned for its new tokens
    from this offset on (len - 1 for plain decoding: the last one only).
    """
    num_seqs = len(seq_tokens)
    max_new = max(len(t) for t in seq_tokens)
    tokens, positions, write_slots, unpad, logits_index = [], [], [], [], []
    num_tokens = sum(len(t) for t in seq_tokens)
    pad_index = [num_tokens] * (num_seqs * max_new)
    query_positions = [0] * (num_seqs * max_new)
    for b, (toks, start, slot, first) in enumerate(zip(seq_tokens, seq_starts, seq_slots, logits_from)):
        for t, tok in enumerate(toks):
            n = len(tokens)
            tokens.append(tok)
            positions.append(start + t)
            write_slots.append(slot)
            unpad.append(b * max_new + t)
            pad_index[b * max_new + t] = n
            query_positions[b * max_new + t] = start + t
            if t >= first:
                logits_index.append(n)
    kv_len = max(s + len(t) for s, t in zip(seq_starts, seq_tokens))

    def as_tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return ForwardBatch(
        tokens=as_tensor(tokens),
        positions=as_tensor(positions),
        write_slots=as_tensor(write_slots),
        read_slots=as_tensor(seq_slots),
        pad_index=as_tensor(pad_index),
        unpad_index=as_tensor(unpad),
        query_positions=as_tensor(query_positions).view(num_seqs, max_new),
        kv_len=kv_len,
        max_new=max_new,
        logits_index=as_tensor(logits_index),
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def to_padded(x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Packed [N, ...] -> padded [B, Tq, ...] (padding rows zero)."""
    B, Tq = batch.query_positions.shape
    if not batch.padded:
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[batch.pad_index]
    return x.view(B, Tq, *x.shape[1:])


def to_packed(x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Padded [B, Tq, ...] -> packed [N, ...]."""
    x = x.reshape(-1, *x.shape[2:])
    return x if batch.padded else x[batch.unpad_index]


def attention_mask(batch: ForwardBatch, group: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, group * Tq, L]: 0 where query row g * Tq + t of sequence b may see a
    key (its position or earlier, and within `window`), -inf elsewhere.

    Built once per forward and shared by every layer (all layers of a model have the same
    shape of mask). Rows repeat per group of query heads that share a KV head, so grouped-query
    attention runs as plain attention over Hkv heads of group * Tq query rows: no K/V expansion,
    and a float mask keeps SDPA on its fused kernels. Every row sees key 0, so none is all -inf.
    """
    key = (group, window, dtype)
    mask = batch.masks.get(key)
    if mask is None:
        key_pos = torch.arange(batch.kv_len, device=batch.query_positions.device)
        qpos = batch.query_positions[:, None, :, None]  # [B, 1, Tq, 1]
        ok = key_pos <= qpos
        if window is not None:
            ok = ok & (key_pos > qpos - window)
        if group > 1:
            ok = ok.repeat(1, 1, group, 1)
        mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))
        batch.masks[key] = mask
    return mask


def rope_inv_freq(rope: RopeArgs, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":  # Llama 3.1's frequency-dependent scaling
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope.kind == "yarn":  # YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones
        inv_freq = _yarn_inv_freq(rope, head_dim)
    return inv_freq


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeArgs) -> float:
    """YaRN's scale on cos and sin (1 for every other rope type)."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def _yarn_inv_freq(rope: RopeArgs, dim: int) -> torch.Tensor:
    def correction_dim(num_rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position / (num_rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1: keep the trained frequency, 0: interpolate by `factor`
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def check_head_split(num_heads: int, num_kv_heads: int, qk_norm: str | None, world: int) -> None:
    """Whether attention with these heads splits over `world` trunk replicas by heads
    (`ShardOptions.replica_attention = "heads"`); a ValueError naming why not."""
    if world < 1 or num_heads % world or num_kv_heads % world:
        raise ValueError(
            f"replica_attention 'heads': {num_heads} query and {num_kv_heads} key/value heads do not split "
            f"evenly over {world} shards; use a shard count that divides both, or 'replicated'"
        )
    if qk_norm == "full":
        raise ValueError(
            "replica_attention 'heads': this model normalises q and k over all heads at once (a full-width "
            "q/k norm), which no rank can compute from its heads alone; use 'replicated'"
        )


def check_args_head_split(args: ModelArgs, world: int) -> None:
    """`check_head_split` for a checkpoint's args (MLA attention does not split by heads here)."""
    if args.mla is not None:
        raise ValueError(
            f"replica_attention 'heads': {args.model_type}'s latent attention (MLA) is not split by heads "
            "here; use 'replicated'"
        )
    check_head_split(args.num_heads, args.num_kv_heads, args.qk_norm, world)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        D = args.hidden_size
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        elif args.qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, args.rms_norm_eps)
        self.clip_qkv = args.clip_qkv
        self.sliding_window = args.sliding_window
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see fuse_projections
        self._heads_done: dict[torch.device, torch.Tensor] = {}  # the attention kernel's counters
        # Heads split over trunk replicas (`split_heads`): (layer, this rank's heads' attention
        # output [N, h * hd], o_proj's weight [D, h * hd]) -> o_proj's output summed over the
        # ranks (a tensor, or a `fused.Pending` the next add + norm sums).
        self.head_sum: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None

    def split_heads(self, rank: int, world: int) -> None:
        """Keep only rank's 1 / world of the heads (`ShardOptions.replica_attention = "heads"`):
        its query heads and the key/value heads they read, and o_proj's columns for them, so its
        KV cache holds only those; o_proj then gives a partial output that `head_sum` sums over
        the ranks. Call before `fuse_projections`."""
        check_head_split(self.num_heads, self.num_kv_heads, self.qk_norm, world)
        if self._qkv is not None:
            raise RuntimeError("Attention.split_heads: split before fuse_projections")
        hd = self.head_dim
        h, hk = self.num_heads // world, self.num_kv_heads // world
        rows = {self.q_proj: slice(rank * h * hd, (rank + 1) * h * hd)}
        rows.update({p: slice(rank * hk * hd, (rank + 1) * hk * hd) for p in (self.k_proj, self.v_proj)})
        for p, keep in rows.items():
            p.weight = nn.Parameter(p.weight.data[keep].clone(), requires_grad=False)
            if p.bias is not None:
                p.bias = nn.Parameter(p.bias.data[keep].clone(), requires_grad=False)
            p.out_features = p.weight.shape[0]
        o = self.o_proj
        o.weight = nn.Parameter(o.weight.data[:, rows[self.q_proj]].clone(), requires_grad=False)
        o.in_features = o.weight.shape[1]
        self.num_heads, self.num_kv_heads = h, hk
        self._heads_done = {}

    def _output(self, out: torch.Tensor, matvec: bool = False):
        """o_proj of the attention's output; split heads: this rank's share, projected and
        summed over the ranks by `head_sum` (which may write it straight into shared memory)."""
        if self.head_sum is None:
            return linear(out, self.o_proj.weight, matvec=matvec)
        return self.head_sum(self.layer, out, self.o_proj.weight)

    def fuse_projections(self) -> None:
        """q, k and v projections as one matmul: their weights become views of one tensor (the
        same values, the same state-dict keys), which `forward` multiplies once."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self._qkv is not None or any(p.weight.is_meta for p in projs):
            return
        weight = stack_weights([p.weight for p in projs])
        bias = stack_weights([p.bias for p in projs]) if self.q_proj.bias is not None else None
        self._qkv = (weight, bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: KVCache
    ) -> torch.Tensor:
        if self._qkv is not None:
            return self.forward_qkv(linear(x, *self._qkv), cos, sin, batch, cache)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.forward_projected(q, k, v, cos, sin, batch, cache)

    def forward_qkv(self, qkv: torch.Tensor, cos, sin, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """From the fused q/k/v projection's output ([N, (H + 2 Hkv) * hd]) on."""
        q, k, v = qkv.split([p.weight.shape[0] for p in (self.q_proj, self.k_proj, self.v_proj)], -1)
        return self.forward_projected(q, k, v, cos, sin, batch, cache)

    def _counters(self, device: torch.device) -> torch.Tensor:
        """This layer's per-head counters for the attention kernel (`SPLIT_MERGE_LAST`): zeros,
        left zero by every launch; enough for 512 sequences."""
        counters = self._heads_done.get(device)
        if counters is None:
            counters = self._heads_done[device] = torch.zeros(
                512 * self.num_kv_heads, dtype=torch.int32, device=device
            )
        return counters

    def forward_projected(self, q, k, v, cos, sin, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        N = q.shape[0]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(N, self.num_heads, self.head_dim)
        k = k.view(N, self.num_kv_heads, self.head_dim)
        v = v.view(N, self.num_kv_heads, self.head_dim)
        head_norm = self.qk_norm == "head"
        norms = (
            self.q_norm.weight if head_norm else None,
            self.k_norm.weight if head_norm else None,
            self.q_norm.eps if head_norm else 0.0,
        )
        rows = self.num_heads // self.num_kv_heads * batch.max_new
        # Static steps on GPUs: one kernel reads the keys from the cache by slot.
        kernel = batch.padded and fused.is_active()
        new = None
        if kernel and triton_kernels.rope_in_attention(q, k, cos, self.head_dim, rows):
            # Norms, rope and the cache write inside that kernel too (`ROPE_IN_ATTENTION`).
            new = triton_kernels.NewKeys(k, v, cos, sin, *norms, batch.write_slots, batch.positions)
        else:
            if fused.FUSED_CACHE_WRITE and fused.is_active() and q.is_cuda:
                q = fused.qk_rope_write(
                    q, k, v, cos, sin, *norms, cache.kv[self.layer], batch.write_slots, batch.positions
                )
            else:
                q, kv = qk_rope(q, k, v, cos, sin, *norms)
                cache.write_kv(self.layer, batch.write_slots, batch.positions, kv)
            kernel = kernel and triton_kernels.attention_supported(q, self.head_dim, rows)
        if batch.ahead is not None:
            batch.ahead.at(self.layer, "attention")
        if kernel:
            out = triton_kernels.decode_attention(
                q,
                cache.kv[self.layer],
                batch.read_slots,
                batch.query_positions,
                batch.kv_len,
                self.sliding_window,
                new=new,
                counters=self._counters(q.device),
            )
            return self._output(out, matvec=fused.MATVEC_O_PROJ)
        keys, values = cache.read(self.layer, batch.read_slots, batch.kv_len)  # [B, Hkv, L, hd]

        # Query head h uses kv head h // G: fold the G heads of a group into the query rows.
        Hkv, G, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = to_padded(q, batch)  # [B, Tq, H, hd]
        B, Tq = q.shape[:2]
        q = q.view(B, Tq, Hkv, G, hd).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, hd)
        mask = attention_mask(batch, G, self.sliding_window, q.dtype)  # [B, 1, G * Tq, L]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, Hkv, G * Tq, hd]
        out = out.view(B, Hkv, G, Tq, hd).permute(0, 3, 1, 2, 4)  # [B, Tq, Hkv, G, hd]
        return self._output(to_packed(out.reshape(B, Tq, self.num_heads * hd), batch))


def stack_weights(params: list[nn.Parameter]) -> torch.Tensor:
    """The parameters' tensors stacked along dim 0 into one tensor, each parameter's data then a
    view of its rows (the same values and state-dict keys: one matmul serves them all)."""
    stacked = torch.cat([p.data for p in params])
    start = 0
    for p in params:
        n = p.shape[0]
        p.data = stacked[start : start + n]
        start += n
    return stacked


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._gate_up: torch.Tensor | None = None  # see fuse_projections

    def fuse_projections(self) -> None:
        """gate and up projections as one matmul ([2I, D], gate rows first: the experts' layout),
        whose one-row product in static steps also applies silu * up (`fused.glu_linear`)."""
        projs = (self.gate_proj, self.up_proj)
        if self._gate_up is None and not any(p.weight.is_meta for p in projs):
            self._gate_up = stack_weights([p.weight for p in projs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None:
            return linear(fused.glu_linear(x, self._gate_up), self.down_proj.weight)
        gate, up = linear(x, self.gate_proj.weight), linear(x, self.up_proj.weight)
        return linear(F.silu(gate) * up, self.down_proj.weight)


class MoEBlock(nn.Module):
    """[Router] -> [Dispatch -> Experts] (the backend) -> [Combine] (+ shared experts).

    Shared experts: Qwen2-MoE's one sigmoid-gated `shared_expert`, or DeepSeek's ungated
    `shared_experts` (n of them fused into one MLP n times as wide)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = make_router(args)
        self.backend: ExpertBackend | None = None
        self.shared_expert = self.shared_experts = None
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)
        if args.num_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate, TopKRouter):
            if fused.is_active() and triton_kernels.router_topk_supported(x):
                return self.forward_routed(x, *self.gate.route_tokens(x, self._load_counter(x)))
            return self.forward_logits(x, linear(x, self.gate.weight))
        return self.forward_routed(x, *self.gate(x))

    def _load_counter(self, x: torch.Tensor):
        """A backend that keeps load counters: a callable for the routing kernel to count into
        them (`TopKRouter.route`); else None."""
        load_counter = getattr(self.backend, "load_counter", None)
        if load_counter is not None and triton_kernels.COUNT_IN_ROUTING:
            return lambda: load_counter(self.layer, x.device)
        return None

    def forward_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """From a top-k router's logits on: a backend that keeps load counters has the routing
        kernel count into them (no counting kernel of its own)."""
        return self.forward_routed(x, *self.gate.route(logits, x, self._load_counter(x)))

    def forward_routed(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, counted: bool = False
    ) -> torch.Tensor:
        """From the router's weights and expert ids ([T, A] each) on; counted: the expert load
        was counted while routing."""
        defer = (
            fused.DEFER_COMBINE and fused.is_active() and self.shared_expert is self.shared_experts is None
        )
        if getattr(self.backend, "combines", False):  # gathers and combines in one kernel
            out = self.backend(self.layer, x, expert_ids, counted=counted, weights=weights)
            if isinstance(out, fused.Pending):  # a float32 sum: rounded inside the next add + norm
                if defer:
                    return out
                out = out.combined()
        else:
            y = self.backend(self.layer, x, expert_ids, counted=counted)  # [T, A, D]
            if defer:
                return fused.Pending(y, weights, x)  # combined inside the next add + norm
            # Combine in top-k slot order: the same order however the experts are placed.
            out = combine(y, weights, x)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, attention_cls: type[nn.Module] = Attention):
        super().__init__()
        self.layer = layer
        self.self_attn = attention_cls(args, layer)
        if args.is_moe_layer(layer):
            self.mlp = MoEBlock(args, layer)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        out, residual = self.forward_residual(x, None, cos, sin, batch, cache)
        return fused.materialize(out) + residual

    def forward_residual(self, x, residual, cos, sin, batch: ForwardBatch, cache: KVCache):
        """The layer on a residual stream kept apart: the stream is `x + residual` (residual None:
        just x) -> (out, residual') whose sum is the layer's output. The adds run inside the
        norms (`add_rms_norm`), one kernel each instead of two."""
        if batch.ahead is not None:
            batch.ahead.at(self.layer, "start")
        if isinstance(x, fused.Pending) and (residual is None or fused.FUSED_NORM_MATVEC):
            x = x.combined()  # (the add + norm below combines it otherwise)
        attn, mlp, qkv = self.self_attn, self.mlp, None
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        elif self._norms_in_projections(x):
            return self._forward_norms_in_projections(x, residual, cos, sin, batch, cache)
        elif self._norm_preloaded(x, self._qkv_weight(), "qkv"):
            # add + norm inside the q/k/v projection (`fused.NORM_PRELOAD`)
            norm = self.input_layernorm
            qkv, residual = triton_experts.norm_matvec(x, residual, norm.weight, norm.eps, attn._qkv[0])
        else:
            h, residual = self._add_norm(self.input_layernorm, x, residual)
        if qkv is None:
            out = attn(h, cos, sin, batch, cache)
        else:
            out = attn.forward_qkv(qkv, cos, sin, batch, cache)
        if batch.ahead is not None:
            batch.ahead.at(self.layer, "moe")
        if self._norm_in_router(out):  # add + norm, router and routing: one kernel
            norm = self.post_attention_layernorm
            weights, ids, counted, h, residual = mlp.gate.route_tokens(
                out, mlp._load_counter(out), (residual, norm.weight, norm.eps)
            )
            return mlp.forward_routed(h, weights, ids, counted), residual
        if self._norm_preloaded(out, mlp._gate_up if isinstance(mlp, MLP) else None, "gate_up"):
            norm = self.post_attention_layernorm  # add + norm inside gate/up (`fused.NORM_PRELOAD`)
            act, residual = triton_experts.norm_matvec(
                out, residual, norm.weight, norm.eps, mlp._gate_up, glu=True
            )
            return linear(act, mlp.down_proj.weight), residual
        h, residual = self._add_norm(self.post_attention_layernorm, out, residual)
        return mlp(h), residual

    def _qkv_weight(self) -> torch.Tensor | None:
        """The fused q/k/v projection's weight where it has no bias (else None)."""
        attn = self.self_attn
        fused_qkv = attn._qkv if isinstance(attn, Attention) else None
        return fused_qkv[0] if fused_qkv is not None and fused_qkv[1] is None else None

    @staticmethod
    def _norm_preloaded(x, weight: torch.Tensor | None, projection: str) -> bool:
        """`fused.NORM_PRELOAD` serves the add + norm of x (a plain tensor of one row, in a static
        step on a GPU with PDL, or Triton's interpreter) before projection ("qkv" or "gate_up")
        by weight (None: this layer has no such one-weight projection)."""
        glu = projection == "gate_up"
        return (
            projection in fused.NORM_PRELOAD
            and weight is not None
            and not isinstance(x, fused.Pending)
            and x.dim() == 2
            and x.shape[0] == 1
            and fused.is_active()
            and triton_experts.AVAILABLE
            and ((x.is_cuda and triton_experts.preload_pays(x.device)) or triton_experts.INTERPRETED)
            and (triton_experts.glu_preload_supported if glu else triton_experts.preload_supported)(weight)
        )

    def _norm_in_router(self, x: torch.Tensor) -> bool:
        """`triton_kernels.ROUTER_TOPK_NORM` and the one-kernel router serve this MoE block
        (not for split heads' output, summed by the add + norm: `Attention.head_sum`)."""
        return (
            triton_kernels.ROUTER_TOPK_NORM
            and not isinstance(x, fused.Pending)
            and isinstance(self.mlp, MoEBlock)
            and isinstance(self.mlp.gate, TopKRouter)
            and fused.is_active()
            and triton_kernels.router_topk_supported(x)
        )

    @staticmethod
    def _add_norm(norm: RMSNorm, x, residual: torch.Tensor):
        if isinstance(x, fused.Pending):  # an MoE block's output, combined here (DEFER_COMBINE)
            if x.peer is not None:  # trunk replicas' shares, summed here (`moe/peer_sum.py`)
                peer_sum, slot, position = x.peer
                return peer_sum.sum_add_rms_norm(slot, residual, norm.weight, norm.eps, position)
            if x.weights is None:
                return fused.sum_add_rms_norm(x.y, residual, norm.weight, norm.eps)
            return fused.combine_add_rms_norm(x.y, x.weights, residual, norm.weight, norm.eps)
        return add_rms_norm(x, residual, norm.weight, norm.eps)

    def _norms_in_projections(self, x: torch.Tensor) -> bool:
        """`fused.FUSED_NORM_MATVEC`, a one-token static step on a GPU, and a layer of the plain
        shape: fused q/k/v without bias, a top-k-routed MoE block."""
        attn, mlp = self.self_attn, self.mlp
        return (
            fused.FUSED_NORM_MATVEC
            and x.shape[0] == 1
            and (x.is_cuda or triton_experts.INTERPRETED)
            and fused.is_active()
            and triton_kernels.AVAILABLE
            and isinstance(attn, Attention)
            and attn.head_sum is None
            and attn._qkv is not None
            and attn._qkv[1] is None
            and isinstance(mlp, MoEBlock)
            and isinstance(mlp.gate, TopKRouter)
        )

    def _forward_norms_in_projections(self, x, residual, cos, sin, batch: ForwardBatch, cache: KVCache):
        """`forward_residual` for one token: each residual add + norm runs inside the one-row
        projection after it (q/k/v; the router, which also writes the normed row for the
        experts): two kernels per layer fewer."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv, _, residual = triton_kernels.add_norm_matvec(
            x, residual, norm1.weight, norm1.eps, attn._qkv[0], normed=False
        )
        out = attn.forward_qkv(qkv, cos, sin, batch, cache)
        logits, h, residual = triton_kernels.add_norm_matvec(
            out, residual, norm2.weight, norm2.eps, mlp.gate.weight, normed=True
        )
        return mlp.forward_logits(h, logits), residual


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs, attention_cls: type[nn.Module] = Attention):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, attention_cls) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """A causal LM over packed tokens with an external KV cache."""

    attention_cls: type[nn.Module] = Attention
    # Tensors kept in float32 whatever the model dtype (state-dict key suffixes).
    float32_tensors: tuple[str, ...] = ()

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderModel(args, self.attention_cls)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args.rope, args.head_dim), persistent=False)
        self.rope_scale = rope_attention_factor(args.rope)

    def fuse_projections(self) -> None:
        """Weights that run as one matmul (q/k/v; dense MLPs' and shared experts' gate/up) stored
        as one tensor; values unchanged."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.fuse_projections()

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        """The MoE layers' experts; with split heads (`split_attention`) the backend, a trunk
        replicas' `ReplicaDispatch`, also sums the attention's partial outputs (`sum_heads`)."""
        self.backend_version = getattr(self, "backend_version", 0) + 1  # step graphs re-check theirs
        head_sum = getattr(backend, "sum_heads", None) if self.head_split else None
        if self.head_split and head_sum is None:
            raise ValueError("attention heads split over trunk replicas: the experts' backend must sum them")
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.backend = backend
            if self.head_split:
                layer.self_attn.head_sum = head_sum

    @property
    def head_split(self) -> tuple[int, int] | None:
        """(rank, world) when `split_attention` split the heads, else None."""
        return getattr(self, "_head_split", None)

    def split_attention(self, rank: int, world: int) -> None:
        """Every layer keeps rank's 1 / world of the attention heads (`Attention.split_heads`);
        the KV cache (`make_cache`) then holds only theirs. Before `fuse_projections`."""
        for layer in self.model.layers:
            if type(layer.self_attn) is not Attention:
                raise ValueError(
                    f"{self.args.model_type}: its attention ({type(layer.self_attn).__name__}) cannot be "
                    "split by heads; use shards.replica_attention 'replicated'"
                )
        for layer in self.model.layers:
            layer.self_attn.split_heads(rank, world)
        self._head_split = (rank, world)

    def make_cache(self, num_slots: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        a = self.args
        kv_heads = a.num_kv_heads // (self.head_split[1] if self.head_split else 1)
        return KVCache(a.num_layers, num_slots, max_len, kv_heads, a.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward_layers(self, batch: ForwardBatch, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and decoder layers -> (x, residual) `[N, D]` each, whose sum is the last
        layer's output (before the final norm). A trunk replica (`moe/replica.py`) runs only this."""
        batch.masks = {}  # built by the first layer that needs one (the batch may be reused)
        x = self.model.embed_tokens(batch.tokens)  # [N, D]
        freqs = batch.positions[:, None].float() * self.inv_freq  # [N, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        residual = None
        batch.ahead = l2_ahead.for_step(self, x, batch.padded)
        for layer in self.model.layers:
            x, residual = layer.forward_residual(x, residual, cos, sin, batch, cache)
        if batch.ahead is not None:
            batch.ahead.finish()
            batch.ahead = None
        return fused.materialize(x), residual

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: KVCache, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> logits `[M, V]` (float32) for the tokens `batch.logits_index` names.

        return_hidden: also return the final-normed hidden states of every packed token, `[N, D]`
        (what DeepSeek's multi-token-prediction head takes as input).
        """
        x, residual = self.forward_layers(batch, cache)
        norm = self.model.norm
        if return_hidden:
            hidden = add_rms_norm(x, residual, norm.weight, norm.eps)[0]
            return self.lm_head(hidden[batch.logits_index]).float(), hidden
        index = batch.logits_index
        return self.lm_head(add_rms_norm(x[index], residual[index], norm.weight, norm.eps)[0]).float()
