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
return to 0 by themselves, so CUDA graphs replay the same launches. Two slots alternate by layer:
a rank writes layer l + 2's partial into l's slot only after its layer l + 2 add + norm saw every
peer's layer l + 1 signal, which each peer sends after it read layer l's slots.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPUs without Triton: NCCL (gloo) sums only
    AVAILABLE = False

import torch

if AVAILABLE:

    @triton.jit
    def _thread_id():
        return tl.inline_asm_elementwise(
            "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
        )

    @triton.jit
    def _send(addrs):
        """Set each flag 0 -> 1 (system scope, release: the slot's writes come first), waiting
        while the receiver still holds the last one."""
        tl.inline_asm_elementwise(
            """
            {
            .reg .u32 %prev;
            .reg .pred %done;
            peer_sum_send:
            atom.global.release.sys.cas.b32 %prev, [$1], 0, 1;
            setp.eq.u32 %done, %prev, 0;
            @!%done bra peer_sum_send;
            mov.u32 $0, %prev;
            }
            """,
            "=r, l",
            [addrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _take(addrs):
        """Wait for each flag to be 1 and take it back to 0 (system scope, acquire)."""
        tl.inline_asm_elementwise(
            """
            {
            .reg .u32 %prev;
            .reg .pred %done;
            peer_sum_take:
            atom.global.acquire.sys.cas.b32 %prev, [$1], 1, 0;
            setp.eq.u32 %done, %prev, 1;
            @!%done bra peer_sum_take;
            mov.u32 $0, %prev;
            }
            """,
            "=r, l",
            [addrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _signal_kernel(pads_ptr, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Program t: flag (t, RANK) in every rank's pad, this one's too (pads_ptr: int64
        [WORLD] addresses), so that a rank's add + norm waits on WORLD flags alike."""
        t = tl.program_id(0)
        ranks = tl.arange(0, WORLD)
        flags = tl.load(pads_ptr + ranks).to(tl.pointer_type(tl.int32)) + t * WORLD + RANK
        if _thread_id() < WORLD:  # thread r holds rank r's flag; the others hold copies
            _send(flags)

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
        RANK: tl.constexpr,
        WORLD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NORM: tl.constexpr,
    ):
        """Row t: wait for every rank's flag (t, r), sum the WORLD slots' row t in rank order
        (every rank the same sum), round to x's dtype; NORM: add the residual and RMS-norm, as
        `fused.sum_add_rms_norm`."""
        t = tl.program_id(0)
        flags = tl.load(pads_ptr + RANK).to(tl.pointer_type(tl.int32)) + t * WORLD + tl.arange(0, WORLD)
        if _thread_id() < WORLD:
            _take(flags)
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


def pad_rows(world: int) -> int:
    """The most rows a `PeerSum` of `world` ranks can flag: each rank's signal pad holds one
    int32 flag per (row, rank)."""
    import torch.distributed._symmetric_memory as symm_mem

    pad_bytes = symm_mem.get_signal_pad_size() if hasattr(symm_mem, "get_signal_pad_size") else 2048
    return pad_bytes // (4 * world)


class PeerSum:
    """Symmetric slots and signal pads for one process group's per-layer sums of [rows, D]
    float32 partials, rows <= max_rows. Every rank builds it at the same point (a collective)."""

    def __init__(self, max_rows: int, hidden: int, device: torch.device, group_name: str):
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
        self.max_rows, self.hidden = max_rows, hidden
        self.buffer = symm_mem.empty((2, max_rows, hidden), dtype=torch.float32, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group_name)
        self.pads = torch.tensor(self.handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        bases = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64, device=device)
        step = max_rows * hidden * 4  # bytes per slot
        self.slot_ptrs = [bases, bases + step]  # int64 [world] addresses of slot 0 / 1
        dist.barrier()  # every rank's pads (zeroed) exist before any flag is set

    def slot(self, layer: int, rows: int) -> torch.Tensor:
        """This rank's slot for `layer`'s partial sum: write [rows, hidden] float32 into it."""
        return self.buffer[layer % 2, :rows]

    def signal(self, rows: int) -> None:
        """Tell every peer that this rank's slot holds its rows (after the kernel that wrote them)."""
        _signal_kernel[(rows,)](self.pads, RANK=self.rank, WORLD=self.world, num_warps=1)

    def sum_add_rms_norm(
        self, layer: int, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused.sum_add_rms_norm` of every rank's `slot(layer)`: -> (normed, residual + sum).
        Takes the layer's signals: call it (or `sum`) once per layer and signal."""
        x, out = torch.empty_like(residual), torch.empty_like(residual)
        self._launch(layer, residual, weight, x, out, eps, True)
        return out, x

    def sum(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """Every rank's `slot(layer)` summed, in like's dtype ([rows, hidden]; takes the signals)."""
        x = torch.empty_like(like)
        self._launch(layer, x, x, x, x, 0.0, False)
        return x

    def _launch(self, layer, residual, weight, x, out, eps: float, norm: bool) -> None:
        rows, D = x.shape
        _sum_add_norm_kernel[(rows,)](
            self.slot_ptrs[layer % 2],
            self.pads,
            residual,
            weight,
            x,
            out,
            D,
            eps,
            RANK=self.rank,
            WORLD=self.world,
            BLOCK_D=triton.next_power_of_2(D),
            NORM=norm,
            num_warps=8,
        )
