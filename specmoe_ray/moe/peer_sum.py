"""Trunk replicas' per-layer sum folded into the next residual add + RMS norm, by peer loads
over NVLink instead of an NCCL all_reduce (opt-in, measured by benchmarks/allreduce.py (2)).

Each rank writes its float32 partial sum of a MoE layer into its own slot of a symmetric buffer
(`torch.distributed._symmetric_memory`, mapped into every rank's address space), then
`PeerSum.signal` tells every peer, row by row, that the slot is written; the next layer's
add + norm (`PeerSum.sum_add_rms_norm`) waits for the peers' signals of its row, reads their
slots and its own, sums them and rounds, adds and norms as `fused.sum_add_rms_norm` does: one
small kernel and the norm's own instead of NCCL's all_reduce kernel and the norm.

Signals are per (row, sender) flags in each rank's signal pad: a sender sets its flag 0 -> 1
(waiting while the receiver has not taken the last one), the receiver takes it 1 -> 0. The flags
return to 0 by themselves, so CUDA graphs replay the same launches. A wait longer than the group's
collective timeout traps (a peer died mid-step): the CUDA context fails loudly, as NCCL's
watchdog takes a process down, instead of a step that never ends.

Slots: the caller gives consecutive sums different slots, the last sum of a forward and the first
of the next one too (`slot_order`). A rank then writes sum i + 1's slot only after its add + norm
took every peer's signal of sum i, which each peer sends after it read sum i - 1's slots, the
last ones that used it; the first sum of a forward follows no wait, and its slot is not the one
the peers may still be reading (the last sum's).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPUs without Triton: NCCL (gloo) sums only
    AVAILABLE = False

import torch

SLOTS = 3  # `slot_order`

if AVAILABLE:

    @triton.jit
    def _thread_id():
        return tl.inline_asm_elementwise(
            "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
        )

    def _cas_loop(sem: str, old: int, new: int, label: str) -> tl.constexpr:
        """PTX: compare-and-swap a flag old -> new at system scope (`sem`: release or acquire),
        retried until it was `old`; after $2 nanoseconds (the group's collective timeout) a
        device trap: the process's CUDA context fails loudly instead of spinning forever."""
        return tl.constexpr(
            f"""{{
            .reg .u32 %prev;
            .reg .pred %done, %late;
            .reg .u64 %t0, %t;
            mov.u64 %t0, %globaltimer;
            {label}:
            atom.global.{sem}.sys.cas.b32 %prev, [$1], {old}, {new};
            setp.eq.u32 %done, %prev, {old};
            @%done bra {label}_done;
            mov.u64 %t, %globaltimer;
            sub.u64 %t, %t, %t0;
            setp.gt.u64 %late, %t, $2;
            @!%late bra {label};
            trap;
            {label}_done:
            mov.u32 $0, %prev;
            }}"""
        )

    # Set a flag 0 -> 1 (release: the slot's writes come first), waiting while the receiver still
    # holds the last one; take it 1 -> 0 (acquire), waiting for it.
    _SEND = _cas_loop("release", 0, 1, "peer_sum_send")
    _TAKE = _cas_loop("acquire", 1, 0, "peer_sum_take")

    @triton.jit
    def _cas(addrs, timeout_ns, ASM: tl.constexpr):
        tl.inline_asm_elementwise(ASM, "=r, l, l", [addrs, timeout_ns], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _signal_kernel(pads_ptr, timeout_ns, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Program t: flag (t, RANK) in every rank's pad, this one's too (pads_ptr: int64
        [WORLD] addresses), so that a rank's add + norm waits on WORLD flags alike."""
        t = tl.program_id(0)
        ranks = tl.arange(0, WORLD)
        flags = tl.load(pads_ptr + ranks).to(tl.pointer_type(tl.int32)) + t * WORLD + RANK
        if _thread_id() < WORLD:  # thread r holds rank r's flag; the others hold copies
            _cas(flags, timeout_ns.to(tl.int64), _SEND)

    @triton.jit
    def _sum_add_norm_kernel(
        slots_ptr,  # int64 [WORLD] addresses of each rank's slot (float32 [rows, D])
        pads_ptr,  # int64 [WORLD] addresses of each rank's signal pad (int32 flags)
        res_ptr,  # [rows, D] residual (NORM)
        w_ptr,  # [D] norm weight (NORM)
        x_ptr,  # [rows, D] out: the rounded sum, plus the residual (NORM)
        out_ptr,  # [rows, D] out: x normed (NORM)
        D,
        eps,
        timeout_ns,  # the waits' limit (`_cas_loop`)
        RANK: tl.constexpr,
        WORLD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NORM: tl.constexpr,
        FLAGS: tl.constexpr = True,  # False: the slots are known written (Triton's interpreter)
    ):
        """Row t: wait for every rank's flag (t, r), sum the WORLD slots' row t in rank order
        (every rank the same sum), round to x's dtype; NORM: add the residual and RMS-norm, as
        `fused.sum_add_rms_norm`."""
        t = tl.program_id(0)
        flags = tl.load(pads_ptr + RANK).to(tl.pointer_type(tl.int32)) + t * WORLD + tl.arange(0, WORLD)
        if FLAGS:
            if _thread_id() < WORLD:
                _cas(flags, timeout_ns.to(tl.int64), _TAKE)
            tl.debug_barrier()  # the flags taken before any thread reads the peers' rows
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        total = tl.zeros((BLOCK_D,), tl.float32)
        for r in tl.static_range(WORLD):
            slot = tl.load(slots_ptr + r).to(tl.pointer_type(tl.float32))
            total += tl.load(slot + t * D + cols, mask=ok, other=0.0, volatile=True)
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


def slot_order(layers: list[int]) -> dict[int, int]:
    """{layer: slot} for the sums of these layers, in order, once per forward: alternating
    0, 1, and the last one 2 when their number is odd (the last and the next forward's first
    differ too). Fewer than 2 layers: {} (their sum cannot alternate; use NCCL)."""
    if len(layers) < 2:
        return {}
    order = {layer: i % 2 for i, layer in enumerate(sorted(layers))}
    if len(layers) % 2:
        order[max(layers)] = 2
    return order


def pad_rows(world: int) -> int:
    """The most rows a `PeerSum` of `world` ranks can flag: each rank's signal pad holds one
    int32 flag per (row, rank)."""
    import torch.distributed._symmetric_memory as symm_mem

    pad_bytes = symm_mem.get_signal_pad_size() if hasattr(symm_mem, "get_signal_pad_size") else 2048
    return pad_bytes // (4 * world)


class PeerSum:
    """Symmetric slots and signal pads for one process group's per-layer sums of [rows, D]
    float32 partials, rows <= max_rows. Every rank builds it at the same point (a collective)."""

    def __init__(
        self, max_rows: int, hidden: int, device: torch.device, group_name: str, timeout_s: float = 120.0
    ):
        """timeout_s: a rank that waits longer than this for a peer's flag traps (its CUDA
        context fails; use the group's collective timeout)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        if not AVAILABLE:
            raise RuntimeError("PeerSum needs Triton and CUDA GPUs")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world & (self.world - 1):
            raise ValueError(f"PeerSum: the group has {self.world} ranks; it takes a power of 2")
        if max_rows > pad_rows(self.world):
            raise ValueError(
                f"PeerSum: {max_rows} rows x {self.world} ranks of flags do not fit the signal pad "
                f"(at most {pad_rows(self.world)} rows)"
            )
        self.max_rows, self.hidden, self.timeout_s = max_rows, hidden, timeout_s
        # Plain peer mappings are all this needs: no NVLink multicast objects (NVLS) unless the
        # environment asks for them (on shared hosts they can take the GPUs out of service).
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, a no-op after
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(group_name)
        self.buffer = symm_mem.empty(SLOTS, max_rows, hidden, dtype=torch.float32, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group_name)
        self.pads = torch.tensor(self.handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        bases = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64, device=device)
        step = max_rows * hidden * 4  # bytes per slot
        self.slot_ptrs = [bases + i * step for i in range(SLOTS)]  # int64 [world] addresses each
        dist.barrier()  # every rank's pads (zeroed) exist before any flag is set

    def slot(self, index: int, rows: int) -> torch.Tensor:
        """This rank's slot `index` (`slot_order`): write a partial sum [rows, hidden] into it."""
        return self.buffer[index, :rows]

    def signal(self, rows: int) -> None:
        """Tell every peer that this rank's slot holds its rows (after the kernel that wrote them)."""
        _signal_kernel[(rows,)](
            self.pads, int(self.timeout_s * 1e9), RANK=self.rank, WORLD=self.world, num_warps=1
        )

    def sum_add_rms_norm(
        self, index: int, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused.sum_add_rms_norm` of every rank's slot `index`: -> (normed, residual + sum).
        Takes the signals: call it (or `sum`) once per `signal`."""
        x, out = torch.empty_like(residual), torch.empty_like(residual)
        self._launch(index, residual, weight, x, out, eps, True)
        return out, x

    def sum(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Every rank's slot `index` summed, in like's dtype ([rows, hidden]; takes the signals)."""
        x = torch.empty_like(like)
        self._launch(index, x, x, x, x, 0.0, False)
        return x

    def _launch(self, index: int, residual, weight, x, out, eps: float, norm: bool) -> None:
        launch_sum(
            self.slot_ptrs[index],
            self.pads,
            self.rank,
            residual,
            weight,
            x,
            out,
            eps,
            norm,
            True,
            self.timeout_s,
        )


def launch_sum(
    slot_ptrs: torch.Tensor,
    pads: torch.Tensor,
    rank: int,
    residual: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    norm: bool,
    flags: bool = True,
    timeout_s: float = 120.0,
) -> None:
    """The sum (+ add + norm) kernel over x's rows: slot_ptrs / pads int64 [world] addresses;
    writes x (and out when norm). flags False: no waiting (the slots are known written);
    timeout_s: a wait longer than this traps (`_cas_loop`)."""
    rows, D = x.shape
    _sum_add_norm_kernel[(rows,)](
        slot_ptrs,
        pads,
        residual,
        weight,
        x,
        out,
        D,
        eps,
        int(timeout_s * 1e9),
        RANK=rank,
        WORLD=slot_ptrs.shape[0],
        BLOCK_D=triton.next_power_of_2(D),
        NORM=norm,
        FLAGS=flags,
        num_warps=8,
    )
