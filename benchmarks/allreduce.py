"""What one MoE layer's all_reduce costs trunk replicas (`moe/replica.py`): two processes, one
GPU each (no Ray), the layer's sum at its real sizes, 48 in a row as in a 48-layer step, each
behind a small kernel that reads the last result (the next layer's dependency), captured in
one CUDA graph and replayed; the same chain without the collectives is the baseline.

    python benchmarks/allreduce.py                      # NCCL, then symmetric memory where it runs
    python benchmarks/allreduce.py --device cpu         # gloo, eager: checks the script only

(1) Sizes: the float32 partial sums [T, 2048] (default replicas) and the bf16 pairs' outputs
[T, 8, 2048] (`replica_exact`) at T = 1, 8, 32 tokens. Variants: NCCL's all_reduce, and
`torch.ops.symm_mem` one-shot / two-shot all-reduce on a symmetric buffer (peer loads over
NVLink, no NCCL kernel) when this torch build and machine support them; a variant that fails
prints its error. Every variant's sum is checked against the expected values.

(2) GPUs: a replica's MoE layer end as the engine runs it, from the pairs' outputs [T, 8, 2048]
and gate weights: the compiled partial combine (float32 [T, 2048]), NCCL's all_reduce and the
compiled `fused.sum_add_rms_norm`, against `moe/peer_sum.py` (one kernel combines into a shared
slot and signals the peers, one waits for them, sums, adds and norms) and against the combine
and add + norm with no sum at all; the peer sum as it is, then with one switch flipped each
(`PEER_VARIANTS`: without programmatic dependent launch, `peer_sum.PDL`; with one combine
program per row, `peer_sum.COMBINE_PROGRAMS` 0), then as it is again (the spread of the two is
the noise), and with its waits timed (`peer_sum.WAIT_TIMES`: each rank's microseconds waited
per sum, and their count checked). One layer of
each is checked against float64 math, and after the timed replays the ranks must hold the same
rows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
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
    return graph_us(lambda: chain(x, reduce, group_name), dev, reps)[0]


def graph_us(run, dev: torch.device, reps: int) -> tuple[float, object]:
    """run() (LAYERS layers) warmed up on a side stream, captured in a CUDA graph and replayed
    in step with the other rank -> (microseconds per layer, what the captured run returned)."""
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        run()  # warm-up (compilations, symmetric buffers' rendezvous) off the graph
    torch.cuda.current_stream(dev).wait_stream(stream)
    torch.cuda.synchronize(dev)
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = run()
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
    return 1e3 * start.elapsed_time(end) / (reps * LAYERS), out


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
    if dev.type == "cuda":
        if rank == 0:
            print(f"(2) the sum and the next add + norm, {LAYERS} layers chained", flush=True)
        for T in tokens:
            try:
                line = fold_variants(rank, dev, T, reps, group_name)
            except Exception as e:  # a machine or build without symmetric memory
                line = f"T={T}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if rank == 0:
                print("  " + line, flush=True)
    dist.barrier()
    dist.destroy_process_group()


EPS = 1e-6


def fold_layers(y, weights, res, w, variant: str, peer):
    """LAYERS replica layer ends: this rank's share of a MoE layer (y [T, A, D] the pairs'
    outputs, weights [T, A] its gate weights) combined in float32, summed over the ranks, added
    to the residual and normed -> (h, res). variant: "nccl" (the compiled partial combine,
    all_reduce, the compiled add + norm, as the engine's NCCL path), "peer" (`PeerSum`: the
    combine + signal kernel, then the sum + add + norm), "alone" (combine and add + norm, no sum)."""
    from specmoe_ray.models import fused
    from specmoe_ray.moe import replica

    h = None
    for layer in range(LAYERS):
        if variant.startswith("peer"):
            peer.combine_signal(layer % 2, y, weights)  # LAYERS even: `slot_order`
            h, res = peer.sum_add_rms_norm(layer % 2, res, w, EPS, position=layer)
        else:
            partial = replica.partial_combine(y, weights, None, None, y)
            if variant == "nccl":
                dist.all_reduce(partial)
            h, res = fused.sum_add_rms_norm(partial, res, w, EPS)
    return h, res


def fold_variants(rank: int, dev: torch.device, T: int, reps: int, group_name: str) -> str:
    """(2) at T tokens: microseconds per layer of each variant, replayed from CUDA graphs."""
    from specmoe_ray.models import fused
    from specmoe_ray.moe.peer_sum import PeerSum

    g = torch.Generator(device="cpu").manual_seed(0)  # the same inputs on both ranks
    y = torch.randn(T, TOP_K, HIDDEN, generator=g).to(dev, torch.bfloat16)
    gates = torch.rand(T, TOP_K, generator=g)
    res0 = torch.randn(T, HIDDEN, generator=g).to(dev, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dev, torch.bfloat16)
    scales = (0.5, 0.25)  # rank r's gate weights: gates * scales[r] (exact in bf16)
    weights = [(gates * s).to(torch.bfloat16) for s in scales]
    mine = weights[rank].to(dev)
    peer = PeerSum(T, HIDDEN, dev, positions=LAYERS)  # (each layer's waits timed apart)
    out = {}
    with fused.active():
        # One layer against float64: each rank's products rounded, summed, the ranks' sums
        # added in float32, rounded, added to the residual (rounded), normed. Inductor may keep
        # float32 where the eager ops round (the products; the sum through the add): the
        # residual may match any of those four roundings.
        res_d = res0.double().cpu()
        x_refs = []
        for round_products in (True, False):
            shares = []
            for wr in weights:
                products = y.double().cpu() * wr.double()[..., None]
                if round_products:
                    products = products.to(torch.bfloat16).double()
                shares.append(products.sum(1).float().double())
            total = (shares[0] + shares[1]).float().double()
            x_refs.append((total.to(torch.bfloat16).double() + res_d).to(torch.bfloat16).double())
            x_refs.append((total + res_d).to(torch.bfloat16).double())
        x_ref = x_refs[0]
        ref = w.double().cpu() * (x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + EPS))
        checks = []
        for variant in ("nccl", *PEER_VARIANTS):
            if variant == "peer again":
                continue
            with peer_switches(variant):
                hn, xn = fold_one(y, mine, res0, w, variant, peer)
            hn, xn = hn.double().cpu(), xn.double().cpu()
            err = ((hn - ref).norm() / ref.norm()).item()
            x_off = min((xn != ref_x).float().mean().item() for ref_x in x_refs)
            ok = err < 1e-2 and x_off < 1e-3
            checks.append(f"{variant} {'ok' if ok else 'WRONG'} (norm {err:.1e}, residual {x_off:.0e})")
        for variant in ("alone", "nccl", *PEER_VARIANTS, "peer timed"):
            run = functools.partial(fold_layers, y, mine, res0.clone(), w, variant, peer)
            peer.timed = variant == "peer timed"  # its waits counted (`peer_sum.WAIT_TIMES`)
            with peer_switches(variant):  # (read as the kernels are captured)
                out[variant], (h_out, _) = graph_us(run, dev, reps)
            if variant != "alone":  # replicas must stay equal: every rank the same rows
                mine_sum = h_out.float().sum().reshape(1)
                both = [torch.empty_like(mine_sum) for _ in range(2)]
                dist.all_gather(both, mine_sum)
                checks.append(f"{variant} ranks {'agree' if torch.equal(both[0], both[1]) else 'DIFFER'}")
        # The timed variant's sums: its warm-up, 3 replays and the timed ones, one per layer
        # (position) each, on both ranks (each reads both ranks' counters; rank 0's line prints).
        peer.timed = True
        waits = peer.wait_times()
        peer.timed = False
        counted = all(sums == 4 + reps for rank in waits for sums, _ in rank)
        checks.append(f"waits {'counted' if counted else 'MISCOUNTED'} ({4 + reps} per layer expected)")
    nccl, fold, alone = out["nccl"], out["peer"], out["alone"]
    per_sum = ", ".join(
        f"rank {r} {sum(us for _, us in w) / max(sum(n for n, _ in w), 1):.2f}" for r, w in enumerate(waits)
    )
    return (
        f"T={T}: combine + add + norm alone {alone:5.1f} us/layer, with NCCL's sum {nccl:5.1f}, "
        f"peer sum {fold:5.1f} ({nccl / fold:.2f}x), without PDL {out['peer-no-pdl']:5.1f}, "
        f"a combine program per row {out['peer-row-programs']:5.1f}, peer sum again "
        f"{out['peer again']:5.1f}, timing its waits {out['peer timed']:5.1f} (us waited per sum: "
        f"{per_sum}); {', '.join(checks)}"
    )


# The peer sum's variants: `peer_sum` switches flipped from its defaults ("peer" and "peer
# again": none; their spread is the noise).
PEER_VARIANTS = {
    "peer": {},
    "peer-no-pdl": {"PDL": False},
    "peer-row-programs": {"COMBINE_PROGRAMS": 0},
    "peer again": {},
}


@contextlib.contextmanager
def peer_switches(variant: str):
    """`PEER_VARIANTS[variant]`'s `peer_sum` switches set for the block (the kernels' launches
    read them); other variants: none."""
    from specmoe_ray.moe import peer_sum

    flips = PEER_VARIANTS.get(variant, {})
    before = {k: getattr(peer_sum, k) for k in flips}
    try:
        for k, v in flips.items():
            setattr(peer_sum, k, v)
        yield
    finally:
        for k, v in before.items():
            setattr(peer_sum, k, v)


def fold_one(y, weights, res, w, variant: str, peer):
    """One layer end of `fold_layers` (its slot 0), eagerly: -> (normed, residual + sum)."""
    from specmoe_ray.models import fused
    from specmoe_ray.moe import replica

    if variant.startswith("peer"):
        peer.combine_signal(0, y, weights)
        return peer.sum_add_rms_norm(0, res, w, EPS)
    partial = replica.partial_combine(y, weights, None, None, y)
    dist.all_reduce(partial)
    return fused.sum_add_rms_norm(partial, res.clone(), w, EPS)


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
