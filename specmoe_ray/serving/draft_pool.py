"""The draft-model replica pool: a Serve deployment, its affinity router, and the verifier's client.

Each step the verifier sends ONE call per pool replica, carrying all of that replica's
sequences. A sequence goes to the replica that holds its draft KV cache: the client hashes
sequence ids onto the replica ids it learns with `broadcast("replica_id")` (rendezvous
hashing: a scale event moves only the sequences of replicas that came or went), and
`SequenceAffinityRouter` routes each call to the replica it names. Correctness never depends
on it: a replica that has not seen a sequence prefills it (the draft cache reuses the longest
common prefix of what it is sent), and a failed call just means no drafts this step.

Internal wire: msgpack, never pickle: token ids, sampling knobs, and the sparse draft
distributions as raw little-endian arrays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from typing import Any

import msgpack
import numpy as np
import torch
from ray import serve
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from specmoe_ray.spec.proposer import DraftModelProposer, DraftRequest, empty_proposal
from specmoe_ray.spec.rejection import DraftProposal

log = logging.getLogger(__name__)


def encode_requests(requests: list[DraftRequest], release: list[str]) -> bytes:
    rows = [[r.seq_id, r.tokens, r.num_draft, r.temperature, r.top_k, r.top_p, r.seed] for r in requests]
    return msgpack.packb({"requests": rows, "release": release})


def decode_requests(payload: bytes) -> tuple[list[DraftRequest], list[str]]:
    msg = msgpack.unpackb(payload)
    return [DraftRequest(*row) for row in msg["requests"]], list(msg["release"])


def encode_proposal(p: DraftProposal, replica: str) -> bytes:
    B, k, S = p.sparse_ids.shape
    return msgpack.packb(
        {
            "shape": [B, k, S],
            "tokens": p.tokens.cpu().numpy().astype("<i8").tobytes(),
            "num_draft": p.num_draft.tolist(),
            "ids": p.sparse_ids.cpu().numpy().astype("<i8").tobytes(),
            "probs": p.sparse_probs.float().cpu().numpy().astype("<f4").tobytes(),
            "replica": replica,
        }
    )


def decode_proposal(payload: bytes) -> tuple[DraftProposal, str]:
    msg = msgpack.unpackb(payload)
    B, k, S = msg["shape"]

    def arr(key: str, dtype: str, shape) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(msg[key], dtype=dtype).reshape(shape).copy())

    proposal = DraftProposal(
        tokens=arr("tokens", "<i8", (B, k)),
        num_draft=torch.tensor(msg["num_draft"], dtype=torch.long),
        sparse_ids=arr("ids", "<i8", (B, k, S)),
        sparse_probs=arr("probs", "<f4", (B, k, S)),
    )
    return proposal, msg["replica"]


class SequenceAffinityRouter(FIFOMixin, RequestRouter):
    """Routes a call to the replica its `target_replica` keyword names, when that replica is up."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("target_replica") if pending_request is not None else None
        if target:
            match = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if match:
                return [match]
        return [candidate_replicas]


@serve.deployment(max_ongoing_requests=64)
class DraftPool:
    """A replica of the draft model; holds the draft KV caches of the sequences routed to it."""

    def __init__(self, draft: str, dtype: str, max_num_seqs: int, max_model_len: int, top_n: int):
        from specmoe_ray.engine.setup import load_local_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_local_model(draft, dtype, device)
        self.proposer = DraftModelProposer(model, max_num_seqs, max_model_len, top_n=top_n)
        self.lock = threading.Lock()  # one proposal at a time: they share the draft caches
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.seen: set[str] = set()
        self.num_calls = 0
        self.num_sequences = 0

    def replica_id(self) -> str:
        return self.id

    def _propose(self, payload: bytes) -> bytes:
        requests, release = decode_requests(payload)
        with self.lock:
            for seq_id in release:
                self.proposer.release(seq_id)
            proposal = self.proposer.propose(requests)
            self.num_calls += 1
            self.num_sequences += len(requests)
            self.seen.update(r.seq_id for r in requests)
        return encode_proposal(proposal, self.id)

    async def propose(self, payload: bytes, target_replica: str | None = None) -> bytes:
        return await asyncio.to_thread(self._propose, payload)

    def stats(self) -> dict[str, Any]:
        return {
            "replica_id": self.id,
            "num_calls": self.num_calls,
            "num_sequences": self.num_sequences,
            "seen": sorted(self.seen),
            "cached": len(self.proposer.entries),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        return {"cached_sequences": len(self.proposer.entries)}


def _owner(seq_id: str, replicas: list[str]) -> str:
    """Rendezvous hashing: the replica with the highest hash of (sequence, replica)."""
    return max(replicas, key=lambda r: hashlib.blake2b(f"{seq_id}|{r}".encode(), digest_size=8).digest())


class PoolProposer:
    """The engine-side client of a DraftPool: one call per replica per step."""

    def __init__(
        self,
        handle,
        device: torch.device | str,
        affinity: bool = True,
        timeout_s: float = 30.0,
        refresh_s: float = 5.0,
    ):
        self.handle = handle
        self.device = device
        self.affinity = affinity
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.replicas: list[str] = []
        self._refreshed = 0.0
        self._release: list[str] = []
        self._step = 0
        self.num_failed_calls = 0

    def _refresh(self, force: bool = False) -> None:
        if force or not self.replicas or time.monotonic() - self._refreshed > self.refresh_s:
            try:
                ids = self.handle.broadcast("replica_id").results(timeout_s=self.timeout_s)
                self.replicas = sorted(set(ids))
            except Exception as e:  # keep the old list; calls fall back to any replica
                log.warning("could not list draft pool replicas: %s", e)
            self._refreshed = time.monotonic()

    def release(self, seq_id: str) -> None:
        self._release.append(seq_id)

    def propose(self, requests: list[DraftRequest]) -> DraftProposal:
        self._refresh()
        self._step += 1
        replicas = self.replicas or [""]
        groups: dict[str, list[int]] = {}
        for b, r in enumerate(requests):
            if r.num_draft <= 0:
                continue
            if self.affinity:
                owner = _owner(r.seq_id, replicas)
            else:  # spread sequences over replicas with no regard to where their caches are
                owner = replicas[(b + self._step) % len(replicas)]
            groups.setdefault(owner, []).append(b)
        release, self._release = self._release, []
        calls = []
        for i, (owner, rows) in enumerate(groups.items()):
            payload = encode_requests([requests[b] for b in rows], release if i == 0 else [])
            h = self.handle.options(request_serialization="msgpack", response_serialization="msgpack")
            calls.append((rows, h.propose.remote(payload, target_replica=owner or None)))
        B = len(requests)
        k = max((r.num_draft for r in requests), default=0)
        results = []
        for rows, call in calls:
            try:
                proposal, _ = decode_proposal(call.result(timeout_s=self.timeout_s))
                results.append((rows, proposal))
            except Exception as e:  # no drafts for these sequences this step; output stays exact
                self.num_failed_calls += 1
                log.warning(
                    "draft pool call failed (%s); continuing without drafts for %d sequences", e, len(rows)
                )
                self._refresh(force=True)
        if not results:
            return empty_proposal(B, self.device)
        S = max(p.sparse_ids.shape[-1] for _, p in results)
        merged = DraftProposal(
            tokens=torch.full((B, k), -1, dtype=torch.long),
            num_draft=torch.zeros(B, dtype=torch.long),
            sparse_ids=torch.full((B, k, S), -1, dtype=torch.long),
            sparse_probs=torch.zeros(B, k, S),
        )
        for rows, p in results:
            idx = torch.tensor(rows)
            kk, ss = p.tokens.shape[1], p.sparse_ids.shape[-1]
            merged.tokens[idx, :kk] = p.tokens
            merged.num_draft[idx] = p.num_draft
            merged.sparse_ids[idx, :kk, :ss] = p.sparse_ids
            merged.sparse_probs[idx, :kk, :ss] = p.sparse_probs
        return DraftProposal(
            *(
                t.to(self.device)
                for t in (merged.tokens, merged.num_draft, merged.sparse_ids, merged.sparse_probs)
            )
        )
