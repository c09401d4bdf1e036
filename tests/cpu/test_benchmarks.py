"""benchmarks/: gpu.py's `--switch` variants (parsed with errors naming what is wrong, flipped
only while their variant runs, timed beside `graphs` in the same process); allreduce.py's sums."""

from __future__ import annotations

import argparse
import statistics

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def gpu():
    return benchmark_module("gpu")


def test_switch_parses_modules_attributes_and_literals(gpu):
    name, flips = gpu.parse_switch(
        "combo:triton_experts.DEDUP_ONE_ROW=True, triton_experts.MATVEC_CONFIG={'block_n': 4, 'block_k': 64}"
    )
    assert name == "combo"
    assert flips == [
        ("specmoe_ray.moe.triton_experts", "DEDUP_ONE_ROW", True),
        ("specmoe_ray.moe.triton_experts", "MATVEC_CONFIG", {"block_n": 4, "block_k": 64}),
    ]
    assert gpu.parse_switch("again:") == ("again", [])
    # tuples and lists too, their commas not taken for the flips'
    name, flips = gpu.parse_switch("n:fused.NORM_PRELOAD=('qkv', 'gate_up'),fused.MATMUL_ROWS=[1, 2]")
    assert flips == [
        ("specmoe_ray.models.fused", "NORM_PRELOAD", ("qkv", "gate_up")),
        ("specmoe_ray.models.fused", "MATMUL_ROWS", [1, 2]),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x:nope.MATVEC=True", "module one of"),
        ("x:fused.NOT_A_SWITCH=1", "fused has no NOT_A_SWITCH"),
        ("x:fused.MATVEC", "module.ATTR=value"),
        ("graphs:fused.MATVEC=True", "new NAME"),
        (":fused.MATVEC=True", "new NAME"),
        ("x:fused.MATVEC=maybe", "not a Python literal"),
    ],
)
def test_bad_switches_name_what_is_wrong(gpu, text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        gpu.parse_switch(text)


def test_switch_variants_run_flipped_beside_graphs_and_restore(gpu, monkeypatch):
    """A small model on CPU: each --switch variant runs with its flips set (seen from inside the
    timed engine runs), gets its ratio to `graphs`, and leaves the switches as they were."""
    from specmoe_ray.moe import triton_experts

    before = triton_experts.DEDUP_ONE_ROW
    seen = []
    ours_run = gpu.ours_run

    def spy(engine, rows, new, temperature=0.0, top_p=1.0):
        run = ours_run(engine, rows, new, temperature, top_p)
        return lambda: seen.append(triton_experts.DEDUP_ONE_ROW) or run()

    monkeypatch.setattr(gpu, "ours_run", spy)
    args = ["--shape", "small", "--device", "cpu", "--batch", "1", "--new-tokens", "4", "--repeats", "1"]
    args += ["--skip-hf", "--skip-demo", "--skip-sweep", "--variants", "graphs"]
    args += ["--switch", f"flip:triton_experts.DEDUP_ONE_ROW={not before}", "--switch", "again:"]
    runs = gpu.main(args)["shape"]["runs"]
    assert [r["who"] for r in runs] == ["graphs", "flip", "again"]
    assert all(r["tok_s"] > 0 for r in runs) and "vs_graphs" not in runs[0]
    assert runs[1]["vs_graphs"] == pytest.approx(runs[1]["tok_s"] / runs[0]["tok_s"])
    assert seen == [before] * 2 + [not before] * 2 + [before] * 2  # warm-up + 1 timed run each
    assert triton_experts.DEDUP_ONE_ROW is before


def test_draft_switch_variants_run_the_draft_flipped_beside_draft(gpu, monkeypatch):
    """A --switch NAME starting "draft-" copies the `draft` variant (a draft model proposes),
    runs with its flips set and gets its ratio to `draft`, even where `draft` itself was not
    asked for (then no ratio)."""
    from specmoe_ray.models import fused

    before = fused.DRAFT_PRELOAD_ROWS
    seen = []
    ours_run = gpu.ours_run

    def spy(engine, rows, new, temperature=0.0, top_p=1.0):
        run = ours_run(engine, rows, new, temperature, top_p)
        return lambda: seen.append((engine.proposer is not None, fused.DRAFT_PRELOAD_ROWS)) or run()

    monkeypatch.setattr(gpu, "ours_run", spy)
    args = ["--shape", "small", "--device", "cpu", "--batch", "1", "--new-tokens", "4", "--repeats", "1"]
    args += ["--skip-hf", "--skip-demo", "--skip-sweep", "--switch", "draft-one:fused.DRAFT_PRELOAD_ROWS=1"]
    runs = gpu.main(args + ["--variants", "graphs", "draft"])["shape"]["runs"]
    assert [r["who"] for r in runs] == ["graphs", "draft", "draft-one"]
    assert runs[2]["vs_draft"] == pytest.approx(runs[2]["tok_s"] / runs[1]["tok_s"])
    assert "vs_graphs" not in runs[2] and runs[2]["speculation_length"] is not None
    assert seen == [(False, before)] * 2 + [(True, before)] * 2 + [(True, 1)] * 2
    assert before == fused.DRAFT_PRELOAD_ROWS
    runs = gpu.main(args + ["--variants", "graphs"])["shape"]["runs"]
    assert [r["who"] for r in runs] == ["graphs", "draft-one"] and "vs_draft" not in runs[1]


def test_adaptive_variant_runs_the_draft_with_k_chosen_per_step(gpu, monkeypatch):
    """`--variants adaptive`: the draft variant's engine with the adaptive policy, its ratio to
    `graphs` (no speculation: what a draft that never pays should approach)."""
    policies = []
    ours_run = gpu.ours_run

    def spy(engine, rows, new, temperature=0.0, top_p=1.0):
        run = ours_run(engine, rows, new, temperature, top_p)
        return lambda: policies.append(type(engine.policy).__name__) or run()

    monkeypatch.setattr(gpu, "ours_run", spy)
    args = ["--shape", "small", "--device", "cpu", "--batch", "1", "--new-tokens", "4", "--repeats", "1"]
    args += ["--skip-hf", "--skip-demo", "--skip-sweep", "--variants", "graphs", "draft", "adaptive"]
    runs = gpu.main(args)["shape"]["runs"]
    assert [r["who"] for r in runs] == ["graphs", "draft", "adaptive"]
    assert policies == ["FixedPolicy"] * 4 + ["AdaptivePolicy"] * 2
    assert runs[2]["vs_graphs"] == pytest.approx(runs[2]["tok_s"] / runs[0]["tok_s"])


def test_sampled_variant_samples_every_row_beside_graphs(gpu, monkeypatch):
    """`--variants sampled`: the same engine settings as `graphs` with every row sampled
    (temperature 1, a seed per row), timed beside `graphs` with its ratio to it; `--top-p`
    samples from a nucleus (checked: in (0, 1])."""
    asked = []
    ours_run = gpu.ours_run

    def spy(engine, rows, new, temperature=0.0, top_p=1.0):
        asked.append((temperature, top_p))
        return ours_run(engine, rows, new, temperature, top_p)

    monkeypatch.setattr(gpu, "ours_run", spy)
    args = ["--shape", "small", "--device", "cpu", "--batch", "2", "--new-tokens", "4", "--repeats", "1"]
    args += ["--skip-hf", "--skip-demo", "--skip-sweep", "--variants", "graphs", "sampled"]
    runs = gpu.main(args)["shape"]["runs"]
    assert [r["who"] for r in runs] == ["graphs", "sampled"]
    assert asked == [(0.0, 1.0), (1.0, 1.0)]
    assert runs[1]["vs_graphs"] == pytest.approx(runs[1]["tok_s"] / runs[0]["tok_s"])
    assert runs[1]["tokens_per_step"] == pytest.approx(runs[0]["tokens_per_step"])  # no drafts either way
    # --temperature samples every run of (a), switch variants included (A/B of sampling's path),
    # --top-p from a nucleus.
    asked.clear()
    args = args[: args.index("--variants")] + ["--variants", "graphs", "--temperature", "0.5"]
    args += ["--top-p", "0.9"]
    runs = gpu.main(args + ["--switch", "waits:sampling.PINNED=False"])["shape"]["runs"]
    assert [r["who"] for r in runs] == ["graphs", "waits"] and asked == [(0.5, 0.9), (0.5, 0.9)]
    assert all(r["top_p"] == 0.9 and r["temperature"] == 0.5 for r in runs)
    with pytest.raises(SystemExit):
        gpu.main(args[:-1] + ["1.5"])  # --top-p outside (0, 1]


def test_allreduce_benchmark_sums_right_on_two_gloo_ranks():
    """benchmarks/allreduce.py (the replicas' per-layer sum, 2 processes): on CPUs over gloo
    every size's chained sums come out right and a time per layer is printed."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "allreduce.py")
    run = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--tokens", "1", "4", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if "us/layer" in line]
    assert len(lines) == 4, run.stdout  # 2 token counts x (partial sums, exact)
    assert not any("WRONG" in line for line in lines), run.stdout


def test_sampling_benchmark_runs_every_case_on_cpu():
    """benchmarks/sampling.py (verification's host and GPU time per call): on CPUs, a line per
    (drafts, batch, parameters) with the torch path's times, and a line per batch for a draft
    model's sampled rows."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "sampling.py"), "--device", "cpu", "--vocab", "500",
         "--batch", "1", "3", "--calls", "2"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("  k=")]
    assert len(lines) == 2 * 2 * 3, run.stdout  # k in (0, 3) x 2 batches x 3 parameter sets
    drafts = [line for line in run.stdout.splitlines() if line.startswith("  draft B=")]
    assert len(drafts) == 2 and all("torch  host" in line for line in drafts), run.stdout  # the draft's side


def test_gpu_benchmark_multi_device_rows_run_on_cpu(tmp_path):
    """gpu.py's rows with experts over 2 devices (run over gloo on CPUs, as a check of the
    script): each layout starts its group, prints the ranks' expert load times and each batch's
    ratio to one device; the attention heads split too in the second (the peer sums' option is
    inert on CPUs). In a process of its own:
    the script starts (and stops) its own Ray."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ["--shape", "small", "--device", "cpu", "--batch", "1", "2", "--new-tokens", "4", "--repeats", "1"]
    args += ["--skip-hf", "--skip-demo", "--skip-sweep", "--variants", "graphs", "--gpus", "1", "2"]
    args += ["--layout", "replicas", "replicas-split-heads-peer", "--save-dir", str(tmp_path / "ckpt")]
    args += ["--json", str(tmp_path / "r.json"), "--peer-waits"]
    run = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "peer sums:" not in run.stdout  # --peer-waits: no peer sums on CPUs, nothing to time
    for layout in ("replicas", "replicas-split-heads-peer"):
        ready = re.search(
            rf"2 devices \({layout}\): ready in \d+s \(experts loaded: "
            + ", ".join(rf"rank {r} [\d.]+s \(read [\d.]+s, copied [\d.]+s\)" for r in (0, 1)),
            run.stdout,
        )
        assert ready, run.stdout
        for b in (1, 2):
            assert re.search(rf"2 devices \({layout}\) batch +{b}: .* [\d.]+x one device", run.stdout), (
                run.stdout
            )
    import json

    runs = json.loads((tmp_path / "r.json").read_text())["shape"]["runs"]
    assert sorted((r["layout"], r["batch"]) for r in runs if "layout" in r) == [
        ("replicas", 1),
        ("replicas", 2),
        ("replicas-split-heads-peer", 1),
        ("replicas-split-heads-peer", 2),
    ]


RAY_GPU_SLOTS = """
import json, os
import ray
ray.init(address="local", num_gpus=2, num_cpus=2, include_dashboard=False)  # as gpu.py, 3 GPUs
from specmoe_ray.serving import shards

@ray.remote(num_gpus=1, num_cpus=0, runtime_env={"env_vars": {shards.NOSET_VISIBLE: "1"}})
class Shard:
    def gpu(self):
        return shards._actor_device("cuda")

seen = []
for _ in range(3):  # three groups one after another, as gpu.py's layouts and re-forms make them
    actors = [Shard.remote() for _ in range(2)]
    seen.append(sorted(ray.get([a.gpu.remote() for a in actors])))
    for a in actors:
        ray.kill(a)
print(json.dumps(seen))
ray.shutdown()
"""


def test_shard_actors_take_the_gpus_ray_gave_them_not_the_engines():
    """gpu.py on 3 GPUs: Ray holds GPUs 0 and 1 for the shard actors, the engine takes GPU 2.
    Actors that keep every GPU visible (peer sums: Ray's NOSET switch) pick their device by
    Ray's id (`shards._actor_device`): Ray's two GPUs, never the engine's, in every group of
    actors started one after another. (Session 14 on 2 H200s: with the engine on GPU 0, hidden
    from Ray, and the actors' CUDA_VISIBLE_DEVICES reordered to match, a second group's actor
    took GPU 0: NCCL "duplicate GPU".) Real Ray with GPU resources declared on this CPU
    machine, in a process of its own, no CUDA_VISIBLE_DEVICES set."""
    import json
    import os
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", RAY_GPU_SLOTS],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [["cuda:0", "cuda:1"]] * 3


def test_lookup_benchmark_runs_its_cases_and_agrees_with_the_scans():
    """benchmarks/lookup.py (the CI's smoke run): prompt lookup on random and real text and the
    draft cache's prefix, each timed beside the plain scan after checking they agree; the draft
    pool's wire, new tokens only (rebuilt whole on the replica) beside whole lists."""
    rows = benchmark_module("lookup").main(["--context", "300", "700", "--calls", "1", "--batch", "4"])
    seen = {(r["what"], r["tokens"], r["context"]) for r in rows}
    cases = [("lookup", "random"), ("lookup", "demo text"), ("prefix", "random"), ("pool wire", "random")]
    cases += [("output text", "demo text"), ("prefix, same list", "random")]
    assert seen == {(w, t, L) for L in (300, 700) for w, t in cases}
    assert all(r["ours_us"] > 0 and r["scan_us"] > 0 for r in rows)
    assert all(r["ours_bytes"] < r["whole_bytes"] for r in rows if r["what"] == "pool wire")


def test_draft_benchmark_times_variants_side_by_side_on_the_same_drafts(monkeypatch):
    """benchmarks/draft.py on CPU (the toy draft): each variant's proposals run with its switches
    set (seen from inside the timed calls) and restored after, every round times every variant,
    ratios are to `default`, and the variants' greedy drafts agree (same weights, same inputs)."""
    from specmoe_ray.models import fused

    draft = benchmark_module("draft")
    before = fused.DRAFT_PRELOAD_ROWS
    seen = set()
    make = draft.proposals

    def spy(proposer, batch, k, temperature, seed, tag):
        call = make(proposer, batch, k, temperature, seed, tag)
        return lambda: seen.add((tag.split("-")[0], fused.DRAFT_PRELOAD_ROWS)) or call()

    monkeypatch.setattr(draft, "proposals", spy)
    args = ["--shape", "small", "--device", "cpu", "--batch", "1", "2", "--rounds", "2", "--calls", "1"]
    args += ["--warmup", "1", "--switch", "one:fused.DRAFT_PRELOAD_ROWS=1", "--switch", "again:"]
    out = draft.main(args)
    assert [r["batch"] for r in out["rows"]] == [1, 2]
    for r in out["rows"]:
        assert list(r["ms"]) == ["default", "one", "again"] and r["vs_default"]["default"] == 1.0
        assert r["vs_default"]["one"] == pytest.approx(r["ms"]["default"] / r["ms"]["one"])
        assert r["drafts_differ"] == [] and all(len(t) == 2 for t in r["rounds_ms"].values())
    assert seen == {("default", before), ("one", 1), ("again", before)}
    assert before == fused.DRAFT_PRELOAD_ROWS
    with pytest.raises(SystemExit):  # the unswitched variant's name
        draft.main(args[:-4] + ["--switch", "default:fused.DRAFT_PRELOAD_ROWS=1"])


def test_demo_pair_benchmark_times_methods_and_variants_side_by_side(monkeypatch):
    """benchmarks/demo_pair.py on CPU: every (variant, method) engine runs each round with its
    variant's switches set (seen from inside generate) and restored after; the greedy tokens of
    the draft model and n-gram engines equal no speculation's; ratios are to plain and to the
    default variant; the drafts are accepted at a real rate (the pair shares its training text);
    `--spec-policy adaptive` reaches the speculating engines."""
    from specmoe_ray import Engine
    from specmoe_ray.engine import graph

    demo = benchmark_module("demo_pair")
    before = graph.UPLOAD_LOOP_ROWS
    seen = set()
    generate = Engine.generate

    def spy(self, prompts, params=None):
        seen.add((self.proposer is None, graph.UPLOAD_LOOP_ROWS, type(self.policy).__name__))
        return generate(self, prompts, params)

    monkeypatch.setattr(Engine, "generate", spy)
    args = ["--device", "cpu", "--batch", "1", "3", "--rounds", "2", "--new-tokens", "6"]
    args += ["--spec-policy", "adaptive"]
    out = demo.main([*args, "--switch", "rows:graph.UPLOAD_LOOP_ROWS=0"])
    assert [r["batch"] for r in out["rows"]] == [1, 3]
    for r in out["rows"]:
        assert r["tokens_differ"] == [] and list(r["variants"]) == ["default", "rows"]
        for variant in r["variants"].values():
            assert list(variant) == ["plain", "draft", "ngram"]
            plain = variant["plain"]["tok_s"]
            for m in variant.values():
                assert len(m["rounds_tok_s"]) == 2 and m["tok_s"] == statistics.median(m["rounds_tok_s"])
                assert m["vs_plain"] == pytest.approx(m["tok_s"] / plain)
            assert variant["plain"]["acceptance"] is None and 0 < variant["draft"]["acceptance"] <= 1
            assert 0 <= variant["draft"]["k_now"] <= 3 and variant["plain"]["k_now"] == 0
        rows = r["variants"]["rows"]
        assert rows["draft"]["vs_default"] == pytest.approx(
            rows["draft"]["tok_s"] / r["variants"]["default"]["draft"]["tok_s"]
        )
    policies = {True: "FixedPolicy", False: "AdaptivePolicy"}  # (no proposer: nothing to adapt)
    assert seen == {(plain, n, policies[plain]) for plain in (True, False) for n in (before, 0)}
    assert out["spec_policy"] == "adaptive"
    assert before == graph.UPLOAD_LOOP_ROWS
    with pytest.raises(SystemExit):  # the unswitched variant's name
        demo.main([*args, "--switch", "default:graph.UPLOAD_LOOP_ROWS=0"])
