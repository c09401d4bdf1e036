"""DeepSeek-V3 and V2 (MLA, grouped routing, shared experts, YaRN) against transformers."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import pytest
import torch
from conftest import NODE_RESOURCES, PROMPTS, hf_greedy, hf_logits

from specmoe_ray import Engine, SamplingParams, UnsupportedArchitectureError
from specmoe_ray.errors import CheckpointError
from specmoe_ray.models import loader
from specmoe_ray.models.args import ModelArgs
from specmoe_ray.models.deepseek import DeepseekTransformer
from specmoe_ray.models.kv_cache import MLACache
from specmoe_ray.models.loader import load_experts, load_trunk, read_config
from specmoe_ray.models.transformer import build_forward_batch
from specmoe_ray.moe.dispatch import LoopbackDispatch
from specmoe_ray.moe.router import GroupedTopKRouter
from specmoe_ray.serving.shards import ShardOptions

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
ARCHS = ("deepseek_v3", "deepseek_v2")

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,  # the dense layers
    moe_intermediate_size=16,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.3,  # a varied greedy path, not one repeated token
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=None,
)


def yarn(mscale: float, mscale_all_dim: float) -> dict:
    return dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=64,
        beta_fast=32,
        beta_slow=1,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


def hf_config(arch: str):
    import transformers as T

    if arch == "deepseek_v3":  # as DeepSeek-V3/R1: q LoRA, sigmoid + bias, top-2-sum groups
        return T.DeepseekV3Config(
            **TINY,
            q_lora_rank=32,
            num_experts_per_tok=2,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters=yarn(1.0, 1.0),
        )
    # As DeepSeek-V2 (full-rank q as V2-Lite): softmax, max-scored groups. mscale != mscale_all_dim
    # makes YaRN's cos/sin factor differ from 1.
    return T.DeepseekV2Config(
        **TINY,
        q_lora_rank=None,
        num_experts_per_tok=3,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.5,
        rope_parameters=yarn(0.9, 0.707),
    )


def make_deepseek(path: str, arch: str, seed: int = 0, **overrides) -> str:
    import transformers as T

    cfg = hf_config(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # initialised to zero: make them matter
                param.normal_(0, 0.3)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if hasattr(gate, "e_score_correction_bias"):
            # Zero after init; a random bias makes selection differ from the plain scores' top-k.
            gate.e_score_correction_bias.copy_(0.5 * torch.randn_like(gate.e_score_correction_bias))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """arch -> (checkpoint path, transformers' greedy tokens for PROMPTS)."""
    root = tmp_path_factory.mktemp("deepseek")
    out = {}
    for arch in ARCHS:
        path = make_deepseek(str(root / arch), arch)
        out[arch] = path, hf_greedy(path, PROMPTS, NEW)
    return out


def local_model(path: str, dtype: str = "float32") -> DeepseekTransformer:
    model = load_trunk(path, dtype=dtype)
    args = model.args
    store = load_experts(
        path, {layer: list(range(args.num_experts)) for layer in args.moe_layers}, dtype=dtype, args=args
    )
    model.set_expert_backend(LoopbackDispatch(store))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_logits_and_mla_cache(deepseek, arch):
    path, ref = deepseek[arch]
    assert all(len(set(r)) >= 8 for r in ref), f"degenerate reference {ref}: the test would prove little"
    with Engine.from_pretrained(path, max_model_len=128, max_num_seqs=4) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
        cache = engine.cache
    assert [o.token_ids for o in outs] == ref

    # The cache holds the latent and the rope key per token, not per-head keys and values.
    args = engine.args
    assert isinstance(cache, MLACache) and not hasattr(cache, "k")
    assert len(cache.c_kv) == len(cache.k_pe) == args.num_layers
    for c_kv, k_pe in zip(cache.c_kv, cache.k_pe):
        assert c_kv.shape == (4 + 1, 128, 16)  # [slots + scratch, max_model_len, kv_lora_rank]
        assert k_pe.shape == (4 + 1, 128, 8)  # [..., qk_rope_head_dim]

    tokens = PROMPTS[1] + ref[1]
    model = local_model(path)
    ours = model(build_forward_batch([tokens], [0], [0], [0], "cpu"), model.make_cache(1, 64))
    diff = (ours - hf_logits(path, tokens)).abs().max().item()
    assert diff < 1e-4, f"{arch}: max abs logit diff vs transformers {diff:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_shards_and_self_draft(ray_cluster, deepseek, arch):
    """Experts on 2 Ray actors, then the model drafting for itself: the same tokens."""
    path, ref = deepseek[arch]
    args, _ = read_config(path)
    opts = ShardOptions(
        num_cpus=0.5, strategy="SPREAD", bundle_resources=[{NODE_RESOURCES[s]: 1} for s in range(2)]
    )
    with Engine.from_pretrained(path, num_shards=2, max_model_len=128, shard_options=opts) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == ref
        stats = engine.stats()["shards"]
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size
    for info in stats["shards"]:  # only routed experts live on shards: not the shared ones
        assert info["num_parameters"] == sum(len(v) for v in info["held"].values()) * per_expert
    assert all(c > 0 for c in stats["tokens_per_shard"])
    # Trunk replicas: MLA caches on every rank, shared experts added after the all_reduce.
    opts.replicate_trunk = True
    with Engine.from_pretrained(
        path, num_shards=2, max_model_len=128, step_graphs="padded", shard_options=opts
    ) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == ref
        assert engine.stats()["shards"]["shards"][1]["trunk"]
    opts.replica_split = "intermediate"  # every rank half of every routed expert
    with Engine.from_pretrained(
        path, num_shards=2, max_model_len=128, step_graphs="padded", shard_options=opts
    ) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == ref
        shards = engine.stats()["shards"]["shards"]
    assert (
        shards[0]["held"]
        == shards[1]["held"]
        == {layer: list(range(args.num_experts)) for layer in args.moe_layers}
    )

    with Engine.from_pretrained(path, draft=path, num_speculative_tokens=3, max_model_len=128) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
        spec = engine.stats()
    assert [o.token_ids for o in outs] == ref
    assert isinstance(engine.proposer.cache, MLACache)
    assert spec["acceptance_rate"] > 0.95, spec


def test_v3_variants_logits(tmp_path):
    """rope_interleave=false (rotate-half pairs), plain rope (no YaRN), attention_bias=true."""
    path = make_deepseek(
        str(tmp_path / "v3"),
        "deepseek_v3",
        seed=1,
        rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=True,
    )
    args, _ = read_config(path)
    assert not args.mla.rope_interleave and args.rope.kind == "default" and args.qkv_bias
    tokens = PROMPTS[1] + PROMPTS[0]
    model = local_model(path)
    ours = model(build_forward_batch([tokens], [0], [0], [0], "cpu"), model.make_cache(1, 64))
    diff = (ours - hf_logits(path, tokens)).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff vs transformers {diff:.3g}"


def test_mla_rollback_then_new_tokens_match_fresh_prefill(deepseek):
    """Write a wrong continuation, roll back, write the right one: logits equal a clean prefill."""
    path, _ = deepseek["deepseek_v3"]
    model = local_model(path)
    cache = model.make_cache(num_slots=2, max_len=64)
    prompt, wrong, right = PROMPTS[1], [1, 2, 3, 4, 5], [50, 51, 52]
    other = cache.allocate()  # a neighbour in the same batch, so reads are padded
    slot = cache.allocate()
    model(build_forward_batch([prompt + wrong, PROMPTS[0]], [0, 0], [slot, other], [0, 0], "cpu"), cache)
    cache.advance(slot, len(prompt) + len(wrong))
    cache.rollback(slot, len(prompt))
    logits = model(build_forward_batch([right], [len(prompt)], [slot], [0], "cpu"), cache)
    ref = hf_logits(path, prompt + right)[len(prompt) :]
    assert (logits - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grouped", [True, False])
def test_router_equals_transformers_router(arch, grouped):
    """Our router stage against transformers' own, on many tokens: same experts, same weights."""
    import transformers as T

    cfg = hf_config(arch)
    if not grouped:
        if arch == "deepseek_v3":
            cfg.topk_group = cfg.n_group
        else:
            cfg.topk_method = "greedy"
    cls = T.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter
    if arch == "deepseek_v2":
        cls = T.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter
    torch.manual_seed(0)
    theirs = cls(cfg)
    ours = GroupedTopKRouter(ModelArgs.from_hf_config(cfg.to_dict()))
    with torch.no_grad():
        theirs.weight.normal_(0, 0.3)
        ours.weight.copy_(theirs.weight)
        if arch == "deepseek_v3":
            theirs.e_score_correction_bias.normal_(0, 0.5)
            ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(2000, cfg.hidden_size)
    _, want_w, want_ids = theirs(x)
    got_w, got_ids = ours(x)
    want_ids, order = want_ids.sort(-1)
    got_ids, got_order = got_ids.sort(-1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w.gather(1, got_order), want_w.gather(1, order), rtol=1e-6, atol=1e-7)


def test_half_precision_keeps_the_router_in_float32(deepseek):
    path, _ = deepseek["deepseek_v3"]
    model = local_model(path, dtype="bfloat16")
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    tokens = PROMPTS[1]
    ours = model(build_forward_batch([tokens], [0], [0], [0], "cpu"), model.make_cache(1, 64)).double()
    ref64 = hf_logits(path, tokens).double()
    hf_err = (hf_logits(path, tokens, dtype=torch.bfloat16).double() - ref64).abs().max().item()
    ours_err = (ours - ref64).abs().max().item()
    assert ours_err < max(3 * hf_err, 0.05), f"ours {ours_err:.3g} vs transformers {hf_err:.3g}"


def deepseek_v3_config(**changes) -> dict:
    """The fields of a published DeepSeek-V3 config.json that matter here (old `rope_scaling` form)."""
    cfg = dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        moe_layer_freq=1,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        max_position_embeddings=163840,
        rope_theta=10000,
        rope_scaling={
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
    )
    cfg.update(changes)
    return cfg


def test_published_v3_config_fields():
    args = ModelArgs.from_hf_config(deepseek_v3_config())
    assert args.moe_layers == tuple(range(3, 61))
    assert (args.mla.q_lora_rank, args.mla.kv_lora_rank, args.mla.qk_head_dim) == (1536, 512, 192)
    assert (args.routing.scoring, args.routing.n_group, args.routing.topk_group) == ("sigmoid", 8, 4)
    assert args.rope.kind == "yarn" and args.rope.factor == 40 and args.rope.original_max_position == 4096
    assert args.head_dim == 64 and args.num_shared_experts == 1

    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    assert args.fp8_block is None
    assert ModelArgs.from_hf_config(deepseek_v3_config(quantization_config=fp8)).fp8_block == (128, 128)
    with pytest.raises(UnsupportedArchitectureError, match="quant_method='awq'"):
        ModelArgs.from_hf_config(deepseek_v3_config(quantization_config={"quant_method": "awq"}))
    with pytest.raises(UnsupportedArchitectureError, match="without weight_block_size"):
        ModelArgs.from_hf_config(deepseek_v3_config(quantization_config={"quant_method": "fp8"}))
    with pytest.raises(CheckpointError, match="weight_block_size"):
        ModelArgs.from_hf_config(deepseek_v3_config(quantization_config=dict(fp8, weight_block_size=[128])))
    with pytest.raises(UnsupportedArchitectureError, match="topk_method='greedy'"):
        ModelArgs.from_hf_config(deepseek_v3_config(topk_method="greedy"))
    with pytest.raises(CheckpointError, match="n_group=3"):
        ModelArgs.from_hf_config(deepseek_v3_config(n_group=3))
    with pytest.raises(UnsupportedArchitectureError, match="yarn for DeepSeek"):
        ModelArgs.from_hf_config(
            dict(deepseek_v3_config(), model_type="llama", architectures=["LlamaForCausalLM"])
        )


# --- fp8 block-quantized checkpoints (DeepSeek-V3/R1's published layout) ---------------------------

# Not square, and not dividing every dim (64, 96, 24, 16, 32, 128): partial blocks at both edges.
FP8_BLOCK = (16, 24)
FP8_MAX = 448.0  # largest float8_e4m3fn


def _fp8_quantized(name: str) -> bool:
    """As DeepSeek: the linear projections (attention, dense MLPs, routed and shared experts);
    not the embeddings, norms, router gate or lm_head."""
    return re.search(r"_proj(_with_mqa)?\.weight$", name) is not None


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv [ceil(rows/B0), ceil(cols/B1)]): each block's amax -> 448."""
    (rows, cols), (b0, b1) = w.shape, block
    nr, nc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(nr * b0, nc * b1, dtype=torch.float64)
    padded[:rows, :cols] = w.double()
    amax = padded.view(nr, b0, nc, b1).abs().amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp_min(1e-12).float()
    q = padded.view(nr, b0, nc, b1) / scale.double()[:, None, :, None]
    return q.view(nr * b0, nc * b1)[:rows, :cols].to(torch.float8_e4m3fn), scale


def _dequantize64(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference: each element times its block's scale by index arithmetic, in float64."""
    rows, cols = q.shape
    s = scale.double()[torch.arange(rows) // block[0]][:, torch.arange(cols) // block[1]]
    return q.double() * s


def write_fp8_pair(src: str, root: str, block=FP8_BLOCK) -> tuple[str, str]:
    """(fp8 checkpoint, reference) from `src`: the reference holds each fp8 weight dequantized in
    float64 and saved as float32, so the two differ only by our dequantization code."""
    from safetensors.torch import load_file, save_file

    fp8, ref = os.path.join(root, "fp8"), os.path.join(root, "ref")
    for d in (fp8, ref):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
    for file in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
        tensors = load_file(os.path.join(src, file))
        q_state, ref_state = {}, {}
        for name, t in tensors.items():
            if _fp8_quantized(name):
                q, scale = _quantize(t, block)
                q_state[name], q_state[name + "_scale_inv"] = q, scale
                ref_state[name] = _dequantize64(q, scale, block).float()
            else:
                q_state[name] = ref_state[name] = t
        save_file(q_state, os.path.join(fp8, file), metadata={"format": "pt"})
        save_file(ref_state, os.path.join(ref, file), metadata={"format": "pt"})
    cfg_path = os.path.join(fp8, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return fp8, ref


@pytest.fixture(scope="module")
def fp8_pair(deepseek, tmp_path_factory):
    src, _ = deepseek["deepseek_v3"]
    return write_fp8_pair(src, str(tmp_path_factory.mktemp("fp8")))


def test_fp8_block_checkpoint_matches_dequantized_reference(deepseek, fp8_pair):
    fp8, ref = fp8_pair
    src, _ = deepseek["deepseek_v3"]
    from safetensors import safe_open

    with safe_open(next(glob.iglob(os.path.join(fp8, "*.safetensors"))), framework="pt") as f:
        names = list(f.keys())
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
    quantized = [n for n in names if n + "_scale_inv" in dtypes]
    assert {dtypes[n] for n in quantized} == {"F8_E4M3"}
    assert any(".experts.3.down_proj" in n for n in quantized) and any(
        "shared_experts" in n for n in quantized
    )
    assert not any("embed" in n or "norm" in n or "lm_head" in n or "mlp.gate." in n for n in quantized)
    assert read_config(fp8)[0].fp8_block == FP8_BLOCK

    tokens = PROMPTS[1] + PROMPTS[0]
    logits = {}
    for which, path in (("fp8", fp8), ("ref", ref), ("orig", src)):
        model = local_model(path)
        logits[which] = model(build_forward_batch([tokens], [0], [0], [0], "cpu"), model.make_cache(1, 64))
    diff = (logits["fp8"] - logits["ref"]).abs().max().item()
    assert diff < 1e-4, f"fp8 checkpoint vs its float64-dequantized reference: max abs logit diff {diff:.3g}"
    # The quantization really changed the model (so the comparison above is not vacuous).
    assert (logits["fp8"] - logits["orig"]).abs().max().item() > 1e-3

    # Dequantized on load straight to bf16: the same tensors as the reference's, cast.
    ours, theirs = load_trunk(fp8, dtype="bfloat16"), load_trunk(ref, dtype="bfloat16")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert ours.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.bfloat16
    args = ours.args
    want = {layer: [0, 5] for layer in args.moe_layers}
    a = load_experts(fp8, want, dtype="bfloat16", args=args)
    b = load_experts(ref, want, dtype="bfloat16", args=args)
    for layer in args.moe_layers:
        assert torch.equal(a.by_layer[str(layer)].gate_up, b.by_layer[str(layer)].gate_up)
        assert torch.equal(a.by_layer[str(layer)].down, b.by_layer[str(layer)].down)
    # A slice of each expert's intermediate size (replica_split): cut after the dequantization,
    # so it is the same slice of the reference's tensors.
    half = load_experts(fp8, want, dtype="bfloat16", args=args, part=(1, 2))
    lo, I = args.moe_intermediate_size // 2, args.moe_intermediate_size
    for layer in args.moe_layers:
        gate_up, down = b.by_layer[str(layer)].gate_up, b.by_layer[str(layer)].down
        want_gu = torch.cat([gate_up[:, lo:I], gate_up[:, I + lo :]], dim=1)
        assert torch.equal(half.by_layer[str(layer)].gate_up, want_gu)
        assert torch.equal(half.by_layer[str(layer)].down, down[:, :, lo:])

    with Engine.from_pretrained(fp8, max_model_len=128) as engine:
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    with Engine.from_pretrained(ref, max_model_len=128) as engine:
        assert got == [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


def test_fp8_expert_shards_read_only_their_experts(ray_cluster, fp8_pair, monkeypatch):
    fp8, ref = fp8_pair
    args, _ = read_config(fp8)
    # In process: loading two experts reads their weights and scales, and nothing else.
    read = []
    real_get = loader.CheckpointIndex.get
    monkeypatch.setattr(
        loader.CheckpointIndex, "get", lambda self, n, i=None: read.append(n) or real_get(self, n, i)
    )
    load_experts(fp8, {1: [2, 6]}, args=args)
    monkeypatch.undo()
    want = {
        f"model.layers.1.mlp.experts.{e}.{p}.weight{s}"
        for e in (2, 6)
        for p in ("gate_proj", "up_proj", "down_proj")
        for s in ("", "_scale_inv")
    }
    assert sorted(read) == sorted(want)

    with Engine.from_pretrained(ref, max_model_len=128) as engine:
        want_tokens = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    opts = ShardOptions(
        num_cpus=0.5, strategy="SPREAD", bundle_resources=[{NODE_RESOURCES[s]: 1} for s in range(2)]
    )
    with Engine.from_pretrained(fp8, num_shards=2, max_model_len=128, shard_options=opts) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == want_tokens
        stats = engine.stats()["shards"]
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size
    held = [sum(len(v) for v in info["held"].values()) for info in stats["shards"]]
    assert sum(held) == args.num_experts * len(args.moe_layers) and all(0 < h < sum(held) for h in held)
    for info, h in zip(stats["shards"], held):
        assert info["num_parameters"] == h * per_expert


def _break_scale(path: str, name: str) -> None:
    from safetensors.torch import load_file, save_file

    for file in glob.glob(os.path.join(path, "*.safetensors")):
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = tensors[name][:, :-1].contiguous()  # one block column short
            save_file(tensors, file, metadata={"format": "pt"})


def test_fp8_bad_scale_shape_is_a_clear_error(fp8_pair, tmp_path):
    fp8, _ = fp8_pair
    expert = "model.layers.2.mlp.experts.4.down_proj.weight"
    trunk = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    for name in (expert, trunk):
        bad = str(tmp_path / name.split(".")[-3])
        shutil.copytree(fp8, bad)
        _break_scale(bad, name + "_scale_inv")
        with pytest.raises(CheckpointError, match=re.escape(f"'{name}_scale_inv' has shape")) as info:
            if name == expert:
                load_experts(bad, {2: [4]})
            else:
                load_trunk(bad)
        assert "weight_block_size" in str(info.value), str(info.value)
    # fp8 scales without a quantization_config in config.json
    bad = str(tmp_path / "noconfig")
    shutil.copytree(fp8, bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    del cfg["quantization_config"]
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_trunk(bad)
