"""Proposers: where draft tokens come from.

- `DraftModelProposer`: a small model (dense or MoE, any supported architecture) with its
  own per-sequence KV cache. Each call sends the sequence's whole token list; the proposer
  keeps the longest common prefix of what it has cached, rolls back the rest and feeds only
  the difference. So it needs no notice of accepted or rejected drafts, and it stays correct
  when a sequence moves to another replica (a cold replica just prefills).
- `NgramProposer`: prompt lookup (Saxena 2023): find the latest earlier occurrence of the
  sequence's last n tokens and propose what followed it. No model.

Both return a `DraftProposal` whose draft tokens were sampled from exactly the sparse
distribution they report (one-hot for greedy and n-gram drafts), as verification requires.
"""

from __future__ import annotations

import array
import dataclasses
from collections import OrderedDict

import torch

from specmoe_ray.engine import triton_sampling
from specmoe_ray.engine.graph import make_step_graphs
from specmoe_ray.engine.sampling import filtering, host_to_device, make_generator, target_probs, to_device
from specmoe_ray.models import fused
from specmoe_ray.models.transformer import Transformer, build_forward_batch
from specmoe_ray.moe import triton_experts
from specmoe_ray.spec.rejection import DraftProposal, sample_sparse, sparse_from_probs


@dataclasses.dataclass(slots=True)
class DraftRequest:
    """What a proposer needs of one sequence (plain data: it crosses process boundaries)."""

    seq_id: str
    # The whole sequence so far (prompt + generated). A draft model keeps a reference: pass a list
    # that afterwards only grows (the engine's and the draft pool's do) or a new one each call.
    tokens: list[int]
    num_draft: int  # k for this sequence (0 = none)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def sample_drafts(
    logits: torch.Tensor, reqs: list[DraftRequest], top_n: int, generators: dict[str, torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draft token per row: logits [B, V] -> tokens [B], sparse ids [B, S], sparse probs [B, S].

    Greedy rows take the argmax (one-hot). Sampling rows sample from the top `top_n` of their
    request's distribution (temperature, top-k, top-p), renormalised: exactly the sparse
    distribution returned, by inverse CDF with one uniform from the sequence's own generator in
    `generators` (made on first use from the request's seed, offset so it never replays the
    target's draws; on the host, so the step's uniforms reach the device in one copy).
    Where no row samples, only the argmax: ids and probs are None (`DraftBuffers` makes the
    one-hot distributions from the drafts once, after the last position).
    """
    B, V = logits.shape
    S = min(top_n, V)
    dev = logits.device
    rows = [i for i, r in enumerate(reqs) if r.temperature > 0]
    if not rows:
        return logits.argmax(-1), None, None
    # Rows of temperature only, then rows with top-k / top-p: each row's path follows its own
    # parameters (a seeded request drafts the same tokens whatever shares its batch).
    plain = [i for i in rows if not filtering([reqs[i]], V)]
    groups = [g for g in (plain, [i for i in rows if i not in plain]) if g]
    if len(rows) < B or len(groups) != 1:  # greedy rows' one-hot drafts (sampled rows overwrite theirs)
        greedy = logits.argmax(-1)
        ids = torch.full((B, S), -1, dtype=torch.long, device=dev)
        probs = torch.zeros(B, S, device=dev)
        ids[:, 0], probs[:, 0] = greedy, 1.0
    for group in groups:
        sampled = [reqs[i] for i in group]
        whole = len(group) == B  # (no gathers and scatters of rows: a sampled batch's common case)
        # (host lists sent without waiting: the draft's forward is still running on a GPU)
        r = None if whole else to_device(group, dev)
        x = logits if whole else logits[r]
        temperature = to_device([q.temperature for q in sampled], dev, torch.float32)
        u = host_to_device(_draft_uniforms(sampled, generators), dev)
        if group is plain and triton_sampling.supported(logits) and S <= triton_sampling.TOP_MAX:  # 2 kernels
            sp_ids, sp_probs, picked = triton_sampling.top_n(x, temperature, S, u)
        else:
            p = target_probs(
                x,
                temperature,
                to_device([q.top_k for q in sampled], dev),
                to_device([q.top_p for q in sampled], dev, torch.float32),
                filtered=group is not plain,
                plain=group is plain,
            )
            sp_ids, sp_probs = sparse_from_probs(p, S)  # [R, S]: the draft samples from exactly this
            picked = sample_sparse(sp_ids, sp_probs, u)
        if whole:
            greedy, ids, probs = picked, sp_ids, sp_probs
        else:
            ids, probs = ids.index_copy(0, r, sp_ids), probs.index_copy(0, r, sp_probs)
            greedy = greedy.index_copy(0, r, picked)
    return greedy, ids, probs


def chain_indices(row_sets: list[list[int]], batch: int, device) -> tuple[list, list]:
    """For drafting position by position: the rows drafting at each position as a device index
    into the batch, and as one into the previous position's rows; None where that is every row
    (a slice then: no gather or scatter launches, the common case of a batch drafting k each)."""
    index = [None if len(rows) == batch else to_device(rows, device) for rows in row_sets]
    keep: list = [None]
    for prev, rows in zip(row_sets, row_sets[1:]):
        keep.append(None if rows == prev else to_device([prev.index(b) for b in rows], device))
    return index, keep


def rows_of(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """t's rows at index (`chain_indices`; None: all of them)."""
    return t if index is None else t[index]


class DraftBuffers:
    """A proposal's drafts `tokens` [B, k] (-1 where a row drafts fewer) and their sparse
    distributions [B, k, S], filled position by position (`put`). Where no row samples, only the
    drafts are written and the one-hot ids and probabilities ([B, k, 1]) are made from them at the
    end (`sparse`): two launches per proposal instead of six per position (a greedy draft's host
    time is mostly launches)."""

    def __init__(self, requests: list[DraftRequest], k: int, top_n: int, vocab_size: int, device):
        B = len(requests)
        self.tokens = torch.full((B, k), -1, dtype=torch.long, device=device)
        self.greedy = all(r.temperature <= 0 for r in requests)
        if not self.greedy:
            S = min(top_n, vocab_size)
            self.ids = torch.full((B, k, S), -1, dtype=torch.long, device=device)
            self.probs = torch.zeros(B, k, S, device=device)

    def put(self, index: torch.Tensor | None, i: int, picked, ids, probs) -> None:
        """Position i's drafts (and distributions) of the rows at index (None: every row)."""
        at = slice(None) if index is None else index
        self.tokens[at, i] = picked
        if self.greedy:
            return
        if ids is None:  # this position's rows are greedy ones: point masses
            self.ids[at, i, 0], self.probs[at, i, 0] = picked, 1.0
        else:
            self.ids[at, i], self.probs[at, i] = ids, probs

    def sparse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse ids, sparse probs): greedy drafts' point masses, or the sampled distributions."""
        if self.greedy:
            return self.tokens[..., None], (self.tokens >= 0).float()[..., None]
        return self.ids, self.probs


def _draft_uniforms(sampled: list[DraftRequest], generators: dict[str, torch.Generator]) -> torch.Tensor:
    """One uniform per sampling row from its sequence's own generator (on the host), made on
    first use from the request's seed, offset so it never replays the target's draws -> [R]."""
    u = []
    for q in sampled:
        gen = generators.get(q.seq_id)
        if gen is None:
            gen = generators[q.seq_id] = make_generator(None if q.seed is None else q.seed + 0x5EED)
        u.append(torch.rand((), generator=gen, device=gen.device, dtype=torch.float64))
    return torch.stack(u)


def empty_proposal(batch: int, device: torch.device | str) -> DraftProposal:
    return DraftProposal(
        tokens=torch.full((batch, 0), -1, dtype=torch.long, device=device),
        num_draft=torch.zeros(batch, dtype=torch.long, device=device),
        sparse_ids=torch.full((batch, 0, 1), -1, dtype=torch.long, device=device),
        sparse_probs=torch.zeros(batch, 0, 1, device=device),
        host_tokens=[[] for _ in range(batch)],
        host_num_draft=[0] * batch,
    )


def one_hot_proposal(drafts: list[list[int]], device: torch.device | str) -> DraftProposal:
    """Deterministic drafts: each token's draft distribution is a point mass on it. The drafts
    and their counts reach the device in one copy (from pinned memory to a GPU, not waited for);
    the proposal keeps them as host lists too (`host_tokens`)."""
    B, k = len(drafts), max((len(d) for d in drafts), default=0)
    packed = torch.tensor(
        [t for d in drafts for t in (*d, *(-1,) * (k - len(d)))] + [len(d) for d in drafts],
        dtype=torch.long,
    )
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    tokens = packed[: B * k].view(B, k)
    return DraftProposal(
        tokens=tokens,
        num_draft=packed[B * k :],
        sparse_ids=tokens[..., None],
        sparse_probs=(tokens >= 0).float()[..., None],
        host_tokens=[list(d) for d in drafts],
    )


NGRAM_WINDOW = 512  # prompt lookup searches the last this many tokens first
_WIDTH = array.array("q").itemsize


def _token_bytes(tokens: list[int]) -> bytes:
    return array.array("q", tokens).tobytes()


def _latest_occurrence(buf: bytes, length: int, n: int) -> int:
    """The latest start s < length - n at which the last n tokens of buf (length tokens) occur
    as well, or -1: a token-aligned `rfind` of their bytes, ending before the last token."""
    pattern, end = buf[(length - n) * _WIDTH :], (length - 1) * _WIDTH
    while (pos := buf.rfind(pattern, 0, end)) >= 0:
        if pos % _WIDTH == 0:
            return pos // _WIDTH
        end = pos + len(pattern) - 1  # (a match straddling tokens' bytes: look before it)
    return -1


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """The length of a and b's longest common prefix, at most limit, by slice compares (C speed):
    one compare of the whole where all but the last few tokens agree (the common case: rejected
    drafts), then a bisection of the rest. A loop in Python took ~1 ms per 8k tokens."""
    lo, hi = 0, max(limit, 0)
    if hi > 64:  # the tokens before the last 64 first
        if a[: hi - 64] == b[: hi - 64]:
            lo = hi - 64
        else:
            hi -= 64
    if hi == limit and a[lo:hi] == b[lo:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class NgramProposer:
    """Prompt lookup: continue the latest earlier match of the last n tokens (n = max_n .. min_n)."""

    def __init__(self, min_n: int = 1, max_n: int = 4, device: torch.device | str = "cpu"):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n, self.device = min_n, max_n, device

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The k tokens after the latest earlier occurrence of the longest suffix (max_n .. min_n
        tokens) that occurred before: the suffix itself excluded, something must follow it.

        By substring search over the tokens' bytes (C speed): a scan in Python of every start
        took ~3.5 ms for 8k tokens, per sequence and step. The last `NGRAM_WINDOW` tokens are
        searched first (repeats are mostly recent), the whole sequence only where they miss."""
        L = len(tokens)
        sizes = range(min(self.max_n, L - 1), self.min_n - 1, -1)
        if not sizes:
            return []
        tail = max(0, L - NGRAM_WINDOW)
        buffers = [(tail, _token_bytes(tokens[tail:]))]
        for n in sizes:
            for i in range(2):
                if i == len(buffers):  # the tail missed: the whole sequence, converted once
                    if tail == 0:
                        break
                    buffers.append((0, _token_bytes(tokens)))
                start = _latest_occurrence(buffers[i][1], L - buffers[i][0], n)
                if start >= 0:
                    start += buffers[i][0]
                    return tokens[start + n : start + n + k]
        return []

    def propose(self, requests: list[DraftRequest]) -> DraftProposal:
        return one_hot_proposal(
            [self.lookup(r.tokens, r.num_draft) if r.num_draft else [] for r in requests], self.device
        )

    def release(self, seq_id: str) -> None:
        pass


@dataclasses.dataclass(slots=True)
class _Cached:
    """What a draft cache slot holds: the first n tokens of a caller's list, kept by reference
    (sequences only grow: copying them cost O(context) per step), then the drafts fed after them."""

    tokens: list[int]
    n: int
    drafts: list[int]
    last: int | None = None  # tokens[n - 1] when stored: a list changed under us is caught

    def __len__(self) -> int:
        return self.n + len(self.drafts)

    def common_prefix(self, new: list[int], limit: int) -> int:
        """The longest common prefix with new, at most limit: O(drafts) for the same list grown;
        0 for the same list changed otherwise (what it held is gone: everything is fed again)."""
        if new is not self.tokens:
            return common_prefix(self.tokens[: self.n] + self.drafts, new, limit)
        if len(new) < self.n or (self.n and new[self.n - 1] != self.last):
            return 0
        if limit <= self.n:
            return max(limit, 0)
        return self.n + common_prefix(self.drafts, new[self.n : limit], limit - self.n)


class DraftModelProposer:
    """A draft model with per-sequence KV caches that reuse the longest common prefix."""

    reads_later = True  # `propose(read=False)` leaves the drafts on the device (engine.DEFER_DRAFT_READ)

    def __init__(
        self,
        model: Transformer,
        max_num_seqs: int,
        max_model_len: int,
        top_n: int = 32,
        step_graphs: str = "auto",
        max_tokens_per_seq: int = 8,
        max_prompt_tokens: int = 0,
    ):
        self.model = model
        model.fuse_projections()
        self.device = model.lm_head.weight.device
        self.max_model_len = max_model_len
        self.top_n = top_n
        self.cache = model.make_cache(max_num_seqs, max_model_len)
        # Drafting steps feed 1 token per sequence (after a catch-up of at most k + 1): on GPUs
        # they replay CUDA graphs like the target's decode steps (engine/graph.py).
        self.graphs = make_step_graphs(
            model, self.cache, step_graphs, max_num_seqs, max_tokens_per_seq, False, max_prompt_tokens
        )
        # seq_id -> (slot, tokens whose KV the slot holds), least recently used first
        self.entries: OrderedDict[str, tuple[int, _Cached]] = OrderedDict()
        self.generators: dict[str, torch.Generator] = {}
        # The last proposal's drafts (device) and its sequences, until read (`propose(read=False)`)
        self._unread: tuple[torch.Tensor, list[tuple]] | None = None
        self.num_proposed = 0
        self.num_fed_tokens = 0  # tokens run through the draft (prefill + drafting)

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def _slot_for(self, seq_id: str, busy: set[str]) -> tuple[int, _Cached]:
        if seq_id in self.entries:
            self.entries.move_to_end(seq_id)
            return self.entries[seq_id]
        if not self.cache.num_free_slots:
            victim = next((s for s in self.entries if s not in busy), None)
            if victim is None:
                raise RuntimeError(f"draft cache holds {self.cache.num_slots} sequences, all in this batch")
            self.release(victim)
        entry = (self.cache.allocate(), _Cached([], 0, []))
        self.entries[seq_id] = entry
        return entry

    def release(self, seq_id: str) -> None:
        entry = self.entries.pop(seq_id, None)
        if entry is not None:
            self.cache.free(entry[0])
        self.generators.pop(seq_id, None)

    def _sample(self, logits: torch.Tensor, reqs: list[DraftRequest]):
        return sample_drafts(logits, reqs, self.top_n, self.generators)

    def _forward(
        self, feeds: list[list[int]], starts: list[int], slots: list[int], fed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of each feed's last token: a replayed graph when the step fits one.
        fed: one token per feed, on the device, in place of the feeds' (placeholder) tokens."""
        logits_from = [len(f) - 1 for f in feeds]
        if self.graphs is not None:
            # (a small model's few-row projections preload their weights: `DRAFT_PRELOAD_ROWS`)
            with fused.preload_rows(max(fused.DRAFT_PRELOAD_ROWS, triton_experts.PRELOAD_ROWS)):
                logits = self.graphs.forward(feeds, starts, slots, logits_from, fed)
            if logits is not None:
                return logits
        batch = build_forward_batch(feeds, starts, slots, logits_from, self.device)
        if fed is not None:
            batch.tokens = fed
        return self.model(batch, self.cache)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest], read: bool = True) -> DraftProposal:
        """k drafts per request's sequence, chained on the device, read to the host once at the
        end (`host_tokens`). read=False: not read at all (`host_tokens` None, `host_num_draft`
        given; no wait for the draft's GPU work): the caller feeds `tokens` on the device, and
        this proposer reads them at its next call, by when the step that verified them has
        waited for the GPU anyway (the engine's static steps: `engine.DEFER_DRAFT_READ`)."""
        self._settle()
        B = len(requests)
        k = max((r.num_draft for r in requests), default=0)
        if k == 0:
            return empty_proposal(B, self.device)
        active = [b for b, r in enumerate(requests) if r.num_draft > 0]
        busy = {requests[b].seq_id for b in active}
        out = DraftBuffers(requests, k, self.top_n, self.vocab_size, self.device)
        # First pass: roll each cache back to the common prefix and feed the difference.
        feeds, starts, slots = [], [], []
        for b in active:
            r = requests[b]
            slot, cached = self._slot_for(r.seq_id, busy)
            limit = min(len(cached), len(r.tokens) - 1, self.cache.lengths[slot])
            lcp = cached.common_prefix(r.tokens, limit)
            if max(r.tokens[lcp:], default=0) >= self.vocab_size:  # (the cached prefix was checked)
                raise ValueError(f"sequence {r.seq_id} has token ids outside the draft's vocabulary")
            self.cache.rollback(slot, lcp)
            feeds.append(r.tokens[lcp:])
            starts.append(lcp)
            slots.append(slot)
        slot_of = dict(zip(active, slots))
        # Rows drafting at each position, and where they sit among the previous position's rows:
        # indices made before the first forward, so the loop never waits for the GPU. Each draft
        # feeds the next on the device; the host reads them all once, at the end.
        row_sets = [[b for b in active if requests[b].num_draft > i] for i in range(k)]
        index, keep = chain_indices(row_sets, B, self.device)
        picked = None
        for i, rows in enumerate(row_sets):
            fed = None
            if i > 0:  # each row feeds its previous draft (a placeholder on the host)
                feeds = [[0] for _ in rows]
                starts = [len(requests[b].tokens) + i - 1 for b in rows]
                slots = [slot_of[b] for b in rows]
                fed = rows_of(picked, keep[i])
            logits = self._forward(feeds, starts, slots, fed)  # [len(rows), V]
            for f, s in zip(feeds, slots):
                self.cache.advance(s, len(f))
                self.num_fed_tokens += len(f)
            picked, ids, probs = self._sample(logits, [requests[b] for b in rows])
            out.put(index[i], i, picked, ids, probs)
        # Each drafting sequence's cache entry is completed when the drafts are read (`_settle`):
        # the cache holds its tokens (the first n, as they are now) plus every draft but the last.
        pending = []
        for b in active:
            r = requests[b]
            pending.append((b, r.seq_id, slot_of[b], r.tokens, len(r.tokens), r.num_draft))
        self._unread = (out.tokens, pending)
        drafted = self._settle() if read else None  # the proposal's one host sync
        sparse_ids, sparse_probs = out.sparse()
        return DraftProposal(
            tokens=out.tokens,
            num_draft=to_device([r.num_draft for r in requests], self.device),
            sparse_ids=sparse_ids,
            sparse_probs=sparse_probs,
            host_tokens=None if drafted is None else [d[: r.num_draft] for d, r in zip(drafted, requests)],
            host_num_draft=[r.num_draft for r in requests],
        )

    def _settle(self) -> list[list[int]] | None:
        """The last proposal's drafts read to the host (with read=False: after the step that
        verified them waited for the GPU, so without waiting) and its sequences' cache entries
        completed, but for sequences released meanwhile -> the drafts [B, k], or None."""
        if self._unread is None:
            return None
        tokens, pending = self._unread
        self._unread = None
        drafted = tokens.tolist()
        for b, seq_id, slot, seq_tokens, n, num_draft in pending:
            entry = self.entries.get(seq_id)
            if entry is None or entry[0] != slot:  # released (a finished or aborted sequence)
                continue
            mine = drafted[b][:num_draft]
            last = seq_tokens[n - 1] if n else None
            self.entries[seq_id] = (slot, _Cached(seq_tokens, n, mine[:-1], last))
            self.num_proposed += len(mine)
        return drafted
