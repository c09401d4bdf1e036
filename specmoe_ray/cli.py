"""The `specmoe` command."""

from __future__ import annotations

import argparse
import os
import sys
import time

from specmoe_ray.config import APP_IMPORT_PATH
from specmoe_ray.jobs.batch import add_parser as add_batch_parser
from specmoe_ray.jobs.submit import add_parser as add_submit_parser


def _generate(ns: argparse.Namespace) -> int:
    from specmoe_ray import Engine, SamplingParams, SpecMoEError
    from specmoe_ray.engine.detok import IncrementalText

    try:
        params = SamplingParams(
            max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed
        )
        from specmoe_ray.config import resolve_model_path

        draft = (
            None
            if ns.no_spec
            else (ns.draft if ns.draft in (None, "ngram", "mtp") else resolve_model_path(ns.draft))
        )
        shard_options = None
        for flag, value in (
            ("--replica-split", ns.replica_split),
            ("--replica-attention", ns.replica_attention),
        ):
            if value is not None and not ns.replicate_trunk:
                raise ValueError(f"{flag} applies to trunk replicas: add --replicate-trunk")
        if ns.replicate_trunk:
            if ns.num_shards < 1:
                raise ValueError("--replicate-trunk needs --num-shards 1 or more")
            from specmoe_ray.serving.shards import ShardOptions

            shard_options = ShardOptions(
                replicate_trunk=True,
                replica_split=ns.replica_split or "experts",
                replica_attention=ns.replica_attention or "replicated",
            )
        engine = Engine.from_pretrained(
            resolve_model_path(ns.model),
            draft=draft,
            num_shards=ns.num_shards,
            device=ns.device,
            dtype=ns.dtype,
            num_speculative_tokens=ns.k,
            shard_options=shard_options,
        )
    except (SpecMoEError, ValueError) as e:
        print(f"specmoe generate: {e}", file=sys.stderr)
        return 2
    with engine:
        if engine.tokenizer is None:
            print(
                f"specmoe generate: {ns.model} has no tokenizer; cannot encode a text prompt", file=sys.stderr
            )
            return 2
        try:
            rid = engine.add_request(ns.prompt, params)
        except SpecMoEError as e:
            print(f"specmoe generate: {e}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        text = IncrementalText(engine.tokenizer)  # (whole characters only: no U+FFFD halves)
        final = None
        while final is None:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                printed = len(text.text)
                sys.stdout.write(text.extend(out.new_token_ids)[printed:])
                sys.stdout.flush()
                if out.finished:
                    final = out
        elapsed = time.perf_counter() - start
        n = len(final.token_ids)
        m = final.metrics
        spec = "no speculation"
        if m.acceptance_rate is not None:
            spec = (
                f"acceptance rate {m.acceptance_rate:.2f}, mean accepted length {m.mean_accepted_length:.2f}"
            )
        rate = f"{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tokens/s"
        print(f"\n[{rate}; {spec}; finish: {final.finish_reason}]", file=sys.stderr)
    return 0


REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_DIR, "deployments", "demo.yaml")


def _serve_file_options(path: str) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    apps = [a for a in data.get("applications") or [] if a.get("import_path") == APP_IMPORT_PATH]
    return {
        "http": data.get("http_options") or {},
        "name": apps[0].get("name", "specmoe") if apps else "specmoe",
        "route_prefix": apps[0].get("route_prefix", "/") if apps else "/",
    }


def _print_progress(app_name: str, started: float) -> str:
    from ray import serve

    try:
        status = serve.status().applications.get(app_name)
    except Exception:  # the controller is still starting
        return ""
    if status is None:
        return ""
    import ray

    parts = []
    for name, dep in sorted(status.deployments.items()):
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(dep.replica_states.items()))
        parts.append(f"{name}: {dep.status.lower()}" + (f" ({counts})" if counts else ""))
    pending = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") == "PENDING"]
    if pending:
        bundles = [b for pg in pending for b in pg.get("bundles", {}).values()]
        parts.append(f"waiting for resources {bundles} (free: {ray.available_resources()})")
    return f"{status.status.lower()}: " + "; ".join(parts)


def _serve(ns: argparse.Namespace) -> int:
    import threading

    from specmoe_ray import ServeConfig, SpecMoEError

    path = ns.config or DEFAULT_CONFIG
    try:
        config = ServeConfig.from_yaml(path)
        config.check_paths()
        opts = _serve_file_options(path)
    except (SpecMoEError, ValueError, OSError) as e:
        print(f"specmoe serve: {e}", file=sys.stderr)
        return 2
    host = ns.host or opts["http"].get("host", "127.0.0.1")
    port = ns.port or int(opts["http"].get("port", 8000))

    import signal

    import ray
    from ray import serve

    from specmoe_ray.serving import build_app

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` and container stops shut down as cleanly as Ctrl-C
    address = os.environ.get("RAY_ADDRESS")
    print(f"specmoe serve: {path}", flush=True)
    if address:
        print(f"joining the Ray cluster at {address}", flush=True)
        ctx = ray.init(address=address, log_to_driver=False)
    else:
        print("starting a local Ray cluster", flush=True)
        ctx = ray.init(
            address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=ns.verbose
        )
    dashboard = ctx.dashboard_url or "(dashboard not running)"
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    print(f"Ray session: {ray._private.worker.global_worker.node.get_session_dir_path()}", flush=True)
    name, prefix = opts["name"], opts["route_prefix"]
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        app = build_app(config)
        error: list[BaseException] = []

        def deploy() -> None:
            try:
                serve.run(app, name=name, route_prefix=prefix)
            except BaseException as e:  # reported by the main thread
                error.append(e)

        started = time.monotonic()
        worker = threading.Thread(target=deploy, daemon=True)
        worker.start()
        last = ""
        while worker.is_alive():
            worker.join(timeout=1.0)
            line = _print_progress(name, started)
            if line and line != last:  # print changes only
                print(f"[{time.monotonic() - started:4.0f}s] {line}", flush=True)
                last = line
        if error:
            print(f"specmoe serve: deployment failed: {error[0]}", file=sys.stderr)
            return 1
        base = f"http://{host}:{port}{prefix.rstrip('/')}"
        model = config.model.name
        print(
            f"""
ready in {time.monotonic() - started:.0f}s: model {model!r}
  OpenAI API   {base}/v1   (completions, chat/completions, models; /health)
  dashboard    {dashboard}

try it:
  curl {base}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "prompt": "def fibonacci(n):", "max_tokens": 48, "temperature": 0}}'

  python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='none'); \\
print(c.completions.create(model='{model}', prompt='import os', max_tokens=32).choices[0].text)"

Ctrl-C stops the server{" and the local Ray cluster" if not address else ""}.""",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave Ray processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if address:
                serve.delete(name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt")
    g.add_argument("--model", default="demo-target", help="checkpoint directory (default: the demo target)")
    g.add_argument(
        "--draft",
        default="demo-draft",
        help="draft directory, 'ngram', 'mtp' (DeepSeek-V3's own MTP module), or demo-draft (default)",
    )
    g.add_argument("--no-spec", action="store_true", help="plain decoding, to compare")
    g.add_argument("--k", type=int, default=4, help="speculative tokens per step")
    g.add_argument("--num-shards", type=int, default=0, help="expert shards as Ray actors (0 = in-process)")
    g.add_argument(
        "--replicate-trunk",
        action="store_true",
        help="every shard also runs the trunk; this process holds shard 0 (ShardOptions.replicate_trunk)",
    )
    g.add_argument(
        "--replica-split",
        choices=["experts", "intermediate"],
        help="with --replicate-trunk: shards hold whole experts (default) or a slice of every expert",
    )
    g.add_argument(
        "--replica-attention",
        choices=["replicated", "heads"],
        help="with --replicate-trunk: every shard runs all attention heads (default) or its share of them",
    )
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=_generate)

    sv = sub.add_parser("serve", help="deploy a config (default: the demo) and serve the OpenAI API")
    sv.add_argument("config", nargs="?", help=f"a Serve config YAML (default: {DEFAULT_CONFIG})")
    sv.add_argument("--host", default=None, help="HTTP host (default: the file's, else 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="HTTP port (default: the file's, else 8000)")
    sv.add_argument("--verbose", action="store_true", help="show the cluster's logs")
    sv.set_defaults(func=_serve)

    add_batch_parser(sub)
    add_submit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
