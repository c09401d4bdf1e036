"""What a kernel boundary costs at batch 1, and what a grid barrier inside one kernel would.

A batch-1 step of the 30B shape runs ~7 dependent kernels per layer (add + norm, q/k/v, the
attention, o_proj, the router, the experts' two projections): ~55 us per layer on an H200
against ~28 us of weight bytes (RESULTS.md, session 18). Each boundary waits for the whole
kernel ahead to finish (PDL hides the launch, not that wait). A persistent kernel would
instead separate the phases by grid barriers (every program adds to a counter, then waits for
it). Before building one, this measures both on the same work, N dependent phases of P
programs (P = the SMs, so that all are resident), replayed from a CUDA graph, per phase:

- each phase: every program reads the P values the phase before wrote (the dependence), adds
  the mean of its block of a weight matrix (--weight-kb per program, 0 = none), writes one value;
- "kernels": one kernel per phase (no PDL; PDL: each waits for the one ahead, which lets it
  launch first; PDL preload: the weights loaded before that wait, as `triton_experts.preload_matmul`);
- "barrier": one kernel, the phases separated by a counter per phase (release add, acquire
  spin at GPU scope), weights of the next phase loaded before the spin.

Every variant's values are checked against the same sums in float64 on the host.

    python benchmarks/boundaries.py --phases 112 --weight-kb 0 32
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernels import graph_ms  # noqa: E402

from specmoe_ray.moe.triton_experts import _grid_dependency  # noqa: E402


@triton.jit
def _load_weights(w_ptr, phase, P, W, BLOCK_W: tl.constexpr):
    """This program's W weights of the phase (BLOCK_W >= W, at least 1; zeros past W)."""
    rw = tl.arange(0, BLOCK_W)
    base = (phase * P + tl.program_id(0)).to(tl.int64) * W
    return tl.load(w_ptr + base + rw, mask=rw < W, other=0.0)


@triton.jit
def _phase(buf_ptr, w, phase, P, W, BLOCK_P: tl.constexpr):
    """buf[phase + 1, program] = half the mean of the P values of buf[phase] + the mean of this
    program's W weights w (loaded already)."""
    rp = tl.arange(0, BLOCK_P)
    prev = tl.load(buf_ptr + phase * BLOCK_P + rp, mask=rp < P, other=0.0)
    value = 0.5 * tl.sum(prev, 0) / P + tl.sum(w.to(tl.float32), 0) / tl.maximum(W, 1)
    tl.store(buf_ptr + (phase + 1) * BLOCK_P + tl.program_id(0), value)


@triton.jit
def _phase_kernel(
    buf_ptr, w_ptr, phase, P, W, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
):  # fmt: skip
    """One phase as a kernel of its own (PRELOAD: its weights loaded before waiting, PDL, for
    the kernel ahead)."""
    if PRELOAD:
        w = _load_weights(w_ptr, phase, P, W, BLOCK_W)
        _grid_dependency(PDL)
    else:
        _grid_dependency(PDL)
        w = _load_weights(w_ptr, phase, P, W, BLOCK_W)
    _phase(buf_ptr, w, phase, P, W, BLOCK_P)


@triton.jit
def _arrive(count_ptr):
    """Every thread's writes done (CTA barrier), then one release add at GPU scope."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _spin(count_ptr, target):
    """Until the counter reaches target (acquire loads at GPU scope, every thread). A barrier
    needs every program resident at once: where they are not (another process on the GPU, a
    MIG slice smaller than the SM count read here), a trap after a second of waiting ends the
    kernel with an error instead of a hang."""
    tl.inline_asm_elementwise(
        """{
        .reg .u32 %seen;
        .reg .pred %done, %late;
        .reg .u64 %t0, %t;
        mov.u64 %t0, %globaltimer;
        boundaries_spin:
        ld.acquire.gpu.global.u32 %seen, [$1];
        setp.ge.u32 %done, %seen, $2;
        @%done bra boundaries_seen;
        mov.u64 %t, %globaltimer;
        sub.u64 %t, %t, %t0;
        setp.gt.u64 %late, %t, 1000000000;
        @!%late bra boundaries_spin;
        trap;
        boundaries_seen:
        mov.u32 $0, %seen;
        }""",
        "=r, l, r",
        [count_ptr, target],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _barrier_kernel(
    buf_ptr, w_ptr, count_ptr, phases, P, W, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr
):  # fmt: skip
    """All phases in one kernel: phase k's weights loaded, then wait for phase k - 1's P
    arrivals (count[k - 1]), then the phase, then arrive at count[k]."""
    for phase in range(phases):
        w = _load_weights(w_ptr, phase, P, W, BLOCK_W)
        if phase > 0:
            _spin(count_ptr + phase - 1, P)
        _phase(buf_ptr, w, phase, P, W, BLOCK_P)
        _arrive(count_ptr + phase)


def reference(buf0: torch.Tensor, w: torch.Tensor, phases: int, P: int) -> torch.Tensor:
    """The phases' values in float64 on the host (the kernels' float32 sums differ by rounding)."""
    vals = buf0[:P].double().cpu()
    means = w.double().mean(-1).cpu() if w.shape[-1] else torch.zeros(phases, P, dtype=torch.float64)
    out = [vals]
    for k in range(phases):
        vals = 0.5 * vals.mean() + means[k]
        out.append(vals)
    return torch.stack(out)


def run(phases: int, weight_kb: int, warps: int) -> dict[str, float]:
    P = torch.cuda.get_device_properties(0).multi_processor_count
    block_p = triton.next_power_of_2(P)
    W = weight_kb * 1024 // 2  # bf16 weights per program and phase
    block_w = triton.next_power_of_2(max(W, 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.rand(phases, P, max(W, 1), generator=g, device="cuda") * 2e-3).to(torch.bfloat16)
    w = w[:, :, :W]
    buf = torch.zeros(phases + 1, block_p, device="cuda")
    buf[0, :P] = torch.rand(P, generator=g, device="cuda") / P
    counts = torch.zeros(phases, dtype=torch.int32, device="cuda")
    want = reference(buf[0], w, phases, P)

    def chain(pdl: bool, preload: bool):
        def fn():
            for k in range(phases):
                _phase_kernel[(P,)](
                    buf, w, k, P, W, BLOCK_P=block_p, BLOCK_W=block_w, PDL=pdl, PRELOAD=preload,
                    num_warps=warps, **({"launch_pdl": True} if pdl else {}),
                )  # fmt: skip

        return fn

    def barrier():
        counts.zero_()
        _barrier_kernel[(P,)](buf, w, counts, phases, P, W, BLOCK_P=block_p, BLOCK_W=block_w, num_warps=warps)

    variants = {"kernels, no PDL": chain(False, False), "kernels, PDL": chain(True, False)}
    if W:
        variants["kernels, PDL, weights before the wait"] = chain(True, True)
    variants["one kernel, grid barriers"] = barrier
    variants["kernels, PDL (again)"] = chain(True, False)
    out = {}
    for name, fn in variants.items():
        buf[1:].zero_()
        out[name] = 1e3 * graph_ms(fn) / phases
        got = buf[:, :P].double().cpu()
        err = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
        assert err < 1e-4, f"{name}: relative error {err:.2e} against the host's sums"
    memset = 1e3 * graph_ms(counts.zero_)  # the barrier's one memset, counted in its time above
    print(f"  {phases} phases of {P} programs x {warps} warps, {weight_kb} KB of weights per program each")
    for name, us in out.items():
        print(f"    {us:6.2f} us per phase  {name}")
    print(f"    (the barrier's counter memset: {memset:.1f} us per replay, in its time above)")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", type=int, default=112, help="dependent phases (16 layers x 7 kernels)")
    p.add_argument("--weight-kb", type=int, nargs="+", default=[0, 8, 32])
    p.add_argument("--warps", type=int, nargs="+", default=[4])
    a = p.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for kb in a.weight_kb:
        for warps in a.warps:
            run(a.phases, kb, warps)


if __name__ == "__main__":
    main()
