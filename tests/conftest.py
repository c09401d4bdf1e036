"""Shared fixtures: tiny random checkpoints written by transformers, and a local Ray cluster."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if not torch.cuda.is_available():
    # Triton kernels on CPU tensors run under Triton's interpreter (tests/cpu/test_triton_kernels.py);
    # read when a kernel is defined, so before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # A wide init makes the random model's greedy path varied rather than one repeated token.
    initializer_range=0.3,
    rms_norm_eps=1e-6,
)
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
DENSE_ARCHS = ("llama", "qwen2", "qwen3")


def benchmark_module(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package), loaded once per process."""
    import importlib.util
    import sys

    key = f"specmoe_benchmarks_{name}"
    if key not in sys.modules:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(key, os.path.join(root, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[key]


def hf_config(arch: str, **overrides):
    import transformers as T

    c = dict(COMMON)
    if arch == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(
            **c,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=48,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    elif arch == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(
            **c,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=48,
            shared_expert_intermediate_size=24,
        )
    elif arch == "mixtral":
        cfg = T.MixtralConfig(**c, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    elif arch == "olmoe":
        cfg = T.OlmoeConfig(**c, intermediate_size=16, num_experts=8, num_experts_per_tok=2, clip_qkv=8.0)
    elif arch == "llama":
        cfg = T.LlamaConfig(**c, intermediate_size=48)
    elif arch == "qwen2":
        cfg = T.Qwen2Config(**c, intermediate_size=48)
    elif arch == "qwen3":
        cfg = T.Qwen3Config(**c, intermediate_size=48, head_dim=8)
    else:
        raise KeyError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.eos_token_id = None  # random models: compare fixed-length generations
    cfg.pad_token_id = 0
    return cfg


def make_checkpoint(path: str, arch: str, seed: int = 0, **overrides) -> str:
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> path of a tiny random fp32 checkpoint (made once per session)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_checkpoint(
                str(root / arch), arch, seed=zlib.crc32(arch.encode()) % 1000
            )  # stable per run
        return cache[arch]

    return get


NODE_RESOURCES = ("node_a", "node_b", "node_c")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 3-node local Ray cluster (real raylets), one custom resource per node to pin actors.

    CPUs are logical: CI has 2 real cores, so keep what runs on them small.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "resources": {NODE_RESOURCES[0]: 100}, "include_dashboard": False},
    )
    for name in NODE_RESOURCES[1:]:
        cluster.add_node(num_cpus=4, resources={name: 100})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generation, one prompt at a time (no padding effects)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        # An explicit mask: otherwise transformers masks prompt tokens equal to pad_token_id.
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outs.append(out[0, len(p) :].tolist())
    return outs


def generate_stepwise(engine, prompts, params, at: dict | None = None) -> list[list[int]]:
    """Step `engine` through `prompts` by hand, running `at[step](engine)` before step `step`
    (1-based; e.g. a reshard or a killed shard mid-generation) -> each prompt's tokens, in order.
    params: one SamplingParams for all, or a list of one per prompt."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, each)]
    done, step = {}, 0
    while len(done) < len(ids):
        step += 1
        if at and step in at:
            at[step](engine)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]


def hf_logits(path: str, tokens: list[int], dtype=torch.float32) -> torch.Tensor:
    """transformers' logits [len(tokens), V] for one sequence."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def save_char_tokenizer(path: str) -> None:
    """A character-level tokenizer over the 96 printable ASCII characters (ids 0..95)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 128)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def reference_probs(logits, temperature: float, top_k: int, top_p: float):
    """float64 numpy, written from the definitions: temperature, then top-k, then top-p (nucleus)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, dtype=bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        cum = 0.0
        nucleus = np.zeros_like(keep)
        for i in order:  # most likely first, until the mass reaches top_p
            if not keep[i] or cum >= top_p:
                break
            nucleus[i] = True
            cum += p[i]
        p = np.where(nucleus, p, 0.0)
    return p / p.sum()


def chi2_pvalue(counts, probs) -> tuple[float, float]:
    """Chi-square goodness of fit, cells with expected count < 5 merged into one."""
    import numpy as np
    from scipy.stats import chisquare

    counts, probs = np.asarray(counts, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        if obs[-1] > 0:
            return float("inf"), 0.0  # a token with zero target probability was emitted
        obs, exp = obs[:-1], exp[:-1]
    stat, p = chisquare(obs, exp)
    return float(stat), float(p)


PROMPTS = [[5, 9, 17, 3], [60, 2, 7, 8, 9, 10, 11, 12, 13, 40, 41, 42, 43, 44, 45, 46, 47], [77]]


def hf_next_logits(path: str):
    """transformers' float64 model as a function: equally long token lists -> last logits [B, V]."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager")
    model = model.eval()

    def next_logits(seqs: list[list[int]]):
        with torch.no_grad():
            return model(torch.tensor(seqs)).logits[:, -1].numpy()

    return next_logits


def exact_pair_probs(next_logits, prompt, vocab: int, temperature: float, top_k: int, skip: int = 0):
    """P(t_{skip+1}, t_{skip+2} | prompt) in float64, [V, V]: every generated token drawn from
    `reference_probs` of `next_logits` (equally long token lists -> [B, V]), the first `skip`
    generated tokens summed out."""
    import numpy as np

    def dists(seqs):
        return [reference_probs(z, temperature, top_k, 1.0) for z in next_logits(seqs)]

    prefixes = {(): 1.0}  # generated prefix -> its probability
    for _ in range(skip):
        grown = {}
        for (pre, w), p in zip(prefixes.items(), dists([prompt + list(q) for q in prefixes])):
            for t in np.flatnonzero(p):
                grown[(*pre, int(t))] = w * p[t]
        prefixes = grown
    joint = np.zeros((vocab, vocab))
    for (pre, w), p1 in zip(prefixes.items(), dists([prompt + list(q) for q in prefixes])):
        p2 = np.stack(dists([[*prompt, *pre, t] for t in range(vocab)]))
        joint += w * p1[:, None] * p2
    return joint


def sample_pairs(
    target: str,
    draft: str,
    prompt: list[int],
    vocab: int,
    temperature: float,
    top_k: int,
    num_samples: int,
    skip: int = 0,
    max_tokens: int | None = None,
    batch: int = 5_000,
    **engine_kwargs,
):
    """Counts [V, V] of the generated tokens (t_{skip+1}, t_{skip+2}) over `num_samples` requests
    seeded 0 .. num_samples - 1, and the engine's stats (with num_drafted)."""
    import numpy as np

    from specmoe_ray import Engine, SamplingParams

    counts = np.zeros((vocab, vocab))
    kwargs = dict(
        num_speculative_tokens=2,
        draft_top_n=6,
        max_num_seqs=batch,
        max_model_len=8,
        max_num_batched_tokens=batch * 8,
    )
    with Engine.from_pretrained(target, draft=draft, **{**kwargs, **engine_kwargs}) as engine:
        for start in range(0, num_samples, batch):
            params = [
                SamplingParams(
                    max_tokens=max_tokens or skip + 2,
                    temperature=temperature,
                    top_k=top_k,
                    seed=start + i,
                    ignore_eos=True,
                )
                for i in range(batch)
            ]
            for out in engine.generate([prompt] * batch, params):
                counts[out.token_ids[skip], out.token_ids[skip + 1]] += 1
        stats = {**engine.stats(), "num_drafted": engine.metrics.num_drafted}
    return counts, stats
