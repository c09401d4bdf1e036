"""Speculation length per step: fixed, or chosen from measured acceptance and measured cost.

With per-token acceptance probability a (drafts i.i.d., Leviathan et al. 2023, eq. 1), a step
that drafts k tokens emits on average (1 - a^(k+1)) / (1 - a) tokens; the policy keeps one rate
per position instead (draft i accepted given every draft before it was), 1 + sum_j prod_{i<=j}
a_i tokens, since acceptances come in runs. It costs the draft's
time for k tokens plus the target's verify over k + 1 tokens per sequence. For an MoE target
the verify cost grows with k faster than for a dense one, because more tokens touch more
distinct experts: a layer with E experts, top-K routing and T tokens in the step reads about
E * (1 - (1 - K/E)^T) experts' weights (DESIGN.md section 6). The adaptive policy picks the k
in [0, k_max] with the most expected tokens per second; k = 0 (no speculation) is a candidate.

Costs come from measurement: an exponential moving average of the verify time at each k,
and of the draft time per drafted position (one draft forward over the batch: a batch of B
drafting k tokens each costs k positions, not B * k tokens), both per batch bucket; a proposal
that first catches the draft up on tokens it missed (a new sequence's prompt, the tokens of steps
without drafts: the engine tells) is no sample of the draft's cost. Until a k has been
measured, its verify cost is extrapolated from the nearest measured k with the byte model
above. Every `explore_every` steps the policy tries a neighbour of its current choice, so the
estimates stay fresh.
"""

from __future__ import annotations

import dataclasses


def experts_touched(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected distinct experts of one layer hit by num_tokens independently routed tokens."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


@dataclasses.dataclass(slots=True)
class StepCostModel:
    """Bytes a verify step reads, as a function of tokens per step: the prior before measurements."""

    dense_bytes: float  # weights every step reads (attention, norms, embeddings, shared experts)
    expert_bytes: float  # bytes of one expert of one layer
    num_moe_layers: int
    num_experts: int
    top_k: int

    def bytes_for(self, num_tokens: int) -> float:
        touched = experts_touched(self.num_experts, self.top_k, num_tokens)
        return self.dense_bytes + self.num_moe_layers * touched * self.expert_bytes


class FixedPolicy:
    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"speculation length must be >= 0, got {k}")
        self.k = k

    def choose(self, batch_size: int) -> int:
        return self.k

    def record(self, **_) -> None:
        pass


class AdaptivePolicy:
    """Choose k per step to maximise expected emitted tokens per second."""

    def __init__(
        self,
        k_max: int,
        cost_model: StepCostModel | None = None,
        ema: float = 0.2,
        explore_every: int = 16,
        prior_acceptance: float = 0.6,
    ):
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        self.k_max = k_max
        self.cost_model = cost_model
        self.ema = ema
        self.explore_every = explore_every
        self.acceptance = prior_acceptance  # per-token acceptance estimate over every position
        # P(draft i accepted | every draft before it accepted), i = 1 .. k_max: acceptances often
        # come in runs (a draft that follows a repetitive stretch goes on following it), which one
        # i.i.d. rate undervalues at depth.
        self.position_acceptance = [prior_acceptance] * k_max
        self.seen_positions = [False] * k_max  # measured at least once (else: see expected_tokens)
        self.verify_s: dict[tuple[int, int], float] = {}  # (batch bucket, k) -> seconds
        self.draft_s: dict[int, float] = {}  # batch bucket -> seconds per drafted position
        self.steps = 0
        self.last_k = min(k_max, 2)

    @staticmethod
    def _bucket(batch_size: int) -> int:
        return 1 << max(0, (batch_size - 1).bit_length())  # 1, 2, 4, 8, ...

    def expected_tokens(self, k: int) -> float:
        """Tokens a step of k drafts emits per sequence: 1 (the recovered or bonus token) plus
        each draft that is accepted with every draft before it, 1 + sum_j prod_{i <= j} a_i
        (i.i.d. drafts: (1 - a^(k+1)) / (1 - a)). A position never measured (deeper than any k
        tried) takes the deepest measured one's rate before it, not the prior: exploration
        steps one k at a time, and a run of accepts usually goes on as it went."""
        total, run, rate = 1.0, 1.0, None
        for a, seen in zip(self.position_acceptance[:k], self.seen_positions):
            if seen or rate is None:
                rate = a
            run *= rate
            total += run
        return total

    def verify_cost(self, batch_size: int, k: int) -> float | None:
        bucket = self._bucket(batch_size)
        if (bucket, k) in self.verify_s:
            return self.verify_s[(bucket, k)]
        measured = [kk for (b, kk) in self.verify_s if b == bucket]
        if not measured:
            return None
        near = min(measured, key=lambda kk: abs(kk - k))
        base = self.verify_s[(bucket, near)]
        if self.cost_model is None:
            return base * (k + 1) / (near + 1)
        m = self.cost_model
        return base * m.bytes_for(bucket * (k + 1)) / m.bytes_for(bucket * (near + 1))

    def draft_cost(self, batch_size: int) -> float:
        """Seconds per drafted position at this batch size: measured, else the nearest bucket's
        (a small draft's forward costs about the same over a few more rows), else 0."""
        if not self.draft_s:
            return 0.0
        bucket = self._bucket(batch_size)
        return self.draft_s[min(self.draft_s, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), b))]

    def choose(self, batch_size: int) -> int:
        self.steps += 1
        costs = {}
        per_position = self.draft_cost(batch_size)
        for k in range(self.k_max + 1):
            verify = self.verify_cost(batch_size, k)
            if verify is None:
                return self.last_k  # nothing measured for this batch size yet: keep going
            costs[k] = self.expected_tokens(k) / (verify + per_position * k)
        best = max(costs, key=costs.get)
        if self.explore_every and self.steps % self.explore_every == 0:
            # Refresh a neighbour's estimate (alternating up and down).
            step = 1 if (self.steps // self.explore_every) % 2 else -1
            best = min(self.k_max, max(0, best + step))
        self.last_k = best
        return best

    def record(
        self,
        *,
        batch_size: int,
        k: int,
        verify_s: float,
        draft_s: float | None,
        num_drafted: int,
        num_accepted: int,
        num_rejected: int,
        accepted: list[int] | None = None,
        drafted: list[int] | None = None,
    ) -> None:
        """num_rejected: sequences whose drafts were cut short by a rejection this step.
        draft_s None: the proposal's time is not what k costs (it caught the draft up on tokens
        it missed): the draft's cost estimate is left as it is. accepted / drafted: each
        sequence's accepted and drafted counts, for the acceptance at each position (without
        them every position moves toward the step's overall rate)."""
        key = (self._bucket(batch_size), k)
        old = self.verify_s.get(key)
        self.verify_s[key] = verify_s if old is None else (1 - self.ema) * old + self.ema * verify_s
        if num_drafted and k and draft_s is not None:
            bucket, per_position = self._bucket(batch_size), draft_s / k
            d = self.draft_s.get(bucket)
            self.draft_s[bucket] = per_position if d is None else (1 - self.ema) * d + self.ema * per_position
        if num_drafted:
            # Maximum-likelihood estimate of a per-token acceptance probability from runs of
            # accepts that end in a rejection (or in the end of the drafts).
            rate = num_accepted / max(1, num_accepted + num_rejected)
            self.acceptance = (1 - self.ema) * self.acceptance + self.ema * rate
            for i in range(min(k, self.k_max)):
                if accepted is None or drafted is None:
                    observed = rate
                else:  # draft i + 1 of the sequences that drafted it and accepted every one before
                    trials = [a > i for a, n in zip(accepted, drafted) if n > i and a >= i]
                    if not trials:
                        continue
                    observed = sum(trials) / len(trials)
                a = self.position_acceptance[i]
                self.position_acceptance[i] = (1 - self.ema) * a + self.ema * observed
                self.seen_positions[i] = True
