"""Requests as the engine sees them: sampling parameters, sequences, outputs."""

from __future__ import annotations

import dataclasses
import enum
import time

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """Per-request sampling parameters, validated once when the request arrives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy (argmax).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = off.")
    seed: int | None = Field(None, ge=0, description="Seed of this request's own random generator.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra tokens that end generation.")
    ignore_eos: bool = Field(False, description="Do not stop at the model's end-of-sequence tokens.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclasses.dataclass
class RequestMetrics:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0  # engine steps that produced tokens for this request
    acceptance_rate: float | None = None  # None without speculation
    mean_accepted_length: float | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

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
        self.metrics = RequestMetrics(num_prompt_tokens=len(prompt), arrival_time=time.monotonic())

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    def append(self, token: int) -> None:
        """Add a generated token and decide whether the sequence is finished."""
        self.tokens.append(token)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        if token in self.stop_ids:
            self.finish_reason = FinishReason.STOP
        elif len(self.tokens) >= self.max_len:
            self.finish_reason = FinishReason.LENGTH
