"""Ray Serve deployments: Ingress (OpenAI API), Verifier (engine), DraftPool, and expert shards."""


def __getattr__(name: str):
    # Lazy, so that expert-shard processes importing serving.shards skip FastAPI and Serve.
    if name in ("build_app", "app_builder"):
        from specmoe_ray.serving import app

        return getattr(app, name)
    raise AttributeError(name)


__all__ = ["app_builder", "build_app"]
