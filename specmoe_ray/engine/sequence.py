"""Requests as the engine sees them: sampling parameters, sequences, outputs."""

from __future__ import annotations

import dataclasses
import enum
import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from specmoe_ray.engine.detok import IncrementalText


class SamplingParams(BaseModel):
    """Per-request sampling parameters, validated once when the request arrives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        1.0, ge=0.0, le=100.0, description="0 = greedy (argmax); below 1e-5 counts as 0."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = off.")
    seed: int | None = Field(None, ge=0, description="Seed of this request's own random generator.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra tokens that end generation.")
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Strings that end generation; the returned text stops before the first one.",
    )
    ignore_eos: bool = Field(False, description="Do not stop at the model's end-of-sequence tokens.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # smaller temperatures overflow float32 logits


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclasses.dataclass
class RequestMetrics:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0  # engine steps that produced tokens for this request
    num_drafted: int = 0  # draft tokens proposed for it
    num_accepted: int = 0  # of which the target accepted
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens; None when nothing was drafted."""
        return self.num_accepted / self.num_drafted if self.num_drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per verify step (accepted drafts + 1); 1.0 without speculation."""
        return self.num_generated_tokens / self.num_steps if self.num_steps else None

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def elapsed_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # None while running
    metrics: RequestMetrics
    new_token_ids: list[int] = dataclasses.field(default_factory=list)  # this step's tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Sequence:
    """One request's tokens and state; its KV entries live in cache slot `slot`."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ):
        self.request_id = request_id
        self.prompt = list(prompt)
        self.tokens = list(prompt)
        self.params = params
        self.slot: int | None = None
        self.finish_reason: FinishReason | None = None
        self.max_len = min(max_model_len, len(prompt) + params.max_tokens)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(eos_token_ids)
        self.stop_ids = frozenset(stops)
        self.generator: torch.Generator | None = None
        self.stop_text: str | None = None  # the text up to a matched stop string
        self._text: IncrementalText | None = None  # the output's text, for stop strings
        self.metrics = RequestMetrics(num_prompt_tokens=len(prompt), arrival_time=time.monotonic())

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    def append(self, token: int, tokenizer=None) -> None:
        """Add a generated token and decide whether the sequence is finished."""
        self.tokens.append(token)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        if token in self.stop_ids or (self.params.stop and self._hit_stop_string(tokenizer)):
            self.finish_reason = FinishReason.STOP
        elif len(self.tokens) >= self.max_len:
            self.finish_reason = FinishReason.LENGTH

    def _hit_stop_string(self, tokenizer) -> bool:
        if self._text is None:
            self._text = IncrementalText(tokenizer)
        checked = len(self._text.text)
        text = self._text.extend(self.tokens[len(self.prompt) + len(self._text.tokens) :])
        # A new match ends in the text added since the last check (which had none).
        start = max(0, checked - max(len(s) for s in self.params.stop) + 1)
        if not self._text.exact:  # (bytes that never formed characters: the whole text, searched whole)
            start = 0
        elif not any(text.find(s, start) >= 0 for s in self.params.stop):
            return False
        # A match in the incremental text: the whole output decoded once, where it is cut.
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        hits = [i for s in self.params.stop if (i := text.find(s, start)) >= 0]
        if hits:
            self.stop_text = text[: min(hits)]
        return bool(hits)
