"""Placement: which shard(s) hold which (layer, expert).

An expert may live on several shards (a replicated hot expert): its tokens are then split
between the replicas, by token position, so the split is deterministic. Every replica holds
the same weights, so placement and replication never change what an expert computes.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """owner[layer][expert] = the shards (0-based; shard s is rank s + 1) holding that expert."""

    num_shards: int
    num_experts: int
    owner: dict[int, tuple[tuple[int, ...], ...]]

    def __post_init__(self):
        for layer, row in self.owner.items():
            if len(row) != self.num_experts:
                raise ValueError(
                    f"layer {layer}: {len(row)} experts placed, the model has {self.num_experts}"
                )
            for e, shards in enumerate(row):
                if not shards or any(not 0 <= s < self.num_shards for s in shards):
                    raise ValueError(
                        f"layer {layer} expert {e}: bad shards {shards} for {self.num_shards} shards"
                    )

    @classmethod
    def contiguous(cls, moe_layers: Sequence[int], num_experts: int, num_shards: int) -> PlacementPlan:
        """Split each layer's experts into `num_shards` contiguous, near-equal ranges."""
        _check_count(num_shards, num_experts)
        row = tuple((e * num_shards // num_experts,) for e in range(num_experts))
        return cls(num_shards, num_experts, {layer: row for layer in moe_layers})

    @classmethod
    def balanced(
        cls, load: dict[int, Sequence[float]], num_shards: int, replicate_top: int = 0
    ) -> PlacementPlan:
        """Balance measured load per layer ({layer: [tokens routed to each expert]}).

        The `replicate_top` hottest experts of each layer get a replica on a second shard
        (their load counts half on each); then experts go, hottest first, to the shard with
        the least load so far (longest-processing-time first). Ties break by index, so the
        plan is a pure function of the load.
        """
        num_experts = len(next(iter(load.values())))
        _check_count(num_shards, num_experts)
        owner = {}
        for layer, counts in load.items():
            order = sorted(range(num_experts), key=lambda e: (-counts[e], e))
            hot = set(order[:replicate_top]) if num_shards > 1 else set()
            heap = [(0.0, s) for s in range(num_shards)]
            placed: dict[int, tuple[int, ...]] = {}
            for e in order:
                copies = 2 if e in hot else 1
                share = counts[e] / copies
                chosen = []
                for _ in range(copies):
                    total, s = heapq.heappop(heap)
                    chosen.append((total + share, s))
                for total, s in chosen:
                    heapq.heappush(heap, (total, s))
                placed[e] = tuple(sorted(s for _, s in chosen))
            owner[layer] = tuple(placed[e] for e in range(num_experts))
        return cls(num_shards, num_experts, owner)

    def experts_of(self, shard: int) -> dict[int, list[int]]:
        return {
            layer: [e for e, shards in enumerate(row) if shard in shards] for layer, row in self.owner.items()
        }

    def shard_loads(self, load: dict[int, Sequence[float]]) -> list[float]:
        """Expected tokens per shard under this plan (replicas split their expert's load)."""
        totals = [0.0] * self.num_shards
        for layer, row in self.owner.items():
            for e, shards in enumerate(row):
                for s in shards:
                    totals[s] += load[layer][e] / len(shards)
        return totals

    def to_dict(self) -> dict:
        return {
            "num_shards": self.num_shards,
            "num_experts": self.num_experts,
            "owner": {str(k): [list(s) for s in v] for k, v in self.owner.items()},
        }


def _check_count(num_shards: int, num_experts: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > num_experts:
        raise ValueError(f"num_shards={num_shards} exceeds the model's {num_experts} experts per layer")
