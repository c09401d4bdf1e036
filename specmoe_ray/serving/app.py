"""Assemble the Serve application: Ingress -> Verifier (-> DraftPool) from one ServeConfig.

`serve run deployments/demo.yaml` imports `app_builder` (the file's `import_path`) and calls it
with the application's `args`; Python callers use `build_app(ServeConfig...)`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from specmoe_ray.config import ServeConfig
from specmoe_ray.serving.draft_pool import DraftPool
from specmoe_ray.serving.ingress import Ingress
from specmoe_ray.serving.verifier import Verifier


def build_app(config: ServeConfig) -> serve.Application:
    """The application; a config error surfaces here, before anything is deployed."""
    config.check_paths()
    data = config.model_dump()
    pool = None
    if config.model.draft not in (None, "ngram") and config.draft_pool.placement == "pool":
        from specmoe_ray.config import resolve_model_path
        from specmoe_ray.models.loader import read_config

        dp = config.draft_pool
        args, _ = read_config(resolve_model_path(config.model.target))
        max_len = config.engine.max_model_len or min(args.max_position_embeddings, 4096)
        options: dict[str, Any] = {
            "ray_actor_options": dp.ray_actor_options,
            "request_router_config": RequestRouterConfig(
                request_router_class="specmoe_ray.serving.draft_pool:SequenceAffinityRouter"
            ),
        }
        if dp.autoscaling_config:
            options["autoscaling_config"] = dp.autoscaling_config
        else:
            options["num_replicas"] = dp.num_replicas
        pool = DraftPool.options(**options).bind(
            resolve_model_path(config.model.draft),
            config.model.dtype,
            dp.max_num_seqs,
            max_len,
            config.engine.draft_top_n,
        )
    v = config.verifier
    v_options: dict[str, Any] = {
        "ray_actor_options": v.ray_actor_options,
        "max_ongoing_requests": v.max_ongoing_requests,
    }
    if v.autoscaling_config:
        v_options["autoscaling_config"] = v.autoscaling_config
    else:
        v_options["num_replicas"] = v.num_replicas
    verifier = Verifier.options(**v_options).bind(data, pool)
    ing = config.ingress
    return Ingress.options(num_replicas=ing.num_replicas, ray_actor_options=ing.ray_actor_options).bind(
        data, verifier
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point named by deployment YAMLs (`import_path: specmoe_ray.serving.app:app_builder`)."""
    return build_app(ServeConfig.from_dict(args, source="application args"))
