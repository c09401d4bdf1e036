"""Weights read ahead into L2 on a side stream, while the step's own kernels leave HBM idle.

A batch-1 decode layer spends most of its time in latency-bound kernels (the attention over a
few hundred keys, norms, the router: benchmarks/RESULTS.md, session 8) between the two
bandwidth-bound projections, q/k/v (21 MB on the Qwen3-30B-A3B shape) and o_proj (16.8 MB),
which themselves reach only ~55% of the copy bandwidth from HBM. `MODE` names weights to ask L2
for at points of the layer: a one-warp kernel per weight issues Hopper's bulk L2 prefetches
(`cp.async.bulk.prefetch.L2`: the copy engine reads, no registers, no SM time) on a side stream
forked from the step's stream at that point and joined at the forward's end, so the prefetch
overlaps the main chain and never delays it; the projection then reads its weight from L2.

`MODE` ("" = off) is a list of `what@where`, separated by commas or spaces:
  what:  `o` this layer's o_proj, `qkv+1` the next layer's fused q/k/v, `router` this layer's
         router weight
  where: `start` (before the layer's first add + norm), `attention` (after q/k/v, before the
         attention kernel), `moe` (after o_proj, before the router)
e.g. "o@attention qkv+1@attention". Only static steps (`fused.active()`, padded batches) on
CUDA GPUs of compute capability 9 or more use it; elsewhere (CPUs, the interpreter, eager
prefill) `for_step` returns None and nothing changes. Opt-in: measured without gain on an H200
(benchmarks/RESULTS.md, session 17: the one-row GEMV from L2 is only ~2 us faster than from HBM,
9 against 11 us, so it is bound by its own latency; 48 layers 0.98-1.01x), nor once q/k/v
preload their weights into registers, nor at batch 8 and 32 (session 19: 0.3-1.6% slower).
"""

from __future__ import annotations

import re

import torch

from specmoe_ray.models import fused
from specmoe_ray.moe.triton_experts import AVAILABLE, INTERPRETED, launch_on

if AVAILABLE:
    import triton
    import triton.language as tl

MODE = ""
WHAT = ("o", "qkv+1", "router")
WHERE = ("start", "attention", "moe")
# Bytes per bulk prefetch (a multiple of 16) and prefetches per program (one warp's lanes).
CHUNK = 16384
LANES = 32

_STREAMS: dict[int, torch.cuda.Stream] = {}  # CUDA device index -> side stream
_HOPPER: dict[int, bool] = {}


def parse_mode(mode: str) -> list[tuple[str, str]]:
    """MODE -> [(what, where)]; a clear error for anything else."""
    items = []
    for item in filter(None, re.split(r"[,\s]+", mode)):
        what, _, where = item.partition("@")
        if what not in WHAT or where not in WHERE:
            raise ValueError(
                f"l2_ahead.MODE item {item!r}: expected what@where, what one of {WHAT}, where one of {WHERE}"
            )
        items.append((what, where))
    return items


def plan(model, mode: str) -> dict[tuple[int, str], list[torch.Tensor]]:
    """(layer, where) -> the weights to prefetch there, for `model`'s decoder layers (a
    `Transformer`); layers without the named weight (another attention class, a dense MLP, the
    last layer's `qkv+1`) skip it."""
    layers = model.model.layers
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    for what, where in parse_mode(mode):
        for i, layer in enumerate(layers):
            if what == "o":
                w = getattr(getattr(layer.self_attn, "o_proj", None), "weight", None)
            elif what == "router":
                w = getattr(getattr(layer.mlp, "gate", None), "weight", None)
            else:
                nxt = layers[i + 1].self_attn if i + 1 < len(layers) else None
                qkv = getattr(nxt, "_qkv", None)
                w = qkv[0] if qkv is not None else None
            if isinstance(w, torch.Tensor) and w.is_contiguous():
                out.setdefault((i, where), []).append(w)
    return out


def supported(device: torch.device) -> bool:
    """A CUDA device with the bulk prefetch (compute capability 9+), Triton compiled (not the
    interpreter)."""
    if not (AVAILABLE and not INTERPRETED and device.type == "cuda"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _HOPPER.get(index)
    if ok is None:
        ok = _HOPPER[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return ok


class L2Ahead:
    """One forward's prefetches: `at(layer, where)` forks this point's (on the side stream, after
    the step's stream reaches it); `finish()` joins them before the forward returns."""

    def __init__(self, points: dict[tuple[int, str], list[torch.Tensor]], device: torch.device):
        self.points, self.device = points, device
        index = device.index if device.index is not None else torch.cuda.current_device()
        side = _STREAMS.get(index)
        if side is None:
            side = _STREAMS[index] = torch.cuda.Stream(device)
        self.side, self.forked = side, False

    def at(self, layer: int, where: str) -> None:
        weights = self.points.get((layer, where))
        if not weights:
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for w in weights:
                prefetch(w)
        self.forked = True

    def finish(self) -> None:
        if self.forked:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.forked = False


def for_step(model, x: torch.Tensor, padded: bool) -> L2Ahead | None:
    """The forward's `L2Ahead` when MODE is set and the step is a static one on a GPU that has
    the prefetch; else None."""
    if not (MODE and padded and fused.is_active() and supported(x.device)):
        return None
    cached = getattr(model, "_l2_plan", None)
    if cached is None or cached[0] != MODE:
        cached = model._l2_plan = (MODE, plan(model, MODE))
    return L2Ahead(cached[1], x.device)


def prefetch(w: torch.Tensor, chunk: int | None = None, lanes: int | None = None) -> None:
    """Ask L2 for w's bytes (contiguous, on a Hopper GPU) on the current stream."""
    chunk, lanes = chunk or CHUNK, lanes or LANES
    nbytes = w.numel() * w.element_size()
    grid = (triton.cdiv(nbytes, chunk * lanes),)
    with launch_on(w.device):
        _prefetch_kernel[grid](w.view(-1).view(torch.uint8), nbytes, CHUNK=chunk, LANES=lanes, num_warps=1)


if AVAILABLE:

    @triton.jit
    def _prefetch_kernel(base_ptr, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
        """Each lane: one bulk L2 prefetch of up to CHUNK bytes (whole 16-byte units)."""
        lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
        start = lane.to(tl.int64) * CHUNK
        size = tl.minimum(nbytes - start, CHUNK)
        size = (tl.maximum(size, 0) // 16 * 16).to(tl.int32)
        ptrs = base_ptr + tl.where(size > 0, start, 0)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
            "mov.u32 $0, 0; }",
            "=r,l,r",
            [ptrs, size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
