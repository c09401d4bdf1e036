"""What one MoE layer's all_reduce costs trunk replicas (`moe/replica.py`): two processes, one
GPU each (no Ray), the layer's sum at its real sizes, 48 in a row as in a 48-layer step, each
behind a small kernel that reads the last result (the next layer's dependency), captured in
one CUDA graph and replayed; the same chain without the collectives is the baseline.

    python benchmarks/allreduce.py                      # NCCL, then symmetric memory where it runs
    python benchmarks/allreduce.py --device cpu         # gloo, eager: checks the script only

Sizes: the float32 partial sums [T, 2048] (default replicas) and the bf16 pairs' outputs
[T, 8, 2048] (`replica_exact`) at T = 1, 8, 32 tokens. Variants: NCCL's all_reduce, and
`torch.ops.symm_mem` one-shot / two-shot all-reduce on a symmetric buffer (peer loads over
NVLink, no NCCL kernel) when this torch build and machine support them; a variant that fails
prints its error. Every variant's sum is checked against the expected values.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN, TOP_K, LAYERS = 2048, 8, 48


def shapes(tokens: list[int]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out = []
    for T in tokens:
        out.append((f"partial sums f32 [{T}, {HIDDEN}]", (T, HIDDEN), torch.float32))
        out.append((f"exact bf16 [{T}, {TOP_K}, {HIDDEN}]", (T, TOP_K, HIDDEN), torch.bfloat16))
    return out


def nccl_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def symm_sum(kind: str):
    """A sum through a symmetric buffer: copy in, reduce in place, read out (as serving would)."""
    import torch.distributed._symmetric_memory as symm_mem

    buffers: dict[tuple, torch.Tensor] = {}

    def run(x: torch.Tensor, group_name: str) -> torch.Tensor:
        key = (x.numel(), x.dtype, x.device)
        buf = buffers.get(key)
        if buf is None:
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, a no-op after
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    symm_mem.enable_symm_mem_for_group(group_name)
            buf = buffers[key] = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group_name)
        buf.copy_(x.reshape(-1))
        if kind == "one_shot":
            return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group_name).view(x.shape)
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group_name)
        return buf.view(x.shape)

    return run


def chain(x: torch.Tensor, reduce, group_name: str) -> torch.Tensor:
    """LAYERS dependent sums: each layer's input is the last sum, scaled (a kernel between)."""
    for _ in range(LAYERS):
        x = reduce(x.mul(0.5), group_name) if reduce is not None else x.mul(0.5)
    return x


def time_variant(x: torch.Tensor, reduce, group_name: str, dev: torch.device, reps: int) -> float:
    """Microseconds per layer of the chain (CUDA graph replay on GPUs, eager on CPUs)."""
    if dev.type != "cuda":
        chain(x, reduce, group_name)
        t0 = time.perf_counter()
        for _ in range(reps):
            chain(x, reduce, group_name)
        return 1e6 * (time.perf_counter() - t0) / (reps * LAYERS)
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        chain(x, reduce, group_name)  # warm-up (and symmetric buffers' rendezvous) off the graph
    torch.cuda.current_stream(dev).wait_stream(stream)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        chain(x, reduce, group_name)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize(dev)
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (reps * LAYERS)


def worker(rank: int, port: int, device: str, tokens: list[int], reps: int) -> None:
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    group_name = dist.group.WORLD.group_name
    variants = {"all_reduce (nccl; gloo on cpu)": nccl_sum}
    if dev.type == "cuda":
        variants["symm_mem one_shot"] = symm_sum("one_shot")
        variants["symm_mem two_shot"] = symm_sum("two_shot")
    for name, shape, dtype in shapes(tokens):
        x = torch.full(shape, float(rank + 1), dtype=dtype, device=dev)  # sums to 3 * 0.5 per layer
        base = time_variant(x, None, group_name, dev, reps)
        line = [f"{name:34s} kernel alone {base:6.1f} us"]
        for vname, reduce in variants.items():
            try:
                us = time_variant(x, reduce, group_name, dev, reps) - base
                once = reduce(x.mul(0.5), group_name)
                ok = torch.allclose(once.float(), torch.full_like(once.float(), 1.5))
                line.append(f"{vname} {us:6.1f} us/layer{'' if ok else ' WRONG SUM'}")
            except Exception as e:  # a variant this machine or build cannot run
                line.append(f"{vname}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        if rank == 0:
            print("  " + "; ".join(line), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs (or --device cpu)")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"all_reduce per MoE layer, {LAYERS} layers chained, 2 ranks, {a.device}")
    mp.spawn(worker, args=(port, a.device, a.tokens, a.reps), nprocs=2, join=True)


if __name__ == "__main__":
    main()
