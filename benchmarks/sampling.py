"""What verification costs per step: host time (launching its kernels) and GPU time (their
sum), greedy against sampled rows, with and without speculated drafts, the Triton kernels
(`engine/triton_sampling.py`) against the torch path they replace, side by side in one process.

The draft model's side too (`draft` lines: its sampled rows' top-32 distributions and draws).

A decode step's forward hides verification's host time only while the host launches faster
than the GPU runs (sampled verification once took ~2 ms of host time at batch 1: RESULTS.md,
session 20); the GPU time adds to every step.

    python benchmarks/sampling.py                      # a GPU; vocabulary of Qwen3 (151936)
    python benchmarks/sampling.py --drafts 3 --support 32          # a draft model's sparse q
    python benchmarks/sampling.py --device cpu --vocab 1000 --calls 5   # (the CI's smoke run)
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from specmoe_ray.engine import triton_sampling
from specmoe_ray.engine.sampling import make_generator
from specmoe_ray.engine.sequence import SamplingParams
from specmoe_ray.spec.proposer import DraftRequest, empty_proposal, one_hot_proposal, sample_drafts
from specmoe_ray.spec.rejection import DraftProposal, verify

PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "sampled": SamplingParams(temperature=1.0),
    "top-k/p": SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
}


def proposal_of(B: int, k: int, support: int, device: torch.device) -> DraftProposal:
    """Drafts 1..k for every row; each position's sparse distribution: the draft and support - 1
    other tokens, equally likely (1: one-hot, as prompt lookup's; 32: a draft model's default)."""
    if k == 0:
        return empty_proposal(B, device)
    if support == 1:
        return one_hot_proposal([[1, 2, 3, 4][:k]] * B, device)
    drafts = torch.arange(1, k + 1).repeat(B, 1)  # [B, k]
    ids = torch.cat([drafts[..., None], 100 + torch.arange(support - 1).expand(B, k, -1)], dim=-1)
    probs = torch.full((B, k, support), 1.0 / support)
    return DraftProposal(
        drafts.to(device), torch.full((B,), k).to(device), ids.to(device), probs.to(device),
        host_tokens=[list(range(1, k + 1))] * B,
    )  # fmt: skip


def measure(device: torch.device, V: int, name: str, B: int, k: int, calls: int, support: int = 1) -> dict:
    """A verification of B rows with k drafts each, per call as `timed`."""
    params = PARAMS[name]
    gens = [None if params.greedy else make_generator(b) for b in range(B)]  # (on the host, as the engine's)
    logits = torch.randn(B, k + 1, V, device=device)

    def call():
        proposal = proposal_of(B, k, support, device)
        return verify(logits, proposal, [params] * B, gens)

    return timed(device, call, calls)


def measure_draft(device: torch.device, V: int, B: int, calls: int, top_n: int = 32) -> dict:
    """A draft model's sampled rows (temperature 1): its sparse distribution (top `top_n`) and
    the draw from it (`proposer.sample_drafts`), per call as `measure`."""
    reqs = [DraftRequest(f"s{b}", [1, 2, 3], 3, temperature=1.0, seed=b) for b in range(B)]
    gens: dict = {}
    logits = torch.randn(B, V, device=device)

    def call():
        return sample_drafts(logits, reqs, top_n, gens)

    return timed(device, call, calls)


def timed(device: torch.device, call, calls: int) -> dict:
    """Host us per call (launches, no sync), us per call synchronized, GPU kernel us per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(3):
        call()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - t0) / calls
    sync()
    synced = (time.perf_counter() - t0) / calls
    gpu = None
    if device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            sync()
        gpu = sum(e.device_time_total for e in prof.key_averages()) / calls
    return {"host_us": host * 1e6, "synced_us": synced * 1e6, "gpu_us": gpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--drafts", type=int, nargs="+", default=[0, 3], help="k: drafted tokens per row")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument(
        "--support",
        type=int,
        default=1,
        help="tokens of each draft position's sparse distribution (32: a draft model)",
    )
    a = p.parse_args()
    if a.vocab < 100 + a.support or any(b < 1 for b in a.batch) or any(not 0 <= k <= 4 for k in a.drafts):
        p.error("--vocab must be >= 100 + --support (the drafts' tokens), --batch >= 1, --drafts within 0..4")
    if a.support < 1:
        p.error("--support must be >= 1")
    device = torch.device(a.device)
    print(f"{a.device} vocabulary {a.vocab}: us per verification (host = launching, synced = done)")
    for k in a.drafts:
        for B in a.batch:
            for name in PARAMS:
                # Triton beside torch where it runs (GPUs); greedy rows without drafts take neither.
                both = device.type == "cuda" and (name != "greedy" or k > 0)
                run = functools.partial(measure, device, a.vocab, name, B, k, a.calls, a.support)
                compare(f"  k={k} B={B:3d} {name:8s}", both, run)
    for B in a.batch:  # the draft model's side: its sampled rows' sparse distributions and draws
        run = functools.partial(measure_draft, device, a.vocab, B, a.calls)
        compare(f"  draft B={B:3d} sampled ", device.type == "cuda", run)


def compare(label: str, both: bool, run) -> None:
    """One line: run() with the kernels and, where both, without them (torch)."""
    runs = {}
    for path in ["triton", "torch"] if both else ["torch"]:
        triton_sampling.SAMPLE = path == "triton"
        runs[path] = run()
    triton_sampling.SAMPLE = True
    line = label
    for path, r in runs.items():
        gpu = "" if r["gpu_us"] is None else f", GPU {r['gpu_us']:7.1f}"
        line += f" | {path:6s} host {r['host_us']:7.1f}, synced {r['synced_us']:7.1f}{gpu}"
    if len(runs) == 2:
        line += f" | torch / triton GPU time {runs['torch']['gpu_us'] / runs['triton']['gpu_us']:.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
    main()
