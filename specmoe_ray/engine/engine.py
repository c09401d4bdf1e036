"""The engine: `step()` = schedule -> propose -> verify -> accept -> stream.

Every step runs one target forward over all scheduled sequences: prompt chunks, and for each
sequence that samples, its last emitted token followed by up to k draft tokens. Verification
(`spec/rejection.py`) keeps a prefix of the drafts and adds one recovered or bonus token; the
KV cache rolls back past the first rejected draft. With no proposer (or k = 0) the same path
is plain decoding.

It knows neither transport nor HTTP: the MoE experts are an `ExpertBackend` handed to the
model (in-process, or a ShardGroup of Ray actors built by `from_pretrained`), and the draft
is a proposer object (local, or a client of a remote draft pool).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from specmoe_ray.engine.graph import StepGraphs, make_step_graphs
from specmoe_ray.engine.sampling import make_generator, to_device
from specmoe_ray.engine.scheduler import ScheduledSeq, Scheduler
from specmoe_ray.engine.sequence import FinishReason, RequestOutput, SamplingParams, Sequence
from specmoe_ray.engine.setup import (
    EngineConfig,
    EngineMetrics,
    check_draft,
    cost_model,
    load_local_model,
    load_tokenizer,
    make_autoscaler,
    make_proposer,
    resolve_device,
)
from specmoe_ray.errors import RequestError, ShardGroupError
from specmoe_ray.models.loader import load_trunk, read_config
from specmoe_ray.models.transformer import Transformer, build_forward_batch
from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.spec import rejection
from specmoe_ray.spec.policy import AdaptivePolicy, FixedPolicy
from specmoe_ray.spec.proposer import DraftRequest, empty_proposal

log = logging.getLogger(__name__)

# Static steps with an in-process draft model (`DraftModelProposer`; not with expert shards):
# the drafts stay on the device, the verify step's graph reads them there (`StepGraphs.run(
# drafts=)`) and the host reads them with the step's results, so the host prepares and launches
# the verify step while the draft's forwards still run, instead of waiting for them first (one
# host sync per step fewer; the draft's time from CUDA events). Off: measured in session 24 on
# an H200 (benchmarks/RESULTS.md "Session 24"), it gains 1.5-2% where the draft is GPU-bound
# (30B + a 0.6B-shaped draft at batch 4 and 8; batch 1 within the spread) and loses 4-9% where
# the draft's launches outlast its GPU work (the demo pair): nothing is left to overlap there,
# and placing the drafts, the events and the separate read add ~0.1 ms of host work per step.
DEFER_DRAFT_READ = False


class Engine:
    """Batched speculative generation over a target whose experts may live on other processes."""

    def __init__(
        self,
        model: Transformer,
        *,
        tokenizer=None,
        shard_group=None,
        local_experts=None,
        proposer=None,
        autoscaler=None,
        config: EngineConfig | None = None,
        **config_kwargs,
    ):
        self.config = config or EngineConfig(**config_kwargs)
        self.config.validate(model.args.max_position_embeddings)
        self.max_model_len = self.config.max_model_len
        self.model = model
        model.fuse_projections()
        self._empty_proposals: dict[int, rejection.DraftProposal] = {}
        self._draft_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # DEFER_DRAFT_READ
        self._last_drafted: set[str] = set()  # request ids that drafted in the last step
        self.args = model.args
        self.device = model.lm_head.weight.device
        self.tokenizer = tokenizer
        self.shard_group = shard_group
        self.local_experts = local_experts
        self.proposer = proposer
        self.max_k = k = self.config.num_speculative_tokens if proposer is not None else 0
        if self.config.spec_policy == "adaptive" and proposer is not None:
            self.policy = AdaptivePolicy(k, cost_model(model) if self.args.is_moe else None)
        else:
            self.policy = FixedPolicy(k)
        self.cache = model.make_cache(self.config.max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(self.cache, self.config.max_num_batched_tokens)
        self.graphs = self._make_step_graphs()
        self.metrics = EngineMetrics()
        self.max_recoveries = 2  # re-forms of the shard group per step before giving up
        self.autoscaler = autoscaler
        self._window: tuple | None = None
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        target: str,
        draft: str | None = None,
        num_shards: int = 0,
        device: str = "cpu",
        dtype: str | torch.dtype = "auto",
        shard_options: Any = None,
        proposer: Any = None,
        shard_autoscale: Any = None,
        **config_kwargs,
    ) -> Engine:
        """Load a local HF checkpoint; experts in-process (num_shards=0) or on Ray actors.

        dtype "auto" is the checkpoint's dtype on GPUs and float32 on CPU.

        draft: a local checkpoint directory (a dense or MoE model sharing the target's
        vocabulary), "ngram" (prompt lookup), "mtp" (the target's own multi-token-prediction
        module: DeepSeek-V3/R1 checkpoints), or None (no speculation).
        proposer: a ready proposer object instead of `draft` (e.g. a draft-pool client).
        shard_autoscale: a `ShardAutoscaleConfig` to scale the expert shards with measured load.
        """
        if draft is not None and proposer is not None:
            raise ValueError("pass either draft or proposer, not both")
        device = resolve_device(device)
        if num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {num_shards}")
        if dtype == "auto" and device == "cpu":
            dtype = "float32"  # CPUs compute bf16/fp16 far slower than fp32; checkpoints load either way
        config = EngineConfig(**config_kwargs)
        args, _ = read_config(target)
        config.validate(args.max_position_embeddings)
        check_draft(target, args, draft)  # before anything loads
        if not args.is_moe and num_shards:
            raise ValueError(f"{target!r} is a dense model ({args.model_type}): it has no experts to shard")
        # Checked before anything loads: the plan validates the shard count.
        plan = PlacementPlan.contiguous(args.moe_layers, args.num_experts, num_shards) if num_shards else None
        autoscaler = make_autoscaler(shard_autoscale, num_shards)

        shard_group = local_experts = None
        if num_shards == 0:
            model, local_experts = load_local_model(target, dtype, device)
        else:
            from specmoe_ray.serving.shards import ShardGroup, ShardOptions

            model = load_trunk(target, dtype=dtype, device=device)
            shard_group = ShardGroup(
                target,
                plan,
                args.hidden_size,
                model.lm_head.weight.dtype,
                device,
                shard_options or ShardOptions(),
                cache_shape=(config.max_num_seqs, config.max_model_len),
            )
            if shard_group.attention_layers is not None:  # replica_attention "heads": rank 0's heads
                if autoscaler is not None:
                    raise ValueError(
                        "replica_attention 'heads' fixes the shard count (it splits the attention heads "
                        "over them): it cannot autoscale; use 'replicated' with shard autoscaling"
                    )
                model.split_attention(0, plan.num_shards)
            model.set_expert_backend(shard_group.start())
        try:
            if draft is not None:
                proposer = make_proposer(draft, target, model, config, dtype, device)
            return cls(
                model,
                tokenizer=load_tokenizer(target),
                shard_group=shard_group,
                local_experts=local_experts,
                proposer=proposer,
                config=config,
                autoscaler=autoscaler,
            )
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
        if params.stop and self.tokenizer is None:
            raise RequestError(
                "stop strings need a tokenizer, and the checkpoint has none: use stop_token_ids"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, token_ids, params, self.max_model_len, self.args.eos_token_ids)
        seq.generator = None if params.greedy else make_generator(params.seed)  # (on the host)
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
        """Cancel a request; its KV slot (and its draft cache) is free at once."""
        seq = self.scheduler.abort(request_id)
        if seq is not None and self.proposer is not None:
            self.proposer.release(request_id)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One target forward over every scheduled sequence; outputs of those that emitted tokens."""
        # Streams, events, graphs and Triton launches follow the current device: make it ours.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        self._maybe_autoscale()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        samplers = [s for s in scheduled if s.samples]
        chosen_k = self.policy.choose(len(samplers)) if samplers else 0
        t_step = time.perf_counter()
        drafts, proposal, draft_s, on_device = self._propose(samplers, chosen_k)

        feeds = [s.tokens + drafts.get(id(s), []) for s in scheduled]
        num_draft = [len(drafts.get(id(s), [])) for s in samplers]
        # The draft's time measures what k costs only where every drafting row drafted in the
        # last step too: a proposal for a row that did not (new, or after a step without drafts)
        # first feeds the draft model every token it missed (a whole prompt, at first).
        drafting = {s.seq.request_id for s, n in zip(samplers, num_draft) if n}
        draft_continues, self._last_drafted = drafting <= self._last_drafted, drafting
        t0 = time.perf_counter()
        key = self._graph_key(scheduled, feeds)
        if on_device and key is None:  # an eager step takes its tokens from the host: read them
            drafts = self._read_drafts(samplers, proposal)
            feeds = [s.tokens + drafts.get(id(s), []) for s in scheduled]
            on_device, t0 = False, time.perf_counter()
            draft_s = t0 - t_step  # (the read waited for the draft, as `propose` does)
        device_drafts = proposal if on_device else None
        run = functools.partial(
            self._compute, scheduled, samplers, feeds, key, num_draft, proposal, chosen_k, device_drafts
        )
        hidden, emitted, accepted, extra = self._checked(scheduled, samplers, run)
        if not samplers:
            if hidden is not None:
                self._observe_hidden(scheduled, feeds, hidden, {})
            self.metrics.num_steps += 1
            return []
        verify_s = time.perf_counter() - t0
        if on_device and self.device.type == "cuda":  # the draft's GPU time (after the step's sync)
            draft_s = self._draft_events[0].elapsed_time(self._draft_events[1]) / 1e3
            verify_s = max(0.0, time.perf_counter() - t_step - draft_s)
        if hidden is not None:  # before finished sequences release their proposer state
            self._observe_hidden(scheduled, feeds, hidden, {id(s): a for s, a in zip(samplers, accepted)})

        m = self.metrics
        m.num_steps += 1 + extra
        m.draft_time_s += draft_s
        m.verify_time_s += verify_s
        if key is not None:
            m.num_static_steps += 1 + extra
            m.static_time_s += verify_s
        m.num_drafted += sum(num_draft)
        m.num_accepted += sum(accepted)
        m.num_verify_rows += len(samplers)
        # Only pure decode steps measure what k costs: a prompt chunk in the batch would be charged
        # to the speculation length.
        if all(len(s.tokens) == 1 for s in scheduled):
            self.policy.record(
                batch_size=len(samplers),
                k=chosen_k,
                verify_s=verify_s / (1 + extra),  # a step's cost, run-ahead steps included
                draft_s=draft_s if draft_continues else None,
                num_drafted=sum(num_draft),
                num_accepted=sum(accepted),
                num_rejected=sum(a < n for a, n in zip(accepted, num_draft)),
                accepted=accepted,
                drafted=num_draft,
            )
        outputs = []
        for s, n, a, toks in zip(samplers, num_draft, accepted, emitted):
            seq = s.seq
            # Keep the accepted drafts' KV entries (and the run-ahead steps'); forget the rejected ones.
            self.cache.rollback(seq.slot, s.start + len(s.tokens) + a + extra)
            seq.metrics.num_drafted += n
            seq.metrics.num_accepted += a
            seq.metrics.num_steps += 1 + extra
            new = []
            for token in toks[: a + 1 + extra]:  # (a sequence that finishes drops the rest)
                seq.append(token, self.tokenizer)
                new.append(token)
                if seq.finish_reason is not None:
                    break
            m.num_generated_tokens += len(new)
            if seq.finish_reason is not None:
                self._retire(seq)
            outputs.append(self._output(seq, new))
        return outputs

    def _compute(
        self, scheduled, samplers, feeds, key, num_draft: list[int], proposal, chosen_k: int, device_drafts
    ):
        """The step's target forward (and run-ahead decode steps) and verification, up to its one
        host sync -> (final hidden states or None, emitted tokens per sampler, accepted drafts per
        sampler, run-ahead steps); the KV cache advanced past every token fed. device_drafts: a
        proposal whose drafts the feeds hold as placeholders (their last tokens: a static step
        reads them on the device, `DEFER_DRAFT_READ`)."""
        starts = [s.start for s in scheduled]
        slots = [s.seq.slot for s in scheduled]
        logits_from = [len(s.tokens) - 1 if s.samples else len(s.tokens) for s in scheduled]
        hidden = None  # [N, D]: final hidden states, for a proposer that reads them (MTP)
        if key is not None:  # a decode/verify step: replay its CUDA graph (engine/graph.py)
            on_device = {} if device_drafts is None else {"drafts": (device_drafts.tokens, num_draft)}
            run = functools.partial(self.graphs.run, key, feeds, starts, slots, logits_from, **on_device)
            logits = self._recovering(run)
            if self.graphs.hidden:
                logits, hidden = logits
        else:
            batch = build_forward_batch(feeds, starts, slots, logits_from, self.device)
            if self._wants_hidden:
                logits, hidden = self._forward(batch, return_hidden=True)
            else:
                logits = self._forward(batch)  # [M, V]: k_b + 1 rows per sampling sequence
        for s, feed in zip(scheduled, feeds):
            self.cache.advance(s.seq.slot, len(feed))
        if not samplers:
            if self.shard_group is not None and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # before `_checked` looks
            return hidden, [], [], 0

        k = proposal.tokens.shape[1]
        # Row r of `logits` belongs to sampler b at offset i: lay them out as [B, k + 1, V].
        if all(n == k for n in num_draft):  # already in that layout (always when k = 0): no copy
            target_logits = logits.view(len(samplers), k + 1, -1)
        else:
            index, row = [], 0
            for n in num_draft:
                index.append([row + min(i, n) for i in range(k + 1)])
                row += n + 1
            target_logits = logits[to_device(index, logits.device)]
        seqs = [s.seq for s in samplers]
        result = rejection.verify(
            target_logits, proposal, [q.params for q in seqs], [q.generator for q in seqs]
        )
        tokens = result.tokens  # [B, k + 1]
        ahead = self._decode_ahead(scheduled, key, chosen_k, proposal, tokens)  # [B, extra]
        extra = ahead.shape[1] if ahead is not None else 0
        if ahead is not None:
            tokens = torch.cat([tokens, ahead], dim=1)
        emitted = tokens.tolist()  # the step's one host sync
        # Accepted drafts from the same read: a row's first k + 1 places hold its accepted drafts
        # and one more token (token ids, >= 0), then -1.
        accepted = [sum(t >= 0 for t in row[: k + 1]) - 1 for row in emitted]
        return hidden, emitted, accepted, extra

    def _checked(self, scheduled, samplers, run):
        """run() (`_compute`); with expert shards, rolled back (KV lengths, seeded generators) and
        run again on a re-formed group if the group's watcher found it broken by the step's host
        sync: an NCCL collective aborted for a dead rank returns garbage, not an error
        (`ShardGroup._heartbeat_loop`)."""
        if self.shard_group is None:
            return run()
        lengths = [self.cache.lengths[s.seq.slot] for s in scheduled]
        generators = [(g, g.get_state()) for g in (s.seq.generator for s in samplers) if g is not None]
        for attempt in range(self.max_recoveries + 1):
            self.shard_group.begin_step()  # (the watcher asks the shards if it runs long)
            try:
                out = run()
            finally:
                self.shard_group.end_step()
            try:
                self.shard_group.check()
                return out
            except ShardGroupError as e:
                for s, length in zip(scheduled, lengths):
                    self.cache.rollback(s.seq.slot, length)
                for g, state in generators:
                    g.set_state(state)
                self._recover(e, attempt)
        raise AssertionError("unreachable")

    def _decode_ahead(
        self, scheduled: list[ScheduledSeq], key, k: int, proposal, tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """More decode steps after this one, before the host reads any token: each feeds the
        last one's sampled tokens on the device (`StepGraphs.run(fed=)`) -> their tokens
        `[B, extra]`, or None. Only static steps of one token per sequence with nothing to
        verify (k = 0) run ahead, at most `decode_steps - 1` steps, no more than any sequence
        still wants and no further than every sequence's cache room. A sequence that finishes
        on an earlier token drops the later ones (computed, never emitted)."""
        n = self.config.decode_steps
        if n <= 1 or key is None or k or self.graphs.hidden:
            return None
        if not all(s.samples and len(s.tokens) == 1 for s in scheduled):
            return None
        n = min(
            n,
            max(s.seq.max_len - len(s.seq.tokens) for s in scheduled),  # tokens still wanted
            min(self.cache.max_len - s.start for s in scheduled),  # positions left to write
        )
        B = len(scheduled)
        seqs = [s.seq for s in scheduled]
        params, generators = [q.params for q in seqs], [q.generator for q in seqs]
        starts = [s.start for s in scheduled]
        slots = [q.slot for q in seqs]
        out = []
        for _ in range(n - 1):
            starts = [p + 1 for p in starts]
            step_key = self.graphs.key(B, 1, max(starts) + 1, B)
            if step_key is None:  # past the largest bucket
                break
            fed = tokens[:, -1]
            run = functools.partial(self.graphs.run, step_key, [[0]] * B, starts, slots, [0] * B, fed=fed)
            logits = self._recovering(run)
            for slot in slots:
                self.cache.advance(slot, 1)
            tokens = rejection.verify(logits.view(B, 1, -1), proposal, params, generators).tokens
            out.append(tokens)
        return torch.cat(out, dim=1) if out else None

    def _graph_key(self, scheduled: list[ScheduledSeq], feeds: list[list[int]]):
        """The CUDA-graph bucket of this step, or None to run it eagerly (prompt chunks in it,
        or larger than any bucket)."""
        if self.graphs is None or not all(s.samples for s in scheduled):
            return None
        kv_len = max(s.start + len(f) for s, f in zip(scheduled, feeds))
        num_tokens = sum(len(f) for f in feeds)
        return self.graphs.key(len(scheduled), max(len(f) for f in feeds), kv_len, num_tokens)

    def _make_step_graphs(self) -> StepGraphs | None:
        # With expert shards, "auto" captures static steps (fixed-size NCCL exchanges, moe/dispatch.py)
        # where the shard options ask for it (the default); else steps run eagerly.
        shards = self.shard_group
        if shards is not None and self.config.step_graphs == "auto" and not shards.options.cuda_graphs:
            return None
        # One token per sequence to decode, up to k + 1 to verify.
        return make_step_graphs(
            self.model,
            self.cache,
            self.config.step_graphs,
            self.config.max_num_seqs,
            self.max_k + 1,
            hidden=self._wants_hidden,  # an MTP drafter reads the target's hidden states
            max_prompt_tokens=self.config.graph_prompt_tokens,
        )

    @property
    def _wants_hidden(self) -> bool:
        return bool(getattr(self.proposer, "wants_hidden", False))

    def _observe_hidden(
        self, scheduled: list[ScheduledSeq], feeds: list[list[int]], hidden: torch.Tensor, accepted: dict
    ) -> None:
        """Hand the proposer the hidden states of the positions each sequence keeps: a prompt
        chunk all it fed, a sampling sequence its fed tokens and its accepted drafts."""
        offset = 0
        for s, feed in zip(scheduled, feeds):
            keep = len(s.tokens) + accepted.get(id(s), 0)
            self.proposer.observe(s.seq.request_id, s.start, hidden[offset : offset + keep])
            offset += len(feed)

    def _forward(self, batch, return_hidden: bool = False):
        """The target forward; if the expert shard group fails, re-form it and replay the step.

        -> logits `[M, V]`, or (logits, final hidden states `[N, D]`) with return_hidden.

        Replaying is exact: experts hold no per-request state, KV entries past a sequence's
        recorded length are dead until rewritten, and nothing was sampled yet.
        """
        return self._recovering(lambda: self._run_model(batch, return_hidden))

    def _run_model(self, batch, return_hidden: bool = False):
        """One forward of the target; trunk replicas (`moe/replica.py`) run it beside this one."""
        dispatch = self.shard_group.dispatch if self.shard_group is not None else None
        replica_step = getattr(dispatch, "replica_step", None)
        with replica_step(batch) if replica_step is not None else contextlib.nullcontext():
            return self.model(batch, self.cache, return_hidden=return_hidden)

    def _recovering(self, forward):
        """forward(), re-forming the expert shard group and replaying it if the group fails."""
        for attempt in range(self.max_recoveries + 1):
            try:
                return forward()
            except Exception as e:
                if self.shard_group is None:
                    raise
                self._recover(e, attempt)
        raise AssertionError("unreachable")

    def _recover(self, e: Exception, attempt: int) -> None:
        """Re-form the expert shard group that failed with e (its step is then replayed), or
        raise ShardGroupError when it failed max_recoveries + 1 times in a row."""
        if attempt == self.max_recoveries:
            raise ShardGroupError(f"expert shard group failed {attempt + 1} times: {e}") from e
        log.warning(
            "expert shard group failed (%s: %s); re-forming it and replaying the step",
            type(e).__name__,
            e,
        )
        t0 = time.perf_counter()
        # A shard that stopped (the group's watcher saw its task end: a dead actor; or saw it not
        # answer during a long step) says nothing against the graphs: the re-formed group
        # captures anew. Any other failure (a collective
        # that timed out, a failed capture) may come from replayed collectives, the least proven
        # part of a step with shards: the re-formed group serves static steps eagerly, on both
        # sides.
        if self.shard_group.options.cuda_graphs and self.shard_group.failure is None:
            log.warning("CUDA graphs for steps with expert shards are off from now on")
            if self.graphs is not None:
                self.graphs.capture = False
            self.shard_group.options.cuda_graphs = False
        self.shard_group.end_step()  # (the re-form is no step: the new watcher asks no shard)
        try:
            self._reform(self.shard_group.plan, failed=True)
        except Exception as reform_error:
            raise ShardGroupError(
                f"expert shard group failed ({e}) and could not re-form: {reform_error}"
            ) from reform_error
        self.shard_group.begin_step()  # the replay
        self.metrics.num_recoveries += 1
        self.metrics.recovery_time_s += time.perf_counter() - t0
        log.warning("expert shard group re-formed in %.1fs", time.perf_counter() - t0)

    def _propose(self, samplers: list[ScheduledSeq], k: int):
        """Up to k draft tokens per sampling sequence -> ({id(s): drafts}, proposal, seconds,
        whether the drafts stay on the device: then the lists hold placeholders, `DEFER_DRAFT_READ`)."""
        if not k:
            if len(samplers) not in self._empty_proposals:  # read-only: one per batch size
                self._empty_proposals[len(samplers)] = empty_proposal(len(samplers), self.device)
            return {}, self._empty_proposals[len(samplers)], 0.0, False
        requests = []
        for s in samplers:
            seq = s.seq
            # Emit at most what is left: the drafts plus one recovered or bonus token.
            room = seq.max_len - len(seq.tokens) - 1
            p = seq.params
            requests.append(
                DraftRequest(
                    seq.request_id,
                    seq.tokens,
                    max(0, min(k, room)),
                    0.0 if p.greedy else p.temperature,
                    p.top_k,
                    p.top_p,
                    p.seed,
                )
            )
        t0 = time.perf_counter()
        if self._defers_draft_read():
            events = self._draft_events if self.device.type == "cuda" else None
            if events is not None:
                events[0].record()
            proposal = self.proposer.propose(requests, read=False)
            if events is not None:
                events[1].record()
            if proposal.host_tokens is not None:  # made on the host after all (no row drafts)
                return self._read_drafts(samplers, proposal), proposal, time.perf_counter() - t0, False
            proposal.tokens = proposal.tokens.to(self.device)
            # Placeholders: the static step reads the drafts on the device (`_compute`).
            drafts = {id(s): [0] * n for s, n in zip(samplers, proposal.host_num_draft)}
            return drafts, proposal, time.perf_counter() - t0, True
        proposal = self.proposer.propose(requests)
        draft_s = time.perf_counter() - t0
        return self._read_drafts(samplers, proposal), proposal, draft_s, False

    def _defers_draft_read(self) -> bool:
        """`DEFER_DRAFT_READ` serves this engine: an in-process draft model (which can leave its
        drafts unread) with step graphs (on CPUs too: the same path, checked by the CPU tests)
        and no expert shards."""
        if not (
            DEFER_DRAFT_READ
            and self.graphs is not None
            and self.shard_group is None
            and getattr(self.proposer, "reads_later", False)
        ):
            return False
        if self._draft_events is None and self.device.type == "cuda":
            self._draft_events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2))
        return True

    def _read_drafts(self, samplers: list[ScheduledSeq], proposal) -> dict[int, list[int]]:
        """{id(sampler): its drafts} from the host lists where the proposer made them there,
        else from one read of the device's; the proposal's tokens moved to this engine's device."""
        tokens = proposal.host_tokens if proposal.host_tokens is not None else proposal.tokens.tolist()
        proposal.tokens = proposal.tokens.to(self.device)
        return {id(s): [t for t in toks if t >= 0] for s, toks in zip(samplers, tokens)}

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.retire(seq)
        if self.proposer is not None:
            self.proposer.release(seq.request_id)

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        seq.metrics.num_generated_tokens = seq.num_generated
        finish = seq.finish_reason.value if seq.finish_reason is not None else None
        if finish is not None and seq.metrics.finish_time is None:
            seq.metrics.finish_time = time.monotonic()
        text = None
        if finish is not None and self.tokenizer is not None:
            text = (
                seq.stop_text
                if seq.stop_text is not None
                else self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            )
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
            **self.metrics.summary(),
            "num_running": self.num_running,
            "num_waiting": len(self.scheduler.waiting),
            "speculation_length": getattr(self.policy, "last_k", getattr(self.policy, "k", 0)),
        }
        if hasattr(self.proposer, "num_failed_calls"):
            out["draft_failed_calls"] = self.proposer.num_failed_calls
        if self.shard_group is not None:
            out["shards"] = self.shard_group.stats()
            out["expert_tokens_per_shard"] = out["shards"]["tokens_per_shard"]
        elif self.local_experts is not None:
            out["expert_tokens_per_shard"] = [self.local_experts.num_pairs]
        return out

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, {moe layer: [per expert]} (since the group formed)."""
        if self.shard_group is not None:
            return self.shard_group.dispatch.load.snapshot()
        if self.local_experts is not None:
            return self.local_experts.load.snapshot()
        return {}

    def reshard(self, num_shards: int | None = None, plan: PlacementPlan | None = None) -> None:
        """Re-form the expert shard group with `num_shards` shards (or a given plan), between steps.

        Running requests continue: their KV caches live here, and experts hold no per-request
        state, so the next step runs on the new group with the same results (trunk replicas
        get the running sequences' caches refilled first).
        """
        if self.shard_group is None:
            raise ValueError("this engine keeps its experts in-process (num_shards=0): nothing to reshard")
        if plan is None:
            plan = PlacementPlan.contiguous(self.args.moe_layers, self.args.num_experts, num_shards)
        self._reform(plan)
        self._window = None  # the new group's counters start at zero

    def _maybe_autoscale(self) -> None:
        """At a step boundary: measure the last window's expert load and re-form if the policy says."""
        scaler = self.autoscaler
        if scaler is None or self.shard_group is None:
            return
        now = time.monotonic()
        if self._window is not None and now - self._window[0] < scaler.config.interval_s:
            return  # (before reading the device's counters: no host sync on most steps)
        dispatch = self.shard_group.dispatch
        pairs, steps, busy = (
            sum(dispatch.tokens_per_shard),
            self.metrics.num_steps,
            self.metrics.verify_time_s,
        )
        if self._window is None:
            self._window = (now, pairs, steps, busy)
            return
        t0, pairs0, steps0, busy0 = self._window
        self._window = (now, pairs, steps, busy)
        step_s = (busy - busy0) / (steps - steps0) if steps > steps0 else 0.0
        decision = scaler.decide(now, (pairs - pairs0) / (now - t0), step_s, self.shard_group.plan.num_shards)
        if decision is None:
            return
        load = dispatch.load.snapshot()
        if set(load) == set(self.args.moe_layers):
            plan = PlacementPlan.balanced(load, decision.num_shards, scaler.config.replicate_hot_experts)
        else:
            plan = PlacementPlan.contiguous(self.args.moe_layers, self.args.num_experts, decision.num_shards)
        t = time.perf_counter()
        self.reshard(plan=plan)
        self.metrics.num_rescales += 1
        log.info("%s; re-formed in %.1fs", decision.reason, time.perf_counter() - t)

    def _reform(self, plan: PlacementPlan, failed: bool = False) -> None:
        if self.graphs is not None:
            self.graphs.drop()  # graphs captured with the old group's collectives
        self.model.set_expert_backend(self.shard_group.reform(plan, failed=failed))
        if self.shard_group.options.replicate_trunk:
            self._refill_replicas()

    def _refill_replicas(self) -> None:
        """New trunk replicas start with empty KV caches: run every running sequence's cached
        tokens through the group again (prompt-sized chunks), so all ranks hold them. This
        process rewrites its own entries with what it computes again (the same values, up to
        the kernels' rounding of a prompt chunk against a decode step)."""
        budget = self.config.max_num_batched_tokens
        t0, tokens, running = time.perf_counter(), 0, list(self.scheduler.running)
        for seq in running:
            length = self.cache.lengths[seq.slot]
            for start in range(0, length, budget):
                chunk = seq.tokens[start : min(start + budget, length)]
                batch = build_forward_batch([chunk], [start], [seq.slot], [len(chunk) - 1], self.device)
                self._run_model(batch)
            tokens += length
        if running:
            log.info(
                "refilled the trunk replicas' KV caches: %d sequences, %d tokens in %.1fs",
                len(running),
                tokens,
                time.perf_counter() - t0,
            )
        dispatch = self.shard_group.dispatch
        dispatch.load.reset()  # the refill routed no request's tokens: the load starts at zero
        dispatch.num_pairs = 0

    def shutdown(self) -> None:
        """Stop the expert shards (if any). Safe to call twice."""
        if self.shard_group is not None:
            if self.graphs is not None:
                self.graphs.drop()
            self.shard_group.shutdown()
            self.shard_group = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["Engine", "EngineConfig", "FinishReason"]
