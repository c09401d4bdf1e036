"""DeepSeek-V3 and V2 (MLA, grouped routing, shared experts, YaRN) against transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import NODE_RESOURCES, PROMPTS, hf_greedy, hf_logits

from specmoe_ray import Engine, SamplingParams, UnsupportedArchitectureError
from specmoe_ray.errors import CheckpointError
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

    with pytest.raises(UnsupportedArchitectureError, match="quant_method='fp8'"):
        ModelArgs.from_hf_config(deepseek_v3_config(quantization_config={"quant_method": "fp8"}))
    with pytest.raises(UnsupportedArchitectureError, match="topk_method='greedy'"):
        ModelArgs.from_hf_config(deepseek_v3_config(topk_method="greedy"))
    with pytest.raises(CheckpointError, match="n_group=3"):
        ModelArgs.from_hf_config(deepseek_v3_config(n_group=3))
    with pytest.raises(UnsupportedArchitectureError, match="yarn for DeepSeek"):
        ModelArgs.from_hf_config(
            dict(deepseek_v3_config(), model_type="llama", architectures=["LlamaForCausalLM"])
        )
