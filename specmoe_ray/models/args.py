"""Model arguments read from a Hugging Face `config.json`.

One plain dataclass describes every decoder we run (dense or MoE): the differences
between architectures are a handful of switches (qkv bias, per-head or full-width
q/k norm, a gated shared expert, top-k renormalisation), so one model class serves all.
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
}

_ARCH_TO_TYPE = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclasses.dataclass(slots=True)
class RopeArgs:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


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
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

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

        def need(key: str, *aliases: str) -> Any:
            for k in (key, *aliases):
                if cfg.get(k) is not None:
                    return cfg[k]
            raise CheckpointError(f"{source}: missing required field {key!r} for model_type {model_type!r}")

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        head_dim = cfg.get("head_dim") or hidden // num_heads
        rope = _rope_args(cfg)

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
            if args.num_experts_per_tok > args.num_experts:
                raise CheckpointError(
                    f"{source}: num_experts_per_tok={args.num_experts_per_tok} "
                    f"> num_experts={args.num_experts}"
                )
        return args


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


def _rope_args(cfg: dict[str, Any]) -> RopeArgs:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"rope type {kind!r} is not supported (supported: default, linear, llama3)"
        )
    return RopeArgs(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
        ),
    )
