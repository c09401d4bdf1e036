"""`draft="mtp"`: DeepSeek-V3's multi-token-prediction module drafting for its own model.

The MTP module is checked against a float64 implementation written here from the DeepSeek-V3
report's equations (§2.2), reading the checkpoint's tensors with plain torch ops, and fed the
trunk's hidden states from transformers' own model; the engine is checked to stay lossless.
transformers saves no MTP tensors, so the test checkpoints get theirs written here.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil

import pytest
import torch
from conftest import (
    NODE_RESOURCES,
    PROMPTS,
    chi2_pvalue,
    exact_pair_probs,
    hf_greedy,
    hf_next_logits,
    sample_pairs,
)
from safetensors.torch import load_file, save_file
from test_deepseek import make_deepseek, write_fp8_pair

from specmoe_ray import Engine, SamplingParams, UnsupportedArchitectureError
from specmoe_ray.config import ConfigError, ServeConfig
from specmoe_ray.errors import CheckpointError
from specmoe_ray.models.loader import load_experts, load_mtp, load_trunk
from specmoe_ray.models.transformer import build_forward_batch
from specmoe_ray.moe.dispatch import LoopbackDispatch
from specmoe_ray.serving.shards import ShardOptions
from specmoe_ray.spec.mtp import MTPProposer
from specmoe_ray.spec.proposer import DraftRequest

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


# -- test checkpoints: a DeepSeek-V3 trunk plus an MTP layer written by hand -------------------------


def _tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(file))
    return out


def add_mtp(path: str, seed: int, own_head: bool = True) -> str:
    """Write a random MTP layer `model.layers.{L}.*` (L = num_hidden_layers) into mtp.safetensors.

    Its decoder layer has the shapes of layer 1 (an MoE layer, per-expert tensors as published
    checkpoints); `own_head`: also its own `embed_tokens` and `shared_head.head` (else the trunk's
    serve, as transformers' MtpModel always does).
    """
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    L, D, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.3):
        return torch.randn(*shape, generator=gen) * std

    mtp = {}
    for name, t in _tensors(path).items():
        if name.startswith("model.layers.1."):
            new = f"model.layers.{L}." + name.removeprefix("model.layers.1.")
            if name.endswith("norm.weight"):
                mtp[new] = 1 + randn(*t.shape, std=0.2)
            elif name.endswith("e_score_correction_bias"):
                mtp[new] = randn(*t.shape, std=0.5)
            else:
                mtp[new] = randn(*t.shape)
    p = f"model.layers.{L}."
    mtp[p + "enorm.weight"] = 1 + randn(D, std=0.2)
    mtp[p + "hnorm.weight"] = 1 + randn(D, std=0.2)
    mtp[p + "eh_proj.weight"] = randn(D, 2 * D, std=0.15)
    mtp[p + "shared_head.norm.weight"] = 1 + randn(D, std=0.2)
    if own_head:
        mtp[p + "embed_tokens.weight"] = randn(V, D)
        mtp[p + "shared_head.head.weight"] = randn(V, D)
    save_file({k: v.contiguous() for k, v in mtp.items()}, os.path.join(path, "mtp.safetensors"))
    cfg["num_nextn_predict_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def make_useful_mtp(
    path: str, strength: float = 30.0, bigram: float = 2.0, mix: float = 0.1, seed: int = 0
) -> str:
    """Rewrite an MTP checkpoint (no own head) so that its MTP predicts the trunk well.

    The trunk's embeddings are scaled up (`strength`), so each token's own embedding dominates
    the residual stream (the layers read it through RMSNorm and write as before), and the LM
    head favours a successor permutation (`bigram`): the next token depends mostly on the
    current one, t_{i+1} ~ f(t_i). The MTP then predicts t_{i+2} ~ f(t_{i+1}) from the embedding
    of t_{i+1}: eh_proj passes the embedding half through, scaled alike, and mixes in a little of
    the hidden half; its head is the trunk's norm and lm_head. Close, not equal: drafts are
    often accepted, sometimes not.
    """
    with open(os.path.join(path, "config.json")) as f:
        L = json.load(f)["num_hidden_layers"]
    p = f"model.layers.{L}."
    embed = _tensors(path)["model.embed_tokens.weight"]
    rms = float(embed.pow(2).mean().sqrt())
    succ = torch.randperm(embed.shape[0], generator=torch.Generator().manual_seed(seed))
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        tensors = load_file(file)
        if "model.embed_tokens.weight" in tensors:
            tensors["model.embed_tokens.weight"] = embed * strength
            lm_head = tensors["lm_head.weight"]
            favour = torch.zeros_like(lm_head)
            favour[succ] = (
                embed / embed.norm(dim=-1, keepdim=True).clamp_min(1e-6) * lm_head.norm(dim=-1, keepdim=True)
            )
            tensors["lm_head.weight"] = lm_head + bigram * favour
        if p + "eh_proj.weight" in tensors:
            D = tensors[p + "enorm.weight"].shape[0]
            eh = tensors[p + "eh_proj.weight"][:, D:]
            hidden_half = eh / eh.std() * mix / D**0.5  # |R h| ~ mix |h|
            # enorm makes the embedding's rms 1; the trunk's is `rms` (before scaling).
            identity = torch.eye(D) * strength * rms
            tensors[p + "eh_proj.weight"] = torch.cat([identity, hidden_half], dim=1)
            tensors[p + "enorm.weight"] = torch.ones(D)
            tensors[p + "shared_head.norm.weight"] = torch.ones(D)  # the trunk's norm (transformers' init)
        save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return path


# -- the float64 reference, from the DeepSeek-V3 report's equations ----------------------------------


class Reference64:
    """DeepSeek-V3's MTP module (report §2.2) in float64 over one sequence, without a cache.

    The trunk's final-normed hidden states come from transformers' float64 model; the MTP layer
    is written here: RMSNorm, MLA (DeepSeek-V2 §2.1: low-rank q and kv, decoupled rope key,
    interleaved pairs rotated as complex numbers, as V3's rope_interleave=true), MoE with V3's
    sigmoid + bias, top-2-sum group-limited routing, then the shared head. Rope frequencies
    (YaRN) come from transformers. The report's eq. 21 writes [RMSNorm(h); RMSNorm(Emb(t))], but
    the released weights take the embedding half first (DeepSeek's inference code, vLLM, SGLang
    and transformers all do): so does this reference.
    """

    def __init__(self, path: str):
        import transformers as T

        with open(os.path.join(path, "config.json")) as f:
            self.cfg = cfg = json.load(f)
        self.W = {k: v.double() for k, v in _tensors(path).items()}
        self.L = cfg["num_hidden_layers"]
        self.p = f"model.layers.{self.L}."
        self.model = T.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, experts_implementation="eager"
        ).eval()
        rotary = self.model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.double()
        self.cos_sin_scale = float(rotary.attention_scaling)
        rp = cfg["rope_parameters"]
        self.scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
        if rp.get("rope_type") == "yarn" and rp["factor"] > 1:
            m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1.0
            self.scale *= m * m

    def w(self, name: str) -> torch.Tensor:
        return self.W[self.p + name]

    @staticmethod
    def rms(x, w, eps):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def linear(self, x, name):
        y = x @ self.w(name + ".weight").T
        bias = self.p + name + ".bias"
        return y + self.W[bias] if bias in self.W else y

    def rope(self, x, positions):
        """Rotate pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i]: x [T, ..., P]."""
        angle = positions.double()[:, None] * self.inv_freq  # [T, P/2]
        rot = torch.polar(torch.full_like(angle, self.cos_sin_scale), angle)
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        rot = rot.view(rot.shape[0], *([1] * (z.dim() - 2)), rot.shape[-1])
        return torch.view_as_real(z * rot).flatten(-2)

    def attention(self, x, positions):
        c = self.cfg
        T, H = x.shape[0], c["num_attention_heads"]
        Dn, P, Dv, R = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        q = self.linear(
            self.rms(self.linear(x, "self_attn.q_a_proj"), self.w("self_attn.q_a_layernorm.weight"), 1e-6),
            "self_attn.q_b_proj",
        )
        q = q.view(T, H, Dn + P)
        q_nope, q_pe = q[..., :Dn], self.rope(q[..., Dn:], positions)
        kv_a = self.linear(x, "self_attn.kv_a_proj_with_mqa")
        c_kv = self.rms(kv_a[:, :R], self.w("self_attn.kv_a_layernorm.weight"), 1e-6)
        k_pe = self.rope(kv_a[:, R:], positions)  # [T, P], one for all heads
        kv = self.linear(c_kv, "self_attn.kv_b_proj").view(T, H, Dn + Dv)
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        scores = torch.einsum("ihd,jhd->hij", q_nope, k_nope) + torch.einsum("ihd,jd->hij", q_pe, k_pe)
        causal = positions[None, :] <= positions[:, None]  # [T, T]: key j visible from query i
        scores = (scores * self.scale).masked_fill(~causal, float("-inf"))
        out = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(T, H * Dv)
        return self.linear(out, "self_attn.o_proj")

    def mlp(self, x, name):
        gate, up = self.linear(x, name + ".gate_proj"), self.linear(x, name + ".up_proj")
        return self.linear(torch.nn.functional.silu(gate) * up, name + ".down_proj")

    def moe(self, x):
        """Shared experts plus the top-k routed experts of each token (report eq. 12-16)."""
        c = self.cfg
        E, G, A = c["n_routed_experts"], c["n_group"], c["num_experts_per_tok"]
        T = x.shape[0]
        scores = (x @ self.w("mlp.gate.weight").T).sigmoid()  # s_{i,t} [T, E]
        choice = scores + self.w("mlp.gate.e_score_correction_bias")  # the bias steers selection only
        group_score = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)  # [T, G]
        kept = torch.zeros(T, G, dtype=torch.bool)
        kept.scatter_(1, group_score.topk(c["topk_group"], dim=-1).indices, True)
        choice = choice.masked_fill(~kept.repeat_interleave(E // G, dim=1), float("-inf"))
        experts = choice.topk(A, dim=-1).indices  # [T, A]
        gates = scores.gather(1, experts)
        if c.get("norm_topk_prob", True):
            gates = gates / gates.sum(-1, keepdim=True)
        gates = gates * c["routed_scaling_factor"]
        weight = torch.zeros(T, E, dtype=torch.float64).scatter(1, experts, gates)  # g_{i,t}, 0 if unchosen
        out = self.mlp(x, "mlp.shared_experts")
        for e in range(E):
            out = out + weight[:, e : e + 1] * self.mlp(x, f"mlp.experts.{e}")
        return out

    def shared(self, name: str, trunk_name: str) -> torch.Tensor:
        return self.W.get(self.p + name, self.W[trunk_name])

    def mtp(self, hidden, next_tokens, positions):
        """h_i [T, D], t_{i+1} [T], positions i [T] -> logits [T, V], g [T, D] (report eq. 21-23)."""
        eps = self.cfg["rms_norm_eps"]
        emb = self.shared("embed_tokens.weight", "model.embed_tokens.weight")[next_tokens]
        u = torch.cat(
            [self.rms(emb, self.w("enorm.weight"), eps), self.rms(hidden, self.w("hnorm.weight"), eps)], -1
        )
        x = u @ self.w("eh_proj.weight").T
        x = x + self.attention(self.rms(x, self.w("input_layernorm.weight"), eps), positions)
        x = x + self.moe(self.rms(x, self.w("post_attention_layernorm.weight"), eps))
        g = self.rms(x, self.w("shared_head.norm.weight"), eps)
        return g @ self.shared("shared_head.head.weight", "lm_head.weight").T, g

    @torch.no_grad()
    def trunk_hidden(self, tokens: list[int]) -> torch.Tensor:
        """transformers' final-normed hidden states of the trunk, [len, D] float64."""
        return self.model.model(torch.tensor([tokens])).last_hidden_state[0]

    @torch.no_grad()
    def prompt_logits(self, tokens: list[int]) -> torch.Tensor:
        """MTP logits at positions 0 .. n - 2 of a sequence of n tokens: [n - 1, V]."""
        h = self.trunk_hidden(tokens)
        return self.mtp(h[:-1], torch.tensor(tokens[1:]), torch.arange(len(tokens) - 1))[0]

    @torch.no_grad()
    def chain(self, tokens: list[int], drafts: list[int]) -> torch.Tensor:
        """Logits of drafts 1 .. k+1 for a sequence of n tokens, chained as transformers' MtpModel:
        position n - 2 + j takes the previous position's g and draft j (`drafts` = d_1 .. d_k).
        -> [k + 1, V]."""
        n = len(tokens)
        h = self.trunk_hidden(tokens)[:-1]  # h_0 .. h_{n-2}
        toks = list(tokens[1:])
        out = []
        for j in range(len(drafts) + 1):
            logits, g = self.mtp(h, torch.tensor(toks), torch.arange(n - 1 + j))
            out.append(logits[-1])
            if j < len(drafts):
                h = torch.cat([h, g[-1:]])
                toks.append(drafts[j])
        return torch.stack(out)


def transformers_mtp_logits(ref: Reference64, path: str, tokens: list[int]) -> torch.Tensor:
    """The same MTP logits from transformers' own `MtpModel` (float64), checkpoint tensors renamed
    as its loader does; it always shares the trunk's embedding and head. -> [n - 1, V]."""
    from transformers.modeling_layers import MtpModel

    mtp = MtpModel(ref.model, 1).double().eval()
    W, p, E = ref.W, ref.p, ref.cfg["n_routed_experts"]
    state = {}
    for name, t in W.items():
        key = name.removeprefix(p)
        if not name.startswith(p) or ".experts." in key:
            continue
        if key.startswith(("enorm.", "hnorm.", "eh_proj.")):
            state["layers.0." + key] = t
        elif key == "shared_head.norm.weight":
            state["layers.0.post_norm.weight"] = t
        else:
            state["layers.0.mtp_block." + key] = t
    experts = "layers.0.mtp_block.mlp.experts."
    state[experts + "gate_up_proj"] = torch.stack(
        [
            torch.cat([W[f"{p}mlp.experts.{e}.gate_proj.weight"], W[f"{p}mlp.experts.{e}.up_proj.weight"]])
            for e in range(E)
        ]
    )
    state[experts + "down_proj"] = torch.stack([W[f"{p}mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    tied = {"embed_tokens.weight", "shared_head.weight"}  # the trunk's, by reference
    assert set(missing) == tied and not unexpected
    n = len(tokens)
    with torch.no_grad():
        h = ref.trunk_hidden(tokens)[None, :-1]
        g = mtp.forward_layer(0, h, torch.arange(n - 1)[None], None, input_ids=torch.tensor([tokens[1:]]))
        return mtp._project_to_logits(g)[0]


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_ckpts(tmp_path_factory):
    """name -> (checkpoint, transformers' greedy tokens for PROMPTS).

    random: a random MTP layer with its own embedding and head (drafts are almost never right).
    useful: the trunk nearly a bigram model and the MTP built to follow it (drafts often right).
    """
    root = tmp_path_factory.mktemp("mtp")
    random = add_mtp(make_deepseek(str(root / "random"), "deepseek_v3", seed=3), seed=4)
    useful = make_useful_mtp(
        add_mtp(make_deepseek(str(root / "useful"), "deepseek_v3", seed=5), seed=6, own_head=False)
    )
    return {
        name: (path, hf_greedy(path, PROMPTS, NEW)) for name, path in (("random", random), ("useful", useful))
    }


@pytest.fixture(scope="module")
def references(mtp_ckpts):
    return {name: Reference64(path) for name, (path, _) in mtp_ckpts.items()}


def local_trunk(path: str):
    model = load_trunk(path, dtype="float32")
    args = model.args
    experts = {layer: list(range(args.num_experts)) for layer in args.moe_layers}
    model.set_expert_backend(LoopbackDispatch(load_experts(path, experts, args=args)))
    return model


# -- 1. the MTP forward against the float64 reference -------------------------------------------------


@pytest.mark.parametrize("name", ["random", "useful"])
def test_mtp_forward_matches_float64_reference(mtp_ckpts, references, name):
    path, ref_tokens = mtp_ckpts[name]
    ref = references[name]
    tokens = PROMPTS[1] + ref_tokens[1][:6]  # n = 23
    n = len(tokens)
    want = ref.prompt_logits(tokens)  # [n - 1, V]: positions 0 .. n - 2

    trunk = local_trunk(path)
    head = load_mtp(path, dtype="float32", trunk=trunk)
    head.set_expert_backend(
        LoopbackDispatch(load_experts(path, {head.layer: list(range(head.args.num_experts))}, args=head.args))
    )
    _, hidden = trunk(
        build_forward_batch([tokens], [0], [0], [0], "cpu"), trunk.make_cache(1, 64), return_hidden=True
    )
    assert (hidden.double() - ref.trunk_hidden(tokens)).abs().max() < 1e-4  # the trunk's normed output

    # All positions in one pass.
    got, _ = head(
        build_forward_batch([tokens[1:]], [0], [0], [0], "cpu"), hidden[:-1], head.make_cache(1, 64)
    )
    diff = (got.double() - want).abs().max().item()
    assert diff < 1e-4, f"{name}: MTP logits vs float64 reference: max abs diff {diff:.3g}"
    assert want.std() > 1.0  # logits of real spread, so the tolerance above means something
    if name == "useful":  # no own head: transformers' MtpModel applies, a second reference
        theirs = transformers_mtp_logits(ref, path, tokens)
        assert (theirs - want).abs().max().item() < 1e-4

    # In two chunks through the cache, next to another sequence (padded reads).
    cache = head.make_cache(2, 64)
    other = [5, 6, 7]
    split = 9
    batch = build_forward_batch([tokens[1 : split + 1], other], [0, 0], [1, 0], [0, 0], "cpu")
    first, _ = head(batch, torch.cat([hidden[:split], hidden[:3]]), cache)
    batch = build_forward_batch([tokens[split + 1 :]], [split], [1], [0], "cpu")
    second, _ = head(batch, hidden[split : n - 1], cache)
    got = torch.cat([first[:split], second])
    assert (got.double() - want).abs().max().item() < 1e-4

    # The comparison is sensitive to the hidden input: states one position off are far off.
    shifted, _ = head(
        build_forward_batch([tokens[2:]], [0], [0], [0], "cpu"), hidden[: n - 2], head.make_cache(1, 64)
    )
    assert (shifted.double() - want[1:]).abs().max().item() > 0.1


def test_proposer_chains_observes_and_catches_up_like_the_reference(mtp_ckpts, references):
    """The proposer alone, fed the reference's hidden states: prompt chunks observed on prefill-only
    steps, drafts chained to k, accepted positions observed, a k = 0 step, then catch-up."""
    path, ref_tokens = mtp_ckpts["random"]
    ref = references["random"]
    trunk = load_trunk(path, dtype="float32")
    V = trunk.args.vocab_size
    proposer = MTPProposer.from_pretrained(path, trunk, max_num_seqs=2, max_model_len=64, top_n=V)
    seq = PROMPTS[1] + ref_tokens[1]  # the target's own greedy continuation
    hid = ref.trunk_hidden(seq).float()

    def observe(seq_id, start, end):
        proposer.observe(seq_id, start, hid[start:end])

    def propose(n: int, k: int, temperature: float):
        req = DraftRequest("a", seq[:n], k, temperature, seed=1)
        return proposer.propose([req, DraftRequest("b", [1, 2, 3], 0)])

    def check(n: int, k: int, temperature: float):
        """Drafts for the first n tokens: each sampled from (greedy: the argmax of) the reference's
        chained distribution, reported exactly."""
        prop = propose(n, k, temperature)
        assert prop.num_draft.tolist() == [k, 0]
        drafts = prop.tokens[0].tolist()
        want = ref.chain(seq[:n], drafts[:-1])  # [k, V] logits along the drafts made
        if temperature == 0:
            assert drafts == want.argmax(-1).tolist()
            assert (prop.sparse_probs[0, :, 0] == 1).all()
        else:
            q = torch.zeros(k, V, dtype=torch.float64)
            q.scatter_(1, prop.sparse_ids[0], prop.sparse_probs[0].double())
            diff = (q - (want / temperature).softmax(-1)).abs().max().item()
            assert diff < 1e-5, f"draft distributions vs reference: {diff:.3g}"
            assert all(q[j, d] > 0 for j, d in enumerate(drafts))
        assert proposer.cache.lengths[proposer.states["a"].slot] == n - 1  # only real positions stay

    P = len(PROMPTS[1])  # 17
    observe("a", 0, 8)  # a prefill-only step: the first prompt chunk
    assert propose(P, 3, 0.0).num_draft.tolist() == [0, 0]  # h_{P-2} not known: no drafts, no crash
    observe("a", 8, P)  # the last chunk, which sampled t_P
    check(P + 1, 3, 0.0)
    observe("a", P, P + 2)  # verified: t_P fed, one draft accepted, a bonus token sampled
    observe("a", P + 2, P + 3)  # a step with k = 0 (propose not called)
    observe("a", P, P + 3)  # a replayed observation changes nothing
    check(P + 4, 3, 1.0)  # catch-up over 3 pending positions, then sampled, chained drafts
    observe("a", P + 3, P + 5)  # t_{P+3} fed, its one draft accepted
    check(P + 6, 2, 0.7)

    observe("gap", 3, 5)  # positions 0 .. 2 never observed: this sequence never drafts
    assert proposer.propose([DraftRequest("gap", seq[:6], 3)]).num_draft.tolist() == [0]
    free = proposer.cache.num_free_slots
    proposer.release("a")
    assert proposer.cache.num_free_slots == free + 1 and "a" not in proposer.states


# -- 2. greedy: identical to no speculation -----------------------------------------------------------


def _run(path: str, prompts, **kwargs):
    """-> (outputs, engine stats with num_drafted, the engine, shut down)."""
    with Engine.from_pretrained(path, max_model_len=128, **kwargs) as engine:
        outs = engine.generate(prompts, GREEDY)
        return outs, {**engine.stats(), "num_drafted": engine.metrics.num_drafted}, engine


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ["random", "useful"])
def test_greedy_mtp_equals_target_greedy(mtp_ckpts, name, k):
    path, ref = mtp_ckpts[name]
    plain, _, _ = _run(path, PROMPTS)
    assert [o.token_ids for o in plain] == ref  # no speculation = transformers' greedy
    outs, stats, engine = _run(path, PROMPTS, draft="mtp", num_speculative_tokens=k)
    assert [o.token_ids for o in outs] == ref
    assert isinstance(engine.proposer, MTPProposer)
    for o in outs:  # drafts at every step but the first (prefill) and one with 1 token left
        assert o.metrics.num_drafted >= o.metrics.num_steps - 2, o.metrics
    if name == "useful":
        assert stats["acceptance_rate"] > 0.4, stats
        assert stats["mean_accepted_length"] > (1.4 if k == 1 else 1.8), stats
    if name == "random":
        assert stats["acceptance_rate"] < 0.2, stats
    assert not engine.proposer.states  # finished sequences released their MTP state


def test_greedy_mtp_through_static_steps(mtp_ckpts):
    """The padded static steps that CUDA graphs replay also hand the MTP drafter the hidden
    states it needs (packed in feed order): same tokens, same acceptance as the plain path."""
    path, ref = mtp_ckpts["useful"]
    plain, plain_stats, _ = _run(path, PROMPTS, draft="mtp", num_speculative_tokens=3, step_graphs="off")
    padded, padded_stats, engine = _run(
        path, PROMPTS, draft="mtp", num_speculative_tokens=3, step_graphs="padded"
    )
    assert [o.token_ids for o in padded] == [o.token_ids for o in plain] == ref
    assert engine.graphs.hidden and engine.graphs._static, "the static path never ran"
    assert padded_stats["acceptance_rate"] == plain_stats["acceptance_rate"] > 0.4


@pytest.mark.parametrize("name", ["random", "useful"])
def test_greedy_mtp_chunked_prefill_joining_requests_and_drafts_match_reference(mtp_ckpts, references, name):
    """Small prefill chunks, requests joining mid-run; every draft the engine verifies is the
    reference's chained argmax (where the reference's top two are not within 1e-3)."""
    path, ref = mtp_ckpts[name]
    prompts = [*PROMPTS, PROMPTS[1][3:] + PROMPTS[0]]
    want = ref + hf_greedy(path, prompts[3:], NEW)
    records = []
    with Engine.from_pretrained(
        path, draft="mtp", num_speculative_tokens=3, max_model_len=128, max_num_batched_tokens=6
    ) as engine:
        propose = engine.proposer.propose

        def recording(requests):
            proposal = propose(requests)
            for r, toks in zip(requests, proposal.tokens.tolist()):
                records.append((list(r.tokens), [t for t in toks if t >= 0]))
            return proposal

        engine.proposer.propose = recording
        ids, done = [], {}
        for step in range(1000):
            if step in (0, 2, 3, 7):
                ids.append(engine.add_request(prompts[len(ids)], GREEDY))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            if len(done) == len(prompts):
                break
        stats = engine.stats()
    assert [done[i] for i in ids] == want
    checked = 0
    for tokens, drafts in records:
        if not drafts:
            continue
        logits = references[name].chain(tokens, drafts[:-1])
        for j, d in enumerate(drafts):
            top2 = logits[j].topk(2).values
            if top2[0] - top2[1] < 1e-3:
                break  # a near tie: float32 may pick either, and the chain after it differs
            assert d == logits[j].argmax().item(), f"draft {j + 1} for {tokens}"
            checked += 1
    assert checked > 100, checked
    if name == "useful":
        assert stats["acceptance_rate"] > 0.4, stats


@pytest.mark.parametrize("replicas", [False, True])
def test_greedy_mtp_with_expert_shards(ray_cluster, mtp_ckpts, replicas):
    """Trunk experts on 2 Ray actors (replicas: on 2 trunk replicas, the engine's process one of
    them), the MTP layer's experts in-process: the same tokens."""
    path, ref = mtp_ckpts["useful"]
    opts = ShardOptions(
        num_cpus=0.5,
        strategy="SPREAD",
        bundle_resources=[{NODE_RESOURCES[s]: 1} for s in range(2)],
        replicate_trunk=replicas,
    )
    outs, stats, engine = _run(
        path, PROMPTS, draft="mtp", num_shards=2, num_speculative_tokens=3, shard_options=opts
    )
    assert [o.token_ids for o in outs] == ref
    assert stats["acceptance_rate"] > 0.4, stats
    assert all(n > 0 for n in stats["expert_tokens_per_shard"])
    held = {layer for info in stats["shards"]["shards"] for layer in info["held"]}
    mtp_layer = engine.proposer.head.layer
    assert mtp_layer not in held and set(engine.proposer.head.mlp.backend.store.held()) == {mtp_layer}


# -- 3. sampling follows the target distribution ------------------------------------------------------

V = 16
PROMPT = [3, 7, 1]
TEMPERATURE, TOP_K = 0.8, 12
N = 20_000


@pytest.fixture(scope="module")
def tiny_mtp(tmp_path_factory):
    path = make_deepseek(
        str(tmp_path_factory.mktemp("tiny_mtp") / "v3"), "deepseek_v3", seed=11, vocab_size=V
    )
    # Drafts accepted about half the time: both acceptance and the residual resampling matter.
    return make_useful_mtp(add_mtp(path, seed=12, own_head=False), strength=20, bigram=1.5)


def test_sampling_with_mtp_follows_target_distribution(tiny_mtp):
    """The chi-square test of speculative sampling, with the MTP drafting. The MTP drafts from a
    sequence's second step (its first prefills the prompt), so the tested pair is the 2nd and 3rd
    generated tokens (the 1st summed out): both are drafted at that step (k = 2, chained)."""
    counts, stats = sample_pairs(tiny_mtp, "mtp", PROMPT, V, TEMPERATURE, TOP_K, N, skip=1, max_tokens=4)
    assert stats["num_drafted"] >= 2 * N, stats
    assert 0.05 < stats["acceptance_rate"] < 0.9, f"the MTP should be a different distribution: {stats}"
    probs = exact_pair_probs(hf_next_logits(tiny_mtp), PROMPT, V, TEMPERATURE, TOP_K, skip=1)
    stat, p = chi2_pvalue(counts, probs)
    assert p > 1e-3, f"chi-square {stat:.1f}, p={p:.3g} over {N} samples of (t2, t3)"


# -- 4. errors and loading ----------------------------------------------------------------------------


def test_mtp_errors_name_what_is_missing(checkpoints, mtp_ckpts, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="DeepSeek-V3 checkpoint.*'qwen3_moe'"):
        Engine.from_pretrained(checkpoints("qwen3_moe"), draft="mtp")
    v2 = make_deepseek(str(tmp_path / "v2"), "deepseek_v2")
    with pytest.raises(CheckpointError, match="num_nextn_predict_layers=None"):
        Engine.from_pretrained(v2, draft="mtp")
    # transformers writes num_nextn_predict_layers=1 for DeepSeek-V3 but saves no MTP tensors.
    v3 = make_deepseek(str(tmp_path / "v3"), "deepseek_v3")
    with pytest.raises(CheckpointError, match=r"no tensors model\.layers\.3\.\*"):
        Engine.from_pretrained(v3, draft="mtp")

    src, _ = mtp_ckpts["random"]
    for drop, named in (
        ("model.layers.3.eh_proj.weight", "model.layers.3.eh_proj.weight"),
        ("model.layers.3.mlp.experts.5.up_proj.weight", "model.layers.3.mlp.experts.5.up_proj.weight"),
        ("model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight"),
    ):
        bad = str(tmp_path / drop.replace(".", "_"))
        shutil.copytree(src, bad)
        tensors = load_file(os.path.join(bad, "mtp.safetensors"))
        del tensors[drop]
        save_file(tensors, os.path.join(bad, "mtp.safetensors"))
        with pytest.raises(CheckpointError, match=re.escape(named)):
            Engine.from_pretrained(bad, draft="mtp")

    # The serving config: checked before anything deploys.
    with pytest.raises(ConfigError, match="placement"):
        ServeConfig.from_dict({"model": {"target": src, "draft": "mtp"}, "draft_pool": {"placement": "pool"}})
    ServeConfig.from_dict({"model": {"target": src, "draft": "mtp"}}).check_paths()
    with pytest.raises(CheckpointError, match=r"model\.draft='mtp'.*model\.layers\.3"):
        ServeConfig.from_dict({"model": {"target": v3, "draft": "mtp"}}).check_paths()


def test_cli_passes_mtp_through(mtp_ckpts, monkeypatch):
    from specmoe_ray import cli

    seen = {}

    def fake(target, **kwargs):
        seen.update(kwargs, target=target)
        raise ValueError("stop here")

    monkeypatch.setattr(Engine, "from_pretrained", staticmethod(fake))
    path, _ = mtp_ckpts["random"]
    assert cli.main(["generate", "hi", "--model", path, "--draft", "mtp"]) == 2
    assert seen["draft"] == "mtp" and seen["target"] == path


def test_fp8_mtp_layer_matches_its_dequantized_reference(mtp_ckpts, tmp_path):
    """The MTP layer of a block-fp8 checkpoint (eh_proj, attention and experts quantized, as
    DeepSeek-V3's) dequantizes on load: the same logits as the float64-dequantized checkpoint."""
    src, ref_tokens = mtp_ckpts["random"]
    fp8, ref = write_fp8_pair(src, str(tmp_path))
    tokens = PROMPTS[1] + ref_tokens[1][:4]
    logits = {}
    for which, path in (("fp8", fp8), ("ref", ref), ("orig", src)):
        trunk = local_trunk(path)
        proposer = MTPProposer.from_pretrained(path, trunk, 1, 64)
        assert proposer.head.eh_proj.weight.dtype == torch.float32
        _, hidden = trunk(
            build_forward_batch([tokens], [0], [0], [0], "cpu"), trunk.make_cache(1, 64), return_hidden=True
        )
        batch = build_forward_batch([tokens[1:]], [0], [0], [0], "cpu")
        logits[which], _ = proposer.head(batch, hidden[:-1], proposer.head.make_cache(1, 64))
    assert (logits["fp8"] - logits["ref"]).abs().max().item() < 1e-4
    assert (logits["fp8"] - logits["orig"]).abs().max().item() > 1e-3  # quantization did change it
