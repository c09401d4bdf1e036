"""The Serve application on a 3-node local cluster: HTTP, handles, the draft pool, bad input."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import socket
import time

import pytest
import ray
from conftest import NODE_RESOURCES, hf_greedy, make_checkpoint, save_char_tokenizer
from ray import serve

from specmoe_ray import ConfigError, Engine, SamplingParams, ServeConfig
from specmoe_ray.serving import build_app
from specmoe_ray.serving.protocol import GenerateRequest

TEXT_PROMPTS = ["def f(x):", "import os\nfor i in range(10):", "class A"]
NEW = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    target = make_checkpoint(str(root / "target"), "qwen3_moe", seed=5)
    draft = make_checkpoint(str(root / "draft"), "qwen3", seed=6)
    save_char_tokenizer(target)
    save_char_tokenizer(draft)
    return target, draft


def config(target: str, draft: str, **over) -> ServeConfig:
    data = {
        "model": {"name": "tiny", "target": target, "draft": draft},
        "engine": {"max_model_len": 128, "num_speculative_tokens": 3},
        # One shard on each worker node: the data plane crosses raylets.
        "shards": {
            "num_shards": 2,
            "num_cpus": 0.25,
            "strategy": "SPREAD",
            "bundle_resources": [{NODE_RESOURCES[1]: 1}, {NODE_RESOURCES[2]: 1}],
        },
        "draft_pool": {"placement": "pool", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
        "verifier": {"ray_actor_options": {"num_cpus": 0.25, "resources": {NODE_RESOURCES[0]: 1}}},
    }
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values}
    return ServeConfig.from_dict(data)


@pytest.fixture(scope="module")
def server(ray_cluster, models):
    """The app with a 2-replica draft pool; yields (port, ingress handle, app name)."""
    target, draft = models
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    handle = serve.run(build_app(config(target, draft)), name="main", route_prefix="/")
    yield port, handle
    serve.shutdown()


def post(port: int, path: str, body, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def greedy_ids(port: int, prompt: str) -> list[int]:
    status, body = post(
        port, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": NEW, "temperature": 0}
    )
    assert status == 200, body
    return json.loads(body)


def test_http_handle_engine_and_transformers_agree(server, models):
    port, handle = server
    target, draft = models
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok.encode(p, add_special_tokens=False) for p in TEXT_PROMPTS]
    ref = hf_greedy(target, prompts, NEW)
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0)
    with Engine.from_pretrained(target, draft=draft, max_model_len=128) as engine:
        in_process = [o.token_ids for o in engine.generate(prompts, greedy)]
    via_handle = [
        handle.generate.remote(GenerateRequest(prompt=p, params=greedy)).result().token_ids
        for p in TEXT_PROMPTS
    ]
    via_http = []
    for p in TEXT_PROMPTS:
        body = greedy_ids(port, p)
        via_http.append(tok.encode(body["choices"][0]["text"], add_special_tokens=False))
        assert body["usage"]["completion_tokens"] == NEW
    assert via_http == via_handle == in_process == ref, (via_http, via_handle, in_process, ref)


def test_openai_client_completions_and_chat(server):
    import openai

    port, _ = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    full = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=NEW, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="def f(x):", max_tokens=NEW, temperature=0, stream=True
        )
    )
    assert streamed == full.choices[0].text and full.usage.completion_tokens == NEW
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=NEW, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed_chat = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_chat == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == NEW == chat.usage.completion_tokens
    assert chat.choices[0].finish_reason == "length"


def test_stop_string_over_http_streamed_and_not(server):
    """A stop string through the OpenAI API: the streamed deltas (decoded a window at a time,
    `engine/detok.py`) add up to the non-streamed text, which is the full text cut before the
    stop string; finish reason "stop"."""
    import openai

    port, _ = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    args = dict(model="tiny", prompt="def g(y):", max_tokens=NEW, temperature=0)
    full = client.completions.create(**args).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    chunks = list(client.completions.create(**args, stop=[stop], stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    assert streamed == cut.text and chunks[-1].choices[0].finish_reason == "stop"


def test_twenty_concurrent_streams(server):
    port, _ = server

    def stream(i: int) -> tuple[int, int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = 5 + i % 7
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps(
                {
                    "model": "tiny",
                    "prompt": f"x{i} = ",
                    "max_tokens": n,
                    "temperature": 0.7,
                    "seed": i,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        usage, done = None, False
        for line in resp.read().decode().splitlines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
        conn.close()
        assert done
        return n, usage["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(stream, range(20)))
    assert all(want == got for want, got in results), results


def test_pool_wire_sends_each_token_once_and_resends_what_a_replica_lost():
    """The draft pool's wire (`TokenLedger` -> msgpack -> `HeldTokens`): after a sequence's first
    call a replica gets only its new tokens and rebuilds the whole list; a replica that lost it,
    holds another client's list of the same id, or a different replica, marks the row missing
    (no drafts), and the next call resends the whole list; without affinity every call does."""
    from specmoe_ray.serving.draft_pool import (
        HeldTokens,
        TokenLedger,
        decode_requests,
        encode_requests,
    )
    from specmoe_ray.spec.proposer import DraftRequest

    ledger, a, b = TokenLedger(), HeldTokens(capacity=8), HeldTokens(capacity=8)

    def call(replica: HeldTokens, name: str, reqs: list[DraftRequest]):
        wire = [ledger.row(r, name) for r in reqs]
        rows, _ = decode_requests(encode_requests([w for w, _ in wire], []))
        got, missing = replica.resolve(rows)
        ledger.settle([r.seq_id for r in reqs], [e for _, e in wire], missing)
        return got, missing, [len(row[3]) // 8 for row in rows]

    s1, s2 = [5, 6, 7, 1 << 40], [9, 9]
    got, missing, sent = call(a, "A", [DraftRequest("s1", s1, 3, 0.7, 5, 0.9, 11), DraftRequest("s2", s2, 2)])
    assert missing == [] and sent == [4, 2]
    assert [(g.seq_id, g.tokens, g.num_draft, g.temperature, g.top_k, g.top_p, g.seed) for g in got] == [
        ("s1", s1, 3, 0.7, 5, 0.9, 11),
        ("s2", s2, 2, 0.0, 0, 1.0, None),
    ]
    for step in range(3):  # each sequence grows; only the new tokens travel
        s1, s2 = s1 + [step, step + 1], s2 + [100 + step]
        got, missing, sent = call(a, "A", [DraftRequest("s1", s1, 3), DraftRequest("s2", s2, 3)])
        assert missing == [] and sent == [2, 1] and [g.tokens for g in got] == [s1, s2]
    # Another client's sequence of the same id reaches replica A: A's list changes under ours.
    other = TokenLedger()
    row, _ = other.row(DraftRequest("s2", list(range(len(s2))), 1), "A")  # (as long as ours)
    a.resolve(decode_requests(encode_requests([row], []))[0])
    s1, s2 = s1 + [40], s2 + [41]
    got, missing, sent = call(a, "A", [DraftRequest("s1", s1, 3), DraftRequest("s2", s2, 3)])
    assert missing == [1] and got[0].tokens == s1 and got[1].num_draft == 0
    got, missing, sent = call(a, "A", [DraftRequest("s2", s2, 3)])  # resent whole
    assert missing == [] and sent == [len(s2)] and got[0].tokens == s2
    # The sequence moves to replica B (a scale event): the whole list, once.
    got, missing, sent = call(b, "B", [DraftRequest("s1", s1, 3)])
    assert missing == [] and sent == [len(s1)] and got[0].tokens == s1
    # B restarted (lost everything) under the same name: missing once, then whole again.
    b.seqs.clear()
    assert call(b, "B", [DraftRequest("s1", s1 + [1], 3)])[1] == [0]
    assert call(b, "B", [DraftRequest("s1", s1 + [1], 3)])[0][0].tokens == s1 + [1]
    # Past its capacity a replica drops the least recently used (which is then resent whole).
    small = HeldTokens(capacity=2)
    for i in range(3):
        call(small, "C", [DraftRequest(f"c{i}", [i, i], 1)])
    assert list(small.seqs) == ["c1", "c2"] and call(small, "C", [DraftRequest("c0", [0, 0, 5], 1)])[1] == [0]
    assert ledger.tokens_sent < ledger.tokens_requested
    # Without affinity (replica ""): whole lists every call.
    n = ledger.tokens_sent
    call(a, "", [DraftRequest("s1", s1, 3)])
    call(a, "", [DraftRequest("s1", s1, 3)])
    assert ledger.tokens_sent - n == 2 * len(s1)


def pool_stats(app: str = "main") -> list[dict]:
    h = serve.get_deployment_handle("DraftPool", app_name=app)
    return h.broadcast("stats").results(timeout_s=30)


def test_draft_pool_affinity_and_placements_agree(server, models):
    port, handle = server
    target, draft = models
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0)
    prompts = [f"v{i} = [{i}, " for i in range(8)]

    async def run_all(h):
        return [
            r.token_ids
            for r in await asyncio.gather(
                *[
                    h.generate.remote(GenerateRequest(prompt=p, params=greedy, request_id=f"aff-{i}"))
                    for i, p in enumerate(prompts)
                ]
            )
        ]

    before = sum(s["tokens_received"] for s in pool_stats())
    with_affinity = asyncio.run(run_all(handle))
    stats = pool_stats()
    # Each sequence's tokens reached its replica once (the prompt, then what it gained per step).
    # (one character per token; resending whole lists each step would send several times this)
    assert 0 < sum(s["tokens_received"] for s in stats) - before <= sum(len(p) + NEW for p in prompts)
    assert len(stats) == 2 and all(s["num_calls"] > 0 for s in stats), "proposals reach both replicas"
    seen = [set(s["seen"]) & {f"aff-{i}" for i in range(8)} for s in stats]
    assert not (seen[0] & seen[1]), f"a sequence's proposals moved between replicas: {seen}"
    assert seen[0] | seen[1] == {f"aff-{i}" for i in range(8)}

    no_affinity = serve.run(
        build_app(config(target, draft, draft_pool={"affinity": False})), name="noaff", route_prefix="/noaff"
    )
    without = asyncio.run(run_all(no_affinity))
    moved = [set(s["seen"]) for s in pool_stats("noaff")]
    serve.delete("noaff")
    local = serve.run(
        build_app(config(target, draft, draft_pool={"placement": "local"})),
        name="local",
        route_prefix="/local",
    )
    in_verifier = asyncio.run(run_all(local))
    serve.delete("local")
    assert moved[0] & moved[1], "without affinity sequences spread over both replicas"
    assert with_affinity == without == in_verifier


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, "body"),
        ([1, 2], 400, "body"),
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
        ({"model": "tiny", "prompt": []}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"model": "tiny", "prompt": "x" * 200}, 400, "prompt"),
        ({"model": "tiny", "prompt": [1, 2, 999]}, 400, "prompt"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "n": 3}, 400, "n"),
        ({"model": "tiny", "prompt": "x" * 2_000_000}, 413, "body"),
    ],
)
def test_bad_requests_name_the_field_and_server_keeps_serving(server, body, status, param):
    port, _ = server
    raw = body if isinstance(body, bytes) else None
    got, text = post(port, "/v1/completions", body, raw=raw)
    assert got == status, text
    error = json.loads(text)["error"]
    assert error["param"] == param and param in error["message"], error
    assert greedy_ids(port, "ok")["usage"]["completion_tokens"] == NEW


def test_bad_chat_request(server):
    port, _ = server
    got, text = post(port, "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert got == 400 and json.loads(text)["error"]["param"] == "messages"
    got, text = post(
        port, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    )
    assert got == 400 and "messages.0.role" in json.loads(text)["error"]["param"]


def verifier_running() -> int:
    return serve.get_deployment_handle("Verifier", app_name="main").stats.remote().result()["num_running"]


def test_client_disconnect_frees_its_slot(server):
    port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "loop", "max_tokens": 100, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    resp.fp.readline()  # the first event arrived: the request is running
    assert verifier_running() == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 30
    while verifier_running() and time.time() < deadline:
        time.sleep(0.2)
    assert verifier_running() == 0
    assert greedy_ids(port, "after")["usage"]["completion_tokens"] == NEW


def test_api_key(server, models):
    port, _ = server
    target, _ = models
    serve.run(
        build_app(config(target, "ngram", shards={"num_shards": 0}, ingress={"api_key": "s3cret"})),
        name="keyed",
        route_prefix="/keyed",
    )
    try:
        got, text = post(port, "/keyed/v1/completions", {"model": "tiny", "prompt": "x"})
        assert got == 401, text
        got, text = post(
            port,
            "/keyed/v1/completions",
            {"model": "tiny", "prompt": "x", "max_tokens": 2},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert got == 200, text
    finally:
        serve.delete("keyed")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"target": "x"}, "shards": {"num_shards": -1}}, "shards.num_shards"),
        ({"model": {"target": "x"}, "shards": {"num_shard": 2}}, "shards.num_shard: Extra inputs"),
        ({"model": {"target": "x"}, "verifier": {"num_replicas": 0}}, "verifier.num_replicas"),
        ({"modle": {"target": "x"}}, "modle: Extra inputs"),
        (
            {"model": {"target": "x"}, "shards": {"num_shards": 2, "replica_exact": True}},
            "shards: Value error, shards.replica_exact applies to trunk replicas",
        ),
        (
            {"model": {"target": "x"}, "shards": {"num_shards": 2, "replica_split": "intermediate"}},
            "shards: Value error, shards.replica_split 'intermediate' applies to trunk replicas",
        ),
        (
            {"model": {"target": "x"}, "shards": {"replicate_trunk": True, "replica_split": "by_rows"}},
            "shards.replica_split: Input should be 'experts' or 'intermediate'",
        ),
        (
            {"model": {"target": "x"}, "shards": {"num_shards": 2, "replica_peer_sum": 32}},
            "shards: Value error, shards.replica_peer_sum applies to trunk replicas",
        ),
        (
            {"model": {"target": "x"}, "shards": {"replicate_trunk": True, "replica_peer_sum": 70000}},
            "shards.replica_peer_sum: Input should be less than or equal to 65536",
        ),
        (
            {"model": {"target": "x"}, "shards": {"num_shards": 2, "replica_attention": "heads"}},
            "shards: Value error, shards.replica_attention 'heads' applies to trunk replicas",
        ),
        (
            {"model": {"target": "x"}, "shards": {"replicate_trunk": True, "replica_attention": "rows"}},
            "shards.replica_attention: Input should be 'replicated' or 'heads'",
        ),
        (
            {"model": {"target": "x"}, "draft_pool": {"autoscaling_config": {"max_replica": 3}}},
            "draft_pool.autoscaling_config: Value error, unknown autoscaling_config keys",
        ),
    ],
)
def test_config_errors_fail_at_load(change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ServeConfig.from_dict(change)


def test_every_shards_setting_reaches_the_shard_options():
    """Each `shards:` key of the config (but num_shards and autoscale) is a `ShardOptions` field
    and arrives with its value: a new setting cannot be silently dropped on the way."""
    import dataclasses

    from specmoe_ray.config import ShardsConfig
    from specmoe_ray.serving.shards import MAX_PEER_ROWS, ShardOptions
    from specmoe_ray.serving.verifier import to_shard_options

    values = {
        "num_cpus": 0.5,
        "num_gpus": 2.0,
        "resources": {"accel": 1.0},
        "bundle_resources": [{"node_b": 1.0}],
        "strategy": "SPREAD",
        "startup_timeout_s": 7.0,
        "collective_timeout_s": 9.0,
        "local_shard": True,
        "cuda_graphs": False,
        "env_vars": {"NCCL_GRAPH_REGISTER": "0"},
        "replicate_trunk": True,
        "replica_exact": True,
        "replica_split": "experts",
        "replica_attention": "replicated",
        "replica_peer_sum": 0,
    }
    assert set(values) == set(ShardsConfig.model_fields) - {"num_shards", "autoscale"}, "update this test"
    options = to_shard_options(ShardsConfig(**values))
    assert set(values) <= {f.name for f in dataclasses.fields(ShardOptions)}
    assert {k: getattr(options, k) for k in values} == values
    split = {**values, "replica_exact": False, "replica_split": "intermediate"}  # (not with exact)
    assert to_shard_options(ShardsConfig(**split)).replica_split == "intermediate"
    assert ShardsConfig().replica_peer_sum is None  # the default: on for trunk replicas on GPUs
    assert to_shard_options(ShardsConfig(num_shards=2)).replica_peer_sum is None
    peer = {**split, "replica_peer_sum": 64}
    assert to_shard_options(ShardsConfig(**peer)).replica_peer_sum == 64
    assert ShardsConfig.model_fields["replica_peer_sum"].metadata[-1].le == MAX_PEER_ROWS


def test_missing_checkpoint_path_fails_at_build(models, tmp_path):
    target, _ = models
    cfg = ServeConfig.from_dict({"model": {"target": target, "draft": str(tmp_path / "nope")}})
    with pytest.raises(Exception, match=r"model\.draft: no checkpoint at .*nope"):
        build_app(cfg)
    (tmp_path / "bad.yaml").write_text(
        "applications:\n- name: x\n  import_path: specmoe_ray.serving.app:app_builder\n"
        "  args: {model: {target: /x}, engine: {num_speculative_tokens: -2}}\n"
    )
    with pytest.raises(
        ConfigError, match=r"bad.yaml: invalid specmoe config:\n  engine.num_speculative_tokens"
    ):
        ServeConfig.from_yaml(str(tmp_path / "bad.yaml"))


def test_killed_draft_replica_does_not_lose_requests(server, models):
    """Kill a DraftPool replica mid-stream: requests finish, identical (no drafts until routed anew)."""
    _, handle = server
    target, draft = models
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    prompts = [f"k{i} = {i} * " for i in range(6)]
    with Engine.from_pretrained(target, draft=draft, max_model_len=128) as engine:
        ref = [o.token_ids for o in engine.generate(prompts, greedy)]
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "DraftPool" in a["name"] and a["name"].startswith("SERVE_REPLICA") and "main" in a["name"]
    ]
    assert len(replicas) == 2, replicas

    verifier = serve.get_deployment_handle("Verifier", app_name="main")

    async def run():
        calls = [handle.generate.remote(GenerateRequest(prompt=p, params=greedy)) for p in prompts]
        while (await verifier.stats.remote())["num_running"] < len(prompts):
            await asyncio.sleep(0.05)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
        return [(await c).token_ids for c in calls]

    assert asyncio.run(run()) == ref
    assert verifier.stats.remote().result()["num_running"] == 0


def test_metrics_reach_prometheus_endpoint(server):
    """Engine metrics are exported through Ray's metrics agent (what Prometheus scrapes)."""
    import urllib.request

    port, _ = server
    greedy_ids(port, "metrics")
    head = next(n for n in ray.nodes() if n["Alive"] and n["Resources"].get(NODE_RESOURCES[0]))
    url = f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics"
    wanted = (
        "specmoe_generated_tokens",
        "specmoe_step_seconds",
        "specmoe_expert_tokens",
        "specmoe_expert_load",
    )
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"{missing} not exported at {url}"


def test_killed_verifier_ends_its_requests_with_an_error_and_is_replaced(server):
    """Runs last in this file: it kills the main app's Verifier replica mid-stream."""
    port, handle = server
    verifier = serve.get_deployment_handle("Verifier", app_name="main")
    name = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA") and "#Verifier#" in a["name"] and "main" in a["name"]
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "long", "max_tokens": 100, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")  # streaming has begun
    t0 = time.time()
    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=False)
    body = resp.read().decode()  # the stream must end, with an error event
    conn.close()
    assert time.time() - t0 < 60
    assert '"error"' in body and "generation failed" in body, body[-500:]
    deadline = time.time() + 180
    while time.time() < deadline:  # Serve replaces the replica (its shards start anew)
        try:
            if verifier.check_health.remote().result(timeout_s=10) is None:
                break
        except Exception:
            time.sleep(2)
    assert greedy_ids(port, "after the restart")["usage"]["completion_tokens"] == NEW
