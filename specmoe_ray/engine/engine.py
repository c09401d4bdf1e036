"""The engine: `step()` = schedule -> forward -> sample -> postprocess.

It knows neither transport nor HTTP: the MoE experts are an `ExpertBackend` handed to the
model (in-process, or a ShardGroup of Ray actors built by `from_pretrained`).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from specmoe_ray.engine.sampling import make_generator, sample
from specmoe_ray.engine.scheduler import Scheduler
from specmoe_ray.engine.sequence import RequestOutput, SamplingParams, Sequence
from specmoe_ray.errors import RequestError, ShardGroupError
from specmoe_ray.models.loader import load_experts, load_trunk
from specmoe_ray.models.transformer import Transformer, build_forward_batch
from specmoe_ray.moe.dispatch import LoopbackDispatch
from specmoe_ray.moe.placement import PlacementPlan

log = logging.getLogger(__name__)


def _load_tokenizer(path: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class Engine:
    """Batched generation over a target model whose experts may live on other processes."""

    def __init__(
        self,
        model: Transformer,
        *,
        tokenizer=None,
        shard_group=None,
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
    ):
        args = model.args
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_model_len = max_model_len or min(args.max_position_embeddings, 4096)
        if not 2 <= self.max_model_len <= args.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be in [2, {args.max_position_embeddings}] "
                f"(the model's max_position_embeddings), got {self.max_model_len}"
            )
        self.model = model
        self.args = args
        self.device = model.lm_head.weight.device
        self.tokenizer = tokenizer
        self.shard_group = shard_group
        self.cache = model.make_cache(max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens)
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0

    @classmethod
    def from_pretrained(
        cls,
        target: str,
        draft: str | None = None,
        num_shards: int = 0,
        device: str = "cpu",
        dtype: str | torch.dtype = "auto",
        shard_options: Any = None,
        **engine_kwargs,
    ) -> Engine:
        """Load a local HF checkpoint; experts in-process (num_shards=0) or on Ray actors."""
        if draft is not None:
            raise ValueError("speculative drafts are not available yet: pass draft=None")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU")
        if num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {num_shards}")
        model = load_trunk(target, dtype=dtype, device=device)
        args = model.args
        pdtype = model.lm_head.weight.dtype
        shard_group = None
        if args.is_moe:
            if num_shards == 0:
                all_experts = {layer: list(range(args.num_experts)) for layer in args.moe_layers}
                store = load_experts(target, all_experts, dtype=pdtype, device=device, args=args)
                model.set_expert_backend(LoopbackDispatch(store))
            else:
                from specmoe_ray.serving.shards import ShardGroup, ShardOptions

                plan = PlacementPlan.contiguous(args.moe_layers, args.num_experts, num_shards)
                shard_group = ShardGroup(
                    target, plan, args.hidden_size, pdtype, device, shard_options or ShardOptions()
                )
                model.set_expert_backend(shard_group.start())
        elif num_shards:
            raise ValueError(f"{target!r} is a dense model ({args.model_type}): it has no experts to shard")
        try:
            return cls(model, tokenizer=_load_tokenizer(target), shard_group=shard_group, **engine_kwargs)
        except BaseException:
            if shard_group is not None:
                shard_group.shutdown()
            raise

    # -- requests ----------------------------------------------------------------------------

    def add_request(
        self, prompt: list[int] | str, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        token_ids = self._encode(prompt)
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(token_ids)} tokens; the context holds {self.max_model_len} "
                f"(max_model_len), leaving no room to generate"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, token_ids, params, self.max_model_len, self.args.eos_token_ids)
        seq.generator = None if params.greedy else make_generator(params.seed, self.device)
        self.scheduler.add(seq)
        return request_id

    def _encode(self, prompt: list[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt is a string but the checkpoint has no tokenizer: pass token ids")
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise RequestError("prompt is empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.args.vocab_size]
        if bad:
            raise RequestError(
                f"prompt has token ids outside the vocabulary [0, {self.args.vocab_size}): {bad[:5]}"
            )
        return token_ids

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward over every scheduled sequence; return outputs of those that moved."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        batch = build_forward_batch(
            [s.tokens for s in scheduled],
            [s.start for s in scheduled],
            [s.seq.slot for s in scheduled],
            [len(s.tokens) - 1 if s.samples else len(s.tokens) for s in scheduled],
            self.device,
        )
        try:
            logits = self.model(batch, self.cache)  # [M, V]: one row per sampling sequence
        except RuntimeError as e:
            if self.shard_group is not None:
                raise ShardGroupError(f"expert shard exchange failed: {e}") from e
            raise
        for s in scheduled:
            self.cache.advance(s.seq.slot, len(s.tokens))
        samplers = [s.seq for s in scheduled if s.samples]
        new_tokens = sample(logits, [q.params for q in samplers], [q.generator for q in samplers])
        self.num_steps += 1
        outputs = []
        for seq, token in zip(samplers, new_tokens):
            seq.append(token)
            seq.metrics.num_steps += 1
            self.num_generated_tokens += 1
            if seq.finish_reason is not None:
                self.scheduler.retire(seq)
            outputs.append(self._output(seq, [token]))
        return outputs

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        seq.metrics.num_generated_tokens = seq.num_generated
        finish = seq.finish_reason.value if seq.finish_reason is not None else None
        if finish is not None and seq.metrics.finish_time is None:
            seq.metrics.finish_time = time.monotonic()
        text = None
        if finish is not None and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return RequestOutput(seq.request_id, seq.prompt, seq.generated, text, finish, seq.metrics, new_tokens)

    def generate(
        self,
        prompts: SequenceABC[list[int] | str],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of prompts (token-id lists or strings); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise RequestError("prompts must be a list of prompts (each a token-id list or a string)")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p))
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while wanted - final.keys():
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def stats(self) -> dict[str, Any]:
        out = {
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            "num_running": self.num_running,
            "num_waiting": len(self.scheduler.waiting),
        }
        if self.shard_group is not None:
            out["shards"] = self.shard_group.stats()
        return out

    def shutdown(self) -> None:
        """Stop the expert shards (if any). Safe to call twice."""
        if self.shard_group is not None:
            self.shard_group.shutdown()
            self.shard_group = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
