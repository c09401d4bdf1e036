"""OpenAI-compatible HTTP ingress, and the Python handle API, in front of the Verifier.

Every request is parsed and checked here (size, JSON, fields, model name, prompt length):
a bad one gets a 4xx whose `error.param` names the field, and never reaches an engine loop.
Text in, token ids to the verifier; token ids back, text out (incremental, holding back any
tail that may still become a stop string or is half a UTF-8 character).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type.
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from specmoe_ray.config import ServeConfig, resolve_model_path
from specmoe_ray.engine.detok import IncrementalText
from specmoe_ray.engine.sequence import SamplingParams
from specmoe_ray.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
)

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        body = {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }
        return JSONResponse(body, status_code=self.status)


app = FastAPI(title="specmoe-ray", docs_url=None, redoc_url=None)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return e.response()


class Detokenizer:
    """Turns a growing token list into text deltas that are safe to send."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = IncrementalText(tokenizer) if tokenizer is not None else None
        self.full_text: str | None = None  # the whole output decoded, once it finished
        self.emitted = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, new_tokens: list[int], finish_reason: str | None) -> str:
        self.tokens.extend(new_tokens)
        if self.text is None:
            return ""
        if finish_reason is not None:
            text = self.full_text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if finish_reason == "stop" and self.stop:
                hits = [i for s in self.stop if (i := text.find(s)) >= 0]
                if hits:
                    text = text[: min(hits)]
            delta = text[self.emitted :]
            self.emitted = len(text)
            return delta
        text = self.text.extend(new_tokens)  # (the last tokens decoded, not the whole output)
        if not self.text.exact:  # (bytes that never formed characters)
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        safe = len(text) - self.hold
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(self.emitted, safe)
        return delta


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], verifier):
        from specmoe_ray.engine.setup import load_tokenizer
        from specmoe_ray.models.loader import read_config

        self.config = ServeConfig.from_dict(config)
        self.config.check_paths()
        self.verifier = verifier
        target = resolve_model_path(self.config.model.target)
        self.tokenizer = load_tokenizer(target)
        args, _ = read_config(target)
        self.vocab_size = args.vocab_size
        self.max_model_len = self.config.engine.max_model_len or min(args.max_position_embeddings, 4096)
        ing = self.config.ingress
        self.api_key = ing.api_key or (os.environ.get(ing.api_key_env) if ing.api_key_env else None)
        self.model_name = self.config.model.name
        self._ids = itertools.count()

    # -- checks -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                None,
                "authentication_error",
            )

    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        self._authorize(request)
        limit = self.config.ingress.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit}", "body")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "body")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", "body") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the JSON body must be an object", "body")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise ApiError(400, f"{field}: {err['msg']}", field) from None
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} not found; this server serves {self.model_name!r}",
                "model",
                "not_found_error",
            )
        return req

    def _prompt_ids(self, prompt: str | list[int], field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, f"{field}: this model has no tokenizer; send token ids", field)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"{field}: token ids outside [0, {self.vocab_size}): {bad[:5]}", field)
        if not ids:
            raise ApiError(400, f"{field}: the prompt is empty", field)
        if len(ids) >= self.max_model_len:
            raise ApiError(
                400,
                f"{field}: {len(ids)} tokens, but the context holds {self.max_model_len} "
                f"including the completion",
                field,
            )
        return ids

    def _params(self, req, max_tokens: int | None) -> SamplingParams:
        limit = self.config.ingress.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens: {max_tokens} exceeds the limit of {limit}", "max_tokens")
        if req.stop and self.tokenizer is None:
            raise ApiError(400, "stop: stop strings need a tokenizer, which this model lacks", "stop")
        params = req.sampling_params(default_max_tokens=16)
        return params.model_copy(update={"max_tokens": max_tokens or 16})

    def _chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "messages: this model has no tokenizer, so no chat template", "messages")
        messages = [m.model_dump() for m in req.messages]
        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        return self._prompt_ids(text, "messages")

    # -- the one path every request takes ----------------------------------------------------

    async def _run(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[dict]:
        """Chunks from the verifier, with text deltas; cancelling it cancels the request."""
        stream = self.verifier.options(stream=True).generate_stream.remote(
            {"request_id": request_id, "prompt": prompt_ids, "params": params.model_dump()}
        )
        detok = Detokenizer(self.tokenizer, params.stop)
        done = False
        try:
            async for chunk in stream:
                chunk["text"] = detok.push(chunk["token_ids"], chunk["finish_reason"])
                done = chunk["finish_reason"] is not None
                if done:
                    chunk["full_text"] = detok.full_text
                yield chunk
        finally:
            if not done:
                stream.cancel()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}-{next(self._ids)}"

    # -- HTTP ------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self.verifier.check_health.remote()
        except Exception as e:
            return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "specmoe-ray",
                        "max_model_len": self.max_model_len,
                    }
                ],
            }
        )

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        prompt_ids = self._prompt_ids(req.prompt)
        params = self._params(req, req.max_tokens)
        rid = self._new_id("cmpl")
        return await self._respond(req, rid, prompt_ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self._parse(request, ChatCompletionRequest)
        prompt_ids = self._chat_ids(req)
        params = self._params(req, req.max_completion_tokens or req.max_tokens)
        rid = self._new_id("chatcmpl")
        return await self._respond(req, rid, prompt_ids, params, chat=True)

    async def _respond(self, req, rid: str, prompt_ids: list[int], params: SamplingParams, chat: bool):
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(n: int) -> dict[str, int]:
            return {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": n,
                "total_tokens": len(prompt_ids) + n,
            }

        if not req.stream:
            text, last = "", None
            try:
                async for chunk in self._run(rid, prompt_ids, params):
                    text += chunk["text"]
                    last = chunk
            except Exception as e:  # the engine replica failed: a clear 503, not a hang
                raise ApiError(
                    503, f"generation failed: {type(e).__name__}: {e}", None, "server_error"
                ) from None
            choice = {"index": 0, "finish_reason": last["finish_reason"], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice],
                    "usage": usage(last["num_generated"]),
                    "metrics": {
                        "acceptance_rate": last.get("acceptance_rate"),
                        "mean_accepted_length": last.get("mean_accepted_length"),
                    },
                }
            )

        async def events() -> AsyncIterator[str]:
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": rid, "object": chunk_obj, "created": created, "model": self.model_name}
            if chat:
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ],
                    }
                )
            n = 0
            try:
                async for chunk in self._run(rid, prompt_ids, params):
                    n = chunk["num_generated"]
                    if not chunk["text"] and chunk["finish_reason"] is None:
                        continue
                    choice = {"index": 0, "finish_reason": chunk["finish_reason"]}
                    if chat:
                        choice["delta"] = {"content": chunk["text"]} if chunk["text"] else {}
                    else:
                        choice["text"] = chunk["text"]
                        choice["logprobs"] = None
                    yield _sse({**base, "choices": [choice]})
            except Exception as e:  # the engine replica failed mid-stream: say so, then end the stream
                message = f"generation failed: {type(e).__name__}: {e}"
                yield _sse(
                    {"error": {"message": message, "type": "server_error", "param": None, "code": 503}}
                )
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": usage(n)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- Python handle API ---------------------------------------------------------------------

    def _handle_request(self, req: GenerateRequest | dict) -> tuple[str, list[int], SamplingParams]:
        req = req if isinstance(req, GenerateRequest) else GenerateRequest.model_validate(req)
        try:
            prompt_ids = self._prompt_ids(req.prompt)
        except ApiError as e:
            raise ValueError(e.message) from None
        return req.request_id or self._new_id("gen"), prompt_ids, req.params

    async def generate(self, req: GenerateRequest | dict) -> GenerateResponse:
        rid, prompt_ids, params = self._handle_request(req)
        text, last = "", None
        async for chunk in self._run(rid, prompt_ids, params):
            text += chunk["text"]
            last = chunk
        return GenerateResponse(
            request_id=rid,
            text=text,
            token_ids=last["all_token_ids"],
            finish_reason=last["finish_reason"],
            prompt_tokens=len(prompt_ids),
            completion_tokens=last["num_generated"],
            acceptance_rate=last.get("acceptance_rate"),
            mean_accepted_length=last.get("mean_accepted_length"),
        )

    async def generate_stream(self, req: GenerateRequest | dict) -> AsyncIterator[GenerateChunk]:
        rid, prompt_ids, params = self._handle_request(req)
        async for chunk in self._run(rid, prompt_ids, params):
            yield GenerateChunk(
                request_id=rid,
                text=chunk["text"],
                token_ids=chunk["token_ids"],
                finish_reason=chunk["finish_reason"],
            )
