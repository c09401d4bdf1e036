"""Dispatch and Combine: move (token, expert) pairs to the process holding the expert.

Two backends with one interface, `backend(layer, x [T, D], expert_ids [T, A]) -> [T, A, D]`:

- `LoopbackDispatch`: every expert in this process (num_shards = 0).
- `DistributedDispatch`: rank 0 (the engine) drives a `torch.distributed` group whose ranks
  1..S are expert shards; NCCL on GPUs, gloo on CPUs, the same code. Per MoE layer call:

      broadcast  header [op, layer, n_1 .. n_S]        (rank 0 -> all)
      all_to_all rows + ids  rank 0 -> shard s: n_s rows [n_s, D] with their expert ids, as bytes
      all_to_all results     shard s -> rank 0: [n_s, D]

  Shards run `serve_experts`, a loop that answers headers until OP_STOP. Rows are sorted by
  (shard, expert), stably, so an expert sees the same rows in the same order whatever the
  placement: shard count never changes results.

Every rank must issue the same collectives in the same order, so one lock serialises all
of rank 0's exchanges (the engine loop's, and the idle heartbeat's).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from specmoe_ray.moe.experts import ExpertStore
from specmoe_ray.moe.placement import PlacementPlan

OP_STOP, OP_EXPERTS, OP_PING = 0, 1, 2


def pack_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [n, D] and int64 ids [n] -> one uint8 tensor [n, D * itemsize + 8], so one collective
    carries both (the ranks share a byte order)."""
    n, width = x.shape[0], x.shape[1] * x.element_size()
    rows = x.contiguous().view(torch.uint8).reshape(n, width)
    return torch.cat([rows, ids.contiguous().view(torch.uint8).reshape(n, 8)], dim=1)


def unpack_rows(
    payload: torch.Tensor, hidden_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n = payload.shape[0]
    split = payload.shape[1] - 8
    x = payload[:, :split].contiguous().view(dtype).reshape(n, hidden_size)
    ids = payload[:, split:].contiguous().view(torch.int64).reshape(n)
    return x, ids


class ExpertLoad:
    """Tokens routed to each (layer, expert), counted on the device (no host sync per layer)."""

    def __init__(self, num_experts: int, device: torch.device | str):
        self.num_experts = num_experts
        self.device = device
        self.counts: dict[int, torch.Tensor] = {}

    def record(self, layer: int, expert_ids: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Count `expert_ids` ([T, A] or flat [T * A]); weight [T] (0/1) leaves padded tokens out."""
        if layer not in self.counts:
            self.counts[layer] = torch.zeros(self.num_experts, dtype=torch.long, device=expert_ids.device)
        n = expert_ids.numel()
        if weight is None:
            values = expert_ids.new_ones(()).expand(n)  # a broadcast view: no copy
        else:
            values = weight.long().repeat_interleave(n // weight.numel())
        # In place, with static shapes (no bincount): CUDA graphs replay it into the same counters.
        self.counts[layer].scatter_add_(0, expert_ids.reshape(-1), values)

    def snapshot(self) -> dict[int, list[int]]:
        """{layer: [tokens per expert]}, cumulative (one host sync)."""
        return {layer: c.tolist() for layer, c in sorted(self.counts.items())}

    def reset(self) -> None:
        self.counts.clear()


class LoopbackDispatch:
    """All experts in-process."""

    def __init__(self, store: ExpertStore):
        self.store = store
        store.count = False  # `load` below counts the same pairs
        any_layer = next(iter(store.by_layer.values()))
        self.load = ExpertLoad(any_layer.to_local.shape[0], any_layer.to_local.device)
        self.num_pairs = 0  # (token, expert) pairs computed, cumulative
        # [T] 0/1 while a CUDA graph of a padded batch runs (`engine/graph.py`): padding rows are
        # computed but not counted as load. None: every row counts.
        self.token_mask: torch.Tensor | None = None

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        T, A = expert_ids.shape
        self.num_pairs += T * A
        self.load.record(layer, expert_ids, self.token_mask)
        pairs = x[:, None, :].expand(T, A, x.shape[-1]).reshape(T * A, -1)
        return self.store(layer, pairs, expert_ids.reshape(-1)).view(T, A, -1)


class DistributedDispatch:
    """Rank 0's side of the expert exchange over the default process group."""

    def __init__(self, plan: PlacementPlan, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.plan = plan
        self.world_size = plan.num_shards + 1
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = torch.device(device)
        # owner_table[layer] = [E, R] ranks (1-based) of each expert's replicas, padded by
        # repeating the first; num_replicas[layer] = [E]
        self.owner_table, self.num_replicas = {}, {}
        for layer, row in plan.owner.items():
            R = max(len(shards) for shards in row)
            table = [[s + 1 for s in shards] + [shards[0] + 1] * (R - len(shards)) for shards in row]
            self.owner_table[layer] = torch.tensor(table, dtype=torch.long, device=self.device)
            self.num_replicas[layer] = torch.tensor(
                [len(s) for s in row], dtype=torch.long, device=self.device
            )
        self.load = ExpertLoad(plan.num_experts, self.device)
        self.exchanges: dict[int, int] = {}  # per layer
        self.lock = threading.Lock()
        self.last_exchange = time.monotonic()
        self.tokens_per_shard = [0] * plan.num_shards  # (token, expert) pairs sent, cumulative

    def _header(self, op: int, layer: int = 0, counts: list[int] | None = None) -> torch.Tensor:
        header = [op, layer] + (counts or [0] * (self.world_size - 1))
        return torch.tensor(header, dtype=torch.long, device=self.device)

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        T, A = expert_ids.shape
        D = x.shape[-1]
        flat_ids = expert_ids.reshape(-1)  # [T*A]
        self.load.record(layer, flat_ids)
        # A replicated expert's tokens alternate between its replicas, by token position, and the
        # starting replica rotates with every exchange so single-token steps alternate too.
        # (Counted per layer: a shared counter would keep one parity for a given layer.)
        self.exchanges[layer] = self.exchanges.get(layer, 0) + 1
        position = torch.arange(T * A, device=x.device) // A + self.exchanges[layer]
        replica = position % self.num_replicas[layer][flat_ids]
        owner = self.owner_table[layer][flat_ids, replica]  # [T*A] rank per pair
        order = torch.argsort(owner * self.plan.num_experts + flat_ids, stable=True)
        # One host sync per layer: the split sizes are the header's payload.
        counts = torch.bincount(owner, minlength=self.world_size)[1:].tolist()
        pairs = x[order // A]  # [T*A, D] rows sorted by (shard, expert)
        sorted_ids = flat_ids[order]
        zeros = [0] * self.world_size
        send_splits = [0, *counts]
        payload = pack_rows(pairs, sorted_ids)  # rows and their expert ids travel in one exchange
        with self.lock:
            dist.broadcast(self._header(OP_EXPERTS, layer, counts), src=0)
            dist.all_to_all_single(payload.new_empty(0, payload.shape[1]), payload, zeros, send_splits)
            results = pairs.new_empty(T * A, D)
            dist.all_to_all_single(results, pairs.new_empty(0, D), send_splits, zeros)
            self.last_exchange = time.monotonic()
        for s, c in enumerate(counts):
            self.tokens_per_shard[s] += c
        y = torch.empty_like(results)
        y[order] = results
        return y.view(T, A, D)

    def ping(self) -> None:
        """An empty exchange, so idle shards' collectives never reach their timeout."""
        with self.lock:
            dist.broadcast(self._header(OP_PING), src=0)
            self.last_exchange = time.monotonic()

    def stop(self) -> None:
        with self.lock:
            dist.broadcast(self._header(OP_STOP), src=0)


def serve_experts(store: ExpertStore, rank: int, world_size: int, hidden_size: int, dtype, device) -> int:
    """A shard's loop: answer rank 0's exchanges until OP_STOP. Returns the number served."""
    device = torch.device(device)
    header = torch.empty(world_size + 1, dtype=torch.long, device=device)
    zeros = [0] * world_size
    row_bytes = hidden_size * torch.empty(0, dtype=dtype).element_size() + 8
    served = 0
    while True:
        dist.broadcast(header, src=0)
        op, layer, *counts = header.tolist()
        if op == OP_STOP:
            return served
        if op == OP_PING:
            continue
        n = counts[rank - 1]
        recv_splits = [n] + [0] * (world_size - 1)
        payload = torch.empty(n, row_bytes, dtype=torch.uint8, device=device)
        dist.all_to_all_single(payload, payload.new_empty(0, row_bytes), recv_splits, zeros)
        x, ids = unpack_rows(payload, hidden_size, dtype)
        y = store(layer, x, ids) if n else x
        dist.all_to_all_single(y.new_empty(0, hidden_size), y.contiguous(), zeros, recv_splits)
        served += 1
