"""Experts stage: grouped compute of the experts one process holds.

Weights are kept fused per layer, `gate_up [E_local, 2I, D]` (gate rows first) and
`down [E_local, D, I]`, whatever layout the checkpoint used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specmoe_ray.models.fused import silu_mul
from specmoe_ray.moe import triton_experts


class LocalExperts(nn.Module):
    """The experts of one MoE layer that this process holds (a subset of all E)."""

    def __init__(self, expert_ids: list[int], gate_up: torch.Tensor, down: torch.Tensor, num_experts: int):
        super().__init__()
        assert gate_up.shape[0] == down.shape[0] == len(expert_ids)
        self.expert_ids = list(expert_ids)
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)  # [E_local, 2I, D]
        self.down = nn.Parameter(down, requires_grad=False)  # [E_local, D, I]
        self.num_experts = num_experts
        # Global id -> local id; -1 for experts held elsewhere. One entry more, -1 too, so id -1
        # (padding, e.g. unused rows of a static exchange) maps to -1 without a branch.
        to_local = torch.full((num_experts + 1,), -1, dtype=torch.long)
        to_local[torch.tensor(self.expert_ids, dtype=torch.long)] = torch.arange(len(self.expert_ids))
        self.register_buffer("to_local", to_local.to(gate_up.device), persistent=False)
        self.identity = self.expert_ids == list(range(num_experts))  # every expert, in order
        bounds = torch.arange(0, len(self.expert_ids) + 1, device=gate_up.device)
        self.register_buffer("bounds", bounds, persistent=False)  # for `_offsets`

        # GPUs: few rows per expert (decode, verify) go to the Triton kernel, which reads each
        # touched expert's weights once and skips the others; many rows (prefill) to one grouped
        # GEMM per projection. Both keep offsets on the device: no host sync, no per-expert
        # launches, so CUDA graphs capture them (DESIGN.md section 6). CPUs run the per-expert
        # loop, which is faster there; all give the same rows for the same inputs.
        self.grouped = (
            gate_up.is_cuda
            and gate_up.dtype in (torch.bfloat16, torch.float16)
            and hasattr(torch, "_grouped_mm")
        )
        self.triton = gate_up.is_cuda and triton_experts.AVAILABLE
        # The Triton kernels: per pair (no sort) up to this many (token, expert) pairs, sorted
        # while rows per expert average at most the second; grouped GEMM above it.
        self.triton_max_pairs = 64
        self.triton_max_rows_per_expert = 8
        self._mlp_sync: dict[int, torch.Tensor] = {}  # pairs -> `expert_mlp`'s counters (FUSED_MLP)
        self._sorted_sync: torch.Tensor | None = None  # `expert_mlp_sorted`'s counters (SORTED_FUSED)

    @torch.inference_mode()
    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, group: int = 1, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [n / group, D], row r serving the `group` consecutive pairs r * group ..; expert_ids:
        [n] global ids, one per (token, expert) pair -> [n, D] the pairs' expert outputs.

        Pairs whose expert is not held here, or whose id is -1 (padding), are skipped: their
        output rows are unspecified (zeros on the per-pair and CPU paths) and callers drop them.
        No path reads the ids back to the host except the CPU loop: CUDA graphs capture it.
        counts ([E_local + 1] int64): += pairs per held expert at 1 + its local id (skipped pairs
        at 0), in place with static shapes (a graph replays it)."""
        n = expert_ids.shape[0]
        if self.triton and n > self.triton_max_pairs and triton_experts.sortable(expert_ids):
            # One kernel: local ids, their stable sort, the experts' offsets and the counts.
            table = None if self.identity else self.to_local
            local, order, offsets = triton_experts.sort_pairs(expert_ids, table, len(self.expert_ids), counts)
        else:
            local = expert_ids if self.identity else self.to_local[expert_ids]
            if counts is not None:
                counts.scatter_add_(0, local + 1, local.new_ones(()).expand(n))
            if self.triton and n <= self.triton_max_pairs:
                one = n <= group  # one token's pairs: distinct experts, nothing to share
                if one and triton_experts.FUSED_MLP:
                    sync = self._mlp_sync.get(n)
                    if sync is None:  # this layer's own counters (`expert_mlp`)
                        sync = self._mlp_sync[n] = torch.zeros(2 + n, dtype=torch.int32, device=x.device)
                    return triton_experts.expert_mlp(
                        x, self.gate_up, self.down, local, group=group, sync=sync
                    )
                h = triton_experts.expert_pairs(x, self.gate_up, local, group=group, glu=True, one_row=one)
                return triton_experts.expert_pairs(h, self.down, local, one_row=one)
            local, order = triton_experts.stable_sort(local)
            offsets = self._offsets(local)
        few_rows = n <= self.triton_max_rows_per_expert * len(self.expert_ids)
        if self.triton and (few_rows or not self.grouped):
            return self._triton(x, offsets, order, group)
        if group > 1:
            x = x[:, None, :].expand(-1, group, x.shape[-1]).reshape(-1, x.shape[-1])
        xs = x[order]
        out = self._grouped(xs, offsets) if self.grouped else self._loop(xs, offsets)
        y = torch.empty_like(out)
        y[order] = out
        return y

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can capture this layer's expert computation (no host sync)."""
        return self.grouped or self.triton

    def _offsets(self, local: torch.Tensor) -> torch.Tensor:
        """[E_local + 1] int32: rows of sorted `local` below 0 (skipped), then the end offset of each
        expert's rows, so expert e owns rows offsets[e] .. offsets[e + 1]. searchsorted, not
        bincount: CUDA's bincount reads the max id back to the host, which a graph cannot capture."""
        return torch.searchsorted(local, self.bounds, out_int32=True)

    def _triton(self, x: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor, group: int):
        """Two kernels: the gate/up projection reads each sorted pair's row of x itself and
        applies silu(gate) * up; the down projection writes each result to its pair's row.
        `triton_experts.SORTED_FUSED`: both in one launch (`expert_mlp_sorted`)."""
        if triton_experts.SORTED_FUSED:
            if self._sorted_sync is None:  # this layer's own counters
                self._sorted_sync = torch.zeros(2 + len(self.expert_ids), dtype=torch.int32, device=x.device)
            return triton_experts.expert_mlp_sorted(
                x, self.gate_up, self.down, offsets, order, group, self._sorted_sync
            )
        h = triton_experts.expert_matmul(x, self.gate_up, offsets, src=order, group=group, glu=True)
        return triton_experts.expert_matmul(h, self.down, offsets, dst=order)

    def _grouped(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # xs: rows sorted by local expert, `_offsets` of their ids. Skipped rows (id < 0) come
        # first and are computed by expert 0: wasted work, not wrong results.
        offs = offsets[1:]
        h = silu_mul(torch._grouped_mm(xs, self.gate_up.transpose(1, 2), offs=offs))
        return torch._grouped_mm(h, self.down.transpose(1, 2), offs=offs)

    def _loop(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # One host sync per layer call: the offsets drive the per-expert loop.
        offsets = offsets.tolist()
        out = torch.zeros_like(xs)
        for e, (start, end) in enumerate(zip(offsets, offsets[1:])):
            if end > start:
                gate, up = F.linear(xs[start:end], self.gate_up[e]).chunk(2, dim=-1)
                out[start:end] = F.linear(F.silu(gate) * up, self.down[e])
        return out


class ExpertStore(nn.Module):
    """All experts a process holds, by MoE layer."""

    def __init__(self, layers: dict[int, LocalExperts]):
        super().__init__()
        self.by_layer = nn.ModuleDict({str(layer): experts for layer, experts in layers.items()})
        self.computed: dict[int, torch.Tensor] = {}  # layer -> [1 + held] pairs computed, cumulative
        self.count = True  # off where the caller counts the load itself (LoopbackDispatch)
        # Seconds its load spent reading the files and copying to the device (`load_experts`).
        self.load_times: dict[str, float] = {}

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, group: int = 1) -> torch.Tensor:
        """x [n / group, D] (each row serves `group` consecutive pairs), expert_ids [n] -> [n, D]."""
        experts = self.by_layer[str(layer)]
        if not self.count:
            return experts(x, expert_ids, group)
        counts = self.computed.get(layer)
        if counts is None:  # [1 + held experts]: slot 0 takes padding (id -1) and experts held elsewhere
            counts = self.computed[layer] = x.new_zeros(len(experts.expert_ids) + 1, dtype=torch.long)
        return experts(x, expert_ids, group, counts=counts)

    def computed_counts(self) -> dict[int, list[int]]:
        """{layer: [pairs computed here per expert (global ids)]}, cumulative (one host sync)."""
        out = {}
        for layer, counts in sorted(self.computed.items()):
            experts = self.by_layer[str(layer)]
            per_expert = [0] * experts.num_experts
            for e, c in zip(experts.expert_ids, counts[1:].tolist()):
                per_expert[e] += c
            out[layer] = per_expert
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def held(self) -> dict[int, list[int]]:
        return {int(k): list(v.expert_ids) for k, v in self.by_layer.items()}
