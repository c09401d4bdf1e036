"""Which NCCL exchanges a CUDA graph captures here: two processes, one GPU each (no Ray), the
engine's exchange pattern (`all_to_all_single` of packed uint8 rows, rank 0 sending to both and
the peer answering) captured in thread-local mode at growing sizes, replayed, and checked.

    python benchmarks/nccl_capture.py                       # sizes 4 KB .. 8 MB
    NCCL_GRAPH_REGISTER=0 python benchmarks/nccl_capture.py # without NCCL's buffer registration

Prints one line per size: captured and correct, or the error. (The 30B benchmark's first
capture of a step with expert shards failed with "operation failed due to a previous error
during capture"; tests/gpu with ~2 KB exchanges passed: this isolates the exchange.)
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def exchange(rank: int, payload: torch.Tensor, rows: int) -> None:
    """As `DistributedDispatch._exchange` with a local shard and `serve_experts`: rank 0 sends
    `rows` rows to each rank (itself included), each adds 1 (the "experts"), rank 0 gets all back
    into `payload`."""
    width = payload.shape[1]
    received = payload.new_empty(rows, width)
    nothing = payload.new_empty(0, width)
    if rank == 0:
        dist.all_to_all_single(received, payload, [rows, 0], [rows, rows])
        results = payload.new_empty(2 * rows, width)
        dist.all_to_all_single(results, received + 1, [rows, rows], [rows, 0])
        payload.copy_(results)
    else:
        dist.all_to_all_single(received, nothing, [rows, 0], [0, 0])
        dist.all_to_all_single(nothing, received + 1, [0, 0], [rows, 0])


def worker(rank: int, port: int, sizes: list[int]) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
        device_id=dev,
    )
    width = 4104  # one bf16 row of hidden 2048 + its int64 expert id
    for size in sizes:
        rows = max(1, size // width)
        send = torch.randint(0, 100, (2 * rows, width), dtype=torch.uint8, device=dev)
        start = send.clone()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            exchange(rank, send, rows)  # eager warm-up
        torch.cuda.current_stream(dev).wait_stream(stream)
        status = "ok"
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                exchange(rank, send, rows)
            send.copy_(start)
            graph.replay()
            torch.cuda.synchronize(dev)
            if rank == 0 and not torch.equal(send, start + 1):
                status = "WRONG RESULT"
        except Exception as e:  # report, then stop: the communicator may be unusable
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}"
        flag = torch.tensor([status == "ok"], dtype=torch.int32, device=dev)
        if status == "ok":
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        print(f"rank {rank}: {2 * rows * width / 1e6:8.3f} MB exchanged: {status}", flush=True)
        if status != "ok" or not flag.item():
            break
    dist.distributed_c10d._abort_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20])
    a = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    print("NCCL_GRAPH_REGISTER =", os.environ.get("NCCL_GRAPH_REGISTER", "(default)"), flush=True)
    port = 29000 + os.getpid() % 1000
    mp.spawn(worker, args=(port, a.sizes), nprocs=2, join=True)


if __name__ == "__main__":
    main()
