"""Placement: which shard holds which (layer, expert)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """owner[layer][expert] = shard index (0-based among shards; shard s is rank s + 1)."""

    num_shards: int
    num_experts: int
    owner: dict[int, tuple[int, ...]]

    @classmethod
    def contiguous(cls, moe_layers: tuple[int, ...], num_experts: int, num_shards: int) -> PlacementPlan:
        """Split each layer's experts into `num_shards` contiguous, near-equal ranges."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if num_shards > num_experts:
            raise ValueError(f"num_shards={num_shards} exceeds the model's {num_experts} experts per layer")
        row = tuple(e * num_shards // num_experts for e in range(num_experts))
        return cls(num_shards, num_experts, {layer: row for layer in moe_layers})

    def experts_of(self, shard: int) -> dict[int, list[int]]:
        return {layer: [e for e, s in enumerate(row) if s == shard] for layer, row in self.owner.items()}

    def to_dict(self) -> dict:
        return {
            "num_shards": self.num_shards,
            "num_experts": self.num_experts,
            "owner": {str(k): list(v) for k, v in self.owner.items()},
        }
