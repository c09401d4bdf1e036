"""Engine settings and counters, and the loading helpers `Engine.from_pretrained` uses."""

from __future__ import annotations

import dataclasses
import os

import torch

from specmoe_ray.models.loader import check_mtp, load_experts, load_trunk, read_config
from specmoe_ray.models.transformer import Transformer
from specmoe_ray.moe.dispatch import LoopbackDispatch
from specmoe_ray.spec.policy import StepCostModel


@dataclasses.dataclass(slots=True)
class EngineConfig:
    """Engine limits and speculation settings (plain data: validated once, read per step)."""

    max_num_seqs: int = 16  # KV-cache slots: sequences running at once
    max_model_len: int | None = None  # context per sequence; None: min(max_position_embeddings, 4096)
    max_num_batched_tokens: int = 2048  # prompt tokens per step (longer prompts prefill in chunks)
    num_speculative_tokens: int = 4  # k (the most, with the adaptive policy)
    spec_policy: str = "fixed"  # "fixed" | "adaptive"
    draft_top_n: int = 32  # support size of the sparse draft distributions
    # Decode/verify steps on static shapes (engine/graph.py): "auto" replays CUDA graphs on GPUs
    # (experts in-process) and runs the plain path elsewhere; "padded" runs the same padded static
    # batches without capturing (any device: for checking); "off" always runs the plain path.
    step_graphs: str = "auto"
    # Prompts (whole, or a chunk) of up to this many tokens prefill in static steps too (CUDA
    # graphs on GPUs: no per-kernel launches from Python); 0: prompts always run eagerly.
    graph_prompt_tokens: int = 128
    # A static decode step with nothing to verify (k = 0, every sequence decoding) runs up to this
    # many steps back to back: each feeds the last one's tokens on the device, and the host syncs
    # once for all of them (its bookkeeping no longer idles the GPU each token). 1: sync each step.
    decode_steps: int = 4

    def validate(self, max_position_embeddings: int) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "draft_top_n", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.graph_prompt_tokens < 0:
            raise ValueError(f"graph_prompt_tokens must be >= 0, got {self.graph_prompt_tokens}")
        if self.step_graphs not in ("auto", "padded", "off"):
            raise ValueError(f"step_graphs must be 'auto', 'padded' or 'off', got {self.step_graphs!r}")
        if self.spec_policy not in ("fixed", "adaptive"):
            raise ValueError(f"spec_policy must be 'fixed' or 'adaptive', got {self.spec_policy!r}")
        if self.max_model_len is None:
            self.max_model_len = min(max_position_embeddings, 4096)
        if not 2 <= self.max_model_len <= max_position_embeddings:
            raise ValueError(
                f"max_model_len must be in [2, {max_position_embeddings}] "
                f"(the model's max_position_embeddings), got {self.max_model_len}"
            )


@dataclasses.dataclass
class EngineMetrics:
    num_steps: int = 0
    num_generated_tokens: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_rows: int = 0  # (sequence, step) pairs that emitted tokens
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    # Steps of the static (CUDA-graph) path only: decode/verify time without prompt chunks.
    num_static_steps: int = 0
    static_time_s: float = 0.0
    num_recoveries: int = 0  # times the expert shard group failed and was re-formed
    num_rescales: int = 0  # autoscaler changes of the shard count
    recovery_time_s: float = 0.0

    def summary(self) -> dict[str, float | None]:
        return {
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else None,
            "mean_accepted_length": (
                self.num_generated_tokens / self.num_verify_rows if self.num_verify_rows else None
            ),
            "tokens_per_step": self.num_generated_tokens / self.num_steps if self.num_steps else None,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
            "num_static_steps": self.num_static_steps,
            "static_time_s": self.static_time_s,
            "num_recoveries": self.num_recoveries,
            "num_rescales": self.num_rescales,
            "recovery_time_s": self.recovery_time_s,
        }


def load_tokenizer(path: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_local_model(
    path: str, dtype: str | torch.dtype, device: str
) -> tuple[Transformer, LoopbackDispatch | None]:
    """A model with every expert in this process (targets with num_shards=0, and drafts)."""
    model = load_trunk(path, dtype=dtype, device=device)
    args = model.args
    backend = None
    if args.is_moe:
        experts = {layer: list(range(args.num_experts)) for layer in args.moe_layers}
        store = load_experts(path, experts, dtype=model.lm_head.weight.dtype, device=device, args=args)
        backend = LoopbackDispatch(store)
        model.set_expert_backend(backend)
    return model, backend


def cost_model(model: Transformer) -> StepCostModel:
    args = model.args
    elem = model.lm_head.weight.element_size()
    expert = 3 * args.hidden_size * args.moe_intermediate_size * elem
    dense = sum(p.numel() for p in model.parameters()) * elem - args.vocab_size * args.hidden_size * elem
    return StepCostModel(dense, expert, len(args.moe_layers), args.num_experts, args.num_experts_per_tok)


def make_autoscaler(config, num_shards: int):
    if config is None:
        return None
    if num_shards == 0:
        raise ValueError("shard_autoscale needs expert shards (num_shards >= 1)")
    from specmoe_ray.serving.autoscale import ShardAutoscaler

    return ShardAutoscaler(config)


def resolve_device(device: str) -> str:
    """'cpu', or 'cuda:N' for 'cuda' / 'cuda:N' (made this process's current device: the
    engine's collectives use it too)."""
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA GPU")
        if ":" in device:
            torch.cuda.set_device(torch.device(device))
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def check_draft(target: str, args, draft: str | None) -> None:
    """A clear error, before anything loads, for a draft that cannot serve this target."""
    if draft == "mtp":
        check_mtp(target)  # a DeepSeek checkpoint with its MTP module
    elif draft is not None and draft != "ngram":
        draft_args, _ = read_config(draft)
        if draft_args.vocab_size != args.vocab_size:
            raise ValueError(
                f"draft {draft!r} has vocab_size {draft_args.vocab_size}, the target {args.vocab_size}: "
                "a draft must share the target's tokenizer"
            )


def make_proposer(draft: str, target: str, model: Transformer, config: EngineConfig, dtype, device: str):
    """The proposer for `draft`: "ngram", "mtp" (the target's own MTP module) or a checkpoint path."""
    from specmoe_ray.spec.mtp import MTPProposer
    from specmoe_ray.spec.proposer import DraftModelProposer, NgramProposer

    if draft == "ngram":
        return NgramProposer(device=device)
    if draft == "mtp":
        return MTPProposer.from_pretrained(
            target, model, config.max_num_seqs, config.max_model_len, top_n=config.draft_top_n
        )
    draft_model, _ = load_local_model(draft, dtype, device)
    return DraftModelProposer(
        draft_model,
        config.max_num_seqs,
        config.max_model_len,
        top_n=config.draft_top_n,
        step_graphs=config.step_graphs,
        max_tokens_per_seq=config.num_speculative_tokens + 1,
        max_prompt_tokens=config.graph_prompt_tokens,
    )
