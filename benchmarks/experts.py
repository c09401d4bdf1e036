"""The expert stage alone, per MoE layer: grouped GEMM vs the per-expert loop, against the byte roofline.

Qwen3-30B-A3B's expert shape (128 experts, top-8, hidden 2048, expert width 768), bf16, on one
GPU. For T tokens a layer must read the weights of the distinct experts they route to (about
E * (1 - (1 - K/E)^T) of them, DESIGN.md section 6): bytes / measured copy bandwidth is the
floor. Both paths run side by side in the same process on the same inputs.

    python benchmarks/experts.py [--layers 4] [--tokens 1 2 4 8 16 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from specmoe_ray.moe.experts import LocalExperts


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() / sorted(times[2:])[len(times[2:]) // 2]


def time_layers(fn, layers, xs, ids, repeats: int = 20) -> float:
    """Median seconds per layer call, rotating over layers so that no weights stay in cache."""
    for i in range(3):
        fn(layers[i % len(layers)], xs, ids)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for layer in layers:
            fn(layer, xs, ids)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(layers))
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/experts.py needs a CUDA GPU")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, python {platform.python_version()}")
    E, K, D, I = args.experts, args.top_k, args.hidden, args.width
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(args.layers):
        gate_up = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16, generator=g) / D**0.5
        down = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16, generator=g) / I**0.5
        layers.append(LocalExperts(list(range(E)), gate_up, down, E))
    bw = copy_bandwidth()
    expert_bytes = 3 * D * I * 2
    mb = expert_bytes / 1e6
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s; one expert {mb:.1f} MB; {args.layers} layers rotated")

    def grouped(layer, xs, ids):
        layer.grouped = True
        return layer(xs, ids)

    def loop(layer, xs, ids):
        layer.grouped = False
        return layer(xs, ids)

    rows = []
    print("| T | distinct experts | floor us | grouped us | loop us | grouped % of roofline | loop/grouped |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for T in args.tokens:
        # T tokens, each routed to K distinct random experts: one row per (token, expert) pair.
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)]).reshape(-1)
        xs = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16, generator=g)
        distinct = ids.unique().numel()
        floor = distinct * expert_bytes / bw
        t_grouped = time_layers(grouped, layers, xs, ids)
        t_loop = time_layers(loop, layers, xs, ids)
        row = dict(tokens=T, distinct=distinct, floor_s=floor, grouped_s=t_grouped, loop_s=t_loop)
        rows.append(row)
        print(
            f"| {T} | {distinct} | {floor * 1e6:.0f} | {t_grouped * 1e6:.0f} | {t_loop * 1e6:.0f} | "
            f"{100 * floor / t_grouped:.0f}% | {t_loop / t_grouped:.1f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            out = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
