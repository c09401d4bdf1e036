"""Compiles every Triton kernel of the package for NVIDIA GPUs, without a GPU: Triton's code
generator and ptxas for a Hopper target (sm90, programmatic dependent launch on; every constexpr
branch the engine launches, in bf16), an Ampere one (sm80, off) and float32. Triton's
interpreter (the CPU tests) runs the kernels' arithmetic but not their lowering: a kernel that
only fails to compile for a GPU fails here. Run by tests/cpu/test_triton_kernels.py in a
process of its own (the interpreter is chosen when the kernels are defined); prints "ok NAME"
or "FAIL NAME: error" per variant and exits 1 if any failed.

    python tests/cpu/compile_kernels.py
"""

from __future__ import annotations

import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from specmoe_ray.engine import triton_sampling as tsamp  # noqa: E402
from specmoe_ray.models import l2_ahead as l2  # noqa: E402
from specmoe_ray.models import triton_kernels as tk  # noqa: E402
from specmoe_ray.moe import peer_sum as ps  # noqa: E402
from specmoe_ray.moe import triton_dispatch as td  # noqa: E402
from specmoe_ray.moe import triton_experts as te  # noqa: E402

I64, I32, F32 = "*i64", "*i32", "*fp32"


def signature(fn, consts: dict, ptrs: dict, floats=(), dtype: str = "bf16") -> dict:
    """Every argument's type: constexprs, pointers (`_ptr`: as given, else the model's dtype),
    float scalars, else int32."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*" + dtype)
        elif name.endswith(("_ns", "_addr")):  # nanoseconds, addresses: 64 bits
            sig[name] = "i64"
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def variants(base: dict, **choices) -> list[dict]:
    """base with every combination of the choices."""
    keys = list(choices)
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(choices[k] for k in keys))]


def kernels() -> list[tuple[str, object, list[dict], dict, tuple]]:
    """(name, kernel, constexpr variants, pointer types, float scalars)."""
    attention_ptrs = dict(
        slots_ptr=I64, qpos_ptr=I64, part_ptr=F32, ml_ptr=F32, wslots_ptr=I64, wpos_ptr=I64, counters_ptr=I32
    )
    attention = variants(
        dict(HD=128, BLOCK_M=16, BLOCK_L=64, WINDOW=False, BLOCK_T=2),
        SPLITS=(1, 4),
        ROPE=(False, True),
        NORM=(False, True),
        MERGE_LAST=(False, True),
    )
    attention = [
        v for v in attention if (v["ROPE"] or not v["NORM"]) and (v["SPLITS"] > 1 or not v["MERGE_LAST"])
    ]
    attention.append(
        dict(HD=64, BLOCK_M=32, BLOCK_L=64, WINDOW=True, BLOCK_T=4, SPLITS=1, ROPE=False, NORM=False)
    )
    attention += [  # the first block of past keys read before the wait (ATTENTION_PRELOAD)
        dict(HD=128, BLOCK_M=16, BLOCK_L=64, WINDOW=False, BLOCK_T=2, SPLITS=s, ROPE=True, NORM=True,
             MERGE_LAST=s > 1, PRELOAD=True)
        for s in (1, 16)
    ]  # fmt: skip
    dedup = dict(GROUP=8, P_PAD=64, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, PREFETCH_STEP=64)
    routing_ptrs = dict(ids_ptr=I64, counts_ptr=I64, mask_ptr=I64, done_ptr=I32)
    sort_ptrs = dict(keys_ptr=I64, table_ptr=I64, sorted_ptr=I64, order_ptr=I64, offs_ptr=I32, counts_ptr=I64)
    pack_ptrs = dict(
        ids_ptr=I64, mask_ptr=I64, table_ptr=I64, replicas_ptr=I64, rotation_ptr=I64, idcol_ptr=I64,
        slot_ptr=I64, counts_ptr=I64,
    )  # fmt: skip
    return [
        ("attention", tk._attention_kernel, attention, attention_ptrs, ("scale", "eps")),
        ("merge", tk._merge_kernel, [dict(HD=128, BLOCK_M=16, SPLITS=4)], dict(part_ptr=F32, ml_ptr=F32), ()),
        (
            "softmax_topk",
            tk._softmax_topk_kernel,
            variants(
                dict(K=8, BLOCK_E=128, BLOCK_K=8),
                RENORM=(False, True),
                COUNT=(False, True),
                MASKED=(False, True),
                PACKED=(False, True),
            ),
            routing_ptrs,
            (),
        ),
        (
            "router_topk",
            tk._router_topk_kernel,
            [
                dict(v, ONE_PASS=v["BLOCK_D"] > 512)  # whole rows (hidden 2048) in one block
                for v in variants(
                    dict(K=8, BLOCK_T=4, BLOCK_R=2, BLOCK_E=128, BLOCK_K=8, RENORM=True),
                    COUNT=(False, True),
                    MASKED=(False, True),
                    NORM=(False, True),
                    BLOCK_D=(512, 2048),
                    PACKED=(False, True),
                )
            ]
            + variants(  # 32 rows, products by tensor cores (ROUTER_TOPK_DOT_ROWS)
                dict(K=8, BLOCK_T=32, BLOCK_R=16, BLOCK_E=128, BLOCK_K=8, RENORM=True, BLOCK_D=128),
                ONE_PASS=(False,),
                DOT=(True,),
                PACKED=(False,),
                COUNT=(True,),
                MASKED=(True,),
                NORM=(False, True),
            )
            + variants(  # one token, whole rows loaded before waiting (ROUTER_TOPK_PRELOAD)
                dict(K=8, BLOCK_T=2, BLOCK_R=2, BLOCK_E=128, BLOCK_K=8, RENORM=True, BLOCK_D=2048),
                ONE_PASS=(True,),
                PRELOAD=(True,),
                PACKED=(False,),
                COUNT=(True,),
                MASKED=(True,),
                NORM=(False, True),
            ),
            routing_ptrs,
            ("eps",),
        ),
        (
            "add_norm_matvec",
            tk._add_norm_matvec_kernel,
            variants(dict(BLOCK_N=4, BLOCK_K=2048), NORMED=(False, True)),
            {},
            ("eps",),
        ),
        (
            "experts (sorted)",
            te._experts_kernel,
            variants(
                dict(GROUP=8, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
                GATHER=(False, True),
                SCATTER=(False, True),
                GLU=(False, True),
            ),
            dict(offs_ptr=I32, src_ptr=I64, dst_ptr=I64),
            (),
        ),
        (
            "experts (per pair)",
            te._pair_kernel,
            variants(
                dict(GROUP=8, BLOCK_N=8, BLOCK_K=256, PREFETCH_STEP=64),
                GLU=(False, True),
                PREFETCH_LINES=(0, 64),
            ),
            dict(ids_ptr=I64),
            (),
        ),
        (
            "pairs with weights loaded before the wait",
            te._preload_pair_kernel,
            [
                dict(GROUP=8, BLOCK_N=4, BLOCK_K=4096, ROWS=1, GLU=False, NORM=False),
                dict(GROUP=1, BLOCK_N=8, BLOCK_K=1024, ROWS=1, GLU=False, NORM=False),
                dict(GROUP=1, BLOCK_N=4, BLOCK_K=4096, ROWS=8, GLU=False, NORM=False),  # `preload_rows`
                # `glu_matvec`, `norm_matvec` (q/k/v; gate/up)
                *variants(
                    dict(GROUP=1, BLOCK_N=4, BLOCK_K=2048, ROWS=1), GLU=(False, True), NORM=(False, True)
                ),
            ],
            dict(ids_ptr=I64),
            ("eps",),
        ),
        (
            "experts (dedup)",
            te._dedup_kernel,
            variants(
                dedup,
                GLU=(False, True),
                PREFETCH_LINES=(0, 16),
            )
            + [  # the down projection's whole rows loaded before the wait (DEDUP_DOWN_PRELOAD)
                {**dedup, "BLOCK_N": 16, "BLOCK_K": 1024, "GLU": False, "PREFETCH_LINES": 0, "PRELOAD": True}
            ],
            dict(ids_ptr=I64),
            (),
        ),
        (
            "experts (gate/up and down in one launch)",
            te._expert_mlp_kernel,
            variants(
                dict(GROUP=8, BLOCK_N1=8, BLOCK_K1=256, BLOCK_K2=256),
                BLOCK_N2=(8, 16),
                TICKETS=(True, False),
            ),
            dict(ids_ptr=I64, sync_ptr=I32),
            (),
        ),
        (
            "experts (sorted, gate/up and down in one launch)",
            te._sorted_mlp_kernel,
            variants(
                dict(GROUP=8, BLOCK_M=16, BLOCK_N1=32, BLOCK_K1=128, BLOCK_K2=128),
                BLOCK_N2=(32, 64),
                DOWN_FIRST=(False, True),
            ),
            dict(offs_ptr=I32, src_ptr=I64, sync_ptr=I32),
            (),
        ),
        (
            "rank_sort",
            te._rank_sort_kernel,
            variants(
                dict(BLOCK_I=32, BLOCK_J=128, BLOCK_E=16),
                MAP=(False, True),
                OFFSETS=(False, True),
                COUNT=(False, True),
            ),
            sort_ptrs,
            (),
        ),
        (
            "pack",
            td._pack_kernel,
            variants(dict(BLOCK_I=16, BLOCK_J=128, BLOCK_D=256), HAS_MASK=(False, True)),
            pack_ptrs,
            (),
        ),
        # Peer-sum signals (inline PTX: system-scope atomics) and the folded sum + norm.
        (
            "peer_sum signal",
            ps._signal_kernel,
            [dict(RANK=1, WORLD=2), dict(RANK=3, WORLD=4)],
            dict(pads_ptr=I64, count_ptr=I32),
            (),
        ),
        (
            "peer_sum combine",
            ps._combine_signal_kernel,
            variants(dict(A=8, RANK=1, WORLD=2), SIGNAL=(True, False), MASK=(0, 1, 2), BLOCK_D=(2048, 512)),
            dict(keep_ptr="*i1", ids_ptr=I64, slot_ptr=F32, pads_ptr=I64, count_ptr=I32, ticket_ptr=I32),
            (),
        ),
        (
            "peer_sum add_norm",
            ps._sum_add_norm_kernel,
            variants(
                dict(BLOCK_D=2048, FLAGS=True),
                RANK=(0,),
                WORLD=(2, 4),
                NORM=(True, False),
                TIMED=(False, True),
            ),
            dict(slots_ptr=I64, pads_ptr=I64, count_ptr=I32, waits_ptr=I64),
            ("eps",),
        ),
        # A sampled step's last draw, from logits (softmax) or from float64 / float32 weights.
        *[
            (
                f"{name} ({what})",
                kernel,
                [dict(SOFTMAX=what == "logits", CHUNK=3072, BLOCK=1024, **extra)],
                dict(t_ptr=F32, max_ptr=F32, mass_ptr="*fp64", u_ptr="*fp64", out_ptr=I64)
                | {"logits": {}, "weights": dict(x_ptr="*fp64"), "float32 weights": dict(x_ptr=F32)}[what],
                (),
            )
            for name, kernel, extra in (
                ("chunk_mass", tsamp._chunk_mass_kernel, {}),
                ("pick", tsamp._pick_kernel, dict(BLOCK_C=64)),
            )
            for what in ("logits", "weights", "float32 weights")
        ],
        (
            "verify",
            tsamp._verify_kernel,
            [
                dict(K1=4, CHUNK=3072, BLOCK=1024, BLOCK_C=64, BLOCK_K=4, BLOCK_S=32, SOFTMAX=sm)
                for sm in (True, False)
            ],
            dict(
                x_ptr=F32,
                t_ptr=F32,
                max_ptr=F32,
                mass_ptr="*fp64",
                drafts_ptr=I64,
                n_ptr=I64,
                qid_ptr=I64,
                qp_ptr=F32,
                u_ptr="*fp64",
                acc_ptr=I64,
                out_ptr=I64,
            ),
            (),
        ),
        (
            "sorted_mass",
            tsamp._sorted_mass_kernel,
            [dict(CHUNK=3072, BLOCK=1024)],
            dict(s_ptr=F32, k_ptr=I64, mass_ptr="*fp64"),
            (),
        ),
        (
            "sorted_keep",
            tsamp._sorted_keep_kernel,
            [dict(CHUNK=3072, BLOCK=1024, BLOCK_C=64)],
            dict(s_ptr=F32, idx_ptr=I64, k_ptr=I64, p_ptr=F32, mass_ptr="*fp64", out_ptr=F32),
            (),
        ),
        ("chunk_top", tsamp._chunk_top_kernel, [dict(N=32, CHUNK=4096)], dict(x_ptr=F32, cand_ptr=I64), ()),
        (
            "merge_top",
            tsamp._merge_top_kernel,
            [dict(N=32, BLOCK=2048)],
            dict(x_ptr=F32, t_ptr=F32, cand_ptr=I64, u_ptr="*fp64", ids_ptr=I64, probs_ptr=F32, tok_ptr=I64),
            (),
        ),
        (
            "greedy_verify",
            tsamp._greedy_kernel,
            [dict(K1=4, BLOCK_K=4)],
            dict(drafts_ptr=I64, n_ptr=I64, argmax_ptr=I64, tokens_ptr=I64, acc_ptr=I64),
            (),
        ),
        # Weights read ahead into L2 (inline PTX: the bulk prefetch, Hopper only).
        ("l2_ahead prefetch", l2._prefetch_kernel, [dict(CHUNK=16384, LANES=32)], dict(base_ptr="*u8"), ()),
    ]


def main() -> int:
    failed = 0
    for name, fn, consts_list, ptrs, floats in kernels():
        for i, consts in enumerate(consts_list):
            # Every variant for Hopper in bf16; the first also for Ampere and in float32.
            targets = [(90, "bf16")] + ([(80, "bf16"), (90, "fp32")] if i == 0 else [])
            if fn is l2._prefetch_kernel:  # cp.async.bulk: sm90 and later only (`l2_ahead.supported`)
                targets = [(90, "bf16")]
            for arch, dtype in targets:
                c = dict(consts, PDL=arch >= 90) if "PDL" in fn.arg_names else dict(consts)
                if "PRECISION" in fn.arg_names:
                    c["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
                label = f"{name} sm{arch} {dtype} " + " ".join(f"{k}={v}" for k, v in consts.items())
                src = ASTSource(fn=fn, signature=signature(fn, c, ptrs, floats, dtype), constexprs=c)
                try:
                    triton.compile(src, target=GPUTarget("cuda", arch, 32))
                    print("ok", label)
                except Exception as e:  # noqa: BLE001 (every failure reported, then the exit code)
                    failed += 1
                    print(f"FAIL {label}: {type(e).__name__}: {str(e)[:1500]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
