"""Continuous batching: admit waiting requests into free KV slots, feed each running
sequence its uncached tokens (a prompt chunk, or the last sampled token), retire the finished.
"""

from __future__ import annotations

import collections
import dataclasses

from specmoe_ray.engine.sequence import FinishReason, Sequence
from specmoe_ray.models.kv_cache import KVCache


@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # position of the first token fed (= tokens already cached)
    tokens: list[int]  # fed this step
    samples: bool  # True when this chunk reaches the end of the sequence: sample a token


class Scheduler:
    def __init__(self, cache: KVCache, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish_reason = FinishReason.ABORT
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = FinishReason.ABORT
                self.retire(seq)
                return seq
        return None

    def schedule(self) -> list[ScheduledSeq]:
        while self.waiting and self.cache.num_free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            self.running.append(seq)
        budget = self.max_num_batched_tokens
        batch = []
        # Decoding sequences first (1 token each), then prompt chunks with what budget is left.
        lengths = self.cache.lengths
        for seq in sorted(self.running, key=lambda s: len(s.tokens) - lengths[s.slot]):
            start = lengths[seq.slot]
            pending = len(seq.tokens) - start
            take = min(pending, budget)
            if take <= 0:
                continue
            budget -= take
            batch.append(ScheduledSeq(seq, start, seq.tokens[start : start + take], samples=take == pending))
        return batch

    def retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.cache.free(seq.slot)
            seq.slot = None
