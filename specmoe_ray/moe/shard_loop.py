"""The shard side of an expert group: the loops that answer rank 0's headers, their profiler,
CUDA-graph capture of a forward's collectives, and leaving the group.

`serve_experts` answers the coordinator layout's exchanges (`dispatch.DistributedDispatch`);
`replica.serve_replica` runs trunk replicas' forwards; both on `serve_loop`.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from specmoe_ray.moe.dispatch import OP_PING, OP_STATIC, OP_STOP, unpack_rows
from specmoe_ray.moe.experts import ExpertStore


def serve_experts(
    store: ExpertStore,
    rank: int,
    world_size: int,
    hidden_size: int,
    dtype,
    device,
    layers=None,
    capture: bool = False,
    control: dict | None = None,
) -> int:
    """A shard's loop: answer rank 0's exchanges until OP_STOP. Returns the number served.

    layers: every MoE layer of the model, in forward order (static steps exchange at each one,
    also where this shard holds no expert); default: the layers this shard holds.
    capture (CUDA): a static forward's exchanges and expert work (fixed sizes, no host sync) are
    captured in a CUDA graph per row capacity after serving its first forward eagerly, and
    replayed for the next ones: the shard then costs one launch per forward, not ~20 per layer.
    control: a dict another thread may put `"profile": ShardProfile` in: the next
    `ShardProfile.forwards` forwards run under torch.profiler (waits for rank 0 included)."""
    device = torch.device(device)
    held = set(store.held())
    layers = sorted(held) if layers is None else list(layers)
    header = torch.empty(world_size + 2, dtype=torch.long, device=device)  # [op, arg, rows per rank]
    zeros = [0] * world_size
    row_bytes = hidden_size * torch.empty(0, dtype=dtype).element_size() + 8
    graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def exchange(layer: int, n: int) -> None:
        recv_splits = [n] + [0] * (world_size - 1)  # everything comes from (and goes back to) rank 0
        payload = torch.empty(n, row_bytes, dtype=torch.uint8, device=device)
        dist.all_to_all_single(payload, payload.new_empty(0, row_bytes), recv_splits, zeros)
        x, ids = unpack_rows(payload, hidden_size, dtype)
        # Static exchanges: unused rows (id -1) are skipped by the experts and go back unused,
        # without a host sync.
        y = store(layer, x, ids) if n and layer in held else x
        dist.all_to_all_single(y.new_empty(0, hidden_size), y.contiguous(), zeros, recv_splits)

    def static_forward(n: int) -> None:
        for layer in layers:
            exchange(layer, n)

    def handle(op: int, arg: int, counts: list[int]) -> None:
        if op == OP_STATIC:  # one forward: every MoE layer, `arg` rows each
            if arg in graphs:
                graphs[arg].replay()
            else:
                static_forward(arg)  # serves this forward (and warms its graph up)
                if capture and device.type == "cuda":
                    graphs[arg] = capture_graph(lambda n=arg: static_forward(n), device)
        else:
            exchange(arg, counts[rank])

    return serve_loop(header, device, handle, graphs.clear, control)


def serve_loop(
    header: torch.Tensor, device: torch.device, handle, on_stop, control: dict | None = None
) -> int:
    """A rank's loop: receive rank 0's headers (`[op, arg, ...]`) and `handle(op, arg, rest)`
    each until OP_STOP (then `on_stop()`: captured collectives go before the communicator,
    `leave_process_group`); pings only keep the group alive. Returns the number served.
    control: a dict another thread may put `"profile": ShardProfile` in: the next
    `ShardProfile.forwards` forwards run under torch.profiler (waits for rank 0 included)."""
    served = 0
    profiling: ShardProfile | None = None
    while True:
        if profiling is None and control is not None and control.get("profile") is not None:
            profiling = control.pop("profile")
            profiling.start(device)
        dist.broadcast(header, src=0)
        op, arg, *rest = header.tolist()
        if op == OP_STOP:
            on_stop()
            if profiling is not None:
                profiling.finish(device)
            return served
        if op == OP_PING:
            continue
        handle(op, arg, rest)
        served += 1
        if profiling is not None and profiling.count():
            profiling.finish(device)
            profiling = None


class ShardProfile:
    """torch.profiler over a shard's next `forwards` forwards (an exchange or a static forward
    each): `result` is then the table of its kernels and ops by device (else CPU) time, and a
    Chrome trace goes to `trace_path` if given. `done` is set once the table is ready."""

    def __init__(self, forwards: int, trace_path: str | None = None, rows: int = 25):
        self.forwards, self.trace_path, self.rows = forwards, trace_path, rows
        self.result: str | None = None
        self.done = threading.Event()
        self._left = forwards
        self._prof = None

    def start(self, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def count(self) -> bool:
        """One forward served; True when the last one has."""
        self._left -= 1
        return self._left <= 0

    def finish(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=key, row_limit=self.rows, max_name_column_width=48)
        served = self.forwards - max(self._left, 0)
        self.result = f"{served} forwards in {1e3 * elapsed:.2f} ms (profiled)\n{table}"
        if self.trace_path:
            self._prof.export_chrome_trace(self.trace_path)
        self.done.set()


def leave_process_group() -> None:
    """This process's side of tearing the default group down, once its exchanges are over.

    NCCL: abort the communicator. `destroy_process_group` finalizes and destroys it, and NCCL's
    destroy is an intra-node collective: a shard leaving after OP_STOP would wait there for rank
    0, which waits for the shard's serve() to return; a rank that lags or died would hold it for
    good. gloo: destroy (no collective)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


def capture_graph(fn, device: torch.device, pool=None) -> torch.cuda.CUDAGraph:
    """fn's kernels and collectives recorded, not run: nothing reaches the peers until replay.
    Thread-local capture: the actor's other thread (stats calls) may touch CUDA meanwhile. A
    capture stream on `device` (torch's default one lives on the first device that captured)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            fn()
    return graph
