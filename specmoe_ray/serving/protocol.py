"""Request and response models: the OpenAI-compatible HTTP API and the Python handle API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from specmoe_ray.engine.sequence import SamplingParams


class _OpenAIRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; known ones are checked.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported (must be 0).")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported (must be 0).")
    logprobs: Any = Field(None, description="Not supported.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 16 or any(not s for s in v):
            raise ValueError("stop: at most 16 non-empty strings")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False):
            raise ValueError("logprobs are not supported")
        return v

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop or [],
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[int] = Field(..., description="Text, or token ids.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str | list):
            v = v[0]  # a batch of one
        if isinstance(v, list) and v and not all(isinstance(t, int) for t in v):
            raise ValueError("one prompt per request: a string or a list of token ids")
        if not v:
            raise ValueError("prompt is empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class GenerateRequest(BaseModel):
    """The Python handle API: `await handle.generate.remote(GenerateRequest(...))`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[int] = Field(..., description="Text (needs a tokenizer) or token ids.")
    params: SamplingParams = Field(default_factory=SamplingParams)
    request_id: str | None = Field(None, description="Defaults to a fresh id.")


class GenerateChunk(BaseModel):
    request_id: str
    text: str  # new text since the last chunk
    token_ids: list[int]  # new tokens since the last chunk
    finish_reason: str | None = None


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
