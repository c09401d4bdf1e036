"""Model arguments read from a Hugging Face `config.json`.

One plain dataclass describes every decoder we run (dense or MoE): the differences
between architectures are a handful of switches (qkv bias, per-head or full-width
q/k norm, a gated shared expert, top-k renormalisation), so one model class serves all.
DeepSeek-V2/V3 add two small groups: `MLAArgs` (Multi-head Latent Attention, read by
`models/deepseek.py`) and `RoutingArgs` (grouped routing, read by `moe/router.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from specmoe_ray.errors import CheckpointError, UnsupportedArchitectureError

# model_type -> (is_moe, description); the names users see in errors.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "qwen3_moe": "Qwen3-MoE",
    "qwen2_moe": "Qwen2-MoE (gated shared expert)",
    "mixtral": "Mixtral",
    "olmoe": "OLMoE",
    "llama": "Llama (dense)",
    "qwen2": "Qwen2 (dense)",
    "qwen3": "Qwen3 (dense)",
    "deepseek_v3": "DeepSeek-V3/R1 (MLA, sigmoid grouped routing)",
    "deepseek_v2": "DeepSeek-V2 (MLA, softmax grouped routing)",
}

_ARCH_TO_TYPE = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
}
DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclasses.dataclass(slots=True)
class RopeArgs:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | yarn (DeepSeek only)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # YaRN (Peng et al. 2023), with DeepSeek's mscale / mscale_all_dim attention scaling
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # None: derived from factor and the mscales
    truncate: bool = True


@dataclasses.dataclass(slots=True)
class MLAArgs:
    """Multi-head Latent Attention (DeepSeek-V2): queries through an optional low-rank
    bottleneck; keys and values from one shared latent `c_kv` plus one shared rope key."""

    q_lora_rank: int | None  # None: a full-rank q_proj (V2-Lite)
    kv_lora_rank: int  # latent size: what the cache holds per token, with the rope key
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rope rotates pairs (2i, 2i + 1), not (i, i + d/2)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(slots=True)
class RoutingArgs:
    """DeepSeek's grouped routing (see `moe/router.py`). The defaults are plain top-k."""

    scoring: str = "softmax"  # softmax (V2) | sigmoid (V3)
    n_group: int = 1  # experts form n_group equal groups ...
    topk_group: int = 1  # ... and a token picks its experts from its best topk_group groups
    group_score: str = "max"  # a group's score: max (V2) | top2_sum (V3) of its experts' scores
    correction_bias: bool = False  # V3: e_score_correction_bias, added for selection only
    routed_scaling_factor: float = 1.0


@dataclasses.dataclass(slots=True)
class ModelArgs:
    """Everything the model code needs; derived once from `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers and dense models)
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeArgs
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: str | None = None  # None | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    hidden_act: str = "silu"
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: sigmoid-gated shared expert
    num_shared_experts: int = 0  # DeepSeek: ungated shared experts, moe_intermediate_size wide each
    routing: RoutingArgs = dataclasses.field(default_factory=RoutingArgs)
    mla: MLAArgs | None = None  # DeepSeek: Multi-head Latent Attention instead of GQA
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # DeepSeek-V3/R1's fp8 checkpoints: e4m3 weights, one float32 `weight_scale_inv` per
    # [rows, cols] block of this size; the loader dequantizes them (`models/loader.py`).
    fp8_block: tuple[int, int] | None = None
    # DeepSeek-V3: multi-token-prediction modules stored after the decoder layers, as
    # `model.layers.{num_layers + j}.*` (the `draft="mtp"` drafter, `spec/mtp.py`); 0 = none.
    num_nextn_predict_layers: int = 0

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures") or []
            model_type = next((_ARCH_TO_TYPE[a] for a in archs if a in _ARCH_TO_TYPE), model_type)
        if model_type not in SUPPORTED_ARCHITECTURES:
            name = model_type or ", ".join(cfg.get("architectures") or []) or "<none>"
            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
            raise UnsupportedArchitectureError(
                f"{source}: unsupported architecture {name!r}; supported model_type values: {supported}"
            )

        fp8_block = _fp8_block(cfg.get("quantization_config"), source)

        def need(key: str, *aliases: str) -> Any:
            for k in (key, *aliases):
                if cfg.get(k) is not None:
                    return cfg[k]
            raise CheckpointError(f"{source}: missing required field {key!r} for model_type {model_type!r}")

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        head_dim = cfg.get("head_dim") or hidden // num_heads
        rope = _rope_args(cfg, allow_yarn=model_type in DEEPSEEK_TYPES)

        args = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=cfg.get("hidden_act", "silu"),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
            fp8_block=fp8_block,
        )
        if args.hidden_act != "silu":
            raise UnsupportedArchitectureError(f"{source}: hidden_act {args.hidden_act!r} (only 'silu')")

        if model_type in ("qwen2", "qwen2_moe"):
            args.qkv_bias = bool(cfg.get("qkv_bias", True))
        else:
            args.qkv_bias = bool(cfg.get("attention_bias", False))
        if model_type in ("qwen3", "qwen3_moe"):
            args.qk_norm = "head"
        elif model_type == "olmoe":
            args.qk_norm = "full"
            args.clip_qkv = cfg.get("clip_qkv")
        args.sliding_window = _sliding_window(cfg, model_type)

        if model_type in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe"):
            args.num_experts = int(need("num_experts", "num_local_experts"))
            args.num_experts_per_tok = int(need("num_experts_per_tok"))
            if model_type in ("mixtral", "olmoe"):
                args.moe_intermediate_size = int(need("intermediate_size"))
            else:
                args.moe_intermediate_size = int(need("moe_intermediate_size"))
            # Mixtral always renormalises the top-k weights; the others say so in the config.
            args.norm_topk_prob = True if model_type == "mixtral" else bool(cfg.get("norm_topk_prob", False))
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            dense_only = set(cfg.get("mlp_only_layers") or [])
            args.moe_layers = tuple(
                i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0
            )
            if model_type == "qwen2_moe":
                args.shared_expert_intermediate_size = int(cfg.get("shared_expert_intermediate_size") or 0)
        elif model_type in DEEPSEEK_TYPES:
            _deepseek_args(args, cfg, need, source)
        if args.num_experts_per_tok > args.num_experts:
            raise CheckpointError(
                f"{source}: num_experts_per_tok={args.num_experts_per_tok} > num_experts={args.num_experts}"
            )
        return args


def _deepseek_args(args: ModelArgs, cfg: dict[str, Any], need, source: str) -> None:
    """MLA, grouped routing, shared experts and the leading dense layers of DeepSeek-V2/V3."""
    v3 = args.model_type == "deepseek_v3"
    args.mla = MLAArgs(
        q_lora_rank=int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None,
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        # V2 rotates interleaved pairs (as complex numbers); V3 says which in rope_interleave.
        rope_interleave=bool(cfg.get("rope_interleave", True)) if v3 else True,
    )
    args.head_dim = args.mla.qk_rope_head_dim  # the rope dimension
    args.num_kv_heads = args.num_heads  # keys and values come from the latent, one per head
    if cfg.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{source}: mlp_bias=true is not supported")

    args.num_experts = int(need("n_routed_experts", "num_experts", "num_local_experts"))
    args.num_experts_per_tok = int(need("num_experts_per_tok"))
    args.moe_intermediate_size = int(need("moe_intermediate_size"))
    args.num_shared_experts = int(cfg.get("n_shared_experts") or 0)
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    args.moe_layers = tuple(i for i in range(args.num_layers) if i >= first_dense and i % freq == 0)
    if len(args.moe_layers) < args.num_layers and not args.intermediate_size:
        raise CheckpointError(f"{source}: missing required field 'intermediate_size' for the dense layers")

    scoring = cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    want = ("sigmoid", ("noaux_tc",)) if v3 else ("softmax", ("greedy", "group_limited_greedy"))
    if scoring != want[0] or method not in want[1]:
        raise UnsupportedArchitectureError(
            f"{source}: {args.model_type} with scoring_func={scoring!r}, topk_method={method!r} "
            f"(supported: scoring_func={want[0]!r}, topk_method in {list(want[1])})"
        )
    grouped = method != "greedy"
    n_group = int(need("n_group")) if grouped else 1
    topk_group = int(need("topk_group")) if grouped else 1
    if args.num_experts % n_group or not 1 <= topk_group <= n_group:
        raise CheckpointError(
            f"{source}: n_group={n_group}, topk_group={topk_group} do not split "
            f"{args.num_experts} experts into groups (need n_group | experts, 1 <= topk_group <= n_group)"
        )
    if v3 and args.num_experts // n_group < 2:
        raise CheckpointError(f"{source}: DeepSeek-V3 scores groups by their top 2 experts: groups of >= 2")
    # transformers' V2 router never renormalises; no published V2 checkpoint asks it to.
    args.norm_topk_prob = bool(cfg.get("norm_topk_prob", v3)) if v3 else False
    if not v3 and cfg.get("norm_topk_prob"):
        raise UnsupportedArchitectureError(f"{source}: deepseek_v2 with norm_topk_prob=true is not supported")
    args.num_nextn_predict_layers = int(cfg.get("num_nextn_predict_layers") or 0)
    args.routing = RoutingArgs(
        scoring=scoring,
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum" if v3 else "max",
        correction_bias=v3,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
    )


def _fp8_block(qcfg: Any, source: str) -> tuple[int, int] | None:
    """The weight block size of a block-quantized fp8 checkpoint (DeepSeek-V3/R1's format);
    None for an unquantized one. Other quantization methods are rejected."""
    if not qcfg:
        return None
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{source}: quantization_config must be a JSON object")
    method = qcfg.get("quant_method", "?")
    if method != "fp8":
        raise UnsupportedArchitectureError(
            f"{source}: quantized checkpoint (quantization_config.quant_method={method!r}) is not "
            "supported; supported: quant_method='fp8' with weight_block_size (DeepSeek-V3/R1), "
            "or a bf16/fp16/fp32 checkpoint"
        )
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedArchitectureError(f"{source}: fp8 format fmt={fmt!r} (only 'e4m3')")
    block = qcfg.get("weight_block_size")
    if block is None:
        raise UnsupportedArchitectureError(
            f"{source}: quant_method='fp8' without weight_block_size (per-tensor fp8) is not "
            "supported; only block-quantized fp8 (e.g. weight_block_size=[128, 128])"
        )
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{source}: quantization_config.weight_block_size={block!r} (expected two positive integers)"
        )
    return int(block[0]), int(block[1])


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    window = cfg.get("sliding_window")
    if not window:
        return None
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        # Qwen configs carry a window but only use it with use_sliding_window.
        if not cfg.get("use_sliding_window", False):
            return None
        layer_types = cfg.get("layer_types") or []
        if any(t != "sliding_attention" for t in layer_types):
            raise UnsupportedArchitectureError(
                f"{model_type}: a mix of sliding and full attention layers is not supported yet"
            )
    return int(window)


def _rope_args(cfg: dict[str, Any], allow_yarn: bool = False) -> RopeArgs:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    supported = ("default", "linear", "llama3", "yarn") if allow_yarn else ("default", "linear", "llama3")
    if kind not in supported:
        raise UnsupportedArchitectureError(
            f"rope type {kind!r} is not supported (supported: {', '.join(supported)}"
            + ("" if allow_yarn else "; yarn for DeepSeek models")
            + ")"
        )
    max_pos = cfg.get("max_position_embeddings", 8192)
    original = int(params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    if factor is None:  # YaRN without a factor: the context extension ratio (as transformers does)
        factor = max_pos / original if kind == "yarn" else 1.0

    def opt(key: str) -> float | None:
        return float(params[key]) if params.get(key) is not None else None

    return RopeArgs(
        theta=float(theta),
        kind=kind,
        factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )
