"""Trunk replicas: every rank runs the dense trunk, each computes its own experts' share.

`ShardOptions.replicate_trunk`. In the coordinator layout (`dispatch.py`) rank 0 alone runs the
trunk (attention, norms, router) while the shards wait, then every MoE layer sends the routed
rows out and back (two all_to_alls, a pack and a gather on rank 0's critical path). With trunk
replicas, rank r holds the whole trunk, a KV cache of its own and the plan's shard r (rank 0,
the engine, shard 0), and runs every forward the engine runs, on the same inputs:

    broadcast  header [op, N, B, P, kv_len, max_new, flags, 0]   rank 0 -> all
    broadcast  the forward's index tensors (`pack_batch`: tokens, positions, slots, ...)
    per MoE layer, on every rank: the same routing of the same tokens; the pairs whose expert
    this rank owns, computed, weighed by their gates and summed in float32 -> [T, D];
    all_reduce(SUM) of those partial sums: the layer's combined output, on every rank.

One collective per MoE layer instead of two, nothing to pack, and no rank idles while rank 0
runs the trunk: the trunk is computed S times, but it is latency-bound (it costs about the same
at any batch size), while the experts' bytes split S ways.

Results: each gate-weighted product is rounded to the model's dtype as in `fused.combine` and
the products are summed in float32, as `combine` sums them; the all_reduce only re-associates
that float32 sum, and the sum is rounded to the model's dtype before the residual add (inside
the next layer's add + norm in static steps: a `fused.Pending` without weights). One process's
static steps defer the combine into the next add + norm without that rounding
(`fused.DEFER_COMBINE`), so in bf16 greedy tokens can part from the one-GPU engine's after many
steps; `exact` (`ShardOptions.replica_exact`) sums the pairs' outputs instead and combines as one
process does, bit for bit. A replicated expert's pairs go to one replica each (by token position
and a per-forward rotation every rank advances alike), so every pair is computed exactly once.

`split` (`ShardOptions.replica_split = "intermediate"`): no ownership; rank r holds slice r of
every expert's intermediate size, so every rank computes every pair's partial output (its
slice's contribution to the down projection), and the same all_reduce sums the slices. Every
rank then reads the same bytes whatever the routing (with whole experts, each layer's sum waits
for the rank whose experts the tokens picked more), and one token's pairs keep their launches.
Every rank must route alike, so every rank runs the same kernels on the same inputs: the header
carries whether rank 0 runs the forward fused (`fused.active`), padded and captured, and the
kernels' module switches (`fused`, `triton_kernels`, `triton_experts`) must be the same in every
process (their defaults).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
import torch.distributed as dist

from specmoe_ray.models import fused
from specmoe_ray.models.transformer import ForwardBatch, Transformer
from specmoe_ray.moe.dispatch import OP_PING, OP_STOP, ExpertLoad, Rank0, _Masked
from specmoe_ray.moe.experts import ExpertStore
from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.moe.shard_loop import capture_graph, serve_loop

log = logging.getLogger(__name__)

OP_FORWARD = 4
HEADER = 8  # [op, N, B, P, kv_len, max_new, flags, 0]
PADDED, FUSED, CAPTURE = 1, 2, 4  # header flags


def pack_batch(batch: ForwardBatch) -> torch.Tensor:
    """The index tensors a replica needs to run `batch` ([4 N + B + 2 P] int64; logits_index
    stays behind: replicas compute no logits)."""
    parts = (batch.tokens, batch.positions, batch.write_slots, batch.unpad_index, batch.read_slots)
    return torch.cat([*parts, batch.pad_index, batch.query_positions.reshape(-1)])


def unpack_batch(payload: torch.Tensor, key: tuple[int, ...]) -> ForwardBatch:
    """`pack_batch`'s inverse (views of payload) for the header's (N, B, P, kv_len, max_new, flags)."""
    N, B, P, kv_len, max_new, flags = key
    tokens, positions, write_slots, unpad, read_slots, pad, query = payload.split([N, N, N, N, B, P, P])
    return ForwardBatch(
        tokens=tokens,
        positions=positions,
        write_slots=write_slots,
        read_slots=read_slots,
        pad_index=pad,
        unpad_index=unpad,
        query_positions=query.view(B, max_new),
        kv_len=kv_len,
        max_new=max_new,
        logits_index=payload[:0],
        padded=bool(flags & PADDED),
    )


@fused.fused
def owned_rows(y: torch.Tensor, held: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """y [T, A, D] expert outputs, rows not computed here unspecified -> those rows zeroed. The
    pairs computed here: held[index] (held [E] bool per expert, index [T, A] expert ids: the
    lookup runs inside the same kernel), or held itself ([T, A] bool) with index None."""
    if held is None:  # every pair computed here (`split`)
        return y
    own = held[index] if index is not None else held
    return torch.where(own[..., None], y, 0)


@fused.fused
def partial_combine(
    y: torch.Tensor, weights: torch.Tensor, held: torch.Tensor, index: torch.Tensor | None, like: torch.Tensor
):
    """y [T, A, D] expert outputs, weights [T, A], held / index as `owned_rows` -> [T, D]
    float32: the pairs computed here, each product rounded to like's dtype as `fused.combine`
    rounds it, summed."""
    products = (y * weights[..., None]).to(like.dtype)
    return owned_rows.__wrapped__(products, held, index).float().sum(1)


def mm_float32_supported(device: torch.device) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` runs for bf16 inputs here (CUDA's
    cuBLAS in recent torch; not CPUs): a probe, once, before any graph capture."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 8, dtype=torch.bfloat16, device=device)
        out = torch.empty(2, 2, dtype=torch.float32, device=device)
        torch.mm(a, a[:2].t(), out_dtype=torch.float32, out=out)
        return bool(out[0, 0].item() == 8.0)
    except Exception:  # (older torch, no such kernel here)
        return False


class ReplicaDispatch(_Masked, Rank0):
    """One rank's MoE layers in a group of trunk replicas (rank r holds the plan's shard r), and
    on rank 0 the control of the group (`replica_step`, `ping`, `stop`).

    exact: all_reduce the pairs' unweighted outputs `[T, A, D]` in the model's dtype instead
    (each row is nonzero on one rank only, so the sum is exact) and leave the combine to the
    MoE block, as one process does: results bit for bit those of the engine with every expert
    in-process, for 2 A / 4 times the bytes per all_reduce (`ShardOptions.replica_exact`).

    split: the store holds every expert, slice `rank` of its intermediate size
    (`ShardOptions.replica_split = "intermediate"`, `load_experts(part=)`): every rank computes
    every pair's share (the plan's ownership does not apply) and the all_reduce sums the shares.

    peer_rows: static steps (inside `fused.active()`, on GPUs) of up to this many tokens sum the
    ranks' shares through memory every rank maps instead (`moe/peer_sum.py`: each rank's share written
    into its slot, the sum done by the next layer's add + norm reading the peers' slots;
    `ShardOptions.replica_peer_sum`); 0: NCCL's all_reduce always. Not with exact.
    peer_by_default: peer_rows is the options' default, not asked for: where peer sums cannot
    run, say so at INFO rather than as a warning."""

    def __init__(
        self,
        plan: PlacementPlan,
        store: ExpertStore,
        rank: int,
        device: torch.device | str,
        exact: bool = False,
        split: bool = False,
        peer_rows: int = 0,
        peer_by_default: bool = False,
        attention_layers: list[int] | None = None,
    ):
        if split and exact:
            raise ValueError(
                "ReplicaDispatch: a split of every expert sums partial outputs: it cannot be exact"
            )
        if peer_rows and exact:
            raise ValueError("ReplicaDispatch: peer sums add partial sums: not with exact")
        self.exact, self.split = exact, split
        self._slots: dict[int, int] = {}  # {MoE layer: PeerSum slot}
        self._positions: dict = {}  # {MoE layer (or ("attention", layer)): its sum's position}
        # Split attention heads (`attention_layers`: every layer, `Transformer.split_attention`):
        # each layer's attention output is summed too, before its MoE layer's (`sum_heads`).
        self.attention_layers = list(attention_layers or [])
        if peer_rows:
            from specmoe_ray.moe.peer_sum import slot_order

            moe = set(plan.owner)
            if self.attention_layers:
                sums = [
                    k
                    for layer in self.attention_layers
                    for k in [("attention", layer)] + [layer] * (layer in moe)
                ]
            else:
                sums = sorted(moe)
            self._slots = slot_order(sums)
            self._positions = {key: i for i, key in enumerate(sums)}  # (the sums' wait times)
            peer_rows = peer_rows if self._slots else 0  # one MoE layer: NCCL (`slot_order`)
        self.peer_rows = peer_rows
        self.peer_by_default = peer_by_default
        self._mm_float32 = bool(self.attention_layers) and mm_float32_supported(torch.device(device))
        self.peer = None  # the `PeerSum`, made by the first static step that uses it
        self.peer_timeout_s = 120.0  # its waits' limit: the group's collective timeout (set by the owner)
        self.combines = not exact  # takes the gate weights, returns the combined [T, D]
        self.plan = plan
        self.local = store
        self.rank = rank
        self.world_size = plan.num_shards
        self.device = torch.device(device)
        store.count = False  # pairs computed are counted by `load` (rank 0) instead
        self.load = ExpertLoad(plan.num_experts, self.device)
        self.num_pairs = 0
        # Per layer: held[e] (bool [E]) where every expert has one owner; else owner_table
        # [E, R] and num_replicas [E], as DistributedDispatch's (ranks = shards here).
        self._held: dict[int, torch.Tensor] = {}
        self._owners: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, row in plan.owner.items():
            if split:
                continue  # no ownership: every pair is computed on every rank (its share)
            if all(len(shards) == 1 for shards in row):
                held = torch.tensor([shards[0] == rank for shards in row], device=self.device)
                self._held[layer] = held
            else:
                R = max(len(shards) for shards in row)
                table = [list(shards) + [shards[0]] * (R - len(shards)) for shards in row]
                self._owners[layer] = (
                    torch.tensor(table, dtype=torch.long, device=self.device),
                    torch.tensor([len(s) for s in row], dtype=torch.long, device=self.device),
                )
        self._rotation = torch.zeros((), dtype=torch.long, device=self.device)  # forwards so far
        self._headers: dict[tuple[int, ...], torch.Tensor] = {}
        self.lock = threading.Lock()
        self.last_exchange = time.monotonic()
        self._ping, self._stop = self._header(OP_PING), self._header(OP_STOP)

    def _header(self, op: int, key: tuple[int, ...] = ()) -> torch.Tensor:
        values = [op, *key] + [0] * (HEADER - 1 - len(key))
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _owned(self, layer: int, ids: torch.Tensor, top_k: int) -> torch.Tensor:
        """[n] bool: pair p (expert ids[p]) is computed on this rank."""
        held = self._held.get(layer)
        if held is not None:
            return held[ids]
        table, replicas = self._owners[layer]
        position = torch.arange(ids.shape[0], device=ids.device) // top_k + self._rotation
        return table[ids, position % replicas[ids]] == self.rank

    def __call__(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        counted: bool = False,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> the layer's combined expert output, the same on every rank: a `fused.Pending` of
        its float32 sum [T, D]; `exact`: [T, A, D] the pairs' outputs."""
        if (weights is None) != self.exact:
            raise TypeError("ReplicaDispatch takes the gate weights unless exact, and only then")
        T, A = expert_ids.shape
        flat = expert_ids.reshape(-1)
        self.num_pairs += T * A
        if not counted:
            self.load.record(layer, flat, self.pair_mask(A))
        peer = self._peer_sum(x)
        if str(layer) not in self.local.by_layer:  # no expert of this layer here: every rank
            shape = (T, A, x.shape[-1]) if self.exact else (T, x.shape[-1])  # still joins the sum
            if peer is not None:
                total = peer.slot(self._slots[layer], T).zero_()
                peer.signal()
            else:
                total = torch.zeros(shape, dtype=x.dtype if self.exact else torch.float32, device=x.device)
        else:
            # split: every pair, this rank's share of it. Experts of one owner each: the kernels
            # skip the pairs of experts held elsewhere (ownership looked up inside the combine).
            held = self._held.get(layer)
            if self.split or held is not None:
                y = self.local(layer, x, flat, group=A).view(T, A, -1)
                own, index = (None, None) if self.split else (held, expert_ids)
            else:
                own = self._owned(layer, flat, A)
                y = self.local(layer, x, torch.where(own, flat, -1), group=A).view(T, A, -1)
                own, index = own.view(T, A), None
            if self.exact:
                total = owned_rows(y, own, index)
            elif peer is not None:  # the share into the slot and the peers told, one kernel
                total = peer.combine_signal(self._slots[layer], y, weights, own, index)
            else:
                total = partial_combine(y, weights, own, index, x)
        if peer is not None:  # signalled: the peers read this share where the output is used
            return fused.Pending(total, None, x, (peer, self._slots[layer], self._positions[layer]))
        dist.all_reduce(total)
        # The float32 sum is rounded to x's dtype by the next add + norm (or by the MoE block).
        return total if self.exact else fused.Pending(total, None, x)

    def sum_heads(self, layer: int, out: torch.Tensor, weight: torch.Tensor):
        """Split attention heads (`Attention.head_sum`): this rank's heads' attention output
        [T, h * hd] and o_proj's columns for them [D, h * hd] -> o_proj's output summed over the
        ranks, as a `fused.Pending` the layer's next add + norm takes (in float32, rounded there,
        as the MoE sums): peer loads in graphed steps (`_peer_sum`; the float32 share written
        into this rank's slot by the matmul itself where cuBLAS can, `_mm_float32`), else NCCL's
        (gloo's) all_reduce. Every rank calls it alike."""
        T, D = out.shape[0], weight.shape[0]
        like = out.new_empty((T, D))  # the summed output's shape and dtype
        peer = self._peer_sum(out, D)
        key = ("attention", layer)
        if peer is not None and key in self._slots:
            share = self._project(out, weight, peer.slot(self._slots[key], T))
            peer.signal()
            return fused.Pending(share, None, like, (peer, self._slots[key], self._positions[key]))
        total = self._project(out, weight)
        dist.all_reduce(total)
        return fused.Pending(total, None, like)

    def _project(
        self, x: torch.Tensor, weight: torch.Tensor, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x @ weight^T in float32 (into `into` if given): bf16 / fp16 on GPUs by one cuBLAS
        call with float32 output (`_mm_float32`: no rounded copy, no cast kernel), else the
        model-dtype product, cast."""
        if self._mm_float32 and x.dtype in (torch.bfloat16, torch.float16):
            return torch.mm(
                x, weight.t(), out_dtype=torch.float32, **({"out": into} if into is not None else {})
            )
        y = fused.linear(x, weight)
        if into is not None:
            return into.copy_(y)
        return y if y.dtype == torch.float32 else y.float()

    def _peer_sum(self, x: torch.Tensor, hidden: int | None = None):
        """The `PeerSum` for this forward's sums, or None (NCCL): every rank decides alike (the
        same tokens, the same static or eager step)."""
        if not (self.peer_rows and x.is_cuda and fused.is_active() and x.shape[0] <= self.peer_rows):
            return None
        if self.peer is None:  # collective: every rank reaches its first peer sum together
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("ReplicaDispatch: the first peer sum must run before a graph capture")
            from specmoe_ray.moe.peer_sum import PeerSum, PeerSumUnavailable

            try:
                width = hidden or x.shape[-1]
                self.peer = PeerSum(
                    self.peer_rows, width, x.device, None, self.peer_timeout_s, len(self._positions)
                )
            except PeerSumUnavailable as e:  # every rank alike: NCCL's sums from now on
                level = logging.INFO if self.peer_by_default else logging.WARNING
                log.log(level, "replica_peer_sum is off, summing with NCCL: %s", e)
                self.peer_rows = 0
                return None
        return self.peer

    @property
    def tokens_per_shard(self) -> list[int]:
        """(token, expert) pairs computed by each shard, cumulative (from the load counters)."""
        load = self.load.snapshot()
        if self.split:  # every rank computes (a share of) every pair
            return [round(sum(sum(row) for row in load.values()))] * self.world_size
        zeros = [0] * self.plan.num_experts  # layers not routed yet (a new group)
        return [round(t) for t in self.plan.shard_loads({k: load.get(k, zeros) for k in self.plan.owner})]

    def begin_forward(self) -> None:
        """Every rank, at the start of each forward: the replicas' rotation advances alike."""
        self._rotation.add_(1)

    @contextlib.contextmanager
    def replica_step(self, batch: ForwardBatch, capture: bool = False):
        """Rank 0: within this block the model runs `batch`; the replicas run it too. capture:
        rank 0 captures it in a CUDA graph (the replicas then capture theirs)."""
        N, B, P = batch.tokens.shape[0], batch.read_slots.shape[0], batch.pad_index.shape[0]
        flags = PADDED if batch.padded else 0
        flags |= (FUSED if fused.is_active() else 0) | (CAPTURE if capture else 0)
        key = (N, B, P, batch.kv_len, batch.max_new, flags)
        header = self._headers.get(key)
        if header is None:  # made outside any capture (a warm-up runs the same shape first)
            header = self._headers[key] = self._header(OP_FORWARD, key)
        payload = pack_batch(batch)
        with self.lock:
            dist.broadcast(header, src=0)
            dist.broadcast(payload, src=0)
            self.begin_forward()
            try:
                yield
            finally:
                self.last_exchange = time.monotonic()


def serve_replica(
    model: Transformer,
    cache,
    dispatch: ReplicaDispatch,
    device,
    capture: bool = False,
    control: dict | None = None,
) -> int:
    """A trunk replica's loop: run rank 0's forwards (`forward_layers`, no logits) until OP_STOP.
    capture (CUDA): a forward rank 0 captures is captured here too, per header, after serving
    its first one eagerly, and replayed after. Returns the number of forwards served."""
    device = torch.device(device)
    header = torch.empty(HEADER, dtype=torch.long, device=device)
    graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}
    pool = torch.cuda.graph_pool_handle() if capture and device.type == "cuda" else None

    def forward(key: tuple[int, ...]) -> None:
        N, B, P = key[:3]
        payload = torch.empty(4 * N + B + 2 * P, dtype=torch.long, device=device)
        dist.broadcast(payload, src=0)
        batch = unpack_batch(payload, key)
        dispatch.begin_forward()
        with fused.active() if key[-1] & FUSED else contextlib.nullcontext():
            model.forward_layers(batch, cache)

    def handle(op: int, arg: int, rest: list[int]) -> None:
        if op != OP_FORWARD:
            raise RuntimeError(f"trunk replica: unknown op {op}")
        key = (arg, *rest[:5])
        if key in graphs:
            graphs[key].replay()
            return
        forward(key)  # serves this forward (and warms its graph up)
        if pool is not None and key[-1] & CAPTURE:
            graphs[key] = capture_graph(lambda: forward(key), device, pool)

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return serve_loop(header, device, handle, graphs.clear, control)
