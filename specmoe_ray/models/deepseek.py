"""DeepSeek-V2 and DeepSeek-V3/R1: Multi-head Latent Attention over packed tokens.

MLA (DeepSeek-V2, DeepSeek-AI 2024, arXiv:2405.04434) compresses each token's keys and values
into one latent `c_kv` (`kv_lora_rank` wide, RMS-normalised) plus one rope key `k_pe` shared by
all heads (`qk_rope_head_dim` wide). Only those two are cached (`MLACache`), so a token costs
`kv_lora_rank + qk_rope_head_dim` numbers per layer instead of `2 * heads * head_dim`. At read
time the cached latents are up-projected by `kv_b_proj` into per-head `k_nope` and `v`; that is
exact and simple. (The "absorbed" form, folding `kv_b_proj` into the query and the output so
attention runs in latent space, is a later optimisation with the same results.)

Everything else is shared with `transformer.py`: the MoE block routes with `GroupedTopKRouter`
(DeepSeek-V3's sigmoid + bias, V2's softmax, both group-limited; `moe/router.py`), adds the
ungated shared experts, and its routed experts go through the same ExpertBackend (in-process,
or expert shards); the first `first_k_dense_replace` layers are dense MLPs. Rope is YaRN as the
configs use it: frequencies from `rope_inv_freq`, cos/sin scaled by YaRN's attention factor, and
the softmax scale multiplied by `mscale(factor, mscale_all_dim) ** 2`.

Module names mirror transformers' (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, ...).

`MTPHead` is DeepSeek-V3's multi-token-prediction module (DeepSeek-V3 technical report,
arXiv:2412.19437, §2.2): one more decoder layer that reads the trunk's final hidden state of
position i together with the embedding of token i + 1 and predicts token i + 2. Served as a
drafter by `spec/mtp.py` (`draft="mtp"`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from specmoe_ray.models.args import ModelArgs
from specmoe_ray.models.fused import apply_rope
from specmoe_ray.models.kv_cache import MLACache
from specmoe_ray.models.transformer import (
    DecoderLayer,
    ExpertBackend,
    ForwardBatch,
    MoEBlock,
    RMSNorm,
    Transformer,
    attention_mask,
    rope_attention_factor,
    rope_inv_freq,
    to_packed,
    to_padded,
    yarn_mscale,
)

# N = packed tokens, B = sequences, Tq = most new tokens of one sequence, L = kv length,
# H = heads, R = kv_lora_rank, P = qk_rope_head_dim, Dn = qk_nope_head_dim, Dv = v_head_dim


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rope on pairs (x[2i], x[2i+1]); the output lists the pairs' first then second halves.

    x: [N, heads, P]; cos, sin: [N, 1, P] as cat(freqs, freqs). The output layout differs from
    the input's, but q and k share it, so q . k is the interleaved rotation's.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def mla_softmax_scale(args: ModelArgs) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 (as DeepSeek's code)."""
    scale = args.mla.qk_head_dim**-0.5
    rope = args.rope
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """Multi-head Latent Attention with the compressed cache; same call as `Attention`."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        m = args.mla
        self.layer = layer
        self.num_heads = H = args.num_heads
        self.q_lora_rank = m.q_lora_rank
        self.kv_lora_rank = m.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.qk_dim = m.qk_head_dim
        self.interleaved = m.rope_interleave
        D, bias = args.hidden_size, args.qkv_bias
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=bias)
            # DeepSeek's latent norms use eps 1e-6 whatever rms_norm_eps says.
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, D, bias=bias)
        self.scale = mla_softmax_scale(args)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope_interleaved(x, cos, sin) if self.interleaved else apply_rope(x, cos, sin)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: MLACache
    ) -> torch.Tensor:
        N, H = x.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(N, H, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [N, R]
        q_pe = self._rope(q_pe, cos, sin)  # [N, H, P]
        k_pe = self._rope(k_pe[:, None, :], cos, sin)[:, 0]  # [N, P]

        cache.write(self.layer, batch.write_slots, batch.positions, c_kv, k_pe)
        c_kv, k_pe = cache.read(self.layer, batch.read_slots, batch.kv_len)  # [B, L, R], [B, L, P]

        # Up-project the latents into per-head keys and values.
        B, L = c_kv.shape[:2]
        kv = self.kv_b_proj(c_kv).view(B, L, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, values = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B, H, L, Dn], [B, H, L, Dv]
        keys = torch.cat((k_nope, k_pe[:, None].expand(B, H, L, self.rope_dim)), dim=-1)  # [B, H, L, Dn+P]

        q = torch.cat((q_nope, q_pe), dim=-1)  # [N, H, Dn+P]
        q = to_padded(q, batch).transpose(1, 2)  # [B, H, Tq, Dn+P]
        mask = attention_mask(batch, 1, None, q.dtype)  # [B, 1, Tq, L]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return self.o_proj(to_packed(out.transpose(1, 2).flatten(2), batch))


class DeepseekTransformer(Transformer):
    """DeepSeek-V2/V3 causal LM: `Transformer` with MLA and its compressed cache."""

    attention_cls = MLAttention
    # transformers keeps the router in float32 (`_keep_in_fp32_modules_strict`); so do we.
    float32_tensors = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    def make_cache(self, num_slots: int, max_len: int) -> MLACache:
        p = self.lm_head.weight
        a = self.args
        return MLACache(
            a.num_layers, num_slots, max_len, a.mla.kv_lora_rank, a.mla.qk_rope_head_dim, p.dtype, p.device
        )


class SharedHead(nn.Module):
    """The MTP module's output head: its own final norm, then an LM head (the trunk's, unless
    the checkpoint stores one)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


class MTPHead(DecoderLayer):
    """One multi-token-prediction depth of DeepSeek-V3 (arXiv:2412.19437, §2.2).

    For position i, with h_i the trunk's final-normed hidden state (it predicted t_{i+1}):

        u_i = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])    [2D] -> [D]
        o_i = DecoderLayer(u_i)                               causal over MTP positions <= i
        g_i = shared_head.norm(o_i);  logits_i = shared_head.head(g_i)   -> predicts t_{i+2}

    The embedding half comes first, as the released weights want (DeepSeek's inference code,
    vLLM, SGLang and transformers), though the report's eq. 21 writes the hidden state first.

    It *is* the decoder layer (MLA attention, MoE with shared experts) plus those extras, so the
    checkpoint's `model.layers.{layer}.*` names are its state-dict keys once the prefix is cut.
    The attention reads layer 0 of its own one-layer `MLACache` (`make_cache`), while the MoE
    block keeps the checkpoint's layer index, under which its routed experts are loaded.
    `embed_tokens` and `shared_head.head` are the trunk's unless the checkpoint has its own.
    """

    float32_tensors = DeepseekTransformer.float32_tensors
    # Keys the checkpoint may leave out: then the trunk's embedding and LM head serve.
    shared_with_trunk = {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "shared_head.head.weight": "lm_head.weight",
    }

    def __init__(self, args: ModelArgs, layer: int, moe: bool):
        block_args = dataclasses.replace(args, moe_layers=(layer,) if moe else ())
        super().__init__(block_args, layer, MLAttention)
        self.args = args
        self.layer = layer
        self.self_attn.layer = 0  # its own cache has one layer
        D = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, D)
        self.enorm = RMSNorm(D, args.rms_norm_eps)
        self.hnorm = RMSNorm(D, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(args)
        self.register_buffer("inv_freq", rope_inv_freq(args.rope, args.head_dim), persistent=False)
        self.rope_scale = rope_attention_factor(args.rope)

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        if isinstance(self.mlp, MoEBlock):
            self.mlp.backend = backend

    def make_cache(self, num_slots: int, max_len: int) -> MLACache:
        p = self.eh_proj.weight
        m = self.args.mla
        return MLACache(1, num_slots, max_len, m.kv_lora_rank, m.qk_rope_head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, hidden: torch.Tensor, cache: MLACache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: position i carries token t_{i+1}; hidden [N, D]: h_i, row for row.

        -> logits `[M, V]` (float32) and g `[M, D]` (the normed output, what a chained next
        position takes as its hidden state) for the tokens `batch.logits_index` names.
        """
        e = self.enorm(self.embed_tokens(batch.tokens))  # [N, D]
        h = self.hnorm(hidden.to(e.dtype))  # [N, D]
        x = self.eh_proj(torch.cat((e, h), dim=-1))  # [N, D]
        # Rope as Transformer.forward: the same positions as the trunk's.
        freqs = batch.positions[:, None].float() * self.inv_freq  # [N, P/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        x = super().forward(x, cos.to(x.dtype), sin.to(x.dtype), batch, cache)
        g = self.shared_head.norm(x[batch.logits_index])  # [M, D]
        return self.shared_head.head(g).float(), g
