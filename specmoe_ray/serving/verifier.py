"""The Verifier deployment: one Engine (trunk + verification) and its expert ShardGroup per replica.

Requests queue asynchronously into the replica's engine loop (`AsyncEngine`) and stream their
tokens back. The draft runs in this process (placement `local`) or in the DraftPool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.util import metrics

from specmoe_ray.config import ServeConfig, resolve_model_path
from specmoe_ray.engine.async_engine import AsyncEngine
from specmoe_ray.engine.engine import Engine
from specmoe_ray.engine.sequence import SamplingParams

log = logging.getLogger(__name__)


class EngineMetrics:
    """Prometheus metrics through Ray's metrics API (scraped from each node's metrics port)."""

    def __init__(self, model: str):
        tags = {"model": model}
        self.tokens = metrics.Counter("specmoe_generated_tokens", "Tokens generated.", tag_keys=("model",))
        self.tokens.set_default_tags(tags)
        self.steps = metrics.Counter("specmoe_engine_steps", "Engine steps.", tag_keys=("model",))
        self.steps.set_default_tags(tags)
        self.acceptance = metrics.Gauge(
            "specmoe_acceptance_rate", "Accepted / drafted tokens.", tag_keys=("model",)
        )
        self.acceptance.set_default_tags(tags)
        self.step_time = metrics.Histogram(
            "specmoe_step_seconds",
            "Engine step time.",
            boundaries=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3],
            tag_keys=("model",),
        )
        self.step_time.set_default_tags(tags)
        self.expert_tokens = metrics.Gauge(
            "specmoe_expert_tokens",
            "(token, expert) pairs computed per shard, cumulative.",
            tag_keys=("model", "shard"),
        )
        self.expert_tokens.set_default_tags(tags)
        self.expert_load = metrics.Gauge(
            "specmoe_expert_load",
            "Tokens routed to each (layer, expert), cumulative since the shard group formed.",
            tag_keys=("model", "layer", "expert"),
        )
        self.expert_load.set_default_tags(tags)
        self.requests = metrics.Counter(
            "specmoe_requests", "Requests by outcome.", tag_keys=("model", "finish_reason")
        )
        self.requests.set_default_tags(tags)
        self._last_tokens = 0

    def on_step(self, engine: Engine, seconds: float) -> None:
        s = engine.metrics
        self.steps.inc()
        self.step_time.observe(seconds)
        if s.num_generated_tokens > self._last_tokens:
            self.tokens.inc(s.num_generated_tokens - self._last_tokens)
            self._last_tokens = s.num_generated_tokens
        if s.num_drafted:
            self.acceptance.set(s.num_accepted / s.num_drafted)
        if engine.metrics.num_steps % 16 == 1:  # the per-shard counts are cheap but not free
            for i, n in enumerate(engine.stats().get("expert_tokens_per_shard", [])):
                self.expert_tokens.set(n, tags={"shard": str(i)})
            for layer, counts in engine.expert_load().items():
                for e, n in enumerate(counts):
                    self.expert_load.set(n, tags={"layer": str(layer), "expert": str(e)})


def to_shard_options(shards) -> Any:
    """A `ShardsConfig` as the engine's `ShardOptions`: every config field of the same name (all
    but num_shards and autoscale, which the engine and the autoscaler take)."""
    import dataclasses

    from specmoe_ray.serving.shards import ShardOptions

    names = {f.name for f in dataclasses.fields(ShardOptions)}
    return ShardOptions(**{k: v for k, v in shards.model_dump().items() if k in names})


def build_engine(cfg: ServeConfig, draft_pool=None) -> Engine:
    """The engine a Verifier replica (or a batch job) runs, from a validated config."""
    cfg.check_paths()
    s = cfg.shards
    autoscale = None
    if s.autoscale is not None:
        from specmoe_ray.serving.autoscale import ShardAutoscaleConfig

        autoscale = ShardAutoscaleConfig(**s.autoscale.model_dump())
    shard_options = to_shard_options(s)
    draft, proposer = cfg.model.draft, None
    if draft not in (None, "ngram"):
        # Without a DraftPool handle (offline batch jobs) the draft runs in this process.
        if cfg.draft_pool.placement == "pool" and draft_pool is not None:
            from specmoe_ray.serving.draft_pool import PoolProposer

            proposer = PoolProposer(
                draft_pool,
                cfg.model.device,
                affinity=cfg.draft_pool.affinity,
                timeout_s=cfg.draft_pool.timeout_s,
            )
            draft = None
        else:
            draft = resolve_model_path(draft)
    return Engine.from_pretrained(
        resolve_model_path(cfg.model.target),
        draft=draft,
        proposer=proposer,
        num_shards=s.num_shards,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        shard_options=shard_options,
        shard_autoscale=autoscale,
        **cfg.engine_kwargs(),
    )


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5)
class Verifier:
    def __init__(self, config: dict[str, Any], draft_pool=None):
        self.config = ServeConfig.from_dict(config)
        self.metrics = EngineMetrics(self.config.model.name)
        self.engine = AsyncEngine(build_engine(self.config, draft_pool), on_step=self.metrics.on_step)

    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """request: {request_id, prompt (token ids), params (SamplingParams fields)} -> chunks."""
        params = SamplingParams(**request["params"])
        async for out in self.engine.generate_stream(request["request_id"], request["prompt"], params):
            chunk = {
                "token_ids": out.new_token_ids,
                "num_generated": len(out.token_ids),
                "finish_reason": out.finish_reason,
            }
            if out.finished:
                m = out.metrics
                chunk["num_prompt_tokens"] = m.num_prompt_tokens
                chunk["acceptance_rate"] = m.acceptance_rate
                chunk["mean_accepted_length"] = m.mean_accepted_length
                chunk["all_token_ids"] = out.token_ids
                self.metrics.requests.inc(tags={"finish_reason": out.finish_reason})
            yield chunk

    def check_health(self) -> None:
        self.engine.check_health()

    def stats(self) -> dict[str, Any]:
        return self.engine.engine.stats()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
