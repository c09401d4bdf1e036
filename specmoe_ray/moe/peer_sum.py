"""Trunk replicas' per-layer sum folded into the next residual add + RMS norm, by peer loads
over NVLink instead of an NCCL all_reduce (opt-in, measured by benchmarks/allreduce.py (2)).

Each rank combines its share of a MoE layer (its pairs' outputs times their gate weights) into
its own float32 slot of a buffer that every rank maps (CUDA IPC), and the same kernel's last
program tells every peer that the slot is written (`PeerSum.combine_signal`; `signal` alone
after a kernel of the caller's); the next layer's add + norm (`PeerSum.sum_add_rms_norm`) waits
for the peers' signals, reads their slots and its own, sums them and rounds, adds and norms as
`fused.sum_add_rms_norm` does: two kernels where NCCL's path runs three (the combine, the
all_reduce, the norm).

The buffers are shared by CUDA IPC handles exchanged over the process group, not by
`torch.distributed._symmetric_memory`: its rendezvous names its store keys by a per-process
sequence number, so an engine that re-forms its group (a shard restarted, a second engine in
the process) waits for keys that the fresh peer never writes.

Signals are counters: each rank's signal pad holds one int32 per sender, the number of sums
that sender has signalled to it. A signal (`_signal_all`) adds 1 to its counter in every rank's pad
(system-scope release, after the slot's writes) and to the rank's own count of sums; the add +
norm waits (acquire) until every sender's counter reached that count. Counters only grow (and
compare by their wrapping difference), so nothing is taken back or reset and CUDA graphs replay
the same launches; one release per sum, not one per row. A wait longer than the group's
collective timeout traps (a peer hung mid-step): the CUDA context fails loudly, as NCCL's
watchdog takes a process down, instead of a step that never ends. A peer that died is reported
sooner by the group's watcher (its Ray actor's task fails), which sets the rank's stop flag
(`PeerSum.abort`): the waits end, the step's garbage is rolled back and replayed on a new group.

Slots: the caller gives consecutive sums different slots, the last sum of a forward and the first
of the next one too (`slot_order`). A rank then writes sum i + 1's slot only after its add + norm
saw every peer's signal of sum i, which each peer sends after its add + norm read sum i - 1's
slots, the last ones that used it; the first sum of a forward follows no wait, and its slot is
not the one the peers may still be reading (the last sum's).

Wait times (`WAIT_TIMES`, or the environment's SPECMOE_PEER_WAIT_TIMES=1 where the group's
`PeerSum` is made, e.g. `ShardOptions.env_vars`): each add + norm's first program adds the
nanoseconds it waited for the peers' signals, and 1, to two counters of its sum's position in
a forward (the caller's numbering), after the rank's pad in the memory every rank maps, so rank
0 reads every rank's (`PeerSum.wait_times`) with no call into the other processes: a rank that
waits while its peer does not is the faster one of the pair, at every sum or at a forward's
first (its start: the peer's header and launch).
"""

from __future__ import annotations

import os
import socket
from typing import Any

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPUs without Triton: NCCL (gloo) sums only
    AVAILABLE = False

import torch

from specmoe_ray.moe.triton_experts import pdl_launch

SLOTS = 3  # `slot_order`
# Programmatic dependent launch for the combine + signal and the sum + add + norm kernels too
# (`triton_experts.pdl_launch`: Hopper and later; off where `triton_experts.PDL` is): each
# launches while the kernel before it ends and waits for it first thing. Measured (H200 x 2,
# benchmarks/allreduce.py (2)): ~1 us less per layer at 1, 8 and 32 tokens.
PDL = True
# The combine + signal kernel's programs: each row's columns split into blocks (at least 256
# wide) until the launch has about this many programs (one per row at 32 rows used 32 of the
# GPU's SMs to read the pairs' outputs); 0: one program per row (session 13's kernel).
COMBINE_PROGRAMS = 128
# Each rank counts its sums' waits for the peers (the module docstring; opt-in: a benchmark's).
WAIT_TIMES = False
WAIT_TIMES_ENV = "SPECMOE_PEER_WAIT_TIMES"

if AVAILABLE:
    from specmoe_ray.moe.triton_experts import _grid_dependency

    @triton.jit
    def _thread_id():
        return tl.inline_asm_elementwise(
            "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
        )

    @triton.jit
    def _globaltimer():
        """The GPU's nanosecond clock (%globaltimer: the same time base in every SM)."""
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit
    def _signal(addrs):
        """Add 1 to each address's counter at system scope, released after this rank's writes."""
        tl.inline_asm_elementwise(
            "red.release.sys.global.add.u32 [$1], 1; mov.u32 $0, 0;",
            "=r, l",
            [addrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _wait(addrs, target, timeout_ns, stops):
        """Wait (acquire, system scope) until each address's counter reached target (by their
        wrapping difference). After 1 ms of waiting, each round also reads the stop flag (stops:
        its address, host memory that `PeerSum.abort` sets when a peer died): set, the wait ends
        as if seen (the caller's results are garbage; the engine replays the step on a new
        group). After timeout_ns nanoseconds (the group's collective timeout) a device trap: the
        process's CUDA context fails loudly instead of spinning forever."""
        tl.inline_asm_elementwise(
            """{
            .reg .u32 %seen, %stop;
            .reg .s32 %ahead;
            .reg .pred %done, %early, %quit, %late;
            .reg .u64 %t0, %t;
            mov.u64 %t0, %globaltimer;
            peer_sum_wait:
            ld.acquire.sys.global.u32 %seen, [$1];
            sub.s32 %ahead, %seen, $2;
            setp.ge.s32 %done, %ahead, 0;
            @%done bra peer_sum_seen;
            mov.u64 %t, %globaltimer;
            sub.u64 %t, %t, %t0;
            setp.lt.u64 %early, %t, 1000000;
            @%early bra peer_sum_wait;
            ld.relaxed.sys.global.u32 %stop, [$4];
            setp.ne.u32 %quit, %stop, 0;
            @%quit bra peer_sum_seen;
            setp.gt.u64 %late, %t, $3;
            @!%late bra peer_sum_wait;
            trap;
            peer_sum_seen:
            mov.u32 $0, %seen;
            }""",
            "=r, l, r, l, l",
            [addrs, target, timeout_ns, stops],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _signal_all(pads_ptr, count_ptr, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Counter RANK in every rank's pad (this one's too, so that a rank's add + norm waits on
        WORLD counters alike; pads_ptr: int64 [WORLD] addresses) += 1, and this rank's count of
        sums (count_ptr, int32 [1]) += 1."""
        ranks = tl.arange(0, WORLD)
        counters = tl.load(pads_ptr + ranks).to(tl.pointer_type(tl.int32)) + RANK
        if _thread_id() < WORLD:  # thread r holds rank r's counter; the others hold copies
            _signal(counters)
        tl.store(count_ptr, tl.load(count_ptr) + 1)

    @triton.jit
    def _signal_kernel(pads_ptr, count_ptr, RANK: tl.constexpr, WORLD: tl.constexpr):
        """One program: `_signal_all`."""
        _signal_all(pads_ptr, count_ptr, RANK, WORLD)

    @triton.jit
    def _combine_signal_kernel(
        y_ptr,  # [rows, A, D] the pairs' expert outputs (rows of pairs not computed here: any)
        w_ptr,  # [rows, A] gate weights
        keep_ptr,  # MASK 1: [E] bool, experts computed here; MASK 2: [rows, A] bool, pairs
        ids_ptr,  # MASK 1: [rows, A] int64 expert ids
        slot_ptr,  # [rows, D] float32 out: this rank's share
        pads_ptr,  # SIGNAL: int64 [WORLD] addresses of each rank's signal pad
        count_ptr,  # SIGNAL: int32 [1], this rank's sums signalled
        ticket_ptr,  # SIGNAL: int32 [1], programs done (0 between launches)
        rows,
        D,
        A: tl.constexpr,
        MASK: tl.constexpr,  # 0: every pair computed here (split experts); 1, 2: as keep_ptr
        RANK: tl.constexpr,
        WORLD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SIGNAL: tl.constexpr,  # False: the share only (Triton's interpreter runs no PTX)
        PDL: tl.constexpr = False,  # programmatic dependent launch (`PDL`, `pdl_launch`)
    ):
        """Row t (program (t, c): its columns c * BLOCK_D ..): `replica.partial_combine` (each
        pair's product with its gate weight rounded to y's dtype, the pairs not computed here
        dropped, the rest summed in float32 in top-k order) into the slot; SIGNAL: the last
        program to finish signals the peers (`_signal_all`) for the whole launch, so no signal
        kernel follows."""
        _grid_dependency(PDL)
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = cols < D
        total = tl.zeros((BLOCK_D,), tl.float32)
        for a in tl.static_range(A):
            w = tl.load(w_ptr + t * A + a).to(tl.float32)
            y = tl.load(y_ptr + (t * A + a) * D + cols, mask=ok, other=0.0)
            product = (y.to(tl.float32) * w).to(y.dtype).to(tl.float32)
            if MASK == 1:
                product = tl.where(tl.load(keep_ptr + tl.load(ids_ptr + t * A + a)) != 0, product, 0.0)
            elif MASK == 2:
                product = tl.where(tl.load(keep_ptr + t * A + a) != 0, product, 0.0)
            total += product
        tl.store(slot_ptr + t * D + cols, total, mask=ok)
        if SIGNAL:
            tl.debug_barrier()  # every thread's stores before the release below
            done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
            if done == rows * tl.num_programs(1) - 1:  # the last program: every row written
                tl.store(ticket_ptr, 0)  # for the next launch (graph replays too)
                _signal_all(pads_ptr, count_ptr, RANK, WORLD)

    @triton.jit
    def _sum_add_norm_kernel(
        slots_ptr,  # int64 [WORLD] addresses of each rank's slot (float32 [rows, D])
        pads_ptr,  # int64 [WORLD] addresses of each rank's signal pad (int32 counters)
        count_ptr,  # int32 [1]: this rank's sums signalled so far (the counters' target)
        res_ptr,  # [rows, D] residual (NORM)
        w_ptr,  # [D] norm weight (NORM)
        x_ptr,  # [rows, D] out: the rounded sum, plus the residual (NORM)
        out_ptr,  # [rows, D] out: x normed (NORM)
        D,
        eps,
        timeout_ns,  # the waits' limit (`_wait`)
        stop_addr,  # int64 address of the waits' stop flag (`_wait`, `PeerSum.abort`)
        waits_ptr,  # TIMED: int64 [2] of the sum's position: += ns program 0 waited, += 1
        RANK: tl.constexpr,
        WORLD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NORM: tl.constexpr,
        FLAGS: tl.constexpr = True,  # False: the slots are known written (Triton's interpreter)
        PDL: tl.constexpr = False,  # programmatic dependent launch (`PDL`, `pdl_launch`)
        TIMED: tl.constexpr = False,  # `WAIT_TIMES`
    ):
        """Row t: wait until every rank's counter in this rank's pad reached this rank's count,
        sum the WORLD slots' row t in rank order (every rank the same sum), round to x's dtype;
        NORM: add the residual and RMS-norm, as `fused.sum_add_rms_norm`."""
        _grid_dependency(PDL)  # (before the count: the kernel before may have signalled)
        t = tl.program_id(0)
        if FLAGS:
            counters = tl.load(pads_ptr + RANK).to(tl.pointer_type(tl.int32)) + tl.arange(0, WORLD)
            target = tl.load(count_ptr) + tl.zeros((WORLD,), tl.int32)
            if TIMED:
                began = _globaltimer()
            if _thread_id() < WORLD:
                stops = stop_addr.to(tl.pointer_type(tl.int32)) + tl.zeros((WORLD,), tl.int32)
                _wait(counters, target, timeout_ns.to(tl.int64), stops)
            tl.debug_barrier()  # every signal seen before any thread reads the peers' rows
            if TIMED:  # noqa: SIM102 (a constexpr: Triton compiles the branch in or out)
                if t == 0:  # (launches in stream order: plain adds)
                    tl.store(waits_ptr, tl.load(waits_ptr) + (_globaltimer() - began))
                    tl.store(waits_ptr + 1, tl.load(waits_ptr + 1) + 1)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        total = tl.zeros((BLOCK_D,), tl.float32)
        for r in tl.static_range(WORLD):
            # Slots are 16-byte aligned (`PeerSum`): vector loads. Past L1 (".cg"): the peers'
            # rows are read after the wait, never from lines an earlier read left.
            slot = tl.multiple_of(tl.load(slots_ptr + r).to(tl.pointer_type(tl.float32)), 16)
            total += tl.load(slot + t * D + cols, mask=ok, other=0.0, cache_modifier=".cg")
        dtype = x_ptr.dtype.element_ty
        x = total.to(dtype)
        if NORM:
            res = tl.load(res_ptr + t * D + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(x_ptr + t * D + cols, x, mask=ok)
        if NORM:
            xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
            normed = (xf * rstd).to(dtype)
            w = tl.load(w_ptr + cols, mask=ok, other=0.0)
            tl.store(out_ptr + t * D + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=ok)


def slot_order(sums: list[Any]) -> dict[Any, int]:
    """{sum: slot} for a forward's sums in the order it runs them (e.g. its MoE layers, or
    with split attention heads ("attention", layer) before each layer's MoE sum), once per
    forward: alternating 0, 1, and the last one 2 when their number is odd (the last and the
    next forward's first differ too). Fewer than 2 sums: {} (they cannot alternate; use NCCL)."""
    if len(sums) < 2:
        return {}
    order = {key: i % 2 for i, key in enumerate(sums)}
    if len(sums) % 2:
        order[sums[-1]] = 2
    return order


class PeerSumUnavailable(RuntimeError):
    """Peer sums cannot run in this group (every rank raises it alike): sum with NCCL instead."""


def unavailable(shares: list[tuple[str, Any, str | None]]) -> str | None:
    """Why a group cannot map each other's buffers, from every rank's (host, handle, error of
    making the handle), or None: every rank on one host, every handle made."""
    hosts = sorted({host for host, _, _ in shares})
    if len(hosts) > 1:
        return f"peer sums need every rank on one host; this group spans {', '.join(hosts)}"
    errors = [f"rank {r}: {error}" for r, (_, _, error) in enumerate(shares) if error]
    return "; ".join(errors) or None


def _device_arg(rebuild) -> int:
    """Where a `reduce_tensor` handle's args name the owner's device."""
    import inspect

    return list(inspect.signature(rebuild).parameters).index("storage_device")


def _open_here(rebuild, args: tuple, device: torch.device) -> torch.Tensor:
    """A peer's tensor from its `reduce_tensor` handle, opened with this GPU current: CUDA IPC
    (lazy peer access) maps it for this GPU's kernels. torch would open it on the owner's device
    (the one in args), where only that device's kernels reach it (illegal addresses here). The
    tensor then says it is on `device`: only its address is used. A GPU without peer access to
    the owner's (no NVLink nor PCIe peer path) raises: its kernels could not load from there."""
    at = _device_arg(rebuild)
    owner = int(args[at])
    if owner != device.index and not torch.cuda.can_device_access_peer(device.index, owner):
        raise RuntimeError(f"GPU {device.index} has no peer access to GPU {owner}")
    args = list(args)
    args[at] = device.index
    return rebuild(*args)


class PeerSum:
    """Slots and signal counters for one process group's per-layer sums of [rows, D] float32
    partials, rows <= max_rows, in memory every rank maps: each rank allocates its own and
    shares it by a CUDA IPC handle (`torch.multiprocessing`'s, exchanged over the group), so
    the peers' slots and pads are plain device addresses here. Every rank builds it at the same
    point (a collective); ranks on one host, every GPU visible in each process (the same device
    numbers)."""

    def __init__(
        self,
        max_rows: int,
        hidden: int,
        device: torch.device,
        group=None,
        timeout_s: float = 120.0,
        positions: int = 1,
    ):
        """group: the process group (None: the default one); timeout_s: a rank that waits
        longer than this for a peer's signal traps (its CUDA context fails; use the group's
        collective timeout); positions: the sums' positions in a forward whose waits are
        timed apart (`WAIT_TIMES`; the sums' `position` arguments: 0 .. positions - 1)."""
        import torch.distributed as dist
        from torch.multiprocessing.reductions import reduce_tensor

        # Every rank meets these alike (the same group, model and install): no agreement needed.
        if not AVAILABLE:
            raise PeerSumUnavailable("peer sums need Triton and CUDA GPUs")
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if self.world & (self.world - 1):
            raise PeerSumUnavailable(f"the group has {self.world} ranks; peer sums take a power of 2")
        if hidden % 4:
            raise PeerSumUnavailable(f"hidden size {hidden} is not a multiple of 4 (16-byte float32 rows)")
        self.max_rows, self.hidden, self.timeout_s = max_rows, hidden, timeout_s
        # One allocation: SLOTS float32 slots, then this rank's pad (an int32 counter per sender),
        # then its wait times (int64 nanoseconds and sums per position; `WAIT_TIMES`).
        slot_bytes = SLOTS * max_rows * hidden * 4
        self.positions = positions
        raw = torch.zeros(slot_bytes + 4 * self.world + 16 * positions, dtype=torch.uint8, device=device)
        self.buffer = raw[:slot_bytes].view(torch.float32).view(SLOTS, max_rows, hidden)
        # Both steps below agree over the group before any rank gives up, so that every rank
        # raises `PeerSumUnavailable` alike (the caller then sums with NCCL) instead of one rank
        # failing while the others wait for it in a collective.
        try:
            mine = (socket.gethostname(), reduce_tensor(raw), None)
        except Exception as e:  # e.g. an allocator whose memory CUDA IPC cannot share
            mine = (socket.gethostname(), None, f"{type(e).__name__}: {e}")
        with torch.cuda.device(device):  # the group's collectives on this rank's GPU
            shares = [None] * self.world
            dist.all_gather_object(shares, mine, group=group)
            why = unavailable(shares)
            if why:
                raise PeerSumUnavailable(why)
            # The peers' allocations mapped here (CUDA IPC); kept while this object lives.
            try:
                self._mapped = [
                    raw if r == self.rank else _open_here(*h, raw.device)
                    for r, (_, h, _) in enumerate(shares)
                ]
                failed = ""
            except Exception as e:  # e.g. a peer's GPU not visible in this process
                self._mapped = []
                failed = f"rank {self.rank} cannot map its peers' memory: {type(e).__name__}: {e}"
            reasons = [None] * self.world
            dist.all_gather_object(reasons, failed, group=group)
            if any(reasons):
                self._mapped = []
                raise PeerSumUnavailable("; ".join(r for r in reasons if r))
        bases = torch.tensor([m.data_ptr() for m in self._mapped], dtype=torch.int64, device=device)
        self.pads = bases + slot_bytes
        # Every rank's wait times as this rank maps them (int64 [positions, 2] each); this rank's
        # own kernels add to them where `WAIT_TIMES` (or its environment variable) says so.
        times = slot_bytes + 4 * self.world
        self._waits = [
            m[times : times + 16 * positions].view(torch.int64).view(positions, 2) for m in self._mapped
        ]
        self.timed = WAIT_TIMES or os.environ.get(WAIT_TIMES_ENV, "") == "1"
        step = max_rows * hidden * 4  # bytes per slot
        self.slot_ptrs = [bases + i * step for i in range(SLOTS)]  # int64 [world] addresses each
        self.count = torch.zeros(1, dtype=torch.int32, device=device)  # sums signalled (`signal`)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)  # `combine_signal`'s programs
        # The waits' stop flag (`abort`): pinned host memory, which kernels read at its host
        # address (unified addressing) and a host thread sets with a plain store.
        self.stop = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's pad (zeroed) mapped before any counter moves

    def wait_times(self) -> list[list[tuple[int, float]]] | None:
        """Every rank's (sums, microseconds waited for the peers' signals) so far at each
        position, read from here (their memory is mapped) -> [rank][position]; None where this
        rank does not time them (`WAIT_TIMES`). Synchronizes this GPU: call it between steps."""
        if not self.timed:
            return None
        torch.cuda.synchronize(self.pads.device)
        return [[(sums, ns / 1e3) for ns, sums in waits.tolist()] for waits in self._waits]

    def abort(self) -> None:
        """End this rank's waits for its peers, now and from now on (a peer died: the group's
        watcher, `ShardGroup._heartbeat_loop`): its sums return garbage instead of trapping
        after the timeout. No CUDA call: safe from another thread while kernels wait. (The flag
        may have been made under inference mode, the engine's; this thread is not in it.)"""
        with torch.inference_mode():
            self.stop[0] = 1

    def slot(self, index: int, rows: int) -> torch.Tensor:
        """This rank's slot `index` (`slot_order`): write a partial sum [rows, hidden] into it."""
        return self.buffer[index, :rows]

    def signal(self) -> None:
        """Tell every peer that this rank's slot holds its share (after the kernel that wrote it)."""
        _signal_kernel[(1,)](self.pads, self.count, RANK=self.rank, WORLD=self.world, num_warps=1)

    def combine_signal(
        self,
        index: int,
        y: torch.Tensor,
        weights: torch.Tensor,
        keep: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`replica.partial_combine` into slot `index`, and `signal`, in one kernel: y [rows, A, D]
        the pairs' outputs, weights [rows, A]; keep None (every pair computed here), [E] bool
        with ids [rows, A] (experts computed here), or [rows, A] bool. -> the slot's rows."""
        out = self.slot(index, y.shape[0])
        launch_combine(y, weights, keep, ids, out, self, True)
        return out

    def sum_add_rms_norm(
        self, index: int, residual: torch.Tensor, weight: torch.Tensor, eps: float, position: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused.sum_add_rms_norm` of every rank's slot `index`: -> (normed, residual + sum).
        Waits for the peers' signals of this sum: call it (or `sum`) after each `signal`.
        position: the sum's in a forward (its wait times' counters)."""
        x, out = torch.empty_like(residual), torch.empty_like(residual)
        self._launch(index, residual, weight, x, out, eps, True, position)
        return out, x

    def sum(self, index: int, like: torch.Tensor, position: int = 0) -> torch.Tensor:
        """Every rank's slot `index` summed, in like's dtype ([rows, hidden]; waits as above)."""
        x = torch.empty_like(like)
        self._launch(index, x, x, x, x, 0.0, False, position)
        return x

    def _launch(self, index: int, residual, weight, x, out, eps: float, norm: bool, position: int) -> None:
        if not 0 <= position < self.positions:
            raise ValueError(f"PeerSum: sum position {position} outside 0 .. {self.positions - 1}")
        launch_sum(
            self.slot_ptrs[index],
            self.pads,
            self.count,
            self.rank,
            residual,
            weight,
            x,
            out,
            eps,
            norm,
            True,
            self.timeout_s,
            self.stop.data_ptr(),
            self._waits[self.rank][position] if self.timed else None,
        )


def launch_sum(
    slot_ptrs: torch.Tensor,
    pads: torch.Tensor,
    count: torch.Tensor,
    rank: int,
    residual: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    norm: bool,
    flags: bool = True,
    timeout_s: float = 120.0,
    stop_addr: int = 0,
    waits: torch.Tensor | None = None,
) -> None:
    """The sum (+ add + norm) kernel over x's rows: slot_ptrs / pads int64 [world] addresses,
    count int32 [1] the signals' target (`PeerSum.count`); writes x (and out when norm). flags
    False: no waiting (the slots are known written); timeout_s: a wait longer than this traps
    (`_wait`); stop_addr: the waits' stop flag (`PeerSum.stop`; needed with flags); waits: int64
    [2] counters of the waits' nanoseconds and number (`WAIT_TIMES`; with flags) or None."""
    if flags and not stop_addr:
        raise ValueError("launch_sum: waits need a stop flag's address (PeerSum.stop)")
    rows, D = x.shape
    _sum_add_norm_kernel[(rows,)](
        slot_ptrs,
        pads,
        count,
        residual,
        weight,
        x,
        out,
        D,
        eps,
        int(timeout_s * 1e9),
        stop_addr,
        waits if waits is not None else count,
        RANK=rank,
        WORLD=slot_ptrs.shape[0],
        BLOCK_D=triton.next_power_of_2(D),
        NORM=norm,
        FLAGS=flags,
        TIMED=waits is not None and flags,
        num_warps=8,
        **(pdl_launch(x.device) if PDL else {}),
    )


def launch_combine(
    y: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor | None,
    ids: torch.Tensor | None,
    out: torch.Tensor,
    peer: PeerSum | None = None,
    signal: bool = True,
) -> None:
    """The combine (+ signal) kernel over y's rows into out (float32 [rows, D]); keep / ids as
    `PeerSum.combine_signal`. signal False (or no peer): the share only."""
    rows, A, D = y.shape
    if rows == 0:
        return
    y, weights = y.contiguous(), weights.contiguous()
    keep, ids = (None if v is None else v.contiguous() for v in (keep, ids))
    mask = 0 if keep is None else (1 if ids is not None else 2)
    signal = signal and peer is not None
    none = out  # an unread pointer for the absent arguments
    block_d = combine_block(rows, D)
    _combine_signal_kernel[(rows, triton.cdiv(D, block_d))](
        y,
        weights,
        none if keep is None else keep,
        none if ids is None else ids,
        out,
        peer.pads if signal else none,
        peer.count if signal else none,
        peer.ticket if signal else none,
        rows,
        D,
        A=A,
        MASK=mask,
        RANK=peer.rank if signal else 0,
        WORLD=peer.world if signal else 1,
        BLOCK_D=block_d,
        SIGNAL=signal,
        num_warps=8 if block_d >= 2048 else 4,
        **(pdl_launch(y.device) if PDL else {}),
    )


def combine_block(rows: int, hidden: int) -> int:
    """The combine kernel's columns per program (`COMBINE_PROGRAMS`): a power of 2, at least
    256 (or the whole row), halved while rows x blocks stays within COMBINE_PROGRAMS."""
    block = triton.next_power_of_2(hidden)
    while COMBINE_PROGRAMS and block > 256 and rows * triton.cdiv(hidden, block // 2) <= COMBINE_PROGRAMS:
        block //= 2
    return block
