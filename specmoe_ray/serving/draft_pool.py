"""The draft-model replica pool: a Serve deployment, its affinity router, and the verifier's client.

Each step the verifier sends ONE call per pool replica, carrying all of that replica's
sequences. A sequence goes to the replica that holds its draft KV cache: the client hashes
sequence ids onto the replica ids it learns with `broadcast("replica_id")` (rendezvous
hashing: a scale event moves only the sequences of replicas that came or went), and
`SequenceAffinityRouter` routes each call to the replica it names. Correctness never depends
on it: a replica that has not seen a sequence prefills it (the draft cache reuses the longest
common prefix of what it is sent), and a failed call just means no drafts this step.

Internal wire: msgpack, never pickle: token ids, sampling knobs, and the sparse draft
distributions as raw little-endian arrays. A sequence's tokens travel once: the client sends
each replica only the tokens a sequence gained since its last call there, with a digest of what
that replica should hold (`TokenLedger`, `HeldTokens`); a replica that does not hold exactly that
(restarted, evicted, another client's sequence of the same id) says so, drafts nothing for it
this step, and gets the whole list next step. (Resending whole lists cost O(context) per sequence
and step: 8k tokens at batch 32 are ~2 MB and milliseconds of packing per step.)
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import torch
from ray import serve
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from specmoe_ray.spec.proposer import DraftModelProposer, DraftRequest, empty_proposal
from specmoe_ray.spec.rejection import DraftProposal

log = logging.getLogger(__name__)


def pack_tokens(tokens: list[int]) -> bytes:
    a = array.array("q", tokens)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def unpack_tokens(data: bytes) -> list[int]:
    a = array.array("q")
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def chain_digest(previous: bytes, tokens: list[int]) -> bytes:
    """The digest of a token list sent in pieces: each piece hashed after the digest before it
    (b"" for none), so both ends agree exactly when they saw the same pieces."""
    return hashlib.blake2b(previous + pack_tokens(tokens), digest_size=16).digest()


def encode_requests(rows: list[list], release: list[str]) -> bytes:
    """rows: [seq_id, base, base digest, tokens after base (`pack_tokens`), num_draft,
    temperature, top_k, top_p, seed] (`TokenLedger.row`)."""
    return msgpack.packb({"requests": rows, "release": release})


def decode_requests(payload: bytes) -> tuple[list[list], list[str]]:
    msg = msgpack.unpackb(payload)
    return list(msg["requests"]), list(msg["release"])


def encode_proposal(p: DraftProposal, replica: str, missing: list[int] | None = None) -> bytes:
    B, k, S = p.sparse_ids.shape
    return msgpack.packb(
        {
            "shape": [B, k, S],
            "tokens": p.tokens.cpu().numpy().astype("<i8").tobytes(),
            "num_draft": p.num_draft.tolist(),
            "ids": p.sparse_ids.cpu().numpy().astype("<i8").tobytes(),
            "probs": p.sparse_probs.float().cpu().numpy().astype("<f4").tobytes(),
            "replica": replica,
            "missing": missing or [],
        }
    )


def decode_proposal(payload: bytes) -> tuple[DraftProposal, str, list[int]]:
    """-> (the proposal, the replica's id, the rows whose base it did not hold: no drafts)."""
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
    return proposal, msg["replica"], list(msg.get("missing", []))


class TokenLedger:
    """The client's side of sending tokens once: per sequence, the replica it last sent to, how
    many tokens, and their chained digest (`chain_digest`). Sequences only grow (the engine's):
    the tokens after the last send are all that is new."""

    def __init__(self):
        self.sent: dict[str, tuple[str, int, bytes]] = {}
        self.tokens_sent = 0  # tokens put on the wire (stats)
        self.tokens_requested = 0  # tokens the requests held (what whole lists would have sent)

    def row(self, r: DraftRequest, replica: str) -> tuple[list, tuple[str, int, bytes]]:
        """A request's wire row for replica, and the entry to record once the replica held it."""
        replica_was, base, digest = self.sent.get(r.seq_id, ("", 0, b""))
        if replica_was != replica or not replica or base > len(r.tokens):
            base, digest = 0, b""  # (no affinity: "" owns nothing; a list that shrank: resend)
        new = r.tokens[base:]
        self.tokens_sent += len(new)
        self.tokens_requested += len(r.tokens)
        row = [r.seq_id, base, digest, pack_tokens(new), r.num_draft, r.temperature, r.top_k, r.top_p, r.seed]
        return row, (replica, len(r.tokens), chain_digest(digest, new))

    def settle(self, seq_ids: list[str], entries: list[tuple[str, int, bytes]], missing) -> None:
        """After a call: its rows' entries recorded, except the missing rows' (resent whole)."""
        for i, (seq_id, entry) in enumerate(zip(seq_ids, entries, strict=True)):
            if i in missing:
                self.sent.pop(seq_id, None)
            else:
                self.sent[seq_id] = entry

    def forget(self, seq_id: str) -> None:
        self.sent.pop(seq_id, None)


class HeldTokens:
    """A replica's side: each sequence's tokens as sent in pieces, and their chained digest; the
    least recently used dropped past `capacity` (a sender then resends the whole list)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.seqs: OrderedDict[str, tuple[list[int], bytes]] = OrderedDict()
        self.tokens_received = 0
        self.num_missing = 0

    def resolve(self, rows: list[list]) -> tuple[list[DraftRequest], list[int]]:
        """Wire rows -> requests with whole token lists, and the rows whose base this replica
        does not hold (their requests draft nothing)."""
        requests, missing = [], []
        for i, (seq_id, base, digest, data, num_draft, *knobs) in enumerate(rows):
            new = unpack_tokens(data)
            self.tokens_received += len(new)
            held = self.seqs.pop(seq_id, None)
            if base and (held is None or len(held[0]) != base or held[1] != digest):
                missing.append(i)
                self.num_missing += 1
                requests.append(DraftRequest(seq_id, [0], 0, *knobs))
                continue
            tokens = held[0] if base else []
            tokens.extend(new)  # (in place: O(new tokens); the request reads it before the next call)
            self.seqs[seq_id] = (tokens, chain_digest(digest if base else b"", new))
            while len(self.seqs) > self.capacity:
                self.seqs.popitem(last=False)
            requests.append(DraftRequest(seq_id, tokens, num_draft, *knobs))
        return requests, missing

    def release(self, seq_id: str) -> None:
        self.seqs.pop(seq_id, None)


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
        self.held = HeldTokens(4 * max_num_seqs)  # (clients that vanish never release theirs)
        self.lock = threading.Lock()  # one proposal at a time: they share the draft caches
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.seen: set[str] = set()
        self.num_calls = 0
        self.num_sequences = 0

    def replica_id(self) -> str:
        return self.id

    def _propose(self, payload: bytes) -> bytes:
        rows, release = decode_requests(payload)
        with self.lock:
            for seq_id in release:
                self.proposer.release(seq_id)
                self.held.release(seq_id)
            requests, missing = self.held.resolve(rows)
            proposal = self.proposer.propose(requests)
            self.num_calls += 1
            self.num_sequences += len(requests)
            self.seen.update(r.seq_id for r in requests)
        return encode_proposal(proposal, self.id, missing)

    async def propose(self, payload: bytes, target_replica: str | None = None) -> bytes:
        return await asyncio.to_thread(self._propose, payload)

    def stats(self) -> dict[str, Any]:
        return {
            "replica_id": self.id,
            "num_calls": self.num_calls,
            "num_sequences": self.num_sequences,
            "seen": sorted(self.seen),
            "cached": len(self.proposer.entries),
            "tokens_received": self.held.tokens_received,
            "num_missing": self.held.num_missing,
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
        self.ledger = TokenLedger()

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
        self.ledger.forget(seq_id)

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
            # (without affinity a call may land anywhere: whole lists, owner "")
            wire = [self.ledger.row(requests[b], owner if self.affinity else "") for b in rows]
            payload = encode_requests([w for w, _ in wire], release if i == 0 else [])
            h = self.handle.options(request_serialization="msgpack", response_serialization="msgpack")
            calls.append(
                (rows, [e for _, e in wire], h.propose.remote(payload, target_replica=owner or None))
            )
        B = len(requests)
        k = max((r.num_draft for r in requests), default=0)
        results = []
        for rows, entries, call in calls:
            try:
                proposal, _, missing = decode_proposal(call.result(timeout_s=self.timeout_s))
                results.append((rows, proposal))
            except Exception as e:  # no drafts for these sequences this step; output stays exact
                self.num_failed_calls += 1
                log.warning(
                    "draft pool call failed (%s); continuing without drafts for %d sequences", e, len(rows)
                )
                self._refresh(force=True)
                missing = range(len(rows))
            self.ledger.settle([requests[b].seq_id for b in rows], entries, missing)
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
