"""CUDA graphs of the target forward for decode and verify steps (the GPU fast path).

A step in which every scheduled sequence samples and feeds at most `Tq` tokens (plain
decoding: its last token, Tq = 1; verification: it and up to k drafts, Tq = k + 1) runs with
*static shapes*: the sequences are padded to a bucket of B (a power of two), each sequence to Tq
tokens, and attention reads keys up to L (a power of two at least as long as the longest
sequence). One CUDA graph is captured per bucket (B, Tq, L), lazily, the first time a step
needs it, and replayed after: one launch instead of thousands, and the Python of the forward
runs once per bucket instead of once per step (DESIGN.md section 6).

Padding is inert: padded tokens write their K/V into the cache's scratch slot, padded
sequences read it, and their logits are never read; the MoE load counters skip them (the
dispatch's `token_mask`). Padded tokens still go through their experts, so padding costs what
it computes, never what it returns.

All of a step's metadata (tokens, positions, slots, the rows whose logits are wanted) is written
into one pinned host buffer and reaches the GPU in one non-blocking copy; the captured
`ForwardBatch` is made of views of the device copy. Nothing in the step waits for the GPU until
the engine reads the verified tokens back (the step's one host sync).

The same padded static batches run eagerly where there is nothing to capture (`mode="padded"`,
and always on CPUs when asked): CPU tests check the bucketing and the padding against the plain
path, GPU tests check graph replay against both.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time

import numpy as np
import torch

from specmoe_ray.engine.sampling import to_device
from specmoe_ray.models import fused
from specmoe_ray.models.transformer import ForwardBatch, MoEBlock, Transformer

log = logging.getLogger(__name__)

MIN_KV_BUCKET = 64
PROMPT_FLOOR = 16  # smallest prompt bucket (tokens per sequence)
BLOCKS = 7  # per-token blocks of the metadata buffer (see StepGraphs.__init__)
# A step's metadata for more sequences than this is written block by block with numpy over all
# of them (`_fill_rows`: ~20 numpy calls whatever the batch), for fewer row by row (8 per row).
UPLOAD_LOOP_ROWS = 4


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), but never above cap."""
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


def make_step_graphs(
    model: Transformer,
    cache,
    mode: str,
    max_batch: int,
    max_tokens_per_seq: int,
    hidden: bool = False,
    max_prompt_tokens: int = 0,
) -> StepGraphs | None:
    """Static steps for this model as `mode` says ("auto": CUDA graphs on GPUs, nothing elsewhere;
    "padded": the same static batches, eagerly; "off": none); None where they do not apply."""
    device = model.lm_head.weight.device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        for layer in model.model.layers:
            store = getattr(getattr(layer.mlp, "backend", None), "store", None)
            if store is not None and not all(e.capturable for e in store.by_layer.values()):
                log.warning("experts on %s cannot be captured in CUDA graphs: running steps eagerly", device)
                return None
    return StepGraphs(
        model,
        cache,
        max_batch,
        max_tokens_per_seq,
        capture=mode == "auto",
        hidden=hidden,
        max_prompt_tokens=max_prompt_tokens,
    )


class StepGraphs:
    """Captures and replays the forward of uniform decode/verify steps, by bucket."""

    def __init__(
        self,
        model: Transformer,
        cache,
        max_batch: int,
        max_tokens_per_seq: int,
        capture: bool,
        hidden: bool = False,
        max_prompt_tokens: int = 0,
    ):
        self.model = model
        self.hidden = hidden  # also return final hidden states (for an MTP drafter)
        self.cache = cache
        self.device = model.lm_head.weight.device
        self.capture = capture and self.device.type == "cuda"
        self.max_batch = max_batch
        self.max_tq = max_tokens_per_seq
        # Prompt buckets: Tq a power of two from PROMPT_FLOOR up to this (0: none).
        cap = max_prompt_tokens
        self.max_prompt = bucket(cap, cap, PROMPT_FLOOR) if cap > self.max_tq else 0
        self.max_len = cache.max_len
        n_max = max_batch * max(self.max_tq, self.max_prompt)
        # Layout of a bucket (B, Tq), N = B * Tq: tokens, positions, write slots, query positions,
        # token mask, logits rows, packed rows (N each; see BLOCKS), then read slots (B).
        self._host = torch.zeros(
            BLOCKS * n_max + max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda"
        )
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None
        self._meta = torch.zeros(BLOCKS * n_max + max_batch, dtype=torch.long, device=self.device)
        # Logits of at most max_tq rows per sequence (its sampled positions), whatever the bucket.
        rows = max_batch * max_tokens_per_seq
        self._logits = torch.zeros(rows, model.args.vocab_size, dtype=torch.float32, device=self.device)
        dtype = model.lm_head.weight.dtype
        self._hidden = (
            torch.zeros(n_max, model.args.hidden_size, dtype=dtype, device=self.device) if hidden else None
        )
        self._static: dict[tuple[int, int, int], tuple[ForwardBatch, torch.Tensor]] = {}
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.backends = self._find_backends()
        self._backend_version = getattr(model, "backend_version", 0)
        self.num_replays = 0
        self._rows_from_zero = False  # the last upload's wanted rows are 0 .. M-1

    def _find_backends(self) -> dict[int, tuple[object, int]]:
        """The MoE backends, with how many layers each serves (to count real (token, expert) pairs)."""
        backends: dict[int, tuple[object, int]] = {}
        for layer in self.model.model.layers:
            if isinstance(layer.mlp, MoEBlock) and layer.mlp.backend is not None:
                backend = layer.mlp.backend
                backends[id(backend)] = (backend, backends.get(id(backend), (backend, 0))[1] + 1)
        return backends

    def _check_backends(self) -> None:
        """A re-formed shard group is a new backend: graphs captured with the old one are dropped."""
        version = getattr(self.model, "backend_version", 0)
        if version == self._backend_version:
            return
        self._backend_version = version
        current = self._find_backends()
        if current.keys() != self.backends.keys():
            self.backends = current
            self.drop()

    def drop(self) -> None:
        """Forget every captured graph (and its static inputs); the next steps capture anew.
        Before a shard group's communicator goes: captured collectives must not outlive it."""
        self._static.clear()
        self._graphs.clear()

    @property
    def has_shards(self) -> bool:
        """Whether a backend exchanges with expert shards (static steps hold collectives)."""
        return any(hasattr(b, "static_step") or hasattr(b, "replica_step") for b, _ in self.backends.values())

    @property
    def captured(self) -> list[tuple[int, int, int]]:
        """Keys (sequences, tokens per sequence, cache bucket) of the captured graphs."""
        return sorted(self._graphs)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def key(
        self, num_seqs: int, max_new: int, kv_len: int, num_tokens: int | None = None
    ) -> tuple[int, int, int] | None:
        """The bucket a step of this shape runs in, or None if it is too large for one.

        Decode/verify steps (at most max_tq tokens per sequence) keep Tq exact. Steps that feed a
        prompt (more tokens) use a prompt bucket, Tq a power of two, when the padded batch is at
        least half real tokens (`num_tokens`): one prompt alone, or prompts of like lengths, but
        not one prompt padding a batch of decoding sequences to its length."""
        if num_seqs > self.max_batch or kv_len > self.max_len:
            return None
        B = bucket(num_seqs, self.max_batch)
        if max_new <= self.max_tq:
            tq = max_new
        elif max_new <= self.max_prompt:
            tq = bucket(max_new, self.max_prompt, PROMPT_FLOOR)
            if num_tokens is not None and 2 * num_tokens < B * tq:
                return None
        else:
            return None
        return (B, tq, bucket(kv_len, self.max_len, MIN_KV_BUCKET))

    def _prompt_bucket(self, Tq: int) -> bool:
        return Tq > self.max_tq

    def _views(self, B: int, Tq: int, L: int) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
        N, m = B * Tq, self._meta
        arange = torch.arange(N, device=self.device)
        # Decode/verify buckets compute logits for every row; prompt buckets only for the rows
        # the meta buffer names (at most max_tq per sequence), so the LM head sees no padding.
        logits_index = m[5 * N : 5 * N + B * self.max_tq] if self._prompt_bucket(Tq) else arange
        batch = ForwardBatch(
            tokens=m[0:N],
            positions=m[N : 2 * N],
            write_slots=m[2 * N : 3 * N],
            read_slots=m[BLOCKS * N : BLOCKS * N + B],
            pad_index=arange,  # packed == padded: every sequence has exactly Tq tokens
            unpad_index=arange,
            query_positions=m[3 * N : 4 * N].view(B, Tq),
            kv_len=L,
            max_new=Tq,
            logits_index=logits_index,
            padded=True,
        )
        return batch, m[4 * N : 5 * N], m[5 * N : 6 * N]

    def _upload(
        self,
        B: int,
        Tq: int,
        feeds: list[list[int]],
        starts: list[int],
        slots: list[int],
        logits_from: list[int],
    ) -> int:
        """Write a padded step into the host buffer and send it; -> rows of logits wanted (M)."""
        N = B * Tq
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the buffer (done already, always)
        h = self._host_np  # numpy view of the pinned buffer: cheap slice writes
        size = BLOCKS * N + B
        h[:size] = 0
        h[2 * N : 3 * N] = self.cache.scratch_slot  # padded tokens write to the scratch slot
        h[BLOCKS * N : size] = self.cache.scratch_slot  # padded sequences read it
        if len(feeds) > UPLOAD_LOOP_ROWS:
            M = self._fill_rows(h, B, Tq, feeds, starts, slots, logits_from)
        else:
            M = self._fill_each_row(h, B, Tq, feeds, starts, slots, logits_from)
        self._meta[:size].copy_(self._host[:size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return M

    def _fill_each_row(self, h: np.ndarray, B: int, Tq: int, feeds, starts, slots, logits_from) -> int:
        """`_upload`'s blocks for the real sequences, row by row (few rows: fewer numpy calls)."""
        N, last = B * Tq, self.max_len - 1
        rows: list[int] = []
        packed: list[int] = []
        for b, (toks, start, slot, first) in enumerate(zip(feeds, starts, slots, logits_from)):
            n, base = len(toks), b * Tq
            h[base : base + n] = toks
            pos = np.minimum(np.arange(start, start + Tq), last)  # padding may run past the cache
            h[N + base : N + base + Tq] = pos
            h[2 * N + base : 2 * N + base + n] = slot
            h[3 * N + base : 3 * N + base + Tq] = pos
            h[4 * N + base : 4 * N + base + n] = 1
            h[BLOCKS * N + b] = slot
            rows.extend(range(base + first, base + n))
            packed.extend(range(base, base + n))
        h[5 * N : 5 * N + len(rows)] = rows
        h[6 * N : 6 * N + len(packed)] = packed
        self._rows_from_zero = not rows or rows[-1] == len(rows) - 1
        return len(rows)

    def _fill_rows(self, h: np.ndarray, B: int, Tq: int, feeds, starts, slots, logits_from) -> int:
        """`_fill_each_row`'s blocks for every real sequence at once (each block a [B, Tq] matrix)."""
        N, R = B * Tq, len(feeds)
        lengths = np.fromiter(map(len, feeds), dtype=np.int64, count=R)
        t = np.arange(Tq)
        fed = t < lengths[:, None]  # [R, Tq]: the real tokens
        wanted = fed & (t >= np.asarray(logits_from)[:, None])  # the rows whose logits are read
        pos = np.minimum(np.asarray(starts)[:, None] + t, self.max_len - 1)
        blocks = h[: BLOCKS * N].reshape(BLOCKS, B, Tq)
        blocks[0, :R][fed] = np.fromiter(itertools.chain.from_iterable(feeds), np.int64, int(lengths.sum()))
        blocks[1, :R] = blocks[3, :R] = pos
        blocks[2, :R] = np.where(fed, np.asarray(slots)[:, None], self.cache.scratch_slot)
        blocks[4, :R] = fed
        rows, packed = np.flatnonzero(wanted), np.flatnonzero(fed)
        h[5 * N : 5 * N + len(rows)] = rows
        h[6 * N : 6 * N + len(packed)] = packed
        h[BLOCKS * N : BLOCKS * N + R] = slots
        self._rows_from_zero = not len(rows) or rows[-1] == len(rows) - 1
        return len(rows)

    def _place_drafts(self, B: int, Tq: int, feeds: list[list[int]], tokens: torch.Tensor, counts: list[int]):
        """`run(drafts=)`: rows' drafts from the device into the uploaded step's tokens, after
        the upload (same stream): one strided copy where every feed ends in k drafts at the same
        place (a verify step's common case), else one indexed copy."""
        view, k = self._meta[: B * Tq].view(B, Tq), tokens.shape[1]
        lengths = [len(f) for f in feeds]
        if all(n == k for n in counts) and len(set(lengths)) == 1:
            if k:
                view[: len(feeds), lengths[0] - k : lengths[0]].copy_(tokens)
            return
        dst = [b * Tq + L - n + j for b, (L, n) in enumerate(zip(lengths, counts)) for j in range(n)]
        src = [b * k + j for b, n in enumerate(counts) for j in range(n)]
        if dst:
            index = to_device(dst + src, self.device)
            flat = self._meta[: B * Tq]
            flat.index_copy_(0, index[: len(dst)], tokens.reshape(-1).index_select(0, index[len(dst) :]))

    def _run(self, batch: ForwardBatch, mask: torch.Tensor) -> None:
        for backend, _ in self.backends.values():
            backend.token_mask = mask
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(fused.active())  # compiled norm/rope/combine: fewer kernels
                top_k = self.model.args.num_experts_per_tok
                for backend, _ in self.backends.values():
                    if hasattr(backend, "static_step"):  # expert shards: fixed-size exchanges
                        stack.enter_context(backend.static_step(mask.shape[0], top_k))
                    if hasattr(backend, "replica_step"):  # trunk replicas run the same batch
                        stack.enter_context(backend.replica_step(batch, capture=self.capture))
                out = self.model(batch, self.cache, return_hidden=self.hidden)
            logits = out[0] if self.hidden else out
            self._logits[: logits.shape[0]].copy_(logits)
            if self.hidden:
                self._hidden[: out[1].shape[0]].copy_(out[1])
        finally:
            for backend, _ in self.backends.values():
                backend.token_mask = None

    def _prepare(self, key: tuple[int, int, int]) -> None:
        """Build the bucket's static batch; on CUDA, warm it up and capture its graph."""
        B, Tq, L = key
        batch, mask, _ = self._views(B, Tq, L)
        self._static[key] = (batch, mask)
        if not self.capture:
            return
        with torch.cuda.device(self.device):  # streams, graphs and Triton launches on the model's GPU
            try:
                self._capture(key, batch, mask)
            except Exception as e:
                # Something in the step cannot be captured: serve on with static shapes, eagerly,
                # rather than fail the step's requests.
                self.capture = False
                self._graphs.clear()
                log.warning(
                    "could not capture a CUDA graph for %d sequences x %d tokens (%s: %s); "
                    "static steps run without CUDA graphs from now on",
                    B,
                    Tq,
                    type(e).__name__,
                    e,
                )
                if self.has_shards:
                    raise  # a collective may be left half-issued: the engine re-forms the group

    def _capture(self, key: tuple[int, int, int], batch: ForwardBatch, mask: torch.Tensor) -> None:
        B, Tq, L = key
        for backend, _ in self.backends.values():
            if hasattr(backend, "last_exchange"):  # no heartbeat due while this captures
                backend.last_exchange = time.monotonic()
        # Warm up and capture on an all-padding batch: every write goes to the scratch slot.
        self._upload(B, Tq, [], [], [], [])
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(batch, mask)  # lazy initialisation (cuBLAS handles, allocator) off the graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Thread-local capture: graphs are captured lazily while serving, and another thread
        # (stats, a heartbeat) may touch the GPU meanwhile without invalidating the capture.
        # stream=: torch's default capture stream is made once per process, on the device current
        # at the first capture; a later engine on another GPU would capture an empty graph there.
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            self._run(batch, mask)
        self._graphs[key] = graph
        log.info("captured a CUDA graph for %d sequences x %d tokens, keys up to %d", B, Tq, L)

    def run(
        self,
        key: tuple[int, int, int],
        feeds: list[list[int]],
        starts: list[int],
        slots: list[int],
        logits_from: list[int],
        fed: torch.Tensor | None = None,
        drafts: tuple[torch.Tensor, list[int]] | None = None,
    ) -> torch.Tensor:
        """The step's logits `[M, V]`, rows in the order the plain path returns them; with
        `hidden`, also the final hidden states of the real tokens `[sum(len(feeds)), D]`, packed
        in feed order (as `Transformer.forward(..., return_hidden=True)` returns them).
        fed: one token per feed on the device, in place of each feed's first (a placeholder).
        drafts: (tokens [len(feeds), k] on the device, n per feed): each feed's last n tokens
        are placeholders for its row's first n tokens there (a verify step's drafts)."""
        self._check_backends()
        pairs = {i: getattr(b, "num_pairs", 0) for i, (b, _) in self.backends.items()}
        if key not in self._static:
            self._prepare(key)
        B, Tq, _ = key
        M = self._upload(B, Tq, feeds, starts, slots, logits_from)
        if self._prompt_bucket(Tq) and self.max_tq * B < M:
            raise ValueError(f"a prompt-bucket step returns at most {self.max_tq} logits rows per sequence")
        if fed is not None:  # one token per feed, already on the device (after the upload, in order)
            self._meta[: B * Tq].view(B, Tq)[: len(feeds), 0].copy_(fed)
        if drafts is not None:
            self._place_drafts(B, Tq, feeds, *drafts)
        if self.capture:
            self._graphs[key].replay()  # one launch: a forward's NCCL exchanges too, in order
            self.num_replays += 1
            for backend, _ in self.backends.values():
                if hasattr(backend, "last_exchange"):  # the shards were just busy: no heartbeat due
                    backend.last_exchange = time.monotonic()
        else:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                self._run(*self._static[key])
        # Count the real (token, expert) pairs only: padding was computed, not asked for.
        real = sum(len(f) for f in feeds) * self.model.args.num_experts_per_tok
        for i, (backend, num_layers) in self.backends.items():
            if hasattr(backend, "num_pairs"):
                backend.num_pairs = pairs[i] + real * num_layers
        N = B * Tq
        # Prompt buckets computed the wanted rows only, in order; others every row, so a gather
        # unless the wanted ones are the first M (one token per sequence: decode, the draft's chain).
        if self._prompt_bucket(Tq) or self._rows_from_zero:
            logits = self._logits[:M]
        else:
            logits = self._logits[self._meta[5 * N : 5 * N + M]]
        if not self.hidden:
            return logits
        return logits, self._hidden[self._meta[6 * N : 6 * N + sum(len(f) for f in feeds)]]

    def forward(
        self,
        feeds: list[list[int]],
        starts: list[int],
        slots: list[int],
        logits_from: list[int],
        fed: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """`run` when the step fits a bucket (every sequence samples); None: run it eagerly."""
        kv_len = max(s + len(f) for s, f in zip(starts, feeds))
        key = self.key(len(feeds), max(len(f) for f in feeds), kv_len, sum(len(f) for f in feeds))
        return None if key is None else self.run(key, feeds, starts, slots, logits_from, fed)
