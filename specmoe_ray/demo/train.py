"""Train the demo pair: a small Qwen3-MoE target and a dense Qwen3 draft distilled from it.

The corpus is the Python standard library's own source (present offline wherever Python is),
so the run needs no network. Code is predictable text, so a small draft agrees with the
target often and speculative decoding has something to show.

    python -m specmoe_ray.demo.train --out specmoe_ray/demo --threads 1        # CPU: ~10 minutes
    python -m specmoe_ray.demo.train --out /tmp/demo --device cuda --steps 800 \\
        --batch-size 64 --distill-steps 800                                   # H100: ~3 minutes

The corpus is small (~2M tokens) for the target's 6.6M parameters: at batch 64 x 256 its
validation loss bottoms out near 800-1000 steps (~4-6 epochs) and then rises while the training
loss keeps falling, so a longer GPU run needs more data, not more steps.

Stages:
1. corpus: eligible stdlib .py files (see `eligible_files`); a fixed 5% of them, chosen by a
   hash of the relative path, is held out (`heldout.txt`) and never seen in training, another
   5% is a validation split for the training log;
2. tokenizer: byte-level BPE (`tokenizers`) trained on the training split;
3. co-training: AdamW on the target's next-token loss (+ the router's load-balancing loss) and,
   on the same windows, the draft on KL(target || draft) mixed with its own next-token loss;
4. distillation: the draft alone on KL to the final target (as saved: rounded to bf16);
5. evaluation on held-out text: next-token loss of both, greedy agreement, and acceptance of
   the draft for the target measured with `specmoe_ray.Engine` (k = 4, greedy and sampled);
6. `CARD.md` with sizes, data, settings, losses, acceptance, timings and the command.

Deterministic: fixed seeds, a fixed window order, deterministic torch algorithms (CPU; on CUDA
where they exist), files read in sorted order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
# Directories of the stdlib that are not ordinary library code (tests, the IDE, vendored or
# generated tables) or that differ most between Python versions and platforms.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "ensurepip",
        "pydoc_data",
        "encodings",
        "__pycache__",
        "__phello__",
    }
)
# sha256(relative path) % 20: bucket 0 is held out (about 5% of the files: never trained on, the
# card's results), bucket 1 is validation (the training log's held-out loss), the rest is training.
HELDOUT_BUCKETS = 20


@dataclasses.dataclass(slots=True)
class Corpus:
    root: str
    train_files: list[str]
    heldout_files: list[str]
    train_texts: list[str]
    heldout_texts: list[str]
    val_files: list[str]
    val_texts: list[str]
    num_eligible: int
    num_capped: int  # eligible training files left out by --max-corpus-mb


# -- corpus --------------------------------------------------------------------------------------


def eligible_files(root: Path, max_file_bytes: int) -> list[str]:
    """Relative posix paths of the stdlib's .py files that form the corpus, sorted."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d in SKIP_DIRS or d.startswith(("config-", "plat-")) for d in dirs):
            continue
        if rel.name.startswith("test_") or rel.name.startswith("_sysconfigdata"):
            continue
        if not path.is_file() or path.stat().st_size > max_file_bytes or path.stat().st_size == 0:
            continue
        out.append(rel.as_posix())
    return sorted(out)


def path_hash(rel: str) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:12], 16)


def is_heldout(rel: str) -> bool:
    return path_hash(rel) % HELDOUT_BUCKETS == 0


def is_val(rel: str) -> bool:
    return path_hash(rel) % HELDOUT_BUCKETS == 1


def load_corpus(max_bytes: int, max_file_bytes: int) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[str, str] = {}
    for rel in eligible_files(root, max_file_bytes):
        try:
            texts[rel] = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    heldout = [r for r in texts if is_heldout(r)]
    val = [r for r in texts if is_val(r)]
    train_pool = [r for r in texts if not (is_heldout(r) or is_val(r))]
    # Cap the training text by taking files in hash order (a fixed pseudo-random order that does
    # not favour any package), then restore sorted order for the token stream.
    chosen, size = [], 0
    for rel in sorted(train_pool, key=path_hash):
        n = len(texts[rel].encode())
        if size + n > max_bytes:
            continue
        chosen.append(rel)
        size += n
    train = sorted(chosen)
    return Corpus(
        root=str(root),
        train_files=train,
        heldout_files=heldout,
        train_texts=[texts[r] for r in train],
        heldout_texts=[texts[r] for r in heldout],
        val_files=val,
        val_texts=[texts[r] for r in val],
        num_eligible=len(texts),
        num_capped=len(train_pool) - len(train),
    )


# -- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over the training split; `EOS` (id 0) separates files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def save_tokenizer(tok, path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = 1024
    fast.save_pretrained(str(path))


def encode_stream(tok, texts: list[str], eos_id: int) -> torch.Tensor:
    """All texts as one token stream, each file followed by EOS."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# -- models --------------------------------------------------------------------------------------


def target_config(args, vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=192,
        intermediate_size=768,  # unused: every layer is MoE
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        router_aux_loss_coef=args.aux_loss_coef,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def draft_config(args, vocab_size: int, eos_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.draft_hidden,
        num_hidden_layers=args.draft_layers,
        num_attention_heads=args.draft_hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=3 * args.draft_hidden,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def unselected_expert_params(cfg) -> int:
    """Expert parameters a token does not touch (its top-k experts aside), over all layers."""
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return expert * cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def make_optimizer(model, lr: float, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def kl_to(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged: [N, V], [N, V] -> scalar."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def round_to_bf16(model) -> None:
    """Round the weights as saving in bf16 will, so the teacher is the shipped target."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def save_model(model, tokenizer, path: Path) -> None:
    import copy

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    out = copy.deepcopy(model).to("cpu", torch.bfloat16)
    out.config.output_router_logits = False
    out.config.use_cache = True
    out.generation_config.eos_token_id = out.config.eos_token_id
    out.generation_config.pad_token_id = out.config.pad_token_id
    out.generation_config.bos_token_id = None
    out.save_pretrained(str(path))
    save_tokenizer(tokenizer, path)


def batch_at(stream: torch.Tensor, starts: torch.Tensor, seq_len: int, device) -> torch.Tensor:
    """[B] window starts -> [B, seq_len + 1] tokens."""
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return stream[idx].to(device, non_blocking=True)


# -- training ------------------------------------------------------------------------------------


@torch.no_grad()
def quick_val(model, windows: torch.Tensor, autocast) -> float:
    """Mean next-token loss of `model` on held-out windows [n, L + 1] (a progress signal only)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), 8):
        x = windows[i : i + 8]
        with autocast:
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].reshape(-1), reduction="sum").item()
    model.train(was_training)
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def train(args, stream: torch.Tensor, target, draft, log, val: torch.Tensor) -> dict:
    """Co-train target and draft, then distill the draft from the (bf16-rounded) final target.

    `val`: held-out windows [n, L + 1] whose loss is logged (never trained on).
    """
    device = torch.device(args.device)
    val = val.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    L, B = args.seq_len, args.batch_size
    hist: dict[str, list] = {"cotrain": [], "distill": []}
    opt_t = make_optimizer(target, args.lr, args.weight_decay)
    opt_d = make_optimizer(draft, args.draft_lr, args.weight_decay)
    total_d = args.steps + args.distill_steps
    warmup = max(1, min(args.warmup, args.steps // 10 or 1))

    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(stream) - L - 1, (args.steps, B), generator=gen)
    t0 = time.perf_counter()
    acc = {"t_ce": 0.0, "aux": 0.0, "d_ce": 0.0, "d_kl": 0.0, "n": 0}
    target.train()
    draft.train()
    for step in range(args.steps):
        x = batch_at(stream, starts[step], L, device)
        inp, labels = x[:, :-1], x[:, 1:].reshape(-1)
        for g in opt_t.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        for g in opt_d.param_groups:
            g["lr"] = lr_at(step, total_d, args.draft_lr, warmup)

        with autocast:
            out = target(input_ids=inp, output_router_logits=True, use_cache=False)
        t_logits = out.logits.float().reshape(-1, out.logits.shape[-1])  # [B*L, V]
        t_ce = F.cross_entropy(t_logits, labels)
        aux = out.aux_loss.float()
        (t_ce + args.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

        with autocast:
            d_logits = draft(input_ids=inp, use_cache=False).logits
        d_logits = d_logits.float().reshape(-1, d_logits.shape[-1])
        d_ce = F.cross_entropy(d_logits, labels)
        d_kl = kl_to(t_logits.detach(), d_logits)
        (args.kd_weight * d_kl + (1.0 - args.kd_weight) * d_ce).backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

        for k, v in (("t_ce", t_ce), ("aux", aux), ("d_ce", d_ce), ("d_kl", d_kl)):
            acc[k] += v.item()  # one host sync per step: fine for a training log
        acc["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row = {k: round(acc[k] / acc["n"], 4) for k in ("t_ce", "aux", "d_ce", "d_kl")}
            row.update(val=round(quick_val(target, val, autocast), 4))
            row.update(step=step + 1, s=round(time.perf_counter() - t0, 1))
            hist["cotrain"].append(row)
            log(f"cotrain {row}")
            acc = dict.fromkeys(acc, 0.0)
            acc["n"] = 0
    hist["cotrain_s"] = time.perf_counter() - t0

    # Distillation: the draft alone, against the target exactly as it will be shipped.
    round_to_bf16(target)
    target.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, len(stream) - L - 1, (max(args.distill_steps, 1), B), generator=gen)
    t0 = time.perf_counter()
    acc = {"d_kl": 0.0, "agree": 0.0, "n": 0}
    for step in range(args.distill_steps):
        x = batch_at(stream, starts[step], L, device)
        inp = x[:, :-1]
        for g in opt_d.param_groups:
            g["lr"] = lr_at(args.steps + step, total_d, args.draft_lr, warmup)
        with torch.no_grad(), autocast:
            t_logits = target(input_ids=inp, use_cache=False).logits
        t_logits = t_logits.float().reshape(-1, t_logits.shape[-1])
        with autocast:
            d_logits = draft(input_ids=inp, use_cache=False).logits
        d_logits = d_logits.float().reshape(-1, d_logits.shape[-1])
        d_kl = kl_to(t_logits, d_logits)
        d_kl.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        acc["d_kl"] += d_kl.item()
        acc["agree"] += (d_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
        acc["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.distill_steps:
            row = {k: round(acc[k] / acc["n"], 4) for k in ("d_kl", "agree")}
            row.update(step=args.steps + step + 1, s=round(time.perf_counter() - t0, 1))
            hist["distill"].append(row)
            log(f"distill {row}")
            acc = {"d_kl": 0.0, "agree": 0.0, "n": 0}
    hist["distill_s"] = time.perf_counter() - t0
    return hist


# -- evaluation ----------------------------------------------------------------------------------


def eval_windows(stream: torch.Tensor, seq_len: int, num: int) -> torch.Tensor:
    """Up to `num` evenly spaced, non-overlapping windows [n, seq_len + 1] of a token stream."""
    n = min(num, (len(stream) - 1) // (seq_len + 1))
    span = (len(stream) - seq_len - 1) // max(n, 1)
    return torch.stack([stream[i * span : i * span + seq_len + 1] for i in range(n)])


@torch.no_grad()
def evaluate_saved(target_dir: Path, draft_dir: Path, windows: torch.Tensor, device: str) -> dict:
    """Held-out loss of both saved models (bf16 weights loaded as fp32), agreement, expert use."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).to(device).eval()
    E, K = target.config.num_experts, target.config.num_experts_per_tok
    counts = torch.zeros(target.config.num_hidden_layers, E)
    t_ce = d_ce = agree = top1 = 0.0
    for i in range(0, len(windows), 8):
        x = windows[i : i + 8].to(device)
        inp, labels = x[:, :-1], x[:, 1:].reshape(-1)
        out = target(input_ids=inp, output_router_logits=True, use_cache=False)
        t = out.logits.reshape(-1, out.logits.shape[-1])
        d = draft(input_ids=inp, use_cache=False).logits.reshape(-1, t.shape[-1])
        t_ce += F.cross_entropy(t, labels, reduction="sum").item()
        d_ce += F.cross_entropy(d, labels, reduction="sum").item()
        agree += (t.argmax(-1) == d.argmax(-1)).sum().item()
        top1 += (t.argmax(-1) == labels).sum().item()
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.topk(K, dim=-1).indices.reshape(-1).cpu()
            counts[layer] += torch.bincount(chosen, minlength=E).float()
    total = windows.shape[0] * (windows.shape[1] - 1)
    share = counts / counts.sum(-1, keepdim=True)
    return {
        "target_loss": t_ce / total,
        "draft_loss": d_ce / total,
        "greedy_agreement": agree / total,
        "target_top1_accuracy": top1 / total,
        "eval_tokens": total,
        "expert_share_min": share.min().item(),
        "expert_share_max": share.max().item(),
    }


def acceptance_prompts(tok, stream: torch.Tensor, num: int, prompt_len: int, gen_len: int) -> list[list[int]]:
    """`num` prompts of `prompt_len` tokens, evenly spaced over the held-out stream, each starting
    at a line start and followed by `gen_len` tokens of the same file (no EOS inside)."""
    ids = stream.tolist()
    newline = {i for i in range(tok.get_vocab_size()) if "\n" in tok.decode([i])}
    eos_id = tok.token_to_id(EOS)
    span = prompt_len + gen_len
    prompts = []
    for i in range(num):
        s = i * (len(ids) - span) // num
        while s < len(ids) - span and (ids[s - 1] not in newline or eos_id in ids[s : s + span]):
            s += 1
        if s < len(ids) - span:
            prompts.append(ids[s : s + prompt_len])
    return prompts


def measure_acceptance(
    target_dir: Path, draft_dir: Path, prompts: list[list[int]], args, temperature: float
) -> tuple[dict, list]:
    """Acceptance of the draft for the target, with our engine (k = args.k)."""
    from specmoe_ray import Engine, SamplingParams

    params = [
        SamplingParams(
            max_tokens=args.eval_tokens, temperature=temperature, seed=args.seed + i, ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    t0 = time.perf_counter()
    with Engine.from_pretrained(
        str(target_dir),
        draft=str(draft_dir),
        num_speculative_tokens=args.k,
        device=args.device,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=len(prompts),
    ) as engine:
        outs = engine.generate(prompts, params)
        stats = engine.stats()
    stats["wall_s"] = time.perf_counter() - t0
    return stats, outs


def _acceptance_line(stats: dict) -> str:
    return (
        f"acceptance {stats['acceptance_rate']:.3f}, mean accepted length {stats['mean_accepted_length']:.2f}"
    )


# -- card ----------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fence(text: str) -> str:
    # "text", not "python": ruff formats Python blocks in Markdown, and these are fragments.
    return "````text\n" + text.rstrip("\n") + "\n````"


def write_card(out: Path, info: dict) -> str:
    a, c, ev = info["args"], info["corpus"], info["eval"]
    g, s = info["greedy"], info["sampled"]
    tcfg, dcfg = info["target_cfg"], info["draft_cfg"]
    rows = "\n".join(
        f"| {r['step']} | {r['t_ce']:.3f} | {r['aux']:.3f} | {r['d_ce']:.3f} | {r['d_kl']:.3f} "
        f"| {r['val']:.3f} | {r['s']} |"
        for r in info["hist"]["cotrain"]
    )
    drows = "\n".join(
        f"| {r['step']} | {r['d_kl']:.3f} | {r['agree']:.3f} | {r['s']} |" for r in info["hist"]["distill"]
    )
    samples = "\n\n".join(
        f"{title} (prompt: last lines of {n_prompt} tokens; then {n_gen} generated tokens):\n\n"
        f"{fence(prompt_tail)}\n\n{fence(text)}"
        for title, n_prompt, n_gen, prompt_tail, text in info["samples"]
    )
    heldout = ", ".join(f"`{f}`" for f in c["heldout_files"])
    last = info["hist"]["cotrain"][-1]
    implied = sum(ev["greedy_agreement"] ** i for i in range(1, a.k + 1)) / a.k
    card = f"""# Demo pair: MoE target + dense draft, trained on the Python standard library

Written by `specmoe_ray/demo/train.py`. Reproduce with:

```
{info["command"]}
```

## Models

| | target (`target/`) | draft (`draft/`) |
| --- | --- | --- |
| architecture | `Qwen3MoeForCausalLM` (qwen3_moe) | `Qwen3ForCausalLM` (qwen3, dense) |
| layers, hidden | {tcfg.num_hidden_layers}, {tcfg.hidden_size} \
| {dcfg.num_hidden_layers}, {dcfg.hidden_size} |
| heads / KV heads x head_dim | {tcfg.num_attention_heads} / {tcfg.num_key_value_heads} x {tcfg.head_dim} \
| {dcfg.num_attention_heads} / {dcfg.num_key_value_heads} x {dcfg.head_dim} |
| MLP | {tcfg.num_experts} experts, top-{tcfg.num_experts_per_tok} (normalised), \
expert width {tcfg.moe_intermediate_size}, every layer | dense, width {dcfg.intermediate_size} |
| parameters | {info["target_params"]:,} ({info["target_active"]:,} active per token) \
| {info["draft_params"]:,} |
| files on disk (bf16 safetensors + config + tokenizer) | {info["target_bytes"]:,} bytes \
| {info["draft_bytes"]:,} bytes |

Both: vocab {tcfg.vocab_size} (shared byte-level BPE `tokenizer.json`, `{EOS}` = id \
{tcfg.eos_token_id} ends each file), tied embeddings, RoPE theta {tcfg.rope_parameters["rope_theta"]:g}, \
max_position_embeddings {tcfg.max_position_embeddings}, weights stored in bfloat16 (load with
`dtype="float32"` on CPU). Both directories together: {info["target_bytes"] + info["draft_bytes"]:,} bytes.

## Data

- Source: the `.py` files under `sysconfig.get_paths()["stdlib"]` of Python {info["python"]}
  (`{c["root"]}`), read in sorted order, skipping the directories {", ".join(sorted(SKIP_DIRS))}
  (and `config-*`), files named `test_*` and files over {a.max_file_kb} KB.
  Eligible files: {c["num_eligible"]}.
- Held out (never seen by the tokenizer or either model): every eligible file whose relative path
  has `int(sha256(path).hexdigest()[:12], 16) % {HELDOUT_BUCKETS} == 0` -- {len(c["heldout_files"])} files,
  {c["heldout_bytes"]:,} bytes, {c["heldout_tokens"]:,} tokens; listed in `heldout.txt`: {heldout}.
- Validation (for the training log only, not trained on): the {c["num_val"]} files in bucket 1
  (`... % {HELDOUT_BUCKETS} == 1`).
- Training split: the other {len(c["train_files"])} files, {c["train_bytes"]:,} bytes,
  {c["train_tokens"]:,} tokens ({c["train_bytes"] / max(c["train_tokens"], 1):.2f} bytes/token);
  cap {a.max_corpus_mb} MB ({c["num_capped"]} files left out by the cap).
- Windows: {a.seq_len} + 1 tokens at uniformly random offsets of the training stream (seeded).

## Training

- Seed {a.seed}; device `{info["device_name"]}`; {"bf16 autocast" if a.bf16 else "fp32"};
  torch {torch.__version__}, transformers {info["transformers"]}, tokenizers {info["tokenizers"]}.
- Tokenizer: byte-level BPE, vocab {a.vocab_size}, min frequency 2 ({info["tok_s"]:.1f} s).
- Co-training, {a.steps} steps x batch {a.batch_size} x {a.seq_len} tokens \
({a.steps * a.batch_size * a.seq_len:,} tokens, {info["hist"]["cotrain_s"]:.0f} s):
  target AdamW lr {a.lr:g} (warmup, cosine to 10%), betas (0.9, 0.95), weight decay \
{a.weight_decay:g}, grad clip 1.0, loss = next-token CE + {a.aux_loss_coef:g} x load-balancing loss;
  draft on the same windows, lr {a.draft_lr:g}, loss = {a.kd_weight:g} x KL(target || draft) + \
{1 - a.kd_weight:g} x CE.
- Distillation, {a.distill_steps} steps x batch {a.batch_size} ({info["hist"]["distill_s"]:.0f} s):
  the draft alone on KL(target || draft), the target frozen and rounded to bf16 as shipped.

| step | target CE | aux | draft CE | draft KL | target validation CE (16 windows) | s |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

| step | draft KL | greedy agreement | s |
| --- | --- | --- | --- |
{drows}

## Results (held-out files, saved bf16 weights loaded as fp32)

| | target | draft |
| --- | --- | --- |
| final train loss (mean CE of the last {a.log_every} co-training steps) | {last["t_ce"]:.3f} \
| {last["d_ce"]:.3f} |
| held-out next-token loss ({ev["eval_tokens"]:,} tokens) | {ev["target_loss"]:.3f} \
(ppl {math.exp(ev["target_loss"]):.2f}) | {ev["draft_loss"]:.3f} (ppl {math.exp(ev["draft_loss"]):.2f}) |

- Greedy agreement (draft argmax == target argmax, teacher-forced): {ev["greedy_agreement"]:.3f};
  target top-1 accuracy {ev["target_top1_accuracy"]:.3f}. Were agreement g independent across
  positions, the acceptance rate at k = {a.k} would be sum(g^i, i = 1..k) / k = {implied:.3f};
  greedy loops of the target (a small model repeating itself) are easy to predict and push the
  measured rate above that, text the target finds hard pulls it below.
- Expert load (share of routed token slots per layer and expert, ideal {1 / tcfg.num_experts:.3f}):
  min {ev["expert_share_min"]:.3f}, max {ev["expert_share_max"]:.3f}.
- **Speculative decoding with `specmoe_ray.Engine`** (k = {a.k}, {len(info["prompts"])} prompts of
  {a.prompt_tokens} held-out tokens, {a.eval_tokens} new tokens each, fp32, `{a.device}`):

| | acceptance rate (accepted / drafted) | mean accepted length (tokens per sequence per step, <= k + 1) |
| --- | --- | --- |
| greedy (temperature 0) | {g["acceptance_rate"]:.3f} | {g["mean_accepted_length"]:.2f} |
| sampled (temperature 1) | {s["acceptance_rate"]:.3f} | {s["mean_accepted_length"]:.2f} |

## Samples (held-out prompts)

{samples}

## Time

Total wall time {info["total_s"]:.0f} s on `{info["device_name"]}` ({info["threads"]} threads): corpus
{info["corpus_s"]:.1f} s, tokenizer {info["tok_s"]:.1f} s, co-training {info["hist"]["cotrain_s"]:.0f} s,
distillation {info["hist"]["distill_s"]:.0f} s, evaluation {info["eval_s"]:.0f} s.
"""
    (out / "CARD.md").write_text(card)
    return card


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", required=True, help="output directory (gets target/, draft/, CARD.md, heldout.txt)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=400, help="co-training steps (target + draft)")
    p.add_argument("--distill-steps", type=int, default=None, help="draft-only steps (default: steps / 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="target peak learning rate")
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss weight")
    p.add_argument("--kd-weight", type=float, default=0.5, help="KL weight of the draft while co-training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-hidden", type=int, default=192, help="draft width (a multiple of 64)")
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-corpus-mb", type=float, default=16.0, help="cap on the training text")
    p.add_argument("--max-file-kb", type=int, default=200, help="skip larger files")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the loss")
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--k", type=int, default=4, help="speculative tokens per step in the evaluation")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast in training (default: on for cuda, and for cpu where it has bf16 instructions)",
    )
    args = p.parse_args(argv)
    if args.distill_steps is None:
        args.distill_steps = args.steps // 2
    if args.bf16 is None:
        # On CPUs with AVX512-BF16 (or AMX) bf16 matmuls are ~1.3x faster than fp32; elsewhere slower.
        cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        args.bf16 = args.device == "cuda" or bool(cpu_bf16)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python -m specmoe_ray.demo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA GPU")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    # CPU kernels all have deterministic versions; on CUDA a few ops may not (warn, don't fail).
    torch.use_deterministic_algorithms(True, warn_only=args.device == "cuda")

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    corpus = load_corpus(int(args.max_corpus_mb * 1e6), args.max_file_kb * 1000)
    corpus_s = time.perf_counter() - t0
    log(
        f"corpus: {len(corpus.train_files)} train files, {len(corpus.heldout_files)} held out ({corpus.root})"
    )
    (out / "heldout.txt").write_text("".join(f + "\n" for f in corpus.heldout_files))

    t0 = time.perf_counter()
    tok = train_tokenizer(corpus.train_texts, args.vocab_size)
    tok_s = time.perf_counter() - t0
    eos_id = tok.token_to_id(EOS)
    train_stream = encode_stream(tok, corpus.train_texts, eos_id)
    heldout_stream = encode_stream(tok, corpus.heldout_texts, eos_id)
    n_train, n_heldout = len(train_stream), len(heldout_stream)
    log(f"tokenizer: vocab {tok.get_vocab_size()}; {n_train:,} train tokens, {n_heldout:,} held out")

    vocab = tok.get_vocab_size()
    torch.manual_seed(args.seed)
    target = AutoModelForCausalLM.from_config(target_config(args, vocab, eos_id), dtype=torch.float32)
    torch.manual_seed(args.seed + 1)
    draft = AutoModelForCausalLM.from_config(draft_config(args, vocab, eos_id), dtype=torch.float32)
    target.to(args.device)
    draft.to(args.device)
    log(f"target {num_params(target):,} params, draft {num_params(draft):,} params")

    val = eval_windows(encode_stream(tok, corpus.val_texts, eos_id), args.seq_len, 16)
    hist = train(args, train_stream, target, draft, log, val)

    target_dir, draft_dir = out / "target", out / "draft"
    save_model(target, tok, target_dir)
    save_model(draft, tok, draft_dir)
    del target, draft
    if args.device == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    ev = evaluate_saved(
        target_dir, draft_dir, eval_windows(heldout_stream, args.seq_len, args.eval_windows), args.device
    )
    log(f"held-out: {ev}")
    prompts = acceptance_prompts(tok, heldout_stream, args.eval_prompts, args.prompt_tokens, args.eval_tokens)
    greedy, g_outs = measure_acceptance(target_dir, draft_dir, prompts, args, temperature=0.0)
    log(f"greedy: {_acceptance_line(greedy)}")
    sampled, s_outs = measure_acceptance(target_dir, draft_dir, prompts, args, temperature=1.0)
    log(f"sampled: {_acceptance_line(sampled)}")
    eval_s = time.perf_counter() - t0

    def tail(ids: list[int], lines: int = 6) -> str:
        return "\n".join(tok.decode(ids).split("\n")[-lines:])

    # Show prompts that hold code (most held-out windows do; some fall in docstrings).
    code = [i for i, p in enumerate(prompts) if any(w in tok.decode(p) for w in ("def ", "return", "self."))]
    code = code or list(range(len(prompts)))
    picks = list(dict.fromkeys(code[j * len(code) // 3] for j in range(3)))
    picks += [i for i in range(len(prompts)) if i not in picks][: 3 - len(picks)]
    samples = []
    for n, i in enumerate(picks):
        outs, how = (g_outs, "greedy") if n < 2 else (s_outs, "sampled, temperature 1")
        rate = outs[i].metrics.acceptance_rate
        title = f"Prompt #{i}, {how}, acceptance {rate:.2f}" if rate is not None else f"Prompt #{i}, {how}"
        samples.append(
            (title, args.prompt_tokens, args.eval_tokens, tail(prompts[i]), tok.decode(outs[i].token_ids))
        )
    for title, *_, text in samples:
        log(f"{title}:\n{text}\n" + "-" * 60)

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    info = {
        "args": args,
        "command": command,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "corpus": {
            "root": corpus.root,
            "num_eligible": corpus.num_eligible,
            "num_capped": corpus.num_capped,
            "train_files": corpus.train_files,
            "heldout_files": corpus.heldout_files,
            "num_val": len(corpus.val_files),
            "train_bytes": sum(len(t.encode()) for t in corpus.train_texts),
            "heldout_bytes": sum(len(t.encode()) for t in corpus.heldout_texts),
            "train_tokens": len(train_stream),
            "heldout_tokens": len(heldout_stream),
        },
        "target_cfg": target_config(args, vocab, eos_id),
        "draft_cfg": draft_config(args, vocab, eos_id),
        "target_params": 0,
        "target_active": 0,
        "draft_params": 0,
        "target_bytes": dir_bytes(target_dir),
        "draft_bytes": dir_bytes(draft_dir),
        "hist": hist,
        "eval": ev,
        "greedy": greedy,
        "sampled": sampled,
        "prompts": prompts,
        "samples": samples,
        "corpus_s": corpus_s,
        "tok_s": tok_s,
        "eval_s": eval_s,
    }
    cfg_t = info["target_cfg"]
    with torch.device("meta"):
        info["target_params"] = num_params(AutoModelForCausalLM.from_config(cfg_t))
        info["draft_params"] = num_params(AutoModelForCausalLM.from_config(info["draft_cfg"]))
    info["target_active"] = info["target_params"] - unselected_expert_params(cfg_t)
    info["total_s"] = time.perf_counter() - t_start
    write_card(out, info)
    summary = {
        "target_params": info["target_params"],
        "draft_params": info["draft_params"],
        "bytes": info["target_bytes"] + info["draft_bytes"],
        "held_out": ev,
        "greedy_acceptance": greedy["acceptance_rate"],
        "greedy_mean_accepted_length": greedy["mean_accepted_length"],
        "sampled_acceptance": sampled["acceptance_rate"],
        "total_s": round(info["total_s"], 1),
    }
    log("summary " + json.dumps(summary))


if __name__ == "__main__":
    main()
