"""Expert-shard autoscaling: how many shards, decided from measured load at step boundaries.

The signal is the rate of (token, expert) pairs the shards computed over the last window,
against the rate one shard is meant to serve (`target_pairs_per_shard_s`); step latency over
`max_step_s` also asks for one more shard. Hysteresis: a change must be wanted for
`upscale_delay_s` / `downscale_delay_s` before it happens. Each change re-forms the shard group
with a placement balanced by the measured per-expert load, the hottest experts replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import math

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class ShardAutoscaleConfig:
    min_shards: int = 1
    max_shards: int = 4
    target_pairs_per_shard_s: float = 20_000.0  # (token, expert) pairs one shard should serve per second
    max_step_s: float | None = None  # a slower step also asks for one more shard
    interval_s: float = 5.0  # measurement window
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 30.0
    replicate_hot_experts: int = 0  # per layer, the hottest experts get a second replica

    def __post_init__(self):
        if not 1 <= self.min_shards <= self.max_shards:
            raise ValueError(f"need 1 <= min_shards <= max_shards, got {self.min_shards}, {self.max_shards}")
        if self.target_pairs_per_shard_s <= 0 or self.interval_s <= 0:
            raise ValueError("target_pairs_per_shard_s and interval_s must be > 0")


@dataclasses.dataclass(slots=True)
class Decision:
    num_shards: int
    reason: str


class ShardAutoscaler:
    def __init__(self, config: ShardAutoscaleConfig):
        self.config = config
        self._wanted: int | None = None
        self._wanted_since = 0.0
        self.decisions: list[Decision] = []

    def desired(self, pairs_per_s: float, step_s: float, current: int) -> tuple[int, str]:
        c = self.config
        want = math.ceil(pairs_per_s / c.target_pairs_per_shard_s) if pairs_per_s > 0 else c.min_shards
        reason = f"{pairs_per_s:.0f} pairs/s at {c.target_pairs_per_shard_s:.0f} per shard"
        if c.max_step_s is not None and step_s > c.max_step_s and want <= current:
            want, reason = current + 1, f"step {step_s * 1e3:.1f} ms > {c.max_step_s * 1e3:.1f} ms"
        return min(c.max_shards, max(c.min_shards, want)), reason

    def decide(self, now: float, pairs_per_s: float, step_s: float, current: int) -> Decision | None:
        """A new shard count once it has been wanted long enough, else None."""
        want, reason = self.desired(pairs_per_s, step_s, current)
        if want == current:
            self._wanted = None
            return None
        if want != self._wanted:
            self._wanted, self._wanted_since = want, now
        delay = self.config.upscale_delay_s if want > current else self.config.downscale_delay_s
        if now - self._wanted_since < delay:
            return None
        self._wanted = None
        decision = Decision(want, f"{current} -> {want} shards: {reason}")
        self.decisions.append(decision)
        log.info("expert shard autoscaler: %s", decision.reason)
        return decision
