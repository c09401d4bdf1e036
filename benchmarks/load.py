"""Load test of a specmoe Serve deployment: N concurrent streaming clients, loopback only.

Each client loops until `--duration-s` has passed or `--max-requests` requests have been sent
(whichever comes first): it picks one of a fixed list of Python-code prompts, sends a streaming
`/v1/completions` or `/v1/chat/completions` request with `stream_options.include_usage`, and
records the time to first token (first non-empty text chunk) and the total latency. Every response
is checked:

- the stream is well formed: HTTP 200, one chunk with a finish_reason, a usage chunk, `[DONE]`;
- its token count: `usage.completion_tokens == max_tokens` with finish_reason "length", or
  `<= max_tokens` with "stop" (the model emitted its end-of-sequence token);
- greedy requests (temperature 0): text, token count and finish_reason equal the reference;
- sampled requests (seeded, from a small pool of seeds): a repeat of the same prompt, endpoint and
  seed returns the same text as the first one (a seeded request ignores its batch company).

The greedy reference is computed before the load starts, one prompt at a time, by an in-process
`specmoe_ray.Engine` on the deployment's target checkpoint, without draft and without expert shards
(plain greedy decoding of the target: speculative decoding is lossless, so the served output must
equal it token for token). Where the config is not known (a server already running at --url) or
the model is not on CPU, the reference is a non-streaming greedy request per prompt sent to the
server alone before the load. With the engine reference those solo requests still run (they warm
the server up) and must agree with the engine too.

Only loopback targets (127.0.0.1, localhost, ::1) are accepted. With `--deploy CONFIG`, or when no
server answers at --url, a new local Ray cluster is started, the config's application is deployed
on a free port of 127.0.0.1 (the YAML's http_options are not used), and both are shut down at the
end. Exit status 1 if any request failed or mismatched.

    python benchmarks/load.py --deploy deployments/demo.yaml --clients 4 --duration-s 20
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 8 --duration-s 30 --json load.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import os
import platform
import random
import shlex
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEPLOY = os.path.join(REPO_ROOT, "deployments", "demo.yaml")
ENDPOINTS = ("completions", "chat")
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# Python source openings: what the demo model was trained on.
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n",
    "def read_json(path):\n    with open(path) as f:\n",
    "import re\n\nPATTERN = re.compile(",
    'def is_prime(n):\n    """Return True if n is prime."""\n',
    "try:\n    import json\nexcept ImportError:\n",
)
SAMPLED_TEMPERATURE = 0.8
SAMPLED_TOP_P = 0.95


class LoadTestError(Exception):
    """A usage or setup error (bad target, no server, unknown model)."""


@dataclasses.dataclass
class LoadOptions:
    clients: int = 8
    duration_s: float = 30.0
    max_requests: int = 500
    max_tokens: int = 32
    greedy_fraction: float = 0.5
    chat_fraction: float = 0.25
    request_timeout_s: float = 60.0
    seed: int = 0  # the request plan (endpoint, prompt, greedy or not, seed) per request number
    seed_pool: int = 2  # sampled requests draw their seed from range(seed_pool), so repeats occur
    reference: str = "auto"  # auto | engine | server

    def validate(self) -> None:
        if self.clients < 1:
            raise LoadTestError("--clients must be >= 1")
        if not 0 < self.duration_s <= 3600:
            raise LoadTestError("--duration-s must be in (0, 3600]")
        if self.max_requests < 1:
            raise LoadTestError("--max-requests must be >= 1")
        if self.max_tokens < 1:
            raise LoadTestError("--max-tokens must be >= 1")
        for name in ("greedy_fraction", "chat_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LoadTestError(f"--{name.replace('_', '-')} must be in [0, 1]")
        if not 0 < self.request_timeout_s <= 600:
            raise LoadTestError("--request-timeout-s must be in (0, 600]")
        if self.seed_pool < 1:
            raise LoadTestError("--seed-pool must be >= 1")
        if self.reference not in ("auto", "engine", "server"):
            raise LoadTestError("--reference must be auto, engine or server")


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    endpoint: str  # "completions" | "chat"
    prompt_index: int
    greedy: bool
    seed: int | None  # sampled requests only
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Reference:
    text: str
    completion_tokens: int
    finish_reason: str
    prompt_tokens: int | None = None


@dataclasses.dataclass
class Outcome:
    spec: RequestSpec
    start_s: float = 0.0  # since the load started
    latency_s: float | None = None
    ttft_s: float | None = None
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    mismatches: list[str] = dataclasses.field(default_factory=list)

    @property
    def status(self) -> str:
        return "error" if self.error else ("mismatch" if self.mismatches else "ok")


# -- targets ----------------------------------------------------------------------------------------


def check_loopback(url: str) -> str:
    """The base URL (no trailing slash) if it names a loopback HTTP server; LoadTestError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise LoadTestError(f"--url {url!r}: only plain http:// to a loopback address is supported")
    host = parts.hostname
    if not host:
        raise LoadTestError(f"--url {url!r}: no host")
    if host.lower() != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise LoadTestError(
                f"--url {url!r}: refusing to load-test {host!r}; this tool only targets loopback "
                "addresses (127.0.0.1, localhost, ::1)"
            )
    if parts.query or parts.fragment:
        raise LoadTestError(f"--url {url!r}: no query or fragment expected")
    return url.rstrip("/")


def _http_get(url: str, timeout_s: float) -> tuple[int, str]:
    """GET without any proxy (a proxy would take the request off this machine)."""
    check_loopback(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def served_models(base_url: str, timeout_s: float = 3.0) -> list[str] | None:
    """The model ids the server at base_url lists, or None when nothing answers there."""
    try:
        status, body = _http_get(base_url + "/v1/models", timeout_s)
    except (OSError, ValueError):
        return None
    if status != 200:
        return None
    try:
        return [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return None


def wait_ready(base_url: str, timeout_s: float = 120.0) -> None:
    """Until /health says ok (the HTTP proxy may learn a new route a moment after serve.run)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = _http_get(base_url + "/health", 5.0)
            if status == 200:
                return
            last = f"{status} {body[:200]}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise LoadTestError(f"{base_url}/health not ready after {timeout_s:.0f} s: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_client():
    """The running Serve instance's client, or None (Ray must be initialized)."""
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None


@contextlib.contextmanager
def deployed(serve_config, app_name: str = "specmoe-load", route_prefix: str = "/") -> Iterator[str]:
    """Deploy `serve_config` on the Ray cluster this process is connected to; yield its base URL.

    A running Serve instance is reused (its HTTP port; only this app is deleted at the end);
    otherwise Serve is started on a free port of 127.0.0.1 and shut down at the end.
    """
    from ray import serve

    from specmoe_ray.serving import build_app

    app = build_app(serve_config)  # config errors surface before anything starts
    client = _serve_client()
    started = client is None
    if started:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    else:
        http = client.http_config
        if http.host not in ("127.0.0.1", "localhost", "0.0.0.0", "::", "::1"):
            raise LoadTestError(f"the running Serve listens on {http.host}, not on a loopback address")
        port = http.port
    base_url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    try:
        serve.run(app, name=app_name, route_prefix=route_prefix)
        wait_ready(base_url)
        yield base_url
    finally:
        with contextlib.suppress(Exception):
            serve.delete(app_name)
        if started:
            with contextlib.suppress(Exception):
                serve.shutdown()


@contextlib.contextmanager
def local_cluster() -> Iterator[None]:
    """A new local Ray cluster for this run (never an existing one), shut down at the end."""
    import ray

    ray.init(
        address="local",
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


# -- references --------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """The token ids the ingress builds for one user message (its template logic)."""
    from specmoe_ray.serving.ingress import FALLBACK_CHAT_TEMPLATE

    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=template,
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def engine_references(
    serve_config, prompts: tuple[str, ...], max_tokens: int
) -> dict[tuple[str, int], Reference]:
    """Greedy outputs of the target alone (no draft, experts in-process), one prompt at a time."""
    from specmoe_ray import Engine, SamplingParams
    from specmoe_ray.config import resolve_model_path

    m = serve_config.model
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    refs: dict[tuple[str, int], Reference] = {}
    with Engine.from_pretrained(
        resolve_model_path(m.target),
        draft=None,
        num_shards=0,
        device=m.device,
        dtype=m.dtype,
        max_model_len=serve_config.engine.max_model_len,
    ) as engine:
        tok = engine.tokenizer
        if tok is None:
            raise LoadTestError("the target checkpoint has no tokenizer: text prompts need one")
        for i, prompt in enumerate(prompts):
            for endpoint in ENDPOINTS:
                ids = (
                    tok.encode(prompt, add_special_tokens=False)
                    if endpoint == "completions"
                    else chat_prompt_ids(tok, prompt)
                )
                out = engine.generate([ids], params)[0]
                refs[(endpoint, i)] = Reference(
                    out.text or "", len(out.token_ids), out.finish_reason, len(ids)
                )
    return refs


def request_body(model: str, spec: RequestSpec, prompts: tuple[str, ...], stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "temperature": 0.0 if spec.greedy else SAMPLED_TEMPERATURE}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompts[spec.prompt_index]}]
        body["max_completion_tokens"] = spec.max_tokens
    else:
        body["prompt"] = prompts[spec.prompt_index]
        body["max_tokens"] = spec.max_tokens
    if not spec.greedy:
        body["top_p"] = SAMPLED_TOP_P
        body["seed"] = spec.seed
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def solo_request(session, base_url: str, model: str, spec: RequestSpec, prompts, timeout_s: float):
    """One non-streaming request: (Reference, None) or (None, error)."""
    import aiohttp

    body = request_body(model, spec, prompts, stream=False)
    try:
        async with session.post(
            base_url + PATHS[spec.endpoint],
            json=body,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            text = await resp.text()
            if resp.status != 200:
                return None, f"HTTP {resp.status}: {text[:300]}"
            data = json.loads(text)
            choice = data["choices"][0]
            content = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
            usage = data["usage"]
            return Reference(
                content, usage["completion_tokens"], choice["finish_reason"], usage["prompt_tokens"]
            ), None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, IndexError) as e:
        return None, f"{type(e).__name__}: {e}"


# -- the load ------------------------------------------------------------------------------------------


def plan_request(ticket: int, opts: LoadOptions, num_prompts: int) -> RequestSpec:
    """Request number `ticket` of this run: the same for a given --seed, whatever the timing."""
    rng = random.Random(opts.seed * 1_000_003 + ticket)
    endpoint = "chat" if rng.random() < opts.chat_fraction else "completions"
    greedy = rng.random() < opts.greedy_fraction
    prompt_index = rng.randrange(num_prompts)
    seed = None if greedy else rng.randrange(opts.seed_pool)
    return RequestSpec(endpoint, prompt_index, greedy, seed, opts.max_tokens)


async def stream_request(
    session, base_url: str, model: str, spec: RequestSpec, prompts, timeout_s: float, t0: float
) -> Outcome:
    """Send one streaming request and read it to the end, within timeout_s; errors land in `error`."""
    import aiohttp

    out = Outcome(spec)
    start = time.monotonic()
    out.start_s = start - t0
    try:
        await asyncio.wait_for(
            _stream(session, base_url, model, spec, prompts, timeout_s, start, out), timeout_s
        )
    except (asyncio.TimeoutError, TimeoutError):
        out.error = f"timed out after {timeout_s:g} s"
    except (aiohttp.ClientError, ValueError, KeyError, TypeError, AttributeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


async def _stream(
    session, base_url, model, spec: RequestSpec, prompts, timeout_s, start, out: Outcome
) -> None:
    import aiohttp

    body = request_body(model, spec, prompts, stream=True)
    finishes: list[str] = []
    usage = None
    done = False
    async with session.post(
        base_url + PATHS[spec.endpoint],
        json=body,
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            return
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                continue
            if not line.startswith("data: "):
                out.error = f"not an SSE data line: {line[:200]!r}"
                return
            payload = line[len("data: ") :]
            if done:
                out.error = f"data after [DONE]: {payload[:200]!r}"
                return
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                out.error = f"error event: {json.dumps(event['error'])[:300]}"
                return
            if event.get("usage") is not None:
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if spec.endpoint == "chat":
                    delta = (choice.get("delta") or {}).get("content") or ""
                else:
                    delta = choice.get("text") or ""
                if delta and out.ttft_s is None:
                    out.ttft_s = time.monotonic() - start
                out.text += delta
                if choice.get("finish_reason") is not None:
                    finishes.append(choice["finish_reason"])
    out.latency_s = time.monotonic() - start
    if not done:
        out.error = "the stream ended without [DONE]"
    elif len(finishes) != 1:
        out.error = f"expected one chunk with a finish_reason, got {finishes}"
    elif usage is None:
        out.error = "no usage chunk (stream_options.include_usage was sent)"
    else:
        out.finish_reason = finishes[0]
        out.completion_tokens = usage.get("completion_tokens")
        out.prompt_tokens = usage.get("prompt_tokens")
        if usage.get("total_tokens") != (out.prompt_tokens or 0) + (out.completion_tokens or 0):
            out.mismatches.append(f"usage: total_tokens != prompt + completion in {usage}")


def check_outcome(
    out: Outcome, references: dict[tuple[str, int], Reference], first_sampled: dict[tuple, Outcome]
) -> bool:
    """Token count rule, greedy reference, seeded repeats: appends to out.mismatches.

    Returns whether this was a seeded repeat (a sampled request compared with an earlier one).
    """
    if out.error:
        return False
    spec, n = out.spec, out.completion_tokens
    if out.finish_reason == "length":
        if n != spec.max_tokens:
            out.mismatches.append(
                f"token_count: finish 'length' with {n} tokens, max_tokens {spec.max_tokens}"
            )
    elif out.finish_reason == "stop":
        if not isinstance(n, int) or not 1 <= n <= spec.max_tokens:
            out.mismatches.append(f"token_count: finish 'stop' with {n} tokens, max_tokens {spec.max_tokens}")
    else:
        out.mismatches.append(f"finish_reason: {out.finish_reason!r}, expected 'length' or 'stop'")
    if spec.greedy:
        ref = references.get((spec.endpoint, spec.prompt_index))
        if ref is None:
            out.mismatches.append("reference: none for this prompt")
            return False
        for field, got, want in (
            ("text", out.text, ref.text),
            ("token_count", n, ref.completion_tokens),
            ("finish_reason", out.finish_reason, ref.finish_reason),
        ):
            if got != want:
                out.mismatches.append(f"{field}: got {got!r}, reference {want!r}")
        if ref.prompt_tokens is not None and out.prompt_tokens != ref.prompt_tokens:
            out.mismatches.append(f"prompt_tokens: got {out.prompt_tokens}, reference {ref.prompt_tokens}")
    else:
        key = (spec.endpoint, spec.prompt_index, spec.seed, spec.max_tokens)
        first = first_sampled.setdefault(key, out)
        if first is out:
            return False
        if (first.text, first.completion_tokens, first.finish_reason) != (out.text, n, out.finish_reason):
            out.mismatches.append(
                f"seeded_repeat: seed {spec.seed} gave {out.text!r} ({n} tokens), earlier {first.text!r} "
                f"({first.completion_tokens} tokens)"
            )
        return True
    return False


async def _load(base_url: str, model: str, opts: LoadOptions, prompts, references) -> tuple[list, float]:
    import aiohttp

    outcomes: list[Outcome] = []
    tickets = itertools.count()
    connector = aiohttp.TCPConnector(limit=opts.clients)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        t0 = time.monotonic()
        deadline = t0 + opts.duration_s

        async def client() -> None:
            while time.monotonic() < deadline:
                ticket = next(tickets)
                if ticket >= opts.max_requests:
                    return
                spec = plan_request(ticket, opts, len(prompts))
                outcomes.append(
                    await stream_request(session, base_url, model, spec, prompts, opts.request_timeout_s, t0)
                )

        # In-flight requests finish after the deadline, each within its own timeout.
        await asyncio.wait_for(
            asyncio.gather(*(client() for _ in range(opts.clients))),
            timeout=opts.duration_s + opts.request_timeout_s + 10,
        )
        wall = time.monotonic() - t0
    return outcomes, wall


async def _solo_references(base_url: str, model: str, opts: LoadOptions, prompts):
    import aiohttp

    refs: dict[tuple[str, int], Reference] = {}
    errors: dict[tuple[str, int], str] = {}
    async with aiohttp.ClientSession(trust_env=False) as session:
        for i in range(len(prompts)):
            for endpoint in ENDPOINTS:
                spec = RequestSpec(endpoint, i, True, None, opts.max_tokens)
                ref, err = await solo_request(session, base_url, model, spec, prompts, opts.request_timeout_s)
                if ref is None:
                    errors[(endpoint, i)] = err
                else:
                    refs[(endpoint, i)] = ref
    return refs, errors


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == "ok"]
    answered = [o for o in outcomes if not o.error]
    tokens = sum(o.completion_tokens or 0 for o in answered)
    lat = [o.latency_s for o in answered if o.latency_s is not None]
    ttft = [o.ttft_s for o in answered if o.ttft_s is not None]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": sum(o.status == "error" for o in outcomes),
        "mismatches": sum(o.status == "mismatch" for o in outcomes),
        "greedy": sum(o.spec.greedy for o in outcomes),
        "sampled": sum(not o.spec.greedy for o in outcomes),
        "finish_stop": sum(o.finish_reason == "stop" for o in answered),
        "generated_tokens": tokens,
        "requests_per_s": len(answered) / wall_s if wall_s > 0 else None,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "latency_max_s": max(lat, default=None),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
    }


def machine_info() -> dict[str, Any]:
    import aiohttp
    import ray
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "aiohttp": aiohttp.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    return info


def load_test(
    base_url: str,
    model: str,
    opts: LoadOptions | None = None,
    serve_config=None,
    prompts: tuple[str, ...] = PROMPTS,
    log=print,
) -> dict[str, Any]:
    """Run the load test against a server that is already up; the report (see `print_report`).

    serve_config: the deployment's ServeConfig when known: the greedy reference then comes from an
    in-process Engine on its target (see the module docstring); otherwise from solo requests.
    """
    opts = opts or LoadOptions()
    opts.validate()
    base_url = check_loopback(base_url)
    reference = opts.reference
    if reference == "auto":
        reference = "engine" if serve_config is not None and serve_config.model.device == "cpu" else "server"
    if reference == "engine" and serve_config is None:
        raise LoadTestError("--reference engine needs the deployment's config (--deploy)")
    report: dict[str, Any] = {"base_url": base_url, "model": model, "options": dataclasses.asdict(opts)}
    report["options"]["reference"] = reference
    t = time.monotonic()
    engine_refs = None
    if reference == "engine":
        log(f"reference: in-process Engine on {serve_config.model.target} (greedy, no draft, no shards)")
        engine_refs = engine_references(serve_config, prompts, opts.max_tokens)
    log(f"warm-up: {len(prompts) * len(ENDPOINTS)} solo greedy requests, one at a time")
    solo, solo_errors = asyncio.run(_solo_references(base_url, model, opts, prompts))
    solo_mismatches = []
    if engine_refs is not None:
        for key, ref in engine_refs.items():
            if key in solo and solo[key] != ref:
                solo_mismatches.append(
                    {
                        "key": list(key),
                        "server": dataclasses.asdict(solo[key]),
                        "engine": dataclasses.asdict(ref),
                    }
                )
        references = engine_refs
    else:
        references = solo
    report["reference"] = {
        "kind": reference,
        "seconds": time.monotonic() - t,
        "solo_errors": {f"{e}:{i}": msg for (e, i), msg in solo_errors.items()},
        "solo_mismatches": solo_mismatches,
        "count": len(references),
        "finish_stop": sum(r.finish_reason == "stop" for r in references.values()),
    }
    log(
        f"load: {opts.clients} clients, up to {opts.duration_s:g} s or {opts.max_requests} requests, "
        f"max_tokens {opts.max_tokens}, greedy {opts.greedy_fraction:g}, chat {opts.chat_fraction:g}"
    )
    outcomes, wall = asyncio.run(_load(base_url, model, opts, prompts, references))
    first_sampled: dict[tuple, Outcome] = {}
    repeats = sum(
        check_outcome(o, references, first_sampled) for o in sorted(outcomes, key=lambda o: o.start_s)
    )
    report["wall_s"] = wall
    report["total"] = summarize(outcomes, wall)
    report["by_endpoint"] = {
        e: summarize([o for o in outcomes if o.spec.endpoint == e], wall) for e in ENDPOINTS
    }
    report["seeded_repeats"] = repeats
    report["failures"] = [
        {
            "status": o.status,
            "endpoint": o.spec.endpoint,
            "prompt_index": o.spec.prompt_index,
            "greedy": o.spec.greedy,
            "seed": o.spec.seed,
            "error": o.error,
            "mismatches": o.mismatches,
        }
        for o in outcomes
        if o.status != "ok"
    ][:50]
    # Failures outside the load phase count too: the server alone disagreed with the engine, or failed.
    report["errors"] = report["total"]["errors"] + len(solo_errors)
    report["mismatches"] = report["total"]["mismatches"] + len(solo_mismatches)
    report["passed"] = report["errors"] == 0 and report["mismatches"] == 0 and report["total"]["ok"] > 0
    return report


# -- output -------------------------------------------------------------------------------------------


def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def print_report(report: dict[str, Any]) -> None:
    head = (
        "endpoint", "requests", "ok", "errors", "mismatches", "greedy", "tokens", "req/s", "tok/s",
        "latency p50", "latency p99", "TTFT p50", "TTFT p99",
    )  # fmt: skip
    rows = []
    for name, s in [*report["by_endpoint"].items(), ("all", report["total"])]:
        rows.append(
            (
                name,
                str(s["requests"]),
                str(s["ok"]),
                str(s["errors"]),
                str(s["mismatches"]),
                str(s["greedy"]),
                str(s["generated_tokens"]),
                _fmt(s["requests_per_s"]),
                _fmt(s["tokens_per_s"], digits=1),
                _fmt(s["latency_p50_s"], " s"),
                _fmt(s["latency_p99_s"], " s"),
                _fmt(s["ttft_p50_s"], " s", 3),
                _fmt(s["ttft_p99_s"], " s", 3),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths)) + " |"
    print(fmt.format(*head))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print(fmt.format(*r))
    ref = report["reference"]
    t = report["total"]
    print(
        f"\nload phase {report['wall_s']:.1f} s; reference: {ref['kind']} "
        f"({ref['seconds']:.1f} s incl. warm-up; {ref['finish_stop']} of {ref['count']} greedy references "
        f"stop at EOS); {t['finish_stop']} responses finished with 'stop'; "
        f"{report['seeded_repeats']} seeded repeats checked"
    )
    for key, msg in ref["solo_errors"].items():
        print(f"  solo request {key} failed: {msg}")
    for m in ref["solo_mismatches"]:
        print(f"  solo request {m['key']}: server {m['server']} != engine {m['engine']}")
    for f in report["failures"][:10]:
        what = f["error"] or "; ".join(f["mismatches"])
        print(f"  {f['status']}: {f['endpoint']} prompt {f['prompt_index']} "
              f"{'greedy' if f['greedy'] else 'seed ' + str(f['seed'])}: {what[:400]}")  # fmt: skip
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"\n{verdict}: {report['errors']} errors, {report['mismatches']} mismatches, {t['ok']} requests ok")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL (loopback only).")
    p.add_argument("--model", default=None, help="Model id (default: the config's, or specmoe-demo).")
    p.add_argument("--clients", type=int, default=8, help="Concurrent streaming clients.")
    p.add_argument("--duration-s", type=float, default=30.0, help="No new request after this.")
    p.add_argument("--max-requests", type=int, default=500, help="No new request after this many.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--greedy-fraction", type=float, default=0.5, help="Share of temperature-0 requests.")
    p.add_argument("--chat-fraction", type=float, default=0.25, help="Share sent to /v1/chat/completions.")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="Bound on each request.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the request plan.")
    p.add_argument("--seed-pool", type=int, default=2, help="Sampled requests use seeds in range(N).")
    p.add_argument("--reference", choices=("auto", "engine", "server"), default="auto")
    p.add_argument(
        "--deploy",
        default=None,
        metavar="CONFIG",
        help="Start a local Ray cluster and deploy this config (also done with the demo config when no "
        "server answers at --url).",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="Write the report as JSON here.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/load.py", *argv])
    try:
        base_url = check_loopback(args.url)
        opts = LoadOptions(
            clients=args.clients,
            duration_s=args.duration_s,
            max_requests=args.max_requests,
            max_tokens=args.max_tokens,
            greedy_fraction=args.greedy_fraction,
            chat_fraction=args.chat_fraction,
            request_timeout_s=args.request_timeout_s,
            seed=args.seed,
            seed_pool=args.seed_pool,
            reference=args.reference,
        )
        opts.validate()
        deploy = args.deploy
        if deploy is None:
            models = served_models(base_url)
            if models is None:
                print(f"no server answers at {base_url}: deploying {DEFAULT_DEPLOY} on a local cluster")
                deploy = DEFAULT_DEPLOY
            else:
                model = args.model or "specmoe-demo"
                if model not in models:
                    raise LoadTestError(
                        f"the server at {base_url} serves {models}, not {model!r}: pass --model"
                    )
        info = machine_info()
        print(f"# {command}")
        print("# " + ", ".join(f"{k} {v}" for k, v in info.items()))
        if deploy is None:
            report = load_test(base_url, model, opts)
        else:
            from specmoe_ray import ServeConfig

            cfg = ServeConfig.from_yaml(deploy)
            model = cfg.model.name
            if args.model not in (None, model):
                raise LoadTestError(f"--model {args.model!r}, but {deploy} serves {model!r}")
            t = time.monotonic()
            with local_cluster():
                print(f"starting a local Ray cluster and deploying {deploy} ...", flush=True)
                with deployed(cfg) as url:
                    print(f"deployed at {url} in {time.monotonic() - t:.1f} s", flush=True)
                    report = load_test(url, model, opts, serve_config=cfg)
    except LoadTestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["command"] = command
    report["machine"] = info
    print()
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
