"""`draft="mtp"`: DeepSeek-V3's multi-token-prediction module drafts for its own model.

Self-speculation with no separate draft model (DeepSeek-V3 technical report, arXiv:2412.19437,
§2.2 and §5.4.3). The MTP module (`models/deepseek.py: MTPHead`) turns the trunk's final hidden
state h_i of position i and the embedding of token t_{i+1} into a prediction of t_{i+2}.

Positions: MTP cache position i holds the pair (h_i, t_{i+1}). After a target step the engine
hands over (`observe`) the hidden states of the positions each sequence keeps. A sequence of n
tokens t_0 .. t_{n-1} has h_0 .. h_{n-2} (t_{n-1} was just sampled, its h is not computed yet),
so the MTP runs positions up to n - 2, and its output there is draft 1 (a guess at t_n). Drafts
2 .. k chain the one MTP depth, as transformers' `MtpModel` does: position n - 2 + j takes the
previous position's normed output g as its hidden state and draft j as its token. Those chained
positions stand on a substitute hidden state, so the cache rolls back to n - 1 after proposing:
only positions with the trunk's real hidden state stay cached.

The engine observes on every step, also on prefill-only steps and steps with k = 0; hidden
states wait per sequence until the next `propose`, which feeds all of them in one forward.
Where they do not reach position n - 2 (a sequence's first step: its prompt is prefilled in the
same forward that samples t_n), the sequence gets no drafts that step.

Experts: the MTP layer's routed experts live in this process, on the verifier's device
(`LoopbackDispatch`), whether the target's experts are in-process or on expert shards. One MoE
layer's experts (1/61 of DeepSeek-V3's) is a small price for drafting with no collective and no
change to the shard protocol.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from specmoe_ray.engine.sampling import to_device
from specmoe_ray.models.deepseek import MTPHead
from specmoe_ray.models.loader import load_experts, load_mtp
from specmoe_ray.models.transformer import MoEBlock, Transformer, build_forward_batch
from specmoe_ray.moe.dispatch import LoopbackDispatch
from specmoe_ray.spec.proposer import (
    DraftBuffers,
    DraftRequest,
    chain_indices,
    empty_proposal,
    rows_of,
    sample_drafts,
)
from specmoe_ray.spec.rejection import DraftProposal

# B = sequences, k = most drafts of any sequence, S = sparse support size, D = hidden


@dataclasses.dataclass(slots=True)
class _SeqState:
    """One sequence's MTP state: cached positions < `next_position`, then pending hidden rows."""

    slot: int | None = None  # MTP cache slot, taken at the first feed
    next_position: int = 0  # first position not in the cache = position of pending row 0
    pending: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [n_i, D] chunks
    num_pending: int = 0
    broken: bool = False  # hidden states of some position were never observed: no more drafts


class MTPProposer:
    """Drafts from the target's own MTP module; needs the target's hidden states (`observe`)."""

    wants_hidden = True

    def __init__(self, head: MTPHead, max_num_seqs: int, max_model_len: int, top_n: int = 32):
        self.head = head
        self.device = head.eh_proj.weight.device
        self.top_n = top_n
        self.cache = head.make_cache(max_num_seqs, max_model_len)
        self.states: OrderedDict[str, _SeqState] = OrderedDict()  # least recently fed first
        self.generators: dict[str, torch.Generator] = {}
        self.num_proposed = 0
        self.num_fed_tokens = 0  # positions run through the MTP layer (real + chained)

    @classmethod
    def from_pretrained(
        cls, path: str, trunk: Transformer, max_num_seqs: int, max_model_len: int, top_n: int = 32
    ) -> MTPProposer:
        """The MTP module of checkpoint `path` (whose trunk is `trunk`), experts in-process."""
        p = trunk.lm_head.weight
        head = load_mtp(path, dtype=p.dtype, device=str(p.device), trunk=trunk)
        if isinstance(head.mlp, MoEBlock):
            args = head.args
            experts = {head.layer: list(range(args.num_experts))}
            store = load_experts(path, experts, dtype=p.dtype, device=str(p.device), args=args)
            head.set_expert_backend(LoopbackDispatch(store))
        return cls(head, max_num_seqs, max_model_len, top_n)

    @property
    def vocab_size(self) -> int:
        return self.head.args.vocab_size

    @torch.inference_mode()
    def observe(self, seq_id: str, start: int, hidden: torch.Tensor) -> None:
        """The trunk's final-normed hidden states `[n, D]` of positions start .. start + n - 1
        of a sequence, positions it keeps (accepted), in order of the sequence."""
        state = self.states.get(seq_id)
        if state is None:
            state = self.states[seq_id] = _SeqState()
        if state.broken:
            return
        end = state.next_position + state.num_pending  # first position not observed yet
        if start > end:  # a gap: those positions can never be fed
            state.broken, state.pending, state.num_pending = True, [], 0
            return
        rows = hidden[end - start :]  # positions already observed (a replayed step) are skipped
        if rows.shape[0]:
            # A copy: the caller's buffer may be reused by the next step (CUDA-graph outputs).
            state.pending.append(rows.clone())
            state.num_pending += rows.shape[0]

    def release(self, seq_id: str) -> None:
        state = self.states.pop(seq_id, None)
        if state is not None and state.slot is not None:
            self.cache.free(state.slot)
        self.generators.pop(seq_id, None)

    def _slot_for(self, seq_id: str, state: _SeqState, busy: set[str]) -> int:
        self.states.move_to_end(seq_id)
        if state.slot is not None:
            return state.slot
        if not self.cache.num_free_slots:
            victim = next((s for s, st in self.states.items() if st.slot is not None and s not in busy), None)
            if victim is None:
                raise RuntimeError(f"MTP cache holds {self.cache.num_slots} sequences, all in this batch")
            self.release(victim)  # it lost its cached positions: it drafts nothing from now on
            self.states[victim] = _SeqState(broken=True)
        state.slot = self.cache.allocate()
        return state.slot

    def _feed(
        self, feeds, starts, slots, hidden: torch.Tensor, fed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run positions through the MTP layer -> logits [B, V], g [B, D] of each feed's last one.
        fed: one token per feed, on the device, in place of the feeds' (placeholder) tokens."""
        batch = build_forward_batch(feeds, starts, slots, [len(f) - 1 for f in feeds], self.device)
        if fed is not None:
            batch.tokens = fed
        logits, g = self.head(batch, hidden, self.cache)
        for f, s in zip(feeds, slots):
            self.cache.advance(s, len(f))
            self.num_fed_tokens += len(f)
        return logits, g

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> DraftProposal:
        B = len(requests)
        k = max((r.num_draft for r in requests), default=0)
        if k == 0:
            return empty_proposal(B, self.device)
        # Catch up: feed each sequence's pending positions, up to n - 2 (the last with a real h).
        rows, feeds, starts, slots, hidden = [], [], [], [], []
        busy = {r.seq_id for r in requests if r.num_draft > 0}
        for b, r in enumerate(requests):
            state = self.states.get(r.seq_id)
            if r.num_draft == 0 or state is None or state.broken:
                continue
            c, n = state.next_position, len(r.tokens)
            need = n - 1 - c  # positions c .. n - 2
            if need < 1 or state.num_pending < need:
                continue  # h_{n-2} not observed yet (or nothing new): no drafts this step
            if any(t >= self.vocab_size for t in r.tokens[c + 1 :]):
                raise ValueError(f"sequence {r.seq_id} has token ids outside the MTP's vocabulary")
            slot = self._slot_for(r.seq_id, state, busy)
            if self.cache.lengths[slot] != c:
                raise RuntimeError(
                    f"MTP cache of {r.seq_id} holds {self.cache.lengths[slot]} positions, not {c}"
                )
            pending = torch.cat(state.pending) if len(state.pending) > 1 else state.pending[0]
            rest = pending[need:]
            state.pending, state.num_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
            state.next_position = n - 1
            rows.append(b)
            feeds.append(r.tokens[c + 1 : n])  # position i carries t_{i+1}
            starts.append(c)
            slots.append(slot)
            hidden.append(pending[:need])

        out = DraftBuffers(requests, k, self.top_n, self.vocab_size, self.device)
        num_draft = [0] * B
        if rows:
            # Rows drafting at each position, and where they sit among the previous position's
            # rows: indices made before the first feed, so the chain never waits for the GPU (each
            # draft and its g feed the next position on the device; the engine reads them once).
            row_sets = [[b for b in rows if requests[b].num_draft > i] for i in range(k)]
            index, live = chain_indices(row_sets, B, self.device)
            logits, g = self._feed(feeds, starts, slots, torch.cat(hidden))  # [R, V], [R, D]
            slot_of = dict(zip(rows, slots))
            picked = None
            for i, rs in enumerate(row_sets):
                if i > 0:  # chain: the previous output's g and draft at the next position
                    feeds = [[0] for _ in rs]  # placeholders: the tokens are `picked`, on the device
                    starts = [len(requests[b].tokens) - 2 + i for b in rs]
                    slots = [slot_of[b] for b in rs]
                    fed = rows_of(picked, live[i])
                    logits, g = self._feed(feeds, starts, slots, rows_of(g, live[i]), fed)
                picked, ids, probs = sample_drafts(
                    logits, [requests[b] for b in rs], self.top_n, self.generators
                )
                out.put(index[i], i, picked, ids, probs)
            for b in rows:
                num_draft[b] = requests[b].num_draft
            # Keep only positions with the trunk's real hidden state.
            for b, slot in slot_of.items():
                self.cache.rollback(slot, len(requests[b].tokens) - 1)
            self.num_proposed += sum(num_draft)
        sparse_ids, sparse_probs = out.sparse()
        return DraftProposal(
            tokens=out.tokens,
            num_draft=to_device(num_draft, self.device),
            sparse_ids=sparse_ids,
            sparse_probs=sparse_probs,
        )
