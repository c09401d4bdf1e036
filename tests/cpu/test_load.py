"""benchmarks/load.py: the load test at small N against the demo deployment, and its checks."""

from __future__ import annotations

import os
import time

import pytest
from conftest import benchmark_module

from specmoe_ray import ServeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_YAML = os.path.join(ROOT, "deployments", "demo.yaml")


@pytest.fixture(scope="module")
def load():
    return benchmark_module("load")


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "http://example.com", "https://127.0.0.1:8000", "http://0.0.0.0:8000"]
)
def test_refuses_targets_that_are_not_loopback(load, url):
    with pytest.raises(load.LoadTestError, match="loopback"):
        load.check_loopback(url)
    assert load.main(["--url", url, "--max-requests", "1"]) == 2


def test_accepts_loopback_targets(load):
    for url in (
        "http://127.0.0.1:8000/",
        "http://localhost:1234",
        "http://[::1]:80/prefix",
        "http://127.0.0.2",
    ):
        assert load.check_loopback(url) == url.rstrip("/")


def test_checks_catch_wrong_counts_and_texts(load):
    spec = load.RequestSpec("completions", 0, True, None, 12)
    refs = {("completions", 0): load.Reference("abc", 12, "length", 5)}

    def outcome(text="abc", n=12, finish="length", spec=spec):
        return load.Outcome(spec, text=text, completion_tokens=n, prompt_tokens=5, finish_reason=finish)

    def mismatches(o, first=None):
        load.check_outcome(o, refs, first if first is not None else {})
        return [m.split(":")[0] for m in o.mismatches]

    assert mismatches(outcome()) == []
    assert mismatches(outcome(n=11)) == ["token_count", "token_count"]
    assert mismatches(outcome(text="abd")) == ["text"]
    assert mismatches(outcome(finish="stop")) == ["finish_reason"]
    assert mismatches(outcome(finish="abort")) == ["finish_reason", "finish_reason"]
    sampled = load.RequestSpec("chat", 3, False, 1, 12)
    assert mismatches(outcome("x", 7, "stop", sampled)) == []  # stopped early at EOS: fine
    assert mismatches(outcome("x", 13, "stop", sampled)) == ["token_count"]
    first: dict = {}
    assert mismatches(outcome("x", 12, "length", sampled), first) == []
    assert mismatches(outcome("x", 12, "length", sampled), first) == []
    assert mismatches(outcome("y", 12, "length", sampled), first) == ["seeded_repeat"]


def test_load_small_n_on_the_demo_deployment(ray_cluster, load):
    """4 streaming clients, 20 requests of 12 tokens: zero errors, zero mismatches."""
    cfg = ServeConfig.from_yaml(DEMO_YAML)
    opts = load.LoadOptions(clients=4, duration_s=40, max_requests=20, max_tokens=12, request_timeout_s=30)
    plan = [load.plan_request(i, opts, len(load.PROMPTS)) for i in range(opts.max_requests)]
    assert {p.endpoint for p in plan} == {"completions", "chat"} and {p.greedy for p in plan} == {True, False}
    t = time.monotonic()
    with load.deployed(cfg, app_name="load-test", route_prefix="/load-test") as url:
        report = load.load_test(url, cfg.model.name, opts, serve_config=cfg)
    load.print_report(report)
    print(f"deploy + load test + teardown: {time.monotonic() - t:.1f} s")
    assert report["reference"]["kind"] == "engine"
    assert report["errors"] == 0, report["failures"] or report["reference"]["solo_errors"]
    assert report["mismatches"] == 0, report["failures"] or report["reference"]["solo_mismatches"]
    total = report["total"]
    assert total["requests"] == total["ok"] == opts.max_requests
    assert total["generated_tokens"] > 0 and total["ttft_p50_s"] is not None
    assert all(report["by_endpoint"][e]["ok"] > 0 for e in ("completions", "chat"))
