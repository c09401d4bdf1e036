"""Our model code against transformers' own implementation, for every supported architecture."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import DENSE_ARCHS, MOE_ARCHS, PROMPTS, hf_greedy, hf_logits, make_checkpoint
from safetensors.torch import load_file, save_file

from specmoe_ray import Engine, SamplingParams
from specmoe_ray.models.kv_cache import KVCache
from specmoe_ray.models.loader import load_experts, load_trunk, read_config
from specmoe_ray.models.transformer import build_forward_batch
from specmoe_ray.moe.dispatch import LoopbackDispatch

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def engine_logits(path: str, tokens: list[int], dtype="float32") -> torch.Tensor:
    """Our logits for every position of one sequence, in one prefill."""
    model = load_trunk(path, dtype=dtype)
    args = model.args
    if args.is_moe:
        store = load_experts(
            path, {layer: list(range(args.num_experts)) for layer in args.moe_layers}, dtype=dtype, args=args
        )
        model.set_expert_backend(LoopbackDispatch(store))
    cache = model.make_cache(num_slots=1, max_len=64)
    batch = build_forward_batch([tokens], [0], [0], [0], "cpu")
    return model(batch, cache)


@pytest.mark.parametrize("arch", MOE_ARCHS + DENSE_ARCHS)
def test_greedy_and_logits_match_transformers(checkpoints, arch):
    path = checkpoints(arch)
    ref = hf_greedy(path, PROMPTS, NEW)
    assert any(len(set(r)) >= 4 for r in ref), f"degenerate reference {ref}: the test would prove little"
    with Engine.from_pretrained(path, max_model_len=128) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
    for out, want in zip(outs, ref):
        assert out.token_ids == want
        assert out.finish_reason == "length"

    tokens = PROMPTS[1] + ref[1]
    ours, theirs = engine_logits(path, tokens), hf_logits(path, tokens)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"{arch}: max abs logit diff vs transformers {diff:.3g}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close_to_transformers(checkpoints, dtype):
    path = checkpoints("qwen2_moe")
    tokens = PROMPTS[1]
    ours = engine_logits(path, tokens, dtype=dtype)
    ref64 = hf_logits(path, tokens, dtype=torch.float32).double()
    theirs = hf_logits(path, tokens, dtype=getattr(torch, dtype))
    ours_err = (ours.double() - ref64).abs().max().item()
    hf_err = (theirs.double() - ref64).abs().max().item()
    # Both round differently; ours must be no worse than transformers' own half-precision run.
    assert ours_err < max(3 * hf_err, 0.05), f"{dtype}: ours {ours_err:.3g} vs transformers {hf_err:.3g}"
    with Engine.from_pretrained(path, dtype=dtype, max_model_len=64) as engine:
        assert engine.model.lm_head.weight.dtype == getattr(torch, dtype)
        out = engine.generate([tokens], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def _to_fused_layout(src: str, dst: str) -> None:
    """Rewrite a per-expert checkpoint in transformers 5's fused module layout."""
    shutil.copytree(src, dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    args, _ = read_config(src)
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for layer in args.moe_layers:
        pre = f"model.layers.{layer}"
        names = [
            (
                f"{pre}.mlp.experts.{e}.gate_proj.weight",
                f"{pre}.mlp.experts.{e}.up_proj.weight",
                f"{pre}.mlp.experts.{e}.down_proj.weight",
            )
            for e in range(args.num_experts)
        ]
        if names[0][0] not in state:  # Mixtral's names
            names = [
                (
                    f"{pre}.block_sparse_moe.experts.{e}.w1.weight",
                    f"{pre}.block_sparse_moe.experts.{e}.w3.weight",
                    f"{pre}.block_sparse_moe.experts.{e}.w2.weight",
                )
                for e in range(args.num_experts)
            ]
            out[f"{pre}.mlp.gate.weight"] = out.pop(f"{pre}.block_sparse_moe.gate.weight")
        out[f"{pre}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[g], state[u]]) for g, u, _ in names]
        )
        out[f"{pre}.mlp.experts.down_proj"] = torch.stack([state[d] for _, _, d in names])
    assert not any(".experts.0." in k for k in out)
    save_file(out, os.path.join(dst, "model.safetensors"))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_and_per_expert_layouts_give_same_tokens(checkpoints, tmp_path, arch):
    per_expert = checkpoints(arch)
    fused = str(tmp_path / "fused")
    _to_fused_layout(per_expert, fused)
    outs = []
    for path in (per_expert, fused):
        with Engine.from_pretrained(path, max_model_len=128) as engine:
            outs.append([o.token_ids for o in engine.generate(PROMPTS, GREEDY)])
    assert outs[0] == outs[1] == hf_greedy(per_expert, PROMPTS, NEW)


def test_sharded_safetensors_with_index(checkpoints, tmp_path):
    """Checkpoints split over several files (as published ones are) load the same."""
    src = checkpoints("qwen2_moe")
    dst = tmp_path / "split"
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(dst / name))
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Engine.from_pretrained(str(dst), max_model_len=128) as engine:
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert got == hf_greedy(src, PROMPTS, NEW)


def test_tied_embeddings(tmp_path):
    path = make_checkpoint(str(tmp_path / "tied"), "qwen3", tie_word_embeddings=True)
    assert not any("lm_head" in k for k in load_file(os.path.join(path, "model.safetensors")))
    with Engine.from_pretrained(path, max_model_len=128) as engine:
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert got == hf_greedy(path, PROMPTS, NEW)


def test_kv_rollback_then_new_tokens_match_fresh_prefill(checkpoints):
    """Write a wrong continuation, roll back, write the right one: logits equal a clean prefill."""
    path = checkpoints("qwen3_moe")
    model = load_trunk(path)
    args = model.args
    store = load_experts(path, {layer: list(range(args.num_experts)) for layer in args.moe_layers}, args=args)
    model.set_expert_backend(LoopbackDispatch(store))
    cache: KVCache = model.make_cache(num_slots=2, max_len=64)
    prompt, wrong, right = PROMPTS[1], [1, 2, 3, 4, 5], [50, 51, 52]
    slot = cache.allocate()
    model(build_forward_batch([prompt + wrong], [0], [slot], [0], "cpu"), cache)
    cache.advance(slot, len(prompt) + len(wrong))
    cache.rollback(slot, len(prompt))
    logits = model(build_forward_batch([right], [len(prompt)], [slot], [0], "cpu"), cache)
    ref = hf_logits(path, prompt + right)[len(prompt) :]
    assert (logits - ref).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="rollback to 99"):
        cache.rollback(slot, 99)


def test_chunked_prefill_and_mixed_batches_match(checkpoints):
    """Tiny token budgets split prompts into chunks and mix prefill with decode: same tokens."""
    path = checkpoints("olmoe")
    ref = hf_greedy(path, PROMPTS, NEW)
    with Engine.from_pretrained(path, max_model_len=128, max_num_batched_tokens=5, max_num_seqs=2) as engine:
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert got == ref


def test_requests_arriving_while_others_run(checkpoints):
    path = checkpoints("mixtral")
    ref = hf_greedy(path, PROMPTS, NEW)
    with Engine.from_pretrained(path, max_model_len=128) as engine:
        first = engine.add_request(PROMPTS[0], GREEDY)
        done = {}
        later = []
        for step in range(200):
            if step in (3, 7):
                later.append(engine.add_request(PROMPTS[len(later) + 1], GREEDY))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            if len(done) == 3:
                break
    assert [done[first], done[later[0]], done[later[1]]] == ref


def test_stop_token_ids_and_eos(checkpoints):
    path = checkpoints("qwen2")
    ref = hf_greedy(path, PROMPTS[:1], NEW)[0]
    stop = ref[5]
    cut = ref.index(stop)
    with Engine.from_pretrained(path, max_model_len=128) as engine:
        out = engine.generate(
            [PROMPTS[0]], SamplingParams(max_tokens=NEW, temperature=0.0, stop_token_ids=[stop])
        )[0]
        assert out.token_ids == ref[: cut + 1] and out.finish_reason == "stop"
        engine.args.eos_token_ids = (stop,)  # as if config.json named it eos
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, temperature=0.0))[0]
        assert out.token_ids == ref[: cut + 1] and out.finish_reason == "stop"
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))[
            0
        ]
        assert out.token_ids == ref and out.finish_reason == "length"


def test_fused_gate_up_keeps_the_weights_and_the_mlp(checkpoints):
    """`fuse_projections` stacks dense MLPs' (and shared experts') gate and up weights into one
    tensor: the state dict keeps its keys and values (gate and up become views of it, gate rows
    first), and the MLP still computes down(silu(gate x) * up x) (float64 reference)."""
    import torch.nn.functional as F

    from specmoe_ray.models.transformer import MLP

    mlps = []
    for arch in ("qwen3_moe", "qwen2_moe"):  # a dense layer; a shared expert in each MoE layer
        model = load_trunk(checkpoints(arch))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.fuse_projections()
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        mlps += [m for m in model.modules() if isinstance(m, MLP)]
    assert len(mlps) >= 2 and all(m._gate_up is not None for m in mlps)
    g = torch.Generator().manual_seed(0)
    for m in mlps:
        n = m.gate_proj.weight.shape[0]
        assert m.gate_proj.weight.data_ptr() == m._gate_up.data_ptr()
        assert m.up_proj.weight.data_ptr() == m._gate_up[n:].data_ptr()
        x = torch.randn(3, m.gate_proj.weight.shape[1], generator=g).double()
        w = {k: p.double() for k, p in m.state_dict().items()}
        gate, up = F.linear(x, w["gate_proj.weight"]), F.linear(x, w["up_proj.weight"])
        ref = F.linear(F.silu(gate) * up, w["down_proj.weight"])
        torch.testing.assert_close(m(x.float()).double(), ref, rtol=1e-5, atol=1e-6)


def test_l2_ahead_plan_names_each_points_weights(checkpoints):
    """`l2_ahead.plan`: each `what@where` of MODE puts that weight at every layer's point (the
    next layer's fused q/k/v for `qkv+1`, none after the last layer, no router in a dense
    layer); a bad item is named; off a
    GPU with the bulk prefetch, `for_step` gives None, so CPUs run the forward unchanged."""
    from specmoe_ray.models import fused, l2_ahead

    model = load_trunk(checkpoints("qwen3_moe"))
    model.fuse_projections()
    layers = model.model.layers
    assert len(layers) >= 2 and 0 < sum(hasattr(layer.mlp, "gate") for layer in layers) < len(layers)
    points = l2_ahead.plan(model, "o@attention, qkv+1@moe,router@start")
    want = {}
    for i, layer in enumerate(layers):
        want[(i, "attention")] = [layer.self_attn.o_proj.weight]
        if hasattr(layer.mlp, "gate"):  # (a dense layer has no router)
            want[(i, "start")] = [layer.mlp.gate.weight]
        if i + 1 < len(layers):
            want[(i, "moe")] = [layers[i + 1].self_attn._qkv[0]]
    assert points.keys() == want.keys()
    for key, weights in want.items():
        assert [w.data_ptr() for w in points[key]] == [w.data_ptr() for w in weights], key
        assert all(a is b for a, b in zip(points[key], weights)), key
    assert not l2_ahead.plan(model, "")
    with pytest.raises(ValueError, match=r"'o@middle'.*what@where"):
        l2_ahead.plan(model, "o@attention,o@middle")
    with pytest.raises(ValueError, match=r"'qkv@start'"):
        l2_ahead.parse_mode("qkv@start")
    x = torch.zeros(1, model.args.hidden_size)
    with fused.active():
        old, l2_ahead.MODE = l2_ahead.MODE, "o@attention"
        try:
            assert l2_ahead.for_step(model, x, padded=True) is None
        finally:
            l2_ahead.MODE = old
