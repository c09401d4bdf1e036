"""Dispatch and Combine: move (token, expert) pairs to the process holding the expert.

Two backends with one interface, `backend(layer, x [T, D], expert_ids [T, A]) -> [T, A, D]`:

- `LoopbackDispatch`: every expert in this process (num_shards = 0).
- `DistributedDispatch`: rank 0 (the engine) drives a `torch.distributed` group whose other
  ranks are expert shards; NCCL on GPUs, gloo on CPUs, the same code. Rank 0 may hold the plan's
  shard 0 itself (`local_store`: the engine's GPU serves experts too), and then takes part in
  each exchange like a shard, its own rows travelling to itself. Per MoE layer call:

      broadcast  header [op, layer, n_0 .. n_S]        (rank 0 -> all; rows per rank)
      all_to_all rows + ids  rank 0 -> shard s: n_s rows [n_s, D] with their expert ids, as bytes
      all_to_all results     shard s -> rank 0: [n_s, D]

  Shards run `shard_loop.serve_experts`, a loop that answers headers until OP_STOP. Rows are sorted by
  (shard, expert), stably, and the experts sort a shard's rows stably by expert again, so an
  expert sees its rows in pair order whatever the placement: shard count never changes results.

- Static steps (`DistributedDispatch.static_step(num_tokens)`, what CUDA graphs replay): one
  header for the whole forward, [OP_STATIC, C], then for every MoE layer, in order, the same two
  all_to_alls with *fixed* split sizes: C = num_tokens * top_k rows to each shard, unused rows
  marked with expert id -1. No host sync and no per-layer header, so the exchange has static
  shapes (capturable); it sends up to S times the rows the dynamic exchange does, which is
  nothing at decode sizes. The rows go grouped by shard in pair order (`pack_static`; on GPUs one
  kernel, `triton_dispatch.pack_pairs`): each expert still sees its rows in pair order.

Every rank must issue the same collectives in the same order, so one lock serialises all
of rank 0's exchanges (the engine loop's, and the idle heartbeat's).
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch
import torch.distributed as dist

from specmoe_ray.models.fused import combine, combine_rows
from specmoe_ray.moe import triton_dispatch
from specmoe_ray.moe.experts import ExpertStore
from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.moe.triton_experts import stable_sort

OP_STOP, OP_EXPERTS, OP_PING, OP_STATIC = 0, 1, 2, 3


def pack_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [n, D] and int64 ids [n] -> one uint8 tensor [n, D * itemsize + 8], so one collective
    carries both (the ranks share a byte order)."""
    n, width = x.shape[0], x.shape[1] * x.element_size()
    rows = x.contiguous().view(torch.uint8).reshape(n, width)
    return torch.cat([rows, ids.contiguous().view(torch.uint8).reshape(n, 8)], dim=1)


def unpack_rows(
    payload: torch.Tensor, hidden_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n, width = payload.shape
    split = width - 8
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if payload.is_contiguous() and width % 8 == 0 and split % itemsize == 0:
        # Views, no copy (the consumers gather or copy rows anyway): rows [n, D] with a row
        # stride of width / itemsize, ids [n] one per width / 8 int64s.
        return payload.view(dtype)[:, :hidden_size], payload.view(torch.int64)[:, -1]
    x = payload[:, :split].contiguous().view(dtype).reshape(n, hidden_size)
    ids = payload[:, split:].contiguous().view(torch.int64).reshape(n)
    return x, ids


def pack_static(
    x: torch.Tensor,
    ids: torch.Tensor,
    pair_mask: torch.Tensor | None,
    owner_table: torch.Tensor,
    num_replicas: torch.Tensor,
    rotation: torch.Tensor,
    counts: torch.Tensor,
    num_shards: int,
    capacity: int,
    top_k: int,
    first_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A static exchange's send buffer, by torch ops (CPUs; `triton_dispatch.pack_pairs` on
    GPUs, same arguments and result): x [T, D], ids [n = T * top_k] -> (buffer [S * C, row bytes]
    in `pack_rows`' layout, slot [n]: each pair's row in it). Pair p goes to the rank owning
    replica (p // top_k + rotation) % replicas of its expert; shard s's block (rows s * C ..) holds
    its pairs in pair order, then unused rows with id -1; padding tokens' pairs (`pair_mask` 0)
    travel with id -1 and are not counted in `counts` [S]."""
    n, D = ids.shape[0], x.shape[-1]
    position = torch.arange(n, device=x.device)
    replica = (position // top_k + rotation) % num_replicas[ids]
    shard = owner_table[ids, replica] - first_rank
    in_order, order = stable_sort(shard)  # by shard, pair order kept within each
    first = torch.searchsorted(in_order, torch.arange(num_shards, device=x.device))  # [S]
    slot = torch.empty_like(position)
    slot[order] = in_order * capacity + position - first[in_order]
    rows = x.new_zeros(num_shards * capacity, D)
    rows[slot] = x[position // top_k]
    sent = ids.new_full((num_shards * capacity,), -1)
    weight = torch.ones_like(shard) if pair_mask is None else pair_mask
    sent[slot] = ids if pair_mask is None else torch.where(pair_mask > 0, ids, -1)
    counts.scatter_add_(0, shard, weight)
    return pack_rows(rows, sent), slot


class ExpertLoad:
    """Tokens routed to each (layer, expert), counted on the device (no host sync per layer)."""

    def __init__(self, num_experts: int, device: torch.device | str):
        self.num_experts = num_experts
        self.device = device
        self.counts: dict[int, torch.Tensor] = {}

    def record(self, layer: int, expert_ids: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Count `expert_ids` ([T, A] or flat [T * A]); weight (int64 0/1, [T] or per pair
        [T * A]) leaves padded tokens out."""
        if layer not in self.counts:
            self.counts[layer] = torch.zeros(self.num_experts, dtype=torch.long, device=expert_ids.device)
        n = expert_ids.numel()
        if weight is None:
            values = expert_ids.new_ones(()).expand(n)  # a broadcast view: no copy
        else:
            values = weight if weight.numel() == n else weight.long().repeat_interleave(n // weight.numel())
        # In place, with static shapes (no bincount): CUDA graphs replay it into the same counters.
        self.counts[layer].scatter_add_(0, expert_ids.reshape(-1), values)

    def counter(self, layer: int, device: torch.device) -> torch.Tensor:
        """Layer `layer`'s counters ([E] int64), for a kernel that counts while it routes."""
        if layer not in self.counts:
            self.counts[layer] = torch.zeros(self.num_experts, dtype=torch.long, device=device)
        return self.counts[layer]

    def snapshot(self) -> dict[int, list[int]]:
        """{layer: [tokens per expert]}, cumulative (one host sync)."""
        return {layer: c.tolist() for layer, c in sorted(self.counts.items())}

    def reset(self) -> None:
        self.counts.clear()


class _Masked:
    """`token_mask`: [T] 0/1 while a CUDA graph of a padded batch runs (`engine/graph.py`):
    padding rows are computed but not counted as load. None: every row counts. Its per-pair
    expansion is built once per forward (the first MoE layer) and reused by the others."""

    _token_mask: torch.Tensor | None = None
    _pair_mask: torch.Tensor | None = None

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self._token_mask

    @token_mask.setter
    def token_mask(self, mask: torch.Tensor | None) -> None:
        self._token_mask, self._pair_mask = mask, None

    def load_counter(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer's load counters, token mask) for a routing kernel that counts as it routes;
        the forward then passes `counted=True` and the load is not recorded again."""
        return self.load.counter(layer, device), self._token_mask

    def pair_mask(self, top_k: int) -> torch.Tensor | None:
        """[T * top_k] int64 0/1 per (token, expert) pair, or None without a token mask."""
        if self._token_mask is not None and self._pair_mask is None:
            self._pair_mask = self._token_mask.long().repeat_interleave(top_k)
        return self._pair_mask


class LoopbackDispatch(_Masked):
    """All experts in-process."""

    def __init__(self, store: ExpertStore):
        self.store = store
        store.count = False  # `load` below counts the same pairs
        any_layer = next(iter(store.by_layer.values()))
        self.load = ExpertLoad(any_layer.num_experts, any_layer.to_local.device)
        self.num_pairs = 0  # (token, expert) pairs computed, cumulative

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, counted: bool = False):
        T, A = expert_ids.shape
        self.num_pairs += T * A
        if not counted:
            self.load.record(layer, expert_ids, self.pair_mask(A))
        return self.store(layer, x, expert_ids.reshape(-1), group=A).view(T, A, -1)


class Rank0:
    """Rank 0's side of a group's control: one lock serialises its collectives (the engine
    loop's and the idle heartbeat's); `ping` and `stop` broadcast headers made beforehand
    (`_ping`, `_stop`), so the heartbeat thread makes no host-to-device copy of its own (which
    would run on the device's default stream, beside graph captures)."""

    lock: threading.Lock
    last_exchange: float
    _ping: torch.Tensor
    _stop: torch.Tensor

    def ping(self) -> None:
        """An empty exchange, so idle shards' collectives never reach their timeout."""
        with self.lock:
            dist.broadcast(self._ping, src=0)
            self.last_exchange = time.monotonic()

    def stop(self) -> None:
        with self.lock:
            dist.broadcast(self._stop, src=0)


class DistributedDispatch(_Masked, Rank0):
    """Rank 0's side of the expert exchange over the default process group.

    local_store: rank 0's own experts (the plan's shard 0), when the engine's device holds
    experts too; then shard s is rank s and rank 0 takes part in every exchange like a shard
    (its rows travel to itself inside the same all_to_alls). Without it, shard s is rank s + 1.
    """

    def __init__(
        self,
        plan: PlacementPlan,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        local_store: ExpertStore | None = None,
    ):
        self.plan = plan
        self.local = local_store
        self.first_rank = 0 if local_store is not None else 1  # rank of shard 0
        self.world_size = plan.num_shards + self.first_rank
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = torch.device(device)
        # owner_table[layer] = [E, R] ranks of each expert's replicas, padded by repeating the
        # first; num_replicas[layer] = [E]
        self.owner_table, self.num_replicas = {}, {}
        r0 = self.first_rank
        for layer, row in plan.owner.items():
            R = max(len(shards) for shards in row)
            table = [[s + r0 for s in shards] + [shards[0] + r0] * (R - len(shards)) for shards in row]
            self.owner_table[layer] = torch.tensor(table, dtype=torch.long, device=self.device)
            self.num_replicas[layer] = torch.tensor(
                [len(s) for s in row], dtype=torch.long, device=self.device
            )
        self.load = ExpertLoad(plan.num_experts, self.device)
        self.exchanges: dict[int, int] = {}  # per layer
        self.lock = threading.Lock()
        self.last_exchange = time.monotonic()
        self._tokens_per_shard = [0] * plan.num_shards  # pairs sent by dynamic exchanges, cumulative
        # Static steps (`static_step`): fixed-capacity exchanges, counters kept on the device.
        self._capacity: int | None = None
        # Static forwards so far, the replica rotation of all their layers: each static forward
        # exchanges once at every MoE layer, so one counter, advanced once per forward, serves all.
        self._rotation = torch.zeros((), dtype=torch.long, device=self.device)
        self._shard_pairs: dict[int, torch.Tensor] = {}  # layer -> [S] pairs sent, cumulative
        self._static_headers: dict[int, torch.Tensor] = {}
        self._ping, self._stop = self._header(OP_PING), self._header(OP_STOP)

    def _header(self, op: int, arg: int = 0, counts: list[int] | None = None) -> torch.Tensor:
        """[op, arg, rows for rank 0 .. world - 1]."""
        header = [op, arg] + (counts or [0] * self.world_size)
        return torch.tensor(header, dtype=torch.long, device=self.device)

    def _compute_local(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rank 0's own rows (shard 0). In static exchanges rows with id -1 are padding: the
        experts skip them (their output rows go back unused) and count nothing."""
        if str(layer) not in self.local.by_layer or x.shape[0] == 0:
            return x  # no rows can be routed here
        return self.local(layer, x, ids)

    def _exchange(
        self,
        layer: int,
        payload: torch.Tensor,
        splits: list[int],
        total: int,
        dtype: torch.dtype,
        static: bool,
    ) -> torch.Tensor:
        """Rows out to their ranks (`splits` rows each; rank 0's own share to itself), rank 0's
        share computed here, results back in the same order -> [total, D]."""
        D = self.hidden_size
        mine = [splits[0]] + [0] * (self.world_size - 1)  # rank 0 receives only its own rows
        received = payload.new_empty(splits[0], payload.shape[1])
        dist.all_to_all_single(received, payload, mine, splits)
        if self.local is not None:
            rx, rids = unpack_rows(received, D, dtype)
            own = self._compute_local(layer, rx, rids)
        else:
            own = torch.empty(0, D, dtype=dtype, device=payload.device)
        results = torch.empty(total, D, dtype=dtype, device=payload.device)
        dist.all_to_all_single(results, own.contiguous(), splits, mine)
        return results

    @property
    def tokens_per_shard(self) -> list[int]:
        """(token, expert) pairs sent to each shard, cumulative (dynamic and static exchanges)."""
        static = [0] * self.plan.num_shards
        if self._shard_pairs:  # one host sync for all layers
            static = torch.stack(list(self._shard_pairs.values())).sum(0).tolist()
        return [a + b for a, b in zip(self._tokens_per_shard, static)]

    combines = True  # takes the gate weights: results gathered and combined in one kernel

    def __call__(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        counted: bool = False,
        weights: torch.Tensor | None = None,
    ):
        """-> [T, A, D] expert outputs, or with `weights` [T, A] their combination [T, D]."""
        if self._capacity is not None:
            results, slot = self._static_exchange(layer, x, expert_ids, counted)
            if weights is not None:
                return combine_rows(results, slot, weights, x)
            return results[slot].view(*expert_ids.shape, -1)
        T, A = expert_ids.shape
        D = x.shape[-1]
        flat_ids = expert_ids.reshape(-1)  # [T*A]
        if not counted:
            self.load.record(layer, flat_ids)
        # A replicated expert's tokens alternate between its replicas, by token position, and the
        # starting replica rotates with every exchange so single-token steps alternate too.
        # (Counted per layer: a shared counter would keep one parity for a given layer.)
        self.exchanges[layer] = self.exchanges.get(layer, 0) + 1
        position = torch.arange(T * A, device=x.device) // A + self.exchanges[layer]
        replica = position % self.num_replicas[layer][flat_ids]
        owner = self.owner_table[layer][flat_ids, replica]  # [T*A] rank per pair
        order = stable_sort(owner * self.plan.num_experts + flat_ids)[1]
        # One host sync per layer: the split sizes are the header's payload.
        counts = torch.bincount(owner, minlength=self.world_size).tolist()  # rows per rank
        pairs = x[order // A]  # [T*A, D] rows sorted by (rank, expert)
        sorted_ids = flat_ids[order]
        payload = pack_rows(pairs, sorted_ids)  # rows and their expert ids travel in one exchange
        with self.lock:
            dist.broadcast(self._header(OP_EXPERTS, layer, counts), src=0)
            results = self._exchange(layer, payload, counts, T * A, x.dtype, static=False)
            self.last_exchange = time.monotonic()
        for s, c in enumerate(counts[self.first_rank :]):
            self._tokens_per_shard[s] += c
        y = torch.empty_like(results)
        y[order] = results
        return y.view(T, A, D) if weights is None else combine(y.view(T, A, D), weights, x)

    @contextlib.contextmanager
    def static_step(self, num_tokens: int, top_k: int):
        """Within this block (one forward of `num_tokens` tokens), every layer's exchange has
        fixed split sizes. Holds the exchange lock throughout: no heartbeat between layers."""
        capacity = num_tokens * top_k
        header = self._static_headers.get(capacity)
        if header is None:  # made outside any graph capture (a warm-up always runs first)
            header = self._static_headers[capacity] = self._header(OP_STATIC, capacity)
        with self.lock:
            dist.broadcast(header, src=0)
            self._rotation.add_(1)
            self._capacity = capacity
            try:
                yield
            finally:
                self._capacity = None
                self.last_exchange = time.monotonic()

    def _static_exchange(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, counted: bool):
        """One layer's fixed-size exchange -> (results [S * C, D], slot [T * A]): pair p's
        output is results[slot[p]]."""
        T, A = expert_ids.shape
        S, C, n = self.plan.num_shards, self._capacity, T * A
        if n > C:
            raise ValueError(f"static step sized for {C} (token, expert) pairs got {n}")
        flat_ids = expert_ids.reshape(-1)
        pair_mask = self.pair_mask(A)
        if not counted:
            self.load.record(layer, flat_ids, pair_mask)
        # Replica rotation as in the dynamic path, counted on the device (a graph replays it).
        counter = self._rotation
        counts = self._shard_pairs.setdefault(layer, torch.zeros(S, dtype=torch.long, device=x.device))
        table, replicas = self.owner_table[layer], self.num_replicas[layer]
        # GPUs: one Triton kernel for pack_static's ~15 small ones (same buffer, same slots).
        pack = triton_dispatch.pack_pairs if triton_dispatch.packable(x, n) else pack_static
        r0 = self.first_rank
        payload, slot = pack(x, flat_ids, pair_mask, table, replicas, counter, counts, S, C, A, r0)
        splits = [0] * self.first_rank + [C] * S  # rows to each rank (rank 0 too when it holds shard 0)
        results = self._exchange(layer, payload, splits, S * C, x.dtype, static=True)
        return results, slot  # pair p's output: results[slot[p]]
