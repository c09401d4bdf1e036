"""The Triton kernels against float64 math (or torch): on a GPU, and on CPUs under Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py where no GPU is), which runs each
kernel's programs in numpy. The interpreter multiplies bfloat16 matrices (`tl.dot`) wrongly
(Triton 3.9), so bfloat16 cases of kernels with `tl.dot` run on GPUs only."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton (GPUs; on CPUs: `pip install triton`, the interpreter)")

from specmoe_ray.moe import triton_experts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_bf16_on_interpreter(dtype: torch.dtype, uses_dot: bool = True, why: str = "") -> None:
    if DEVICE == "cpu" and dtype == torch.bfloat16 and uses_dot:
        pytest.skip(why or "Triton's interpreter multiplies bfloat16 matrices wrongly")


@pytest.mark.parametrize(
    "path", ["pairs", "dedup", "dedup-down-config", "dedup-down-preload", "sorted", "sorted-config"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 40, 300])
def test_triton_experts_equal_float64_reference(dtype, n, path, monkeypatch):
    """The Triton expert kernel (few rows per expert: decode/verify) against float64 per-row math,
    including an expert with more rows than one 16-row block and experts with none; the sorted
    kernel also with other block sizes (`SORTED_CONFIG` and the down projection's
    `SORTED_DOWN_CONFIG`, what kernels.py (5) and (7) sweep), the
    deduplicating one with the down projection's own (`DEDUP_DOWN_CONFIG`, kernels.py (2)) and
    with its whole rows loaded before the wait (`DEDUP_DOWN_PRELOAD`)."""
    import torch.nn.functional as F

    from specmoe_ray.moe.experts import LocalExperts

    skip_bf16_on_interpreter(dtype)
    if DEVICE == "cpu" and path == "pairs" and n > 64:
        pytest.skip("slow on the interpreter; the engine sends at most 64 pairs to this kernel")
    g = torch.Generator().manual_seed(n)
    E, D, I = 16, 256, 96
    gate_up = torch.randn(E, 2 * I, D, generator=g) / D**0.5
    down = torch.randn(E, D, I, generator=g) / I**0.5
    x = torch.randn(n, D, generator=g)
    ids = torch.randint(0, E, (n,), generator=g)
    ids[: min(n, 20)] = 5  # 20 rows on one expert: two 16-row blocks
    experts = LocalExperts(list(range(E)), gate_up.to(DEVICE).to(dtype), down.to(DEVICE).to(dtype), E)
    experts.triton = True  # (on the interpreter too)
    experts.triton_max_rows_per_expert = 10**6  # always a Triton kernel, whatever n
    experts.triton_max_pairs = 0 if path.startswith("sorted") else 10**6
    monkeypatch.setattr(triton_experts, "DEDUP", path.startswith("dedup"))
    if path == "dedup-down-config":
        monkeypatch.setattr(triton_experts, "DEDUP_DOWN_CONFIG", {"block_n": 16, "block_k": 32})
    if path == "dedup-down-preload":
        monkeypatch.setattr(triton_experts, "DEDUP_DOWN_PRELOAD", 16)
        preloaded = []
        real = triton_experts.dedup_matmul
        counted = lambda *a, **k: preloaded.append(k.get("preload", False)) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(triton_experts, "dedup_matmul", counted)
    if path == "sorted-config":
        monkeypatch.setattr(triton_experts, "SORTED_CONFIG", {"block_n": 16, "block_k": 32, "num_warps": 8})
        # the down projection's own (K = I = 96: a block_k that leaves a partial last step)
        monkeypatch.setattr(triton_experts, "SORTED_DOWN_CONFIG", {"block_n": 64, "block_k": 64})
    out = experts(x.to(DEVICE).to(dtype), ids.to(DEVICE)).double().cpu()
    ref = torch.empty(n, D, dtype=torch.float64)
    for i in range(n):
        gate, up = F.linear(x[i].double(), gate_up[ids[i]].double()).chunk(2)
        ref[i] = F.linear(F.silu(gate) * up, down[ids[i]].double())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel
    if path == "dedup-down-preload":  # gate/up as before, the down projection preloaded
        assert preloaded == ([] if n == 1 else [False, True])  # (one token: the per-pair kernels)


def test_column_major_copy_is_made_once_per_weight():
    """`fused.column_major` (`COLUMN_MAJOR`): the weight's values, column-major, one copy per
    weight however often asked (looked up by identity), released with the weight."""
    import gc

    from specmoe_ray.models import fused

    w, other = torch.randn(6, 5), torch.randn(6, 5)
    c = fused.column_major(w)
    assert torch.equal(c, w) and c.stride() == (1, 6) and fused.column_major(w) is c
    assert fused.column_major(other) is not c and torch.equal(fused.column_major(other), other)
    n = len(fused._COLUMN_MAJOR)
    del w, c
    gc.collect()
    assert len(fused._COLUMN_MAJOR) == n - 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_pdl_switch_compiles_with_this_torch(monkeypatch):
    """`fused.INDUCTOR_PDL`: on where this torch's inductor has `triton.enable_pdl`, and the
    option that `fused` then compiles with is one torch.compile takes (it refuses unknown ones):
    a compiled add + norm with it (CPU inductor here) equals eager."""
    import torch._inductor.config as inductor_config

    from specmoe_ray.models import fused

    monkeypatch.setattr(fused, "INDUCTOR_PDL", False)
    assert not fused.inductor_pdl()
    monkeypatch.setattr(fused, "INDUCTOR_PDL", True)  # the default
    assert fused.inductor_pdl() == hasattr(inductor_config.triton, "enable_pdl")
    if not fused.inductor_pdl():
        pytest.skip("this torch's inductor has no PDL option")
    fn = fused.add_rms_norm.__wrapped__
    x, residual, w = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64) + 0.5
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"triton.enable_pdl": True})
    for got, want in zip(compiled(x, residual, w, 1e-6), fn(x, residual, w, 1e-6)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("one_row_dedup", [True, False])
def test_one_tokens_pairs_by_the_kernel_dedup_one_row_picks(one_row_dedup, monkeypatch):
    """A batch-1 decode step's pairs (one token row, `group` = its k distinct experts) go to
    the deduplicating kernel, or with `DEDUP_ONE_ROW` off to the per-pair kernel (nothing to
    share; its down projection by the preloading one, `PRELOAD_DOWN`); a step of several tokens
    stays deduplicated. Both == float64."""
    import torch.nn.functional as F

    from specmoe_ray.moe.experts import LocalExperts

    monkeypatch.setattr(triton_experts, "DEDUP_ONE_ROW", one_row_dedup)
    used = []
    for name in ("pair_matmul", "dedup_matmul", "preload_matmul"):
        fn = getattr(triton_experts, name)
        monkeypatch.setattr(
            triton_experts, name, lambda *a, _f=fn, _n=name, **k: used.append(_n) or _f(*a, **k)
        )
    g = torch.Generator().manual_seed(5)
    E, D, I, A = 8, 64, 48, 4
    gate_up, down = torch.randn(E, 2 * I, D, generator=g) / D**0.5, torch.randn(E, D, I, generator=g) / I**0.5
    experts = LocalExperts(list(range(E)), gate_up.to(DEVICE), down.to(DEVICE), E)
    experts.triton = True
    for T in (1, 2):
        used.clear()
        x = torch.randn(T, D, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)]).reshape(-1)
        out = experts(x.to(DEVICE), ids.to(DEVICE), group=A).double().cpu()
        ref = torch.stack(
            [
                F.linear(F.silu(gu[:I]) * gu[I:], down[e].double())
                for p, e in enumerate(ids.tolist())
                for gu in [F.linear(x[p // A].double(), gate_up[e].double())]
            ]
        )
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        per_pair = T == 1 and not one_row_dedup
        assert used == (["pair_matmul", "preload_matmul"] if per_pair else ["dedup_matmul"] * 2), (T, used)


@pytest.mark.parametrize("programs", [0, 1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp_in_one_launch_equals_the_two_pair_kernels(dtype, programs, monkeypatch):
    """`expert_mlp` (`FUSED_MLP`: both projections of one token's pairs in one launch, down
    blocks waiting on their pair's gate/up blocks) == `pair_matmul` twice with the same blocks,
    bit for bit, and float64 math; a pair of an expert held elsewhere (-1) gives zeros; the
    counters are left zero, so the next launch (a graph replay) works. programs per SM: 1 makes
    each program take many blocks in turn, 64 more programs than blocks, 0 one block each."""
    import torch.nn.functional as F

    from specmoe_ray.moe.experts import LocalExperts

    monkeypatch.setattr(triton_experts, "MLP_PROGRAMS", programs)
    monkeypatch.setattr(triton_experts, "FUSED_MLP", True)
    g = torch.Generator().manual_seed(7)
    E, D, I, A = 8, 64, 40, 4  # I not a multiple of the blocks: masked tails
    gate_up, down = torch.randn(E, 2 * I, D, generator=g) / D**0.5, torch.randn(E, D, I, generator=g) / I**0.5
    held = [0, 2, 3, 5, 6, 7]
    experts = LocalExperts(held, gate_up[held].to(DEVICE, dtype), down[held].to(DEVICE, dtype), E)
    experts.triton = True
    cfg = dict(block_n1=16, block_k1=32, block_n2=16, block_k2=16, num_warps=4)
    monkeypatch.setattr(triton_experts, "MLP_CONFIG", cfg)
    x = torch.randn(1, D, generator=g).to(dtype)
    ids = torch.tensor([3, 1, 7, 0])  # expert 1 is held elsewhere
    outs = [experts(x.to(DEVICE), ids.to(DEVICE), group=A) for _ in range(2)]
    local = experts.to_local[ids.to(DEVICE)]
    h = triton_experts.pair_matmul(
        x.to(DEVICE), experts.gate_up, local, group=A, glu=True, block_n=16, block_k=32, num_warps=4
    )
    two = triton_experts.pair_matmul(h, experts.down, local, block_n=16, block_k=16, num_warps=4)
    assert torch.equal(outs[0], two) and torch.equal(outs[1], two)
    assert not outs[0][1].any()
    assert list(experts._mlp_sync) == [4] and not experts._mlp_sync[4].any(), experts._mlp_sync
    again = triton_experts.expert_mlp(x.to(DEVICE), experts.gate_up, experts.down, local, group=A)
    assert torch.equal(again, two)  # the shared counters of a launch without its own
    ref = torch.stack(
        [
            F.linear(F.silu(gu[:I]) * gu[I:], down[e].double())
            for e in ids.tolist()
            for gu in [F.linear(x[0].double(), gate_up[e].double())]
        ]
    )
    ref[1] = 0
    rel = ((outs[0].double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


def experts_reference(x, ids, group: int, held: list[int], gate_up, down) -> torch.Tensor:
    """Float64 expert outputs of pairs (ids, one per pair; pair p reads row x[p // group]);
    experts indexed by their place in held; pairs of experts not held: zero rows."""
    import torch.nn.functional as F

    ref = torch.zeros(len(ids), gate_up.shape[-1], dtype=torch.float64)
    for p, e in enumerate(ids.tolist()):
        if e in held:
            i = held.index(e)
            gate, up = F.linear(x[p // group].double(), gate_up[i].double()).chunk(2)
            ref[p] = F.linear(F.silu(gate) * up, down[i].double())
    return ref


@pytest.mark.parametrize("path", ["pairs", "pairs-preload", "dedup", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_kernel_reads_token_rows_and_skips_experts_not_held(dtype, path, monkeypatch):
    """The few-pairs kernels (per pair, its down projection also with the weights loaded
    before waiting, `PRELOAD_DOWN`; deduplicated: an expert's pairs together) and the sorted
    kernel (rows gathered and results scattered by the kernels) with `group` pairs per token row
    (what the MoE block passes: no expanded copy of the tokens), token rows strided (as a shard
    receives them), experts of a subset (others, and padding id -1, give zero rows on the
    few-pairs paths, unspecified rows on the sorted one), fused silu * up."""

    from specmoe_ray.moe.experts import LocalExperts

    monkeypatch.setattr(triton_experts, "DEDUP", path == "dedup")
    monkeypatch.setattr(triton_experts, "PRELOAD_DOWN", path == "pairs-preload")
    if path == "pairs-preload":  # the down projection must take the preloading kernel
        calls = []
        real = triton_experts.preload_matmul
        counted = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(triton_experts, "preload_matmul", counted)
    skip_bf16_on_interpreter(dtype, not path.startswith("pairs"))

    g = torch.Generator().manual_seed(3)
    E, D, I, T, A = 16, 320, 200, 5, 4  # widths that are not multiples of the blocks
    held = [1, 2, 3, 5, 8, 13]
    gate_up = torch.randn(len(held), 2 * I, D, generator=g) / D**0.5
    down = torch.randn(len(held), D, I, generator=g) / I**0.5
    x = torch.randn(T, D, generator=g)
    # Tokens share experts (as a sequence's draft tokens often do); the last token is padding.
    pool = torch.randperm(E, generator=g)[: 2 * A]
    ids = torch.stack([pool[torch.randperm(2 * A, generator=g)[:A]] for _ in range(T)]).reshape(-1)
    ids[-A:] = -1
    assert len(set(ids.tolist()) & set(held)) >= 2
    experts = LocalExperts(held, gate_up.to(DEVICE).to(dtype), down.to(DEVICE).to(dtype), E)
    experts.triton = True
    assert experts.triton_max_pairs >= T * A
    if path == "sorted":
        experts.triton_max_pairs, experts.triton_max_rows_per_expert = 0, 10**6
    wide = torch.cat([x, torch.randn(T, 8, generator=g)], dim=1)  # rows with a stride of D + 8
    out = experts(wide.to(DEVICE).to(dtype)[:, :D], ids.to(DEVICE), group=A).double().cpu()
    ref = experts_reference(x, ids, A, held, gate_up, down)
    skipped = ref.abs().sum(1) == 0
    if path == "sorted":  # rows nobody computed are unspecified: compare the others
        out, ref = out[~skipped], ref[~skipped]
    else:
        assert (out[skipped] == 0).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel
    if path == "pairs-preload":
        assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preloaded_pairs_equal_the_pair_kernel_with_whole_rows(dtype, monkeypatch):
    """`preload_matmul` (`MATVEC_KERNEL` "preload", `PRELOAD_DOWN`: whole rows of weights loaded
    before the program waits for the kernel ahead) == `pair_matmul` with one block of K bit for bit, and
    float64 math: pairs on experts, padding ids (zero rows), `group` pairs per token row, widths
    that are not multiples of the blocks; `matvec` takes it by default (one-row projections),
    `preload_rows` for a few rows on one weight."""
    g = torch.Generator().manual_seed(7)
    E, N, K, group = 5, 37, 200, 2
    w = (torch.randn(E, N, K, generator=g) / K**0.5).to(DEVICE).to(dtype)
    x = torch.randn(3, K, generator=g).to(DEVICE).to(dtype)
    ids = torch.tensor([4, 0, -1, 2, 2, -1], device=DEVICE)
    cfg = {"block_n": 4, "num_warps": 4}
    out = triton_experts.preload_matmul(x, w, ids, group=group, **cfg)
    same = triton_experts.pair_matmul(x, w, ids, group=group, block_k=256, **cfg)
    assert torch.equal(out, same)
    ref = torch.zeros(len(ids), N, dtype=torch.float64)
    for p, e in enumerate(ids.tolist()):
        if e >= 0:
            ref[p] = w[e].double().cpu() @ x[p // group].double().cpu()
    assert (out[ids.cpu() < 0] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < tol
    monkeypatch.setattr(triton_experts, "PRELOAD_CONFIG", cfg)
    row = triton_experts.matvec(x[:1], w[3])
    assert torch.equal(row, triton_experts.preload_matmul(x[:1], w[3:4], ids[1:2] * 0, **cfg))
    # The deduplicating kernel with whole rows loaded before the wait (`DEDUP_DOWN_PRELOAD`; an
    # expert with two pairs) == the same kernel and blocks reading them after it.
    if not (DEVICE == "cpu" and dtype == torch.bfloat16):  # (tl.dot: the interpreter's bf16 is wrong)
        dedup = dict(group=group, block_n=16, num_warps=4)
        got = triton_experts.dedup_matmul(x, w, ids, preload=True, **dedup)
        assert torch.equal(got, triton_experts.dedup_matmul(x, w, ids, block_k=256, **dedup))
        assert ((got.double().cpu() - ref).norm() / ref.norm()).item() < tol
    # A few rows on one weight (`preload_rows`, `PRELOAD_ROWS`): each row as `matvec` alone.
    rows = triton_experts.preload_rows(x, w[3], **cfg)
    assert rows.shape == (3, N)
    for r in range(3):
        assert torch.equal(rows[r : r + 1], triton_experts.matvec(x[r : r + 1], w[3]))


@pytest.mark.parametrize("down_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sorted_experts_in_one_launch_equal_the_two_sorted_kernels(dtype, down_first, monkeypatch):
    """`expert_mlp_sorted` (`SORTED_FUSED`: both sorted projections in one launch, a down block
    waiting on its expert's gate/up blocks) == the two `expert_matmul` launches bit for bit on
    every computed pair (experts of a subset, padding, `group` pairs per strided token row,
    widths that are not multiples of the blocks), and float64 math; its counters are left zero,
    so a second launch (a graph replay) gives the same rows. down_first: the down blocks run
    before any gate/up block (a GPU starting programs out of order): each stops waiting after a
    few polls and computes its expert's gate/up itself, with the same result."""
    import functools

    from specmoe_ray.moe.experts import LocalExperts

    skip_bf16_on_interpreter(dtype)
    if down_first:
        one_launch = functools.partial(triton_experts.expert_mlp_sorted, max_spins=3, down_first=True)
        monkeypatch.setattr(triton_experts, "expert_mlp_sorted", one_launch)
    g = torch.Generator().manual_seed(5)
    E, D, I, T, A = 16, 80, 72, 6, 4
    held = [0, 2, 3, 5, 8, 9, 13, 15]
    gate_up = torch.randn(len(held), 2 * I, D, generator=g) / D**0.5
    down = torch.randn(len(held), D, I, generator=g) / I**0.5
    x = torch.randn(T, D + 8, generator=g)[:, :D]  # rows with a stride of D + 8
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)]).reshape(-1)
    ids[-A:] = -1  # the last token is padding
    experts = LocalExperts(held, gate_up.to(DEVICE).to(dtype), down.to(DEVICE).to(dtype), E)
    experts.triton = True
    experts.triton_max_pairs, experts.triton_max_rows_per_expert = 0, 10**6  # the sorted path
    monkeypatch.setattr(triton_experts, "SORTED_CONFIG", {"block_n": 32, "block_k": 32})
    # The one launch's down blocks twice as wide (the same block_k: the same sums).
    monkeypatch.setattr(triton_experts, "SORTED_FUSED_DOWN_CONFIG", {"block_n": 64, "block_k": 32})
    xd, idsd = x.to(DEVICE).to(dtype), ids.to(DEVICE)
    monkeypatch.setattr(triton_experts, "SORTED_FUSED", False)
    two = experts(xd, idsd, group=A)
    monkeypatch.setattr(triton_experts, "SORTED_FUSED", True)
    fused = [experts(xd, idsd, group=A) for _ in range(2)]
    assert experts._sorted_sync is not None and not experts._sorted_sync.any()
    computed = torch.tensor([e in held for e in ids.tolist()])
    assert 0 < computed.sum() < len(ids)
    for out in fused:
        assert torch.equal(out[computed.to(DEVICE)], two[computed.to(DEVICE)])
    ref = experts_reference(x, ids, A, held, gate_up, down)
    got = fused[0].double().cpu()[computed]
    rel = ((got - ref[computed]).norm() / ref[computed].norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize(
    "split_keys,merge_last,preload",
    [(256, False, False), (64, False, False), (64, True, False), (64, True, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,Tq,L,window", [(1, 1, 256, None), (3, 4, 300, None), (2, 2, 1200, None), (3, 3, 200, 50)]
)
def test_decode_attention_kernel_equals_float64_reference(
    dtype, B, Tq, L, window, split_keys, merge_last, preload, monkeypatch
):
    """The static steps' attention kernel (keys read from the cache by slot, grouped query heads,
    causal by position, sliding window, long caches split over programs and merged, by a kernel
    or by each head's last program: `SPLIT_MERGE_LAST`, whose counters end at 0; each program's
    first block of past keys read before the wait, `ATTENTION_PRELOAD`) against float64 math."""
    from specmoe_ray.models import triton_kernels
    from specmoe_ray.models.triton_kernels import decode_attention

    monkeypatch.setattr(triton_kernels, "SPLIT_KEYS", split_keys)
    monkeypatch.setattr(triton_kernels, "SPLIT_MERGE_LAST", merge_last)
    monkeypatch.setattr(triton_kernels, "ATTENTION_PRELOAD", preload)
    counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)

    skip_bf16_on_interpreter(dtype)
    g = torch.Generator().manual_seed(B * Tq + L)
    H, Hkv, hd, S, Lmax = 8, 2, 128, 5, 2048
    G = H // Hkv
    kv = torch.randn(S + 1, 2, Hkv, Lmax, hd, generator=g).to(dtype)
    q = torch.randn(B * Tq, H, hd, generator=g).to(dtype)
    slots = [4, 0, 2][:B]
    lasts = [L - 1, L // 2, 17][:B]  # each sequence's last query position
    qpos = torch.tensor([[p - Tq + 1 + t for t in range(Tq)] for p in lasts])
    slots_t = torch.tensor(slots)
    out = decode_attention(
        q.to(DEVICE), kv.to(DEVICE), slots_t.to(DEVICE), qpos.to(DEVICE), L, window, counters=counters
    )
    assert not counters.any()
    out = out.double().cpu().view(B * Tq, H, hd)
    ref = torch.empty(B * Tq, H, hd, dtype=torch.float64)
    for b in range(B):
        for t in range(Tq):
            p = int(qpos[b, t])
            lo = 0 if window is None else max(0, p - window + 1)
            for h in range(H):
                keys = kv[slots[b], 0, h // G, lo : p + 1].double()
                values = kv[slots[b], 1, h // G, lo : p + 1].double()
                att = torch.softmax(keys @ q[b * Tq + t, h].double() / hd**0.5, dim=0)
                ref[b * Tq + t, h] = att @ values
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize("norm,preload", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Tq,L,split_keys", [(1, 1, 256, 256), (3, 4, 300, 256), (2, 2, 700, 64)])
def test_attention_with_norm_rope_and_cache_write_equals_the_separate_steps(
    B, Tq, L, split_keys, dtype, norm, preload, monkeypatch
):
    """`decode_attention(..., new=NewKeys(...))` (`ROPE_IN_ATTENTION`): the kernel norms and
    ropes q and the step's keys, writes K/V into the cache (each token at its write slot and
    position; a padding token at the scratch slot) and attends, == `fused.qk_rope` + the cache
    write + the plain kernel: the same cache, the same output (one or several programs per head).
    preload (`ATTENTION_PRELOAD`): blocks of past keys read before the kernel writes the step's
    (a sequence whose first block holds its new positions must read that block again)."""
    from specmoe_ray.models import fused, triton_kernels
    from specmoe_ray.models.triton_kernels import NewKeys, decode_attention

    skip_bf16_on_interpreter(dtype)
    monkeypatch.setattr(triton_kernels, "SPLIT_KEYS", split_keys)
    monkeypatch.setattr(triton_kernels, "ATTENTION_PRELOAD", preload)
    g = torch.Generator().manual_seed(B * Tq + L)
    H, Hkv, hd, S, Lmax = 8, 2, 128, 5, 1024
    N = B * Tq
    kv = torch.randn(S + 1, 2, Hkv, Lmax, hd, generator=g).to(dtype)
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g).to(dtype)  # one projection's output
    q, k, v = (t.view(N, -1, hd) for t in qkv.split([H * hd, Hkv * hd, Hkv * hd], -1))
    slots = torch.tensor([4, 0, 2][:B])
    lasts = [L - 1, L // 2, 17][:B]
    qpos = torch.tensor([[p - Tq + 1 + t for t in range(Tq)] for p in lasts])
    write_slots = slots.repeat_interleave(Tq)
    if Tq > 1:
        write_slots[Tq - 1] = S  # the first sequence's last token is padding: the scratch slot
    angles = qpos.reshape(-1, 1).double() * torch.rand(hd // 2, generator=g).double()
    emb = torch.cat((angles, angles), -1)[:, None, :]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    qw = (1 + 0.1 * torch.randn(hd, generator=g)).to(dtype) if norm else None
    kw = (1 + 0.1 * torch.randn(hd, generator=g)).to(dtype) if norm else None
    eps = 1e-6
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    new = NewKeys(to(k), to(v), to(cos), to(sin), to(qw), to(kw), eps, to(write_slots), to(qpos.reshape(-1)))
    got_cache = kv.clone().to(DEVICE)
    got = decode_attention(to(q), got_cache, to(slots), to(qpos), L, None, new=new)
    # The separate steps: norm + rope (fused.qk_rope, eager), the cache write, the plain kernel.
    rq, rkv = fused.qk_rope.__wrapped__(q, k, v, cos, sin, qw, kw, eps)
    ref_cache = kv.clone()
    ref_cache[write_slots, :, :, qpos.reshape(-1)] = rkv
    ref = decode_attention(to(rq), ref_cache.to(DEVICE), to(slots), to(qpos), L, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    cache_err = (got_cache.cpu().double() - ref_cache.double()).abs().max().item()
    assert cache_err <= (1e-5 if dtype == torch.float32 else 0.05), cache_err  # bf16: one rounding
    rel = ((got.cpu().double() - ref.cpu().double()).norm() / ref.cpu().double().norm()).item()
    assert rel < tol, rel


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("T", [1, 3, 4, 32])
@pytest.mark.parametrize("E,renorm,masked", [(128, True, True), (60, False, False)])
@pytest.mark.parametrize("variant", ["one pass", "preloaded", "512 columns", "packed top-k", "tensor cores"])
def test_router_topk_kernel_equals_router_then_routing(T, E, renorm, masked, norm, variant, monkeypatch):
    """`router_topk` (`ROUTER_TOPK`): the router's logits and the routing in one kernel (its last
    program routes) == float64 logits through torch's softmax + top-k: the same experts, the same
    weights, the same load counts (padding tokens count nothing); twice in a row (the kernel
    leaves its counter of finished programs at 0 for the next launch). norm
    (`ROUTER_TOPK_NORM`): the tokens are first `add_rms_norm(x, residual)`'s, which the kernel
    also returns (normed rows, x + residual). Variants: whole rows in one block, 512 columns
    at a time (two passes with the norm), whole rows with the packed top-k (`TOPK_PACKED`),
    whole rows loaded before the program waits for the kernel ahead (`ROUTER_TOPK_PRELOAD`).
    T = 32 (`ROUTER_TOPK_MAX_TOKENS` raised): rows in blocks sized to the product budget. Tensor
    cores: the products by tl.dot, 16 experts per program (`ROUTER_TOPK_DOT_ROWS`)."""
    from specmoe_ray.models import fused, triton_kernels

    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK_ONE_PASS", 0 if variant == "512 columns" else 16384)
    monkeypatch.setattr(triton_kernels, "TOPK_PACKED", variant == "packed top-k")
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK_PRELOAD", variant == "preloaded")
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK_DOT_ROWS", 1 if variant == "tensor cores" else 1 << 20)

    g = torch.Generator().manual_seed(T * E)
    D, k = 600, 8  # D: more than one 512-column block
    x, weight = torch.randn(T, D, generator=g), torch.randn(E, D, generator=g) / D**0.5
    mask = (torch.arange(T) != 1).long() if masked else None  # token 1 is padding
    args = None
    if norm:
        residual, gamma = torch.randn(T, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g)
        args = (residual.to(DEVICE), gamma.to(DEVICE), 1e-6)
        want_h, want_sum = fused.add_rms_norm.__wrapped__(x, residual, gamma, 1e-6)
        x_in, x = x, want_h
    logits = x.double() @ weight.double().T
    p = torch.softmax(logits, -1)
    want_w, want_ids = p.topk(k, -1)
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(E, dtype=torch.long, device=DEVICE)
    for round in (1, 2):
        out = triton_kernels.router_topk(
            (x_in if norm else x).to(DEVICE), weight.to(DEVICE), done, k, renorm, torch.float32, counts,
            None if mask is None else mask.to(DEVICE), args,
        )  # fmt: skip
        w, ids = out[:2]
        if norm:
            assert torch.allclose(out[2].cpu(), want_h, atol=1e-5) and torch.allclose(out[3].cpu(), want_sum)
        assert torch.equal(ids.cpu(), want_ids), round
        assert torch.allclose(w.cpu().double(), want_w, atol=1e-5), round
        assert done.item() == 0
    want_counts = torch.zeros(E, dtype=torch.long)
    for t in range(T):
        if mask is None or mask[t]:
            want_counts[want_ids[t]] += 2
    assert torch.equal(counts.cpu(), want_counts)


@pytest.mark.parametrize("E,renorm", [(128, True), (60, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_softmax_topk_kernel_equals_torch(E, renorm, dtype, packed, monkeypatch):
    """The routing kernel == torch's softmax + top-k; among tied logits (bfloat16) the lowest
    expert first. packed: each pick by one reduction over (value, expert) keys (`TOPK_PACKED`)."""
    from specmoe_ray.models import fused, triton_kernels

    monkeypatch.setattr(triton_kernels, "TOPK_PACKED", packed)
    logits = torch.randn(37, E, generator=torch.Generator().manual_seed(E)).to(dtype)
    weights, ids = triton_kernels.softmax_topk(logits.to(DEVICE), 8, renorm, torch.float32)
    ref_w, ref_ids = fused.softmax_topk.__wrapped__(logits, 8, renorm, logits, False)
    # bfloat16 logits tie often; among equal logits either expert is a top-k choice (the kernel
    # takes the lowest index), so compare the logits the ids select, and the ids where no tie.
    ids = ids.cpu()
    assert torch.equal(logits.gather(1, ids), logits.gather(1, ref_ids))
    assert all(len(set(row)) == 8 for row in ids.tolist())
    tied = (logits.gather(1, ref_ids)[:, :, None] == logits[:, None, :]).sum(-1).gt(1).any(-1)
    assert torch.equal(ids[~tied], ref_ids[~tied]) and (~tied).sum() > 10
    lowest_first = torch.sort(-logits.float(), dim=1, stable=True).indices[:, :8]
    assert torch.equal(ids, lowest_first) and (dtype == torch.float32 or tied.any())
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-7)


def test_softmax_topk_kernel_counts_the_load_of_unmasked_tokens():
    """With load counters (and a token mask), the routing kernel adds each unmasked token's k
    experts to them, as `ExpertLoad.record` does with a scatter kernel; twice, cumulatively."""
    from specmoe_ray.models import triton_kernels
    from specmoe_ray.moe.dispatch import ExpertLoad

    g = torch.Generator().manual_seed(5)
    T, E, k = 29, 60, 6
    logits = torch.randn(T, E, generator=g)
    mask = (torch.rand(T, generator=g) > 0.3).long()
    counts = torch.full((E,), 7, dtype=torch.long)  # counts from earlier steps stay
    ref = ExpertLoad(E, "cpu")
    ref.counts[0] = counts.clone()
    counts = counts.to(DEVICE)
    for _ in range(2):
        x, m = logits.to(DEVICE), mask.to(DEVICE)
        _, ids = triton_kernels.softmax_topk(x, k, True, torch.float32, counts, m)
        ref.record(0, ids.cpu(), mask.repeat_interleave(k))
    assert torch.equal(counts.cpu(), ref.counts[0]) and counts.sum() == 7 * E + 2 * k * mask.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_projection_kernel_equals_float64_reference(dtype):
    """Inside static steps a one-row projection runs the per-pair kernel (`fused.linear` on
    GPUs, `triton_experts.matvec`)."""
    from specmoe_ray.models import fused

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1000, generator=g).to(dtype), torch.randn(333, 1000, generator=g).to(dtype)
    with fused.active():
        if DEVICE == "cuda":
            out = fused.linear(x.to(DEVICE), w.to(DEVICE)).double().cpu()
        else:
            out = triton_experts.matvec(x, w).double()
    ref = x.double() @ w.double().T
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel


def test_preload_rows_limit_is_set_for_a_block_and_restored(monkeypatch):
    """`fused.preload_rows` (a draft model's steps: `DRAFT_PRELOAD_ROWS`) sets the few-row
    projections' limit for its block, nested blocks restore the outer one, and outside any block
    the limit is `triton_experts.PRELOAD_ROWS`, also on another thread inside a block."""
    import threading

    from specmoe_ray.models import fused

    monkeypatch.setattr(triton_experts, "PRELOAD_ROWS", 1)
    seen = []
    with fused.preload_rows(4):
        seen.append(fused.preload_rows_limit())
        with fused.preload_rows(2):
            seen.append(fused.preload_rows_limit())
        seen.append(fused.preload_rows_limit())
        other = threading.Thread(target=lambda: seen.append(fused.preload_rows_limit()))
        other.start()
        other.join()
    seen.append(fused.preload_rows_limit())
    with pytest.raises(KeyError), fused.preload_rows(8):
        raise KeyError("a failing step")
    seen.append(fused.preload_rows_limit())
    assert seen == [4, 2, 4, 1, 1, 1]


@pytest.mark.parametrize("kernel", ["pairs", "preload"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_glu_projection_equals_float64_reference(dtype, kernel):
    """A dense MLP's gate and up projections of one row inside static steps (`fused.glu_linear`
    on GPUs, `fused.GLU_MATVEC`): the experts' GLU kernel on one pair, or the preloading kernel
    (gate and up rows in registers before the wait; `triton_experts.GLU_PRELOAD`, opt-in),
    silu(gate) * up against float64 math; widths that are not multiples of the blocks."""
    from specmoe_ray.models import fused

    g = torch.Generator().manual_seed(3)
    K, I = 1000, 333
    x, w = torch.randn(1, K, generator=g).to(dtype), (torch.randn(2 * I, K, generator=g) / K**0.5).to(dtype)
    out = triton_experts.glu_matvec(x.to(DEVICE), w.to(DEVICE), kernel=kernel)
    pays = triton_experts.GLU_PRELOAD and triton_experts.preload_pays(x.to(DEVICE).device)
    default = "preload" if pays else "pairs"
    if DEVICE == "cuda" and kernel == default:  # the static step's path is this kernel
        with fused.active():
            assert torch.equal(fused.glu_linear(x.to(DEVICE), w.to(DEVICE)), out)
    gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    # (bfloat16: rounded where the unfused path rounds, gate, up, silu and the product)
    assert out.shape == (1, I) and rel < (1e-6 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_matvec_equals_add_rms_norm_then_linear(dtype, normed):
    """Batch-1 decode's residual add + RMS norm + the projection after it in one kernel: the
    same residual stream and normed row as `add_rms_norm` (eager), the projection against
    float64 math on that row."""
    from specmoe_ray.models import fused, triton_kernels

    skip_bf16_on_interpreter(dtype, why="Triton's interpreter rounds float32 to bfloat16 otherwise than GPUs")
    g = torch.Generator().manual_seed(2)
    K, N, eps = 1000, 333, 1e-6
    x, res = torch.randn(1, K, generator=g).to(dtype), torch.randn(1, K, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    out, h, total = triton_kernels.add_norm_matvec(
        x.to(DEVICE), res.to(DEVICE), gamma.to(DEVICE), eps, w.to(DEVICE), normed
    )
    ref_h, ref_total = fused.add_rms_norm.__wrapped__(x, res, gamma, eps)
    assert torch.equal(total.cpu(), ref_total)
    if normed:  # the mean of squares sums in another order: a last-bit difference may round over
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
        torch.testing.assert_close(h.cpu(), ref_h, **tol)
    else:
        assert h is None
    ref = ref_h.double() @ w.double().T
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_matvec_equals_add_rms_norm_then_projection(dtype, glu):
    """A dense layer's residual add + RMS norm inside the preloading projection after it
    (`triton_experts.norm_matvec`, `fused.NORM_PRELOAD`): the residual stream equal to
    `add_rms_norm`'s, the projection (q/k/v; gate/up's silu(gate) * up) against float64 math on
    `add_rms_norm`'s normed row; widths that are not powers of two or multiples of the block."""
    from specmoe_ray.models import fused

    skip_bf16_on_interpreter(dtype, why="Triton's interpreter rounds float32 to bfloat16 otherwise than GPUs")
    g = torch.Generator().manual_seed(5)
    K, N, eps = 1000, 333, 1e-6
    x, res = torch.randn(1, K, generator=g).to(dtype), torch.randn(1, K, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    w = (torch.randn(2 * N if glu else N, K, generator=g) / K**0.5).to(dtype)
    out, total = triton_experts.norm_matvec(
        x.to(DEVICE), res.to(DEVICE), gamma.to(DEVICE), eps, w.to(DEVICE), glu=glu
    )
    ref_h, ref_total = fused.add_rms_norm.__wrapped__(x, res, gamma, eps)
    assert torch.equal(total.cpu(), ref_total)
    ref = ref_h.double() @ w.double().T
    if glu:
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    # (bfloat16: the normed row may differ from torch's in a last bit; rounded as torch rounds)
    assert out.shape == (1, N) and rel < (1e-6 if dtype == torch.float32 else 2e-2), rel


def test_norms_inside_preloading_projections_give_the_tokens_of_transformers(checkpoints, monkeypatch):
    """`fused.NORM_PRELOAD` (opt-in): a dense model's batch-1 static steps run each residual add
    + norm inside the q/k/v or gate/up projection after it (`norm_matvec`), all but layer 0's
    input norm. Greedy tokens == transformers (float32), and == the steps without it."""
    from conftest import hf_greedy

    from specmoe_ray import Engine, SamplingParams
    from specmoe_ray.models import fused

    calls = []
    kernel = triton_experts.norm_matvec
    monkeypatch.setattr(
        triton_experts, "norm_matvec", lambda *a, **k: calls.append(k.get("glu")) or kernel(*a, **k)
    )
    path = checkpoints("qwen3")
    prompt = [[5, 9, 17, 3, 60, 2]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(fused, "NORM_PRELOAD", ("qkv", "gate_up") if on else ())
        with Engine.from_pretrained(path, device=DEVICE, step_graphs="padded", max_model_len=64) as engine:
            layers = engine.model.args.num_layers
            got[on] = [o.token_ids for o in engine.generate(prompt, params)]
        if on:  # 7 decode steps (the prompt's step has 6 tokens): gate/up in every layer, q/k/v from layer 1
            assert calls.count(True) == 7 * layers and calls.count(None) == 7 * (layers - 1), calls
    assert len(calls) == 7 * (2 * layers - 1)
    assert got[True] == got[False] == hf_greedy(path, prompt, 8)


def test_norms_inside_projections_give_the_tokens_of_transformers(checkpoints, monkeypatch):
    """`fused.FUSED_NORM_MATVEC`: batch-1 static steps run each residual add + norm inside the
    q/k/v and router projections (`add_norm_matvec`), the router writing the normed row for the
    experts; a dense layer (qwen3_moe's mlp_only_layers) keeps the plain path between them.
    Greedy tokens == transformers (float32), one sequence at a time."""
    from conftest import hf_greedy

    from specmoe_ray import Engine, SamplingParams
    from specmoe_ray.models import fused, triton_kernels

    calls = []
    kernel = triton_kernels.add_norm_matvec
    monkeypatch.setattr(triton_kernels, "add_norm_matvec", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(fused, "FUSED_NORM_MATVEC", True)
    path = checkpoints("qwen3_moe")
    prompt = [[5, 9, 17, 3, 60, 2]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with Engine.from_pretrained(path, device=DEVICE, step_graphs="padded", max_model_len=64) as engine:
        got = [o.token_ids for o in engine.generate(prompt, params)]
    # 2 kernels per step in layer 2: layer 0 adds no residual before its input norm, layer 1 is
    # dense. 7 decode steps (the prompt's step has 6 tokens).
    assert len(calls) == 2 * 7
    assert got == hf_greedy(path, prompt, 8)


@pytest.mark.parametrize("merge_last", [False, True])
def test_rope_in_attention_gives_the_tokens_of_transformers(tmp_path, monkeypatch, merge_last):
    """`triton_kernels.ROPE_IN_ATTENTION`: static steps norm and rope q and k, write K/V into the
    cache and attend in one kernel (Triton's interpreter here): greedy decode of one sequence
    and n-gram verify steps of several (padding tokens included) give transformers' tokens.
    merge_last: the keys split over programs every 16, merged by each head's last program
    (`SPLIT_MERGE_LAST`, the layer's counters)."""
    from conftest import hf_greedy, make_checkpoint

    from specmoe_ray import Engine, SamplingParams
    from specmoe_ray.models import triton_kernels

    # The tests' qwen3_moe with heads of 64 (the kernel's tensor-core products want >= 16).
    path = make_checkpoint(str(tmp_path / "qwen3_moe_hd64"), "qwen3_moe", seed=3, head_dim=64)
    calls = []
    kernel = triton_kernels.decode_attention
    monkeypatch.setattr(
        triton_kernels,
        "decode_attention",
        lambda *a, **k: calls.append(k.get("new") is not None) or kernel(*a, **k),
    )
    monkeypatch.setattr(triton_kernels, "ROPE_IN_ATTENTION", True)
    if merge_last:
        monkeypatch.setattr(triton_kernels, "SPLIT_KEYS", 16)
        monkeypatch.setattr(triton_kernels, "SPLIT_MERGE_LAST", True)
    prompts = [[5, 9, 17, 3, 60, 2], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [30, 31, 32]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for batch, draft in (([prompts[0]], None), (prompts, "ngram")):
        calls.clear()
        with Engine.from_pretrained(
            path, device=DEVICE, draft=draft, step_graphs="padded", max_model_len=64
        ) as e:
            got = [o.token_ids for o in e.generate(batch, params)]
        assert calls and all(calls), (draft, calls)
        assert got == hf_greedy(path, batch, 8), draft


@pytest.mark.parametrize("arch,norm", [("qwen3_moe", False), ("mixtral", False), ("qwen3_moe", True)])
def test_router_topk_gives_the_tokens_of_transformers(checkpoints, monkeypatch, arch, norm):
    """`triton_kernels.ROUTER_TOPK`: static steps of <= 4 tokens route with the one-kernel
    router + top-k (Triton's interpreter here; Mixtral's float32 combine weights too), with
    `ROUTER_TOPK_NORM` the add + norm before it inside the same kernel: greedy decode and n-gram
    verify steps of one sequence give transformers' tokens."""
    from conftest import hf_greedy

    from specmoe_ray import Engine, SamplingParams
    from specmoe_ray.models import triton_kernels

    tokens = []
    kernel = triton_kernels.router_topk
    monkeypatch.setattr(
        triton_kernels,
        "router_topk",
        lambda x, *a: tokens.append((x.shape[0], a[7] is not None)) or kernel(x, *a),
    )
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK", True)
    monkeypatch.setattr(triton_kernels, "ROUTER_TOPK_NORM", norm)
    path = checkpoints(arch)
    prompt = [[5, 9, 17, 3, 60, 2, 5, 9, 17, 3]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for draft in (None, "ngram"):
        tokens.clear()
        with Engine.from_pretrained(
            path, device=DEVICE, draft=draft, step_graphs="padded", max_model_len=64
        ) as e:
            got = [o.token_ids for o in e.generate(prompt, params)]
        assert tokens and {n for n, _ in tokens} <= {1, 2, 3, 4}, tokens
        assert all(normed == norm for _, normed in tokens)  # the add + norm inside, or not
        assert got == hf_greedy(path, prompt, 10), draft
    assert max(n for n, _ in tokens) > 1  # verify steps with drafted tokens


@pytest.mark.parametrize("rows", [2, 5, 16])
def test_rows_matmul_equals_float64_reference(rows):
    """A verify step's few rows through the deduplicating kernel as a dense GEMM
    (`rows_matmul`, `fused.MATMUL_ROWS`), widths off the block sizes."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 300, generator=g), torch.randn(77, 300, generator=g)
    out = triton_experts.rows_matmul(x.to(DEVICE), w.to(DEVICE)).double().cpu()
    ref = x.double() @ w.double().T
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6


def test_every_kernel_compiles_for_hopper_and_ampere():
    """Triton's interpreter runs the kernels' arithmetic, not their lowering to a GPU: every
    kernel, over the constexpr branches the engine launches, goes through Triton's code generator
    and ptxas for sm90 (with PDL) and sm80 here, in a process without the interpreter
    (`tests/cpu/compile_kernels.py`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])  # this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (
        "\n".join(line for line in lines if line.startswith("FAIL")) or proc.stderr[-3000:]
    )
    names = {"attention", "merge", "softmax_topk", "router_topk", "add_norm_matvec", "rank_sort", "pack"}
    names |= {
        "experts (sorted)",
        "experts (per pair)",
        "experts (dedup)",
        "peer_sum signal",
        "peer_sum combine",
        "peer_sum add_norm",
        *(f"{k} ({w})" for k in ("chunk_mass", "pick") for w in ("logits", "weights")),
        "verify",
        "greedy_verify",
    }
    for name in names:
        assert any(line.startswith(f"ok {name} sm80") for line in lines), name
        assert sum(line.startswith(f"ok {name} sm90") for line in lines) >= 2, name


def test_programmatic_dependent_launch_only_on_hopper_or_later(monkeypatch):
    """PDL (on by default) asks for griddepcontrol instructions, which GPUs before compute
    capability 9 lack: launches there (and on CPUs, and with PDL off) get no PDL arguments."""
    monkeypatch.setattr(triton_experts, "PDL_SUPPORTED", True)
    monkeypatch.setattr(triton_experts, "_PDL_DEVICES", {})
    capability = {0: (8, 0), 1: (9, 0), 2: (10, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability[i])
    pdl = {"launch_pdl": True, "PDL": True}
    assert triton_experts.pdl_launch(torch.device("cuda", 0)) == {}  # an A100
    assert triton_experts.pdl_launch(torch.device("cuda", 1)) == pdl  # an H100
    assert triton_experts.pdl_launch(torch.device("cuda", 2)) == pdl
    assert triton_experts.pdl_launch(torch.device("cpu")) == {}
    monkeypatch.setattr(triton_experts, "PDL", False)
    assert triton_experts.pdl_launch(torch.device("cuda", 1)) == {}


@pytest.mark.parametrize("n", [1, 5, 64, 256, 300, 1030])
def test_rank_sort_equals_torch_stable_sort(n):
    """The pairs' sorting kernel against torch's stable sort: the same keys and the same order
    (ties keep their input order), with padding ids (-1), many ties and large keys."""
    g = torch.Generator().manual_seed(n)
    for high in (3, 130, 2**40):
        keys = torch.randint(-1, high, (n,), generator=g).to(DEVICE)
        got, order = triton_experts.rank_sort(keys)
        ref, ref_order = torch.sort(keys, stable=True)
        assert torch.equal(got, ref) and torch.equal(order, ref_order), high
        assert order.dtype == torch.long


@pytest.mark.parametrize(
    "S,r0,replicas,masked,T,D",
    [(1, 1, 1, False, 6, 24), (2, 0, 1, True, 6, 24), (3, 1, 2, True, 6, 24), (2, 0, 2, False, 40, 600)],
)
def test_pack_pairs_equals_torch_and_a_python_reference(S, r0, replicas, masked, T, D):
    """Rank 0's send buffer of a static exchange: the Triton kernel and the torch path give the
    same buffer (ids everywhere, rows wherever a pair went), the same slots and counts, and both
    match a loop over the pairs: owner = replica (token + rotation) % replicas of the expert,
    each shard's block holds its pairs in pair order, then id -1; masked pairs travel as -1.
    T = 40, D = 600: several programs along the pairs and along the columns."""
    from specmoe_ray.moe import triton_dispatch
    from specmoe_ray.moe.dispatch import pack_static, unpack_rows

    g = torch.Generator().manual_seed(S * 10 + replicas)
    A, E = 4, 10
    C = T * A
    x = torch.randn(T, D, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)]).reshape(-1).to(DEVICE)
    table = torch.stack([torch.randperm(S, generator=g)[:replicas] for _ in range(E)]) + r0
    num_replicas = torch.randint(1, replicas + 1, (E,), generator=g)
    mask = (torch.arange(T * A) < (T - 2) * A).long() if masked else None  # last 2 tokens: padding
    rotation = torch.tensor(3)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    outs = []
    for fn in (triton_dispatch.pack_pairs, pack_static):
        counts = torch.zeros(S, dtype=torch.long, device=DEVICE)
        payload, slot = fn(x, ids, to(mask), to(table), to(num_replicas), to(rotation), counts, S, C, A, r0)
        rows, sent = unpack_rows(payload, D, x.dtype)
        outs.append((rows.cpu(), sent.cpu(), slot.cpu(), counts.cpu()))
    filled = [0] * S
    want_ids = torch.full((S * C,), -1, dtype=torch.long)
    want_slot, want_counts = [], [0] * S
    for p in range(T * A):
        e = int(ids[p])
        s = int(table[e, (p // A + 3) % int(num_replicas[e])]) - r0
        want_slot.append(s * C + filled[s])
        keep = mask is None or bool(mask[p])
        want_ids[want_slot[-1]] = e if keep else -1
        want_counts[s] += keep
        filled[s] += 1
    for rows, sent, slot, counts in outs:
        assert slot.tolist() == want_slot and counts.tolist() == want_counts
        assert torch.equal(sent, want_ids)
        assert torch.equal(rows[slot], x.cpu()[torch.arange(T * A) // A])


@pytest.mark.parametrize("n", [3, 64, 300, 1100])
@pytest.mark.parametrize("mapped", [False, True])
def test_sort_pairs_equals_torch(n, mapped):
    """The experts' one-kernel sort (`sort_pairs`): local ids (global ids through the holder's
    table, -1 for padding and experts held elsewhere), their stable order, the experts' offsets
    and the counts, against torch.sort, searchsorted and scatter_add."""
    from specmoe_ray.moe.experts import LocalExperts

    g = torch.Generator().manual_seed(n)
    E = 100
    held = sorted(torch.randperm(E, generator=g)[:70].tolist()) if mapped else list(range(E))
    experts = LocalExperts(held, torch.zeros(len(held), 2, 1), torch.zeros(len(held), 1, 1), E)
    ids = torch.randint(-1, E, (n,), generator=g)
    table = experts.to_local if mapped else None
    before = torch.randint(0, 5, (len(held) + 1,), generator=g)
    counts = before.to(DEVICE)  # a copy on GPUs; the same tensor on CPUs, hence `before`'s clone
    before = before.clone()
    local, order, offsets = triton_experts.sort_pairs(
        ids.to(DEVICE), None if table is None else table.to(DEVICE), len(held), counts
    )
    want = experts.to_local[ids] if mapped else ids
    ref, ref_order = torch.sort(want, stable=True)
    assert torch.equal(local.cpu(), ref) and torch.equal(order.cpu(), ref_order)
    bounds = torch.arange(len(held) + 1)
    assert torch.equal(offsets.cpu(), torch.searchsorted(ref, bounds, out_int32=True))
    added = torch.zeros(len(held) + 1, dtype=torch.long).scatter_add_(0, want + 1, torch.ones_like(want))
    added[0] = 0  # slot 0 (skipped pairs) is left as it was
    assert torch.equal(counts.cpu(), before + added)


@pytest.mark.parametrize("mask", ["split", "held", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("programs", [0, 128])
def test_peer_sum_combine_kernel_equals_float64(mask, dtype, programs, monkeypatch):
    """`PeerSum.combine_signal`'s kernel (without its signal: the interpreter runs no PTX): a
    rank's share of a MoE layer, each pair's output times its gate weight rounded to the model's
    dtype, the pairs not computed here dropped (whatever their rows hold: NaN here), summed in
    float32 in top-k order; against float64 and against `replica.partial_combine`, which the
    NCCL path runs. split: every pair; held: experts computed here ([E] bool, looked up by id);
    pairs: [T, A] bool. programs (`COMBINE_PROGRAMS`): 0, a program per row; 128, each row's
    columns in 256-wide blocks (D = 300: the second one masked)."""
    from specmoe_ray.moe import peer_sum, replica

    monkeypatch.setattr(peer_sum, "COMBINE_PROGRAMS", programs)
    assert peer_sum.combine_block(5, 300) == (512 if programs == 0 else 256)

    skip_bf16_on_interpreter(dtype, why="Triton's interpreter rounds float32 to bfloat16 otherwise than GPUs")
    T, A, D, E = 5, 8, 300, 16
    g = torch.Generator().manual_seed(3)
    y = torch.randn(T, A, D, generator=g).to(dtype)
    weights = torch.rand(T, A, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    held = torch.zeros(E, dtype=torch.bool)
    held[::3] = True
    own = {"split": torch.ones(T, A, dtype=torch.bool), "held": held[ids], "pairs": held[ids.flip(1)]}[mask]
    y[~own] = float("nan")  # rows computed elsewhere: unspecified
    keep, index = {"split": (None, None), "held": (held, ids), "pairs": (own, None)}[mask]
    products = (y.double() * weights.double()[..., None]).to(dtype).double()
    ref = torch.where(own[..., None], products, 0.0).sum(1)
    out = torch.full((T, D), float("nan"), device=DEVICE)
    keep_d, index_d = (None if v is None else v.to(DEVICE) for v in (keep, index))
    peer_sum.launch_combine(y.to(DEVICE), weights.to(DEVICE), keep_d, index_d, out, None, signal=False)
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
    nccl = replica.partial_combine.__wrapped__(y, weights, keep, index, y)
    torch.testing.assert_close(out.float(), nccl, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peer_sum_kernel_equals_float64(world, dtype):
    """`moe/peer_sum.py`'s sum + add + norm kernel (without its flags: the interpreter runs no
    PTX; tests/gpu run them on 2 GPUs) against float64: the world's slots (read through their
    addresses) summed in rank order, rounded, added to the residual, RMS-normed as
    `fused.sum_add_rms_norm`; every rank's launch gives the same rows; without the norm, the
    rounded sum alone."""
    from specmoe_ray.moe import peer_sum

    skip_bf16_on_interpreter(dtype, why="Triton's interpreter rounds float32 to bfloat16 otherwise than GPUs")
    T, D, eps = 5, 300, 1e-6  # D not a power of 2: masked columns
    g = torch.Generator().manual_seed(world)
    slots = [torch.randn(T, D, generator=g).to(DEVICE) for _ in range(world)]
    ptrs = torch.tensor([s.data_ptr() for s in slots], dtype=torch.int64, device=DEVICE)
    pads = torch.zeros(world, dtype=torch.int64, device=DEVICE)  # not read without flags
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)  # neither
    residual = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    total = slots[0].double()
    for s in slots[1:]:
        total = (total + s.double()).float().double()  # float32 adds, in rank order
    x_ref = (total.to(dtype).double() + residual.double()).to(dtype).double()
    ref = weight.double() * (x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + eps))
    runs = []
    for rank in range(world):
        x, out = torch.empty_like(residual), torch.empty_like(residual)
        peer_sum.launch_sum(ptrs, pads, count, rank, residual, weight, x, out, eps, True, flags=False)
        runs.append((x, out))
    x, out = runs[0]
    assert all(torch.equal(x, r[0]) and torch.equal(out, r[1]) for r in runs[1:])
    assert (x.double() != x_ref).float().mean().item() < 0.01  # bf16: a double rounding, rarely
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    alone = torch.empty_like(residual)
    peer_sum.launch_sum(ptrs, pads, count, 1, alone, alone, alone, alone, 0.0, False, flags=False)
    assert torch.equal(alone, total.to(dtype))
    with pytest.raises(ValueError, match="stop flag"):  # a wait would read address 0 on a GPU
        peer_sum.launch_sum(ptrs, pads, count, 1, alone, alone, alone, alone, 0.0, False, flags=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")  # (NaN rows)
@pytest.mark.parametrize("V", [10, 2048, 5000, 40000])
def test_inverse_cdf_kernel_equals_float64_searchsorted(V):
    """A sampled step's last draw in two kernels (`engine/triton_sampling.py`; 1 to 40 chunks a
    row): the first token
    whose running mass exceeds u * total, from softmax(logits / T) or from weights, against
    float64 math; uniforms near a CDF step (where float32 masses may round to either side) are
    left out, except those of exactly representable masses. Zero-mass tokens (-inf logits,
    zero weights, at the end of the row too) are never drawn, even at u -> 1."""
    from specmoe_ray.engine import triton_sampling

    g = torch.Generator().manual_seed(V)
    R = 12
    logits = torch.randn(R, V, generator=g) * 3
    logits[:, -3:] = float("-inf")  # tokens the model rules out, last in the row
    logits[0, : V // 2] = float("-inf")
    temperature = torch.rand(R, generator=g) * 1.5 + 0.3
    u = torch.rand(R, generator=g, dtype=torch.float64)
    u[0], u[2], u[3] = 0.0, 1 - 2**-53, 0.5
    probs = torch.softmax(logits.double() / temperature[:, None].double(), dim=-1)
    cdf = probs.cumsum(-1)
    ref = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
    margin = ((cdf - u[:, None] * cdf[:, -1:]).abs() / cdf[:, -1:]).min(-1).values  # to the nearest step
    got = triton_sampling.inverse_cdf(logits.to(DEVICE), u.to(DEVICE), temperature.to(DEVICE)).cpu()
    clear = margin > 1e-6  # (float32 masses: ~1e-7 relative each)
    clear[[0, 2]] = False
    assert clear.sum() >= 6 and torch.equal(got[clear], ref[clear])
    assert got[0] == V // 2  # u = 0: the first token with mass (past the -inf)
    assert got[2] == V - 4  # u -> 1: the last token with mass
    assert torch.isfinite(logits.gather(1, got[:, None])).all()  # never a ruled-out token
    broken = torch.full((2, V), float("nan"))  # a broken model's logits: still a token id, not -1
    got = triton_sampling.inverse_cdf(broken.to(DEVICE), u[:2].to(DEVICE), temperature[:2].to(DEVICE)).cpu()
    assert ((got >= 0) & (got < V)).all()

    # Weights: exact binary fractions, so every running mass is exact and u may sit on a step.
    w = torch.randint(0, 4, (R, V), generator=g).double() / 4
    w[:, -5:] = 0.0
    w[:, 0] = 0.25  # some mass in every row
    cdf = w.cumsum(-1)
    steps = cdf[:, 0] / cdf[:, -1]  # u exactly at the first step: the next token with mass
    u = torch.where(torch.arange(R) % 2 == 0, steps, torch.rand(R, generator=g, dtype=torch.float64))
    u[1] = 1 - 2**-53
    ref = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
    got = triton_sampling.inverse_cdf(w.to(DEVICE), u.to(DEVICE)).cpu()
    assert torch.equal(got, ref)
    assert (w.gather(1, got[:, None]) > 0).all()
    got = triton_sampling.inverse_cdf(w.float().to(DEVICE), u.to(DEVICE)).cpu()  # float32 weights as read
    assert torch.equal(got, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")  # (NaN rows)
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("V", [50, 3000])
def test_verify_kernels_equal_the_torch_rule(V, filtered):
    """Speculative sampling's rule in three launches (`triton_sampling.verify_plain`) against the
    torch path (`rejection._verify_sampled`), same logits, drafts and uniforms: drafts kept,
    rejected and all accepted (bonus), sparse draft distributions of 6 tokens (the residual
    max(0, p - q) subtracts them), 0-3 drafts a row, 1-3 chunks a row; rows of temperature only
    (the kernels' softmax) or with top-k / top-p (`filtered`: the kernels read `target_probs`'
    probabilities). Float32 masses round otherwise than torch's softmax, so a uniform within
    ~1e-6 of a decision may fall either side: all but 2 of 96 rows agree."""
    from specmoe_ray.engine import triton_sampling
    from specmoe_ray.engine.sampling import make_generator, target_probs
    from specmoe_ray.engine.sequence import SamplingParams
    from specmoe_ray.spec import rejection

    g = torch.Generator().manual_seed(V)
    R, k, S = 96, 3, 6
    logits = torch.randn(R, k + 1, V, generator=g) * 4
    # Drafts from a distribution near the target's (so some are kept), sparse like a draft model's.
    near = torch.softmax(logits[:, :k] + torch.randn(R, k, V, generator=g) * 0.5, dim=-1)
    q_ids, q_probs = rejection.sparse_from_probs(near, S)
    num_draft = [k if r % 4 == 0 else r % 4 for r in range(R)]
    num_draft[1] = 0
    drafts = torch.full((R, k), -1, dtype=torch.long)
    for r in range(R):
        for i in range(num_draft[r]):
            drafts[r, i] = rejection.sample_sparse_one(q_ids[r, i], q_probs[r, i], g)
        q_ids[r, num_draft[r] :] = -1
        q_probs[r, num_draft[r] :] = 0.0
    params = [
        SamplingParams(temperature=0.6 + 0.1 * (r % 7), top_k=[0, V // 3, 5][r % 3] if filtered else 0,
                       top_p=[0.9, 1.0, 0.8, 0.6][r % 4] if filtered else 1.0)
        for r in range(R)
    ]  # fmt: skip
    temperature = torch.tensor([p.temperature for p in params])
    n = torch.tensor(num_draft)

    ref_acc, ref_final = rejection._verify_sampled(
        logits, drafts, q_ids, q_probs, params, [make_generator(r, "cpu") for r in range(R)], num_draft
    )
    u = rejection._draw_uniforms([make_generator(r, "cpu") for r in range(R)], num_draft, k + 1, "cpu")
    x, t = logits, temperature  # the kernels' softmax, or the probabilities of every position
    if filtered:
        filters = [[q.top_k for q in params], [q.top_p for q in params]]
        each = [torch.tensor(f).repeat_interleave(k + 1) for f in filters]
        x = target_probs(logits.reshape(R * (k + 1), V), temperature.repeat_interleave(k + 1), *each)
        t, x = None, x.view(R, k + 1, V)
    acc, final = triton_sampling.verify_plain(
        x.to(DEVICE), None if t is None else t.to(DEVICE), drafts.to(DEVICE), n.to(DEVICE), q_ids.to(DEVICE),
        q_probs.to(DEVICE), u.to(DEVICE),
    )  # fmt: skip
    acc, final = acc.cpu(), final.cpu()
    broken = x.clone()
    broken[:4] = float("nan")  # a broken model's rows: every draft rejected (as torch), a token id
    acc_nan, final_nan = triton_sampling.verify_plain(
        broken.to(DEVICE), None if t is None else t.to(DEVICE), drafts.to(DEVICE), n.to(DEVICE),
        q_ids.to(DEVICE), q_probs.to(DEVICE), u.to(DEVICE),
    )  # fmt: skip
    final_nan = final_nan.cpu()[:4]
    assert (acc_nan.cpu()[:4] == 0).all() and ((final_nan >= 0) & (final_nan < V)).all()
    same = (acc == ref_acc) & (final == ref_final)
    assert same.sum() >= R - 2, f"{R - int(same.sum())} rows differ"
    rejected, bonus = ref_acc < n, ref_acc == n
    assert rejected.sum() >= 10 and (bonus & (n > 0)).sum() >= 10 and (ref_acc > 0).sum() >= 10  # every case
    assert not ((final == drafts.gather(1, acc.clamp(max=k - 1)[:, None])[:, 0]) & (acc < n)).any()  # (p - q)


def test_greedy_verify_kernel_equals_the_torch_rule():
    """Greedy rows' rule in one kernel (`triton_sampling.greedy_verify`) against `verify`'s torch
    path: every row's tokens and accepted count, exactly; rows with no drafts, all drafts kept,
    a first-token miss and misses in between, ragged drafts (past a row's count: -1, or tokens
    that would match, which only the count rules out)."""
    from specmoe_ray.engine import triton_sampling
    from specmoe_ray.engine.sequence import SamplingParams
    from specmoe_ray.spec import rejection

    g = torch.Generator().manual_seed(3)
    B, k, V = 64, 4, 30
    logits = torch.randn(B, k + 1, V, generator=g)
    argmax = logits.argmax(-1)
    num_draft = torch.randint(0, k + 1, (B,), generator=g)
    num_draft[:3] = torch.tensor([0, k, k])
    drafts = argmax[:, :k].clone()
    miss = torch.rand(B, k, generator=g) < 0.25
    miss[1], miss[2, 0] = False, True  # all kept; a first-token miss
    drafts[miss] = (drafts[miss] + 1) % V
    past = torch.arange(k) >= num_draft[:, None]
    drafts[
        past & (torch.arange(B)[:, None] % 2 == 0)
    ] = -1  # odd rows: the argmax past their drafts (ignored)
    proposal = rejection.DraftProposal(
        drafts, num_draft, drafts[..., None].clone(), (drafts >= 0).float()[..., None]
    )
    ref = rejection.verify(logits, proposal, [SamplingParams(temperature=0.0)] * B, [None] * B)
    tokens, accepted = triton_sampling.greedy_verify(
        argmax.to(DEVICE), drafts.to(DEVICE), num_draft.to(DEVICE)
    )
    assert torch.equal(tokens.cpu(), ref.tokens) and torch.equal(accepted.cpu(), ref.num_accepted)
    assert (
        ref.num_accepted[1] == k and ref.num_accepted[2] == 0 and 0 < (ref.num_accepted < num_draft).sum() < B
    )


@pytest.mark.parametrize("V", [50, 3000])
def test_sorted_probs_kernels_equal_the_torch_rule(V, monkeypatch):
    """Top-k then top-p after the sort in two launches (`triton_sampling.sorted_probs`) against
    the torch rule of `sampling.target_probs` (run here with the kernels off), the same sort:
    tied logits (ranks by index), masked (-inf) tokens, top-k of 1, past the finite tokens and
    past V, top-p of 1 (off), tiny and near 1, rows with one chunk or three. The kept sets agree
    except where a token's mass before it is within 1e-6 of top_p (the kernels sum in float64,
    torch in float32); kept probabilities agree to 1e-6."""
    from specmoe_ray.engine import sampling, triton_sampling

    g = torch.Generator().manual_seed(V)
    R = 40
    logits = torch.randn(R, V, generator=g) * 3
    logits[::3] = (logits[::3] * 2).round() / 2  # many ties
    logits[5, : V // 2] = float("-inf")
    temperature = 0.5 + torch.rand(R, generator=g)
    top_k = torch.tensor([[0, 1, 5, V // 3, V - 1, V, V + 7, V // 2 + 3][r % 8] for r in range(R)])
    top_p = torch.tensor([[1.0, 0.5, 0.9, 0.999, 0.01, 0.3, 1.0][r % 7] for r in range(R)])
    z = logits / temperature[:, None]
    sorted_z, sorted_idx = torch.sort(z, dim=-1, descending=True, stable=True)
    got = triton_sampling.sorted_probs(
        sorted_z.to(DEVICE), sorted_idx.to(DEVICE), top_k.to(DEVICE), top_p.to(DEVICE)
    ).cpu()
    monkeypatch.setattr(triton_sampling, "SAMPLE", False)
    ref = sampling.target_probs(logits, temperature, top_k, top_p, plain=False)

    # The float64 mass before each sorted token, as a fraction of the top-k total: the rows where
    # a token sits within 1e-6 of top_p may keep one token more or less.
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    e = torch.exp(sorted_z.double() - sorted_z[:, :1].double()) * (torch.arange(V) < k[:, None])
    before = (e.cumsum(-1) - e) / e.sum(-1, keepdim=True)
    close = ((before - top_p[:, None].double()).abs() < 1e-6).any(-1) & (top_p < 1)
    same = ((got > 0) == (ref > 0)).all(-1)
    assert same[~close].all(), f"rows {(~same & ~close).nonzero()[:, 0].tolist()} keep other tokens"
    assert (~close).sum() >= R - 2
    assert (got[~close] - ref[~close]).abs().max() < 1e-6
    assert torch.allclose(got.double().sum(-1), torch.ones(R, dtype=torch.float64), atol=1e-5)
    assert (got[5, : V // 2] == 0).all()  # a masked token is never kept
    assert ((got > 0).sum(-1)[top_k == 1] == 1).all()  # top-k 1: the first of the tied maxima
    first = (z == z.max(-1, keepdim=True).values).float().argmax(-1)
    assert (got.argmax(-1)[top_k == 1] == first[top_k == 1]).all()
    off = (top_p == 1.0) & (top_k == 0)  # every finite token kept
    assert torch.equal((got > 0).sum(-1)[off], (logits > float("-inf")).sum(-1)[off])


@pytest.mark.parametrize("V, n", [(50, 32), (9000, 32), (9000, 6), (20, 32)])
def test_top_n_kernels_equal_topk_of_the_softmax(V, n):
    """A draft's sparse distribution and draw in two launches (`triton_sampling.top_n`: each
    chunk's n largest logits, then a merge, the softmax over those n and the draw) against
    `sparse_from_probs` of the full softmax (torch.topk): the same ids in the same order where no
    logits tie, the same probabilities to 1e-6; tied logits keep the lowest indices (torch.topk's
    pick among ties is its own); masked (-inf) tokens become padding (-1, 0); n past V, and n not
    a power of 2. The token drawn from them is `sample_sparse`'s with the same uniform, u -> 1
    included."""
    from specmoe_ray.engine import triton_sampling
    from specmoe_ray.spec.rejection import sample_sparse, sparse_from_probs

    g = torch.Generator().manual_seed(V + n)
    R = 6
    x = torch.randn(R, V, generator=g) * 3
    x[1] = x[1].round()  # ties
    x[2, : V - 3] = float("-inf")  # three tokens with mass
    t = torch.rand(R, generator=g) + 0.5
    u = torch.rand(R, generator=g, dtype=torch.float64)
    u[2] = 1 - 2**-53  # rounds u * total up to the total: the last entry with mass, not the padding
    u[3] = 0.0
    S = min(n, V)
    ids, probs, tokens = triton_sampling.top_n(x.to(DEVICE), t.to(DEVICE), S, u.to(DEVICE))
    ids, probs, tokens = ids.cpu(), probs.cpu(), tokens.cpu()
    ref_ids, ref_probs = sparse_from_probs(torch.softmax(x / t[:, None], -1), S)
    assert torch.equal(tokens, sample_sparse(ids, probs, u))  # the draw, as the torch one from these
    assert tokens[2] == ids[2, 2] and tokens[3] == ids[3, 0]
    assert ids.shape == probs.shape == (R, S)
    clean = [0, 2, 3, 4, 5]
    assert torch.equal(ids[clean], ref_ids[clean])
    assert (probs - ref_probs).abs().max() < 1e-6
    assert (ids[2, 3:] == -1).all() and (probs[2, 3:] == 0).all()
    # Ties: the same values as torch's pick, and among tokens tied at the smallest kept value the
    # lowest indices (every higher value kept whole).
    assert torch.equal(x[1, ids[1]], x[1, ref_ids[1]])
    low = x[1, ids[1, -1]]
    tied = (x[1] == low).nonzero()[:, 0]
    kept = ids[1][x[1, ids[1]] == low]
    assert torch.equal(kept.sort().values, tied[: len(kept)])
    assert torch.allclose(probs.sum(-1), torch.ones(R), atol=1e-6)
