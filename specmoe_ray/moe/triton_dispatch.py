"""A Triton kernel for rank 0's side of a static expert exchange (`DistributedDispatch`).

Before each MoE layer's all_to_all, rank 0 finds every (token, expert) pair's owner (the
replica rotation included), groups the pairs by shard in pair order, and writes the send
buffer: each pair's token row and expert id (-1 for a padding token's pair) in its shard's
block of C rows. In torch that is ~15 small kernels per layer (gathers, a sort, searchsorted,
index_put, a concatenation; ~60 us on an H100 at batch 32: benchmarks/RESULTS.md, session 5);
`pack_pairs` does it in one kernel (plus a fill of the id column). Each pair's row in the send
buffer is its rank among the earlier pairs of its shard: n^2 compares, for the few pairs of
decode and verify steps (`PACK_MAX`).

The send buffer's row layout is `pack_rows`'s: the row's bytes in the model's dtype, then the
int64 expert id. The kernel writes it through two views of the same buffer (the dtype and
int64), so a row's bytes must be a multiple of 8 (`packable`).
"""

from __future__ import annotations

import torch

from specmoe_ray.moe.triton_experts import AVAILABLE, INTERPRETED, launch_on, pdl_launch

if AVAILABLE:
    import triton
    import triton.language as tl

    from specmoe_ray.moe.triton_experts import _grid_dependency

# benchmarks/kernels.py ablates it (off: the torch bookkeeping, same layout).
PACK = True
PACK_MAX = 4096  # pairs per layer; above it (prefill buckets) torch's path
# CPU tensors under Triton's interpreter (TRITON_INTERPRET=1): tests only; CPUs run torch's path.
ON_CPU = False

if AVAILABLE:

    @triton.jit
    def _owner(ids, pos, table_ptr, replicas_ptr, rot, R, A):
        """Rank owning each pair: replica ((pair's token + rotation) % replicas) of its expert."""
        replica = (pos // A + rot) % tl.load(replicas_ptr + ids)
        return tl.load(table_ptr + ids * R + replica)

    @triton.jit
    def _pack_kernel(
        x_ptr,  # [T, D] token rows
        stride_x,
        ids_ptr,  # [n] int64 expert ids, pair p = (token p // A, its p % A-th expert)
        mask_ptr,  # [n] int64 0/1 per pair (HAS_MASK)
        table_ptr,  # [E, R] int64 ranks of each expert's replicas
        replicas_ptr,  # [E] int64
        rotation_ptr,  # [] int64 static forwards so far (the replica rotation)
        rows_ptr,  # send buffer in x's dtype, [S * C, row_stride]
        row_stride,
        idcol_ptr,  # send buffer as int64, [S * C, id_stride]; the id is at column id_stride - 1
        id_stride,
        slot_ptr,  # [n] int64 out: each pair's row in the send buffer
        counts_ptr,  # [S] int64 pairs sent to each shard, cumulative (atomics)
        n,
        D,
        C,
        R,
        A,
        first_rank,
        HAS_MASK: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch (`pdl_launch`)
    ):
        _grid_dependency(PDL)
        # Program (i, d): pairs i's slots (each program of the row finds them: n^2 compares of a
        # few hundred ids, cheaper than a second kernel), then their columns d. Program (i, 0)
        # also writes the slots, the ids and the counts.
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < n
        rot = tl.load(rotation_ptr)
        ids_i = tl.load(ids_ptr + i, mask=i_ok, other=0)
        own_i = _owner(ids_i, i, table_ptr, replicas_ptr, rot, R, A)
        rank = tl.zeros([BLOCK_I], dtype=tl.int64)
        for j0 in range(0, n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < n
            ids_j = tl.load(ids_ptr + j, mask=j_ok, other=0)
            own_j = _owner(ids_j, j, table_ptr, replicas_ptr, rot, R, A)
            earlier = (own_j[None, :] == own_i[:, None]) & (j[None, :] < i[:, None]) & j_ok[None, :]
            rank += tl.sum(earlier.to(tl.int64), axis=1)
        shard = own_i - first_rank
        slot = shard * C + rank
        if tl.program_id(1) == 0:
            tl.store(slot_ptr + i, slot, mask=i_ok)
            if HAS_MASK:
                keep = tl.load(mask_ptr + i, mask=i_ok, other=0)
                sent_id = tl.where(keep > 0, ids_i, -1)
            else:
                keep = tl.zeros([BLOCK_I], dtype=tl.int64) + 1
                sent_id = ids_i
            tl.atomic_add(counts_ptr + shard, keep, mask=i_ok)
            tl.store(idcol_ptr + slot * id_stride + (id_stride - 1), sent_id, mask=i_ok)
        token = (i // A).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = i_ok[:, None] & (d < D)[None, :]
        row = tl.load(x_ptr + token[:, None] * stride_x + d[None, :], mask=ok)
        tl.store(rows_ptr + slot[:, None] * row_stride + d[None, :], row, mask=ok)


def packable(x: torch.Tensor, n: int) -> bool:
    """Whether `pack_pairs` serves this exchange (else the torch path, same layout)."""
    row_bytes = x.shape[-1] * x.element_size() + 8
    return (
        PACK
        and AVAILABLE
        and (x.is_cuda or (ON_CPU and INTERPRETED))
        and 0 < n <= PACK_MAX
        and row_bytes % 8 == 0
        and x.stride(-1) == 1
    )


def pack_pairs(
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
    """x [T, D], ids [T * top_k] (pair order) -> (send buffer [S * C, D * itemsize + 8] uint8 in
    `pack_rows`' layout, slot [T * top_k] int64: each pair's row there). Shard s's block is rows
    s * C .. (s + 1) * C: its pairs in pair order, then unused rows with id -1. `counts[s]` grows
    by the pairs sent to shard s (padding tokens' pairs, per `pair_mask`, not counted)."""
    n, D = ids.shape[0], x.shape[-1]
    row_bytes = D * x.element_size() + 8
    payload = torch.empty(num_shards * capacity, row_bytes, dtype=torch.uint8, device=x.device)
    rows, idcol = payload.view(x.dtype), payload.view(torch.int64)
    idcol[:, -1].fill_(-1)  # unused rows
    slot = torch.empty(n, dtype=torch.long, device=x.device)
    # Enough programs to keep the copy's loads in flight (8 programs of 32 whole rows took 17.7 us
    # for 256 pairs of 2048 columns on an H200; benchmarks/RESULTS.md, session 6).
    block_i, block_d = 16, (128 if n <= 64 else 256)
    with launch_on(x.device):
        _pack_kernel[(triton.cdiv(n, block_i), triton.cdiv(D, block_d))](
            x, x.stride(0), ids.contiguous(), pair_mask if pair_mask is not None else ids,
            owner_table, num_replicas, rotation, rows, rows.stride(0), idcol, idcol.stride(0), slot,
            counts, n, D, capacity, owner_table.shape[1], top_k, first_rank, HAS_MASK=pair_mask is not None,
            BLOCK_I=block_i, BLOCK_J=128, BLOCK_D=block_d, **pdl_launch(x.device),
        )  # fmt: skip
    return payload, slot
