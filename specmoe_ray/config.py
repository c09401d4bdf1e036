"""User-facing deployment configuration, validated once at the boundary.

A deployment YAML is a Ray Serve config file (`serve run` / `serve deploy` take it as is):
its application's `args` are a `ServeConfig`. `ServeConfig.from_yaml` reads either that file
or a bare `ServeConfig` mapping.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specmoe_ray.errors import CheckpointError, SpecMoEError

APP_IMPORT_PATH = "specmoe_ray.serving.app:app_builder"


class ConfigError(SpecMoEError, ValueError):
    """A deployment config is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def resolve_model_path(path: str) -> str:
    """`demo-target` / `demo-draft` name the shipped demo pair; other paths are used as given."""
    if path in ("demo-target", "demo-draft"):
        from specmoe_ray import demo

        return demo.TARGET_DIR if path == "demo-target" else demo.DRAFT_DIR
    return os.path.expanduser(path)


class ModelConfig(_Strict):
    name: str = Field("specmoe", min_length=1, description="Model id clients send as `model` (OpenAI API).")
    target: str = Field(
        ...,
        min_length=1,
        description="Target checkpoint directory (config.json + *.safetensors), or demo-target.",
    )
    draft: str | None = Field(
        None,
        description=(
            "Draft checkpoint directory, demo-draft, 'ngram' (prompt lookup), 'mtp' (the target's own "
            "multi-token-prediction module: DeepSeek-V3/R1), or null (none)."
        ),
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the trunk and the shards run.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")


class EngineSettings(_Strict):
    max_num_seqs: int = Field(16, ge=1, le=4096, description="Sequences a verifier replica runs at once.")
    max_model_len: int | None = Field(
        None, ge=2, description="Context length per sequence (default: model's, <= 4096)."
    )
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Prompt tokens per step; longer prompts prefill in chunks."
    )
    num_speculative_tokens: int = Field(
        4, ge=0, le=16, description="Draft tokens per step (the most, if adaptive)."
    )
    spec_policy: Literal["fixed", "adaptive"] = Field(
        "fixed", description="Speculation length: fixed k, or chosen per step."
    )
    draft_top_n: int = Field(32, ge=1, description="Support size of the sparse draft distributions.")
    decode_steps: int = Field(
        4,
        ge=1,
        le=64,
        description="Decode steps run back to back per host sync when nothing is verified (k = 0; "
        "static steps). Streams then get up to this many tokens at a time.",
    )


class ShardAutoscale(_Strict):
    """Scale the expert shards with measured load (at step boundaries, nothing lost)."""

    min_shards: int = Field(1, ge=1, description="Fewest shards.")
    max_shards: int = Field(4, ge=1, description="Most shards; more ask Ray (and KubeRay) for more GPUs.")
    target_pairs_per_shard_s: float = Field(
        20_000.0, gt=0, description="(token, expert) pairs one shard should serve per second."
    )
    max_step_s: float | None = Field(None, gt=0, description="A slower engine step asks for one more shard.")
    interval_s: float = Field(5.0, gt=0, description="Measurement window.")
    upscale_delay_s: float = Field(0.0, ge=0, description="How long more shards must be wanted first.")
    downscale_delay_s: float = Field(30.0, ge=0, description="How long fewer shards must be wanted first.")
    replicate_hot_experts: int = Field(
        0, ge=0, description="Per layer, the hottest experts get a second replica."
    )


class ShardsConfig(_Strict):
    num_shards: int = Field(
        0, ge=0, description="Expert shard actors (0 = experts in the verifier's process)."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per shard actor.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per shard (default: 1 on cuda, 0 on cpu).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources every shard needs."
    )
    bundle_resources: list[dict[str, float]] | None = Field(
        None, description="Per-shard extra resources (round robin), e.g. one node label each, to pin shards."
    )
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy across nodes."
    )
    startup_timeout_s: float = Field(
        300.0, gt=0, description="Reserve resources, start actors, load experts."
    )
    collective_timeout_s: float = Field(
        120.0, gt=0, description="Join the process group; any one collective."
    )
    local_shard: bool = Field(
        False,
        description="Shard 0 lives in the verifier's process, on its device: num_shards GPUs in all, "
        "the verifier's included, hold experts (num_shards - 1 actors).",
    )
    cuda_graphs: bool = Field(
        True,
        description="GPUs: capture steps with their NCCL exchanges in CUDA graphs (shards too). "
        "A failed capture falls back to eager steps.",
    )
    replicate_trunk: bool = Field(
        False,
        description="Every shard also runs the dense trunk with a KV cache of its own (shard 0 in the "
        "verifier's process, as local_shard): one all_reduce per MoE layer instead of two exchanges, no "
        "idle GPU while the trunk runs. Faster on GPUs (RESULTS.md session 9); costs the trunk's "
        "weights and a KV cache per GPU.",
    )
    replica_exact: bool = Field(
        False,
        description="With replicate_trunk: sum the experts' unweighted outputs (exact) instead of float32 "
        "partial sums, so bf16 tokens match experts in-process bit for bit; more bytes per all_reduce.",
    )
    replica_split: Literal["experts", "intermediate"] = Field(
        "experts",
        description="With replicate_trunk: 'experts': each shard holds whole experts (the placement "
        "plan's); 'intermediate': every shard holds every expert's 1 / num_shards slice of its "
        "intermediate size, so every GPU reads the same bytes whatever the routing (no load imbalance; "
        "not with replica_exact, and autoscaling's placement plans do not apply).",
    )
    replica_attention: Literal["replicated", "heads"] = Field(
        "replicated",
        description="With replicate_trunk: 'replicated': every shard runs all attention heads with a full "
        "KV cache; 'heads': each shard keeps 1 / num_shards of the heads and only their KV cache (memory per "
        "GPU / num_shards), and each layer's attention output is summed over the shards too. num_shards must "
        "divide the query and key/value head counts and stays fixed (no autoscale); not replica_exact, not "
        "MLA models.",
    )
    replica_peer_sum: int | None = Field(
        None,
        ge=0,
        le=65536,  # shards.MAX_PEER_ROWS
        description="With replicate_trunk (not replica_exact), GPUs of one host: graphed steps of up to this "
        "many tokens sum the shards' outputs by NVLink peer loads instead of NCCL (2 H200s, 48 layers, split "
        "experts: 1.54x one GPU at batch 32 vs 1.51x, 1.00x at batch 1 vs 0.92x; RESULTS.md session 13); "
        "0: off; null (default): 256 for trunk replicas on GPUs. Where they cannot run (several hosts, no "
        "peer access) NCCL sums. A shard that dies mid-sum is replaced and the step replayed, as with NCCL; "
        "one alive but stuck past collective_timeout_s ends the verifier's process. Measured over NVLink; "
        "GPUs that reach each other only over PCIe: compare with 0.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for the shard group's communicators, e.g. {NCCL_GRAPH_REGISTER: '0'}.",
    )
    autoscale: ShardAutoscale | None = Field(
        None, description="Scale shards with measured load; num_shards is where it starts."
    )

    @model_validator(mode="after")
    def _exact_needs_replicas(self) -> ShardsConfig:
        if self.replica_exact and not self.replicate_trunk:
            raise ValueError("shards.replica_exact applies to trunk replicas: set shards.replicate_trunk too")
        if self.replica_split == "intermediate" and (self.replica_exact or not self.replicate_trunk):
            raise ValueError(
                "shards.replica_split 'intermediate' applies to trunk replicas (set shards.replicate_trunk) "
                "and sums partial outputs, so it cannot be shards.replica_exact"
            )
        if self.replica_attention == "heads" and (
            self.replica_exact or not self.replicate_trunk or self.autoscale is not None
        ):
            raise ValueError(
                "shards.replica_attention 'heads' applies to trunk replicas (set shards.replicate_trunk) "
                "that sum partial outputs (not shards.replica_exact), over a fixed shard count (no "
                "shards.autoscale)"
            )
        if self.replica_peer_sum and (self.replica_exact or not self.replicate_trunk):
            raise ValueError(
                "shards.replica_peer_sum applies to trunk replicas (set shards.replicate_trunk) that sum "
                "partial outputs, so it cannot be shards.replica_exact"
            )
        return self


def _check_autoscaling(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Serve ignores unknown autoscaling keys; a misspelt one must not pass silently."""
    if value is None:
        return None
    from ray.serve.config import AutoscalingConfig

    unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown autoscaling_config keys {unknown}")
    AutoscalingConfig(**value)
    return value


class DraftPoolConfig(_Strict):
    placement: Literal["local", "pool"] = Field(
        "local",
        description="local: the draft runs in the verifier's process (lowest latency); pool: a DraftPool.",
    )
    num_replicas: int = Field(1, ge=1, description="DraftPool replicas (ignored with autoscaling_config).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config of the DraftPool."
    )
    affinity: bool = Field(
        True, description="Keep each sequence's proposals on the replica that holds its draft cache."
    )
    max_num_seqs: int = Field(
        256, ge=1, description="Draft caches a pool replica keeps (least recently used go first)."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1}, description="Per replica."
    )
    timeout_s: float = Field(30.0, gt=0, description="Bound on one proposal call.")

    _autoscaling = field_validator("autoscaling_config")(_check_autoscaling)


class VerifierConfig(_Strict):
    num_replicas: int = Field(
        1, ge=1, description="Verifier replicas, each with its own engine and shard group."
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests a replica accepts at once (queued in its engine)."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1}, description="Per replica."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config of the Verifier."
    )


class IngressConfig(_Strict):
    api_key: str | None = Field(
        None, description="Bearer token clients must send; null = open (see api_key_env)."
    )
    api_key_env: str | None = Field(
        "SPECMOE_API_KEY", description="Environment variable that, when set, holds the bearer token."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 above).")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0.1}, description="Per replica (it only parses and streams)."
    )


class ServeConfig(_Strict):
    """Everything one specmoe application needs: model, engine, shards, draft pool, verifier, ingress."""

    model: ModelConfig
    engine: EngineSettings = Field(default_factory=EngineSettings)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    draft_pool: DraftPoolConfig = Field(default_factory=DraftPoolConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @model_validator(mode="after")
    def _mtp_runs_locally(self) -> ServeConfig:
        if self.model.draft == "mtp" and self.draft_pool.placement == "pool":
            raise ValueError(
                "model.draft='mtp' drafts from the target's own hidden states, in the verifier: "
                "set draft_pool.placement to 'local'"
            )
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> ServeConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: invalid specmoe config:\n{_format_errors(e)}") from None

    @classmethod
    def from_yaml(cls, path: str, app_name: str | None = None) -> ServeConfig:
        """Read a Serve config file (its specmoe application's args) or a bare ServeConfig YAML."""
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if isinstance(data, dict) and "applications" in data:
            apps = [a for a in data["applications"] or [] if a.get("import_path") == APP_IMPORT_PATH]
            if app_name is not None:
                apps = [a for a in apps if a.get("name") == app_name]
            if not apps:
                raise ConfigError(f"{path}: no application with import_path {APP_IMPORT_PATH!r}")
            data = apps[0].get("args") or {}
        return cls.from_dict(data, source=path)

    def check_paths(self) -> None:
        """Fail early, with the field's name, when a checkpoint path does not exist here."""
        for field, value in (("model.target", self.model.target), ("model.draft", self.model.draft)):
            if value in (None, "ngram", "mtp"):
                continue
            path = resolve_model_path(value)
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise CheckpointError(
                    f"{field}: no checkpoint at {path!r} (expected a directory with config.json)"
                )
        if self.model.draft == "mtp":
            from specmoe_ray.models.loader import check_mtp

            try:
                check_mtp(resolve_model_path(self.model.target))
            except CheckpointError as e:
                raise type(e)(f"model.draft='mtp': {e}") from None

    def engine_kwargs(self) -> dict[str, Any]:
        return self.engine.model_dump()


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)
