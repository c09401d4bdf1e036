"""Expert shards as Ray actors, and the ShardGroup that starts, joins and stops them.

Each `ExpertShard` loads only its own experts (safetensors slices) and then serves them as
rank s + 1 of a `torch.distributed` group whose rank 0 is the engine's process. A ShardGroup
reserves one placement-group bundle per shard (strategy PACK, SPREAD, ...), publishes rank 0's
`host:port` to the shards by argument, and bounds every wait: reservation, actor start, join.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import threading
import time
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specmoe_ray.errors import ShardGroupError, ShardStartupError
from specmoe_ray.models.loader import read_config
from specmoe_ray.models.transformer import check_args_head_split
from specmoe_ray.moe.dispatch import DistributedDispatch
from specmoe_ray.moe.placement import PlacementPlan
from specmoe_ray.moe.replica import ReplicaDispatch, serve_replica
from specmoe_ray.moe.shard_loop import ShardProfile, leave_process_group, serve_experts

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class ShardOptions:
    """How expert shards are placed and how long each phase may take."""

    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 1 when the engine runs on CUDA, else 0
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    strategy: str = "PACK"  # placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    bundle_resources: list[dict[str, float]] | None = None  # per-shard extra resources (pin to nodes)
    startup_timeout_s: float = 120.0  # reserve resources + start actors + load experts
    collective_timeout_s: float = 120.0  # joining the process group, and any one collective
    heartbeat_interval_s: float | None = None  # None: collective_timeout_s / 4
    # Shard 0 of the plan lives in the engine's process, on its device: with S shards on S GPUs
    # every GPU, the engine's included, holds experts (S - 1 actors). Default: S actors, the
    # engine's device holds none.
    local_shard: bool = False
    # CUDA graphs for steps with expert shards: the engine captures its static steps, NCCL
    # exchanges included, and each shard captures its side of a forward (tests/gpu's NCCL tests
    # and the 30B benchmark on 2 and 4 H100s). Off: such steps run eagerly. A failed capture
    # turns it off and re-forms the group.
    cuda_graphs: bool = True
    # Environment for the group's communicators (e.g. {"NCCL_GRAPH_REGISTER": "0"}): set in the
    # shards' processes and, before it joins, in this one (NCCL reads it when a group forms).
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)
    # Trunk replicas (`moe/replica.py`): every shard also holds the dense trunk and a KV cache
    # and runs each forward beside the engine, which holds shard 0 (as with local_shard): one
    # all_reduce per MoE layer instead of two exchanges, and no shard idles while the trunk runs.
    replicate_trunk: bool = False
    # Trunk replicas sum the pairs' unweighted outputs (model dtype, exact) and combine as one
    # process does: bit for bit the tokens of experts in-process, for 2 x top_k / 4 times the
    # bytes per all_reduce. Off: each rank's weighted sum in float32 (the combine re-associated).
    replica_exact: bool = False
    # How trunk replicas split the experts: "experts" (rank r holds the plan's shard r, whole
    # experts) or "intermediate" (every rank holds every expert, 1 / num_shards of its
    # intermediate size: each rank computes every pair's share, the same bytes on every rank
    # whatever the routing; not with replica_exact).
    replica_split: str = "experts"
    # How trunk replicas run attention: "replicated" (every rank all heads, a full KV cache each)
    # or "heads" (rank r keeps 1 / num_shards of the query and key/value heads and only their
    # KV cache, and each layer's attention output is summed over the ranks too, before the MoE
    # layer's; `Transformer.split_attention`). Heads: KV cache memory per GPU / num_shards and
    # attention's bytes split, for a second sum per layer; the shard count must divide both head
    # counts and stays fixed (no reshard to another count, no autoscaling); not replica_exact,
    # not MLA (DeepSeek) nor a full-width q/k norm (OLMoE).
    replica_attention: str = "replicated"
    # Trunk replicas, static steps (CUDA graphs) of up to this many tokens: each MoE layer's sum
    # by peer loads over NVLink inside the next add + norm (`moe/peer_sum.py`, CUDA IPC)
    # instead of NCCL's all_reduce; 0: off; None (the default): DEFAULT_PEER_ROWS for trunk
    # replicas on GPUs that are not replica_exact, else 0. Ranks on one host with every GPU
    # visible (shard actors keep them so), each reaching its peers' memory, and a power-of-2
    # count of them: elsewhere (several hosts, 3 ranks, no peer access, memory that CUDA IPC
    # cannot share) every rank sums with NCCL from its first static step on (a warning when
    # asked for by number, a line in the log by default). ~5 us per MoE layer faster than NCCL
    # (48 layers, 2 H200s, split experts: 1.54x one GPU at batch 32 vs 1.51x, 1.00x at batch 1
    # vs 0.92x; RESULTS.md, session 13). A shard that dies mid-sum is handled as over NCCL: the
    # group's watcher ends the waits, the step is replayed on a re-formed group (tests/gpu). A
    # rank that waits longer than collective_timeout_s for a peer that is alive but stuck
    # traps: its CUDA context fails and its process must restart.
    replica_peer_sum: int | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


NOSET_VISIBLE = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
MAX_PEER_ROWS = 65536  # `ShardOptions.replica_peer_sum`'s bound (a decode or verify step is far smaller)
# `replica_peer_sum`'s default for trunk replicas on GPUs: every decode step of up to 256
# sequences, or verify steps of 32 sequences x 8 tokens (3 float32 slots of 256 rows per GPU:
# 6 MiB at hidden 2048); larger steps sum with NCCL.
DEFAULT_PEER_ROWS = 256


def _actor_device(device: str) -> str:
    """A shard actor's device: Ray's GPU for it, which Ray makes the only visible one ("cuda:0"),
    unless NOSET_VISIBLE keeps every GPU visible (peer sums map the peers' memory, which CUDA
    needs visible): then the one with Ray's id, found among CUDA_VISIBLE_DEVICES if set. (Ray
    names its GPU slot i by entry i of the CUDA_VISIBLE_DEVICES the worker starts with: an
    `env_vars` override must list the GPUs Ray was given first, in Ray's order.)"""
    if device != "cuda":
        return "cpu"
    ids = ray.get_gpu_ids()
    if not (os.environ.get(NOSET_VISIBLE) and ids):
        return "cuda:0"
    gpu = str(ids[0])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"cuda:{visible.index(gpu) if gpu in visible else int(gpu)}"


@ray.remote(max_concurrency=3)  # serve(), and beside it stats calls and profile()
class ExpertShard:
    """Holds some experts of some MoE layers and serves them over the process group."""

    def __init__(
        self,
        path: str,
        assignment: dict[int, list[int]],
        rank: int,
        world_size: int,
        dtype: str,
        device: str,
        replica: tuple[PlacementPlan, int, int, bool, str, int, bool, list[int] | None] | None = None,
    ):
        """replica: (plan, cache slots, cache length, exact, split, peer sum rows, whether those
        are the default, the layers whose attention heads are split or None) for a trunk replica
        (`replicate_trunk`; split "intermediate": every expert, slice `rank` of its intermediate
        size; `replica_peer_sum`; `replica_attention`)."""
        from specmoe_ray.models.loader import load_experts, load_trunk, read_config

        # Where a start's seconds go (`info`, logged by ShardGroup.start): when this process
        # began the actor (wall clock: the group subtracts when it created it), then each phase.
        self.began_at = time.time()
        self.phases: dict[str, float] = {}
        if device == "cpu":
            torch.set_num_threads(1)  # shards share the host's cores with the engine
        self.rank, self.world_size = rank, world_size
        self.device = _actor_device(device)
        self.served = 0
        self.error: str | None = None
        self.control: dict[str, Any] = {}  # read by the serving loop (serve_experts, serve_replica)
        self.model = self.cache = self.replica = None
        t0 = time.monotonic()

        def phase(name: str) -> None:
            nonlocal t0
            now = time.monotonic()
            self.phases[name] = now - t0
            t0 = now

        try:
            if self.device.startswith("cuda"):
                torch.zeros(1, device=self.device)  # the CUDA context
                phase("cuda")
            self.args, _ = read_config(path)
            split = replica is not None and replica[4] == "intermediate"
            part = (rank, world_size) if split else (0, 1)
            self.store = load_experts(
                path, assignment, dtype=dtype, device=self.device, args=self.args, part=part
            )
            phase("experts")
            self.load_s = self.phases["experts"]  # the experts' load (not the trunk's)
            if replica is not None:
                plan, num_slots, max_len, exact, _, peer_rows, by_default, heads = replica
                self.model = load_trunk(path, dtype=dtype, device=self.device)
                if heads:
                    self.model.split_attention(rank, world_size)
                self.model.fuse_projections()  # as the engine's: every rank runs the same kernels
                phase("trunk")
                self.replica = ReplicaDispatch(
                    plan, self.store, rank, self.device, exact, split, peer_rows,
                    peer_by_default=by_default, attention_layers=heads,
                )  # fmt: skip
                self.model.set_expert_backend(self.replica)
                self.cache = self.model.make_cache(num_slots, max_len)
                phase("cache")
        except Exception as e:  # reported by info(), so the engine can say what went wrong
            self.error = f"{type(e).__name__}: {e}"
            return
        self.dtype = next(self.store.parameters()).dtype if self.store.num_parameters() else torch.float32

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            return {"rank": self.rank, "error": self.error}
        return {
            "rank": self.rank,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "num_parameters": self.store.num_parameters()
            + (sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0),
            "held": self.store.held(),
            "trunk": self.model is not None,
            "load_s": round(self.load_s, 1),
            "load_times": dict(self.store.load_times),
            "began_at": self.began_at,
            "phases": {k: round(v, 2) for k, v in self.phases.items()},
        }

    def computed(self) -> dict[int, list[int]]:
        """(token, expert) pairs this shard computed, per layer and expert, cumulative."""
        return self.store.computed_counts()

    def profile(self, forwards: int, trace_path: str | None = None, timeout_s: float = 120.0) -> str:
        """torch.profiler over this shard's next `forwards` forwards (rank 0 must be stepping
        meanwhile; this call runs beside `serve`) -> the table of its kernels by GPU time."""
        request = ShardProfile(forwards, trace_path)
        self.control["profile"] = request
        if not request.done.wait(timeout_s):
            self.control.pop("profile", None)
            return f"rank {self.rank}: no {forwards} forwards within {timeout_s:g}s"
        return f"rank {self.rank}: {request.result}"

    def serve(self, master_addr: str, master_port: int, timeout_s: float, capture: bool = False):
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        kwargs = {"device_id": torch.device(self.device)} if backend == "nccl" else {}
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
        try:
            if self.replica is not None:
                self.replica.peer_timeout_s = timeout_s
                self.served = serve_replica(
                    self.model, self.cache, self.replica, self.device, capture=capture, control=self.control
                )
                return self.served
            self.served = serve_experts(
                self.store,
                self.rank,
                self.world_size,
                self.args.hidden_size,
                self.dtype,
                self.device,
                layers=sorted(self.args.moe_layers),
                capture=capture,
                control=self.control,
            )
        except Exception:
            # Logged now: rank 0 sees only a collective that times out (NCCL) or fails (gloo),
            # and the serve() result that carries this error is read after that.
            log.exception("expert shard rank %d stopped serving", self.rank)
            raise
        finally:
            if self.replica is not None:
                self.replica.peer = None  # the peers' mappings go before the group
            leave_process_group()
        return self.served


class ShardGroup:
    """Starts expert shards, joins them with this process as rank 0, and stops them."""

    def __init__(
        self,
        path: str,
        plan: PlacementPlan,
        hidden_size: int,
        dtype: torch.dtype,
        device: str,
        options: ShardOptions | None = None,
        cache_shape: tuple[int, int] | None = None,
    ):
        """cache_shape: the engine's KV cache (slots, length), which trunk replicas copy."""
        self.path, self.plan, self.hidden_size, self.dtype = path, plan, hidden_size, dtype
        self.device = "cuda" if device.startswith("cuda") else "cpu"  # the shards' kind of device
        self.local_device = torch.device(device)  # the engine's own (rank 0's collectives, local shard)
        self.options = options or ShardOptions()
        if self.options.replicate_trunk and cache_shape is None:
            raise ValueError("ShardOptions.replicate_trunk: the shard group needs the engine's cache_shape")
        opt = self.options
        if opt.replica_exact and not opt.replicate_trunk:
            raise ValueError("ShardOptions.replica_exact applies to trunk replicas: set replicate_trunk too")
        if opt.replica_split not in ("experts", "intermediate"):
            raise ValueError(
                f"ShardOptions.replica_split {opt.replica_split!r}: expected 'experts' or 'intermediate'"
            )
        if opt.replica_split == "intermediate" and (opt.replica_exact or not opt.replicate_trunk):
            raise ValueError(
                "ShardOptions.replica_split 'intermediate' applies to trunk replicas (set replicate_trunk) "
                "and sums partial outputs, so it cannot be replica_exact"
            )
        if opt.replica_attention not in ("replicated", "heads"):
            raise ValueError(
                f"ShardOptions.replica_attention {opt.replica_attention!r}: expected 'replicated' or 'heads'"
            )
        self.attention_layers: list[int] | None = None  # split heads: every layer's attention sums
        if opt.replica_attention == "heads":
            if opt.replica_exact or not opt.replicate_trunk:
                raise ValueError(
                    "ShardOptions.replica_attention 'heads' applies to trunk replicas (set replicate_trunk) "
                    "that sum partial outputs, so it cannot be replica_exact"
                )
            args, _ = read_config(path)
            check_args_head_split(args, plan.num_shards)
            self.attention_layers = list(range(args.num_layers))
        peer = opt.replica_peer_sum
        if peer is not None and not isinstance(peer, int):
            raise ValueError(f"ShardOptions.replica_peer_sum {peer!r}: a token count (or None: the default)")
        if peer and (not 0 < peer <= MAX_PEER_ROWS or opt.replica_exact or not opt.replicate_trunk):
            raise ValueError(
                f"ShardOptions.replica_peer_sum {opt.replica_peer_sum}: a token count from 0 to "
                f"{MAX_PEER_ROWS} (each GPU holds 3 float32 rows of the hidden size per token) for "
                "trunk replicas (set replicate_trunk) that sum partial outputs (not replica_exact)"
            )
        self.cache_shape = cache_shape
        self.actors: list[Any] = []
        self.serve_refs: list[Any] = []
        self.pg = None
        self.dispatch: DistributedDispatch | ReplicaDispatch | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # Why the group broke, found by its watcher (`_heartbeat_loop`) while the engine stepped:
        # the engine checks it after each step's host sync (`check`). None: healthy.
        self.failure: str | None = None
        # When the engine's current step began (`begin_step`; None between steps): a step that
        # runs past half the collective timeout has the watcher ask whether the shards answer.
        self.step_since: float | None = None
        # Shard 0's experts in this process (`_load_local`): (what was loaded, the store); kept
        # over re-forms that give shard 0 the same share, dropped when the group shuts down.
        self._local: tuple[Any, Any] | None = None
        self._startup_deadline = 0.0  # the actors' (`_start_actors`)
        self._created_at = 0.0  # when `_start_actors` created them (wall clock)

    @property
    def local_shard(self) -> bool:
        """Whether this process holds shard 0 (`local_shard`, and always with trunk replicas)."""
        return self.options.local_shard or self.options.replicate_trunk

    @property
    def world_size(self) -> int:
        return self.plan.num_shards + (0 if self.local_shard else 1)

    @property
    def remote_shards(self) -> range:
        """Shards run by actors (all of them, or all but shard 0 when it is local)."""
        return range(1 if self.local_shard else 0, self.plan.num_shards)

    def rank_of(self, shard: int) -> int:
        return shard if self.local_shard else shard + 1

    @property
    def split(self) -> bool:
        """Trunk replicas split every expert by its intermediate size (`replica_split`)."""
        return self.options.replica_split == "intermediate"

    @property
    def peer_rows(self) -> int:
        """`replica_peer_sum` resolved: its number, or by default DEFAULT_PEER_ROWS for trunk
        replicas on GPUs (not exact), else 0."""
        opt = self.options
        if opt.replica_peer_sum is not None:
            return opt.replica_peer_sum
        on = opt.replicate_trunk and not opt.replica_exact and self.device == "cuda"
        return DEFAULT_PEER_ROWS if on else 0

    def assignment(self, shard: int) -> dict[int, list[int]]:
        """The experts shard `shard` loads: the plan's, or every one (of which a slice: `split`)."""
        if self.split:
            return {layer: list(range(self.plan.num_experts)) for layer in self.plan.owner}
        return self.plan.experts_of(shard)

    def start(self) -> DistributedDispatch | ReplicaDispatch:
        if dist.is_initialized():
            raise ShardStartupError(
                "this process already has a torch.distributed group (another Engine with expert shards?); "
                "shut that engine down first"
            )
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
        marks = [time.monotonic()]
        try:
            self.shard_info = []
            self._start_actors()
            marks.append(time.monotonic())
            # Shard 0's experts load here while the actors load theirs, and before the group
            # forms: once joined, the shards wait in a collective (collective_timeout_s), and a
            # long local load (every expert's slice of a 48-layer model: minutes) outlasted it.
            local = self._load_local(self._rank0_device())
            marks.append(time.monotonic())
            self._await_actors()
            marks.append(time.monotonic())
            self._join(local)
            marks.append(time.monotonic())
        except BaseException:
            self._teardown()
            raise
        self.failure = None
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop,
            args=(self._stop, list(self.serve_refs), list(self.actors)),
            name="shard-heartbeat",
            daemon=True,
        )
        self._heartbeat.start()
        spans = [b - a for a, b in zip(marks, marks[1:])]
        log.info(
            "expert shard group of %d formed in %.1fs (actors placed %.1fs, local experts %.1fs, "
            "actors loaded %.1fs%s, process group %.1fs)",
            self.world_size,
            marks[-1] - marks[0],
            *spans[:3],
            self._slowest_actor(),
            spans[3],
        )
        return self.dispatch

    def _slowest_actor(self) -> str:
        """`start`'s log: the last actor ready, its seconds by phase: its process's start (from
        its creation to its constructor: a worker process, imports; hosts' clocks apart count
        here), then the constructor's (`ExpertShard.phases`)."""
        actors = [info for info in self.shard_info if "began_at" in info]  # (not a local shard 0)
        if not actors:
            return ""
        spans = []
        for info in actors:
            phases = {"process start": max(0.0, info["began_at"] - self._created_at), **info["phases"]}
            spans.append((sum(phases.values()), info["rank"], phases))
        _, rank, phases = max(spans, key=lambda x: x[0])
        return f" (slowest: rank {rank}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()) + ")"

    def _start_actors(self) -> None:
        opt = self.options
        num_gpus = opt.num_gpus if opt.num_gpus is not None else (1 if self.device == "cuda" else 0)
        bundles = []
        for s in self.remote_shards:
            bundle = {"CPU": opt.num_cpus, **opt.resources}
            if num_gpus:
                bundle["GPU"] = num_gpus
            if opt.bundle_resources:
                bundle.update(opt.bundle_resources[s % len(opt.bundle_resources)])
            bundles.append({k: v for k, v in bundle.items() if v})
        if not bundles:  # one local shard and no actor
            return
        self.pg = placement_group(bundles, strategy=opt.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=opt.startup_timeout_s)
        if not ready:
            raise ShardStartupError(
                f"could not reserve resources for {self.plan.num_shards} expert shards within "
                f"{opt.startup_timeout_s:g}s (bundles {bundles}, strategy {opt.strategy}); "
                f"cluster resources available: {ray.available_resources()}"
            )
        dtype_name = str(self.dtype).removeprefix("torch.")
        opt = self.options
        replica = None
        if opt.replicate_trunk:
            replica = (
                self.plan,
                *self.cache_shape,
                opt.replica_exact,
                opt.replica_split,
                self.peer_rows,
                opt.replica_peer_sum is None,
                self.attention_layers,
            )
        env = dict(opt.env_vars)
        if opt.replicate_trunk and self.peer_rows and self.device == "cuda":
            env.setdefault(NOSET_VISIBLE, "1")  # every GPU visible: CUDA IPC maps the peers'
        self._created_at = time.time()  # (wall clock: the actors report when they began)
        for i, s in enumerate(self.remote_shards):
            actor = ExpertShard.options(
                num_cpus=bundles[i].get("CPU", 0),
                num_gpus=bundles[i].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                ),
                name=None,
                runtime_env={"env_vars": env} if env else None,
            ).remote(
                self.path,
                self.assignment(s),
                self.rank_of(s),
                self.world_size,
                dtype_name,
                self.device,
                replica,
            )
            self.actors.append(actor)
        self._startup_deadline = time.monotonic() + opt.startup_timeout_s

    def _await_actors(self) -> None:
        """Each actor's info once its experts are loaded; a clear error for one that failed."""
        opt = self.options
        deadline = self._startup_deadline
        for s, actor in zip(self.remote_shards, self.actors):
            remaining = max(0.1, deadline - time.monotonic())
            where = f"expert shard {s} (rank {self.rank_of(s)})"
            try:
                info = ray.get(actor.info.remote(), timeout=remaining)
            except ray.exceptions.GetTimeoutError as e:
                raise ShardStartupError(f"{where} did not start within {opt.startup_timeout_s:g}s") from e
            except ray.exceptions.RayActorError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise ShardStartupError(f"{where} failed to start: {cause}") from e
            if "error" in info:
                raise ShardStartupError(f"{where} failed to start: {info['error']}")
            self.shard_info.append(info)

    def _rank0_device(self) -> torch.device:
        """Where rank 0's collectives (and shard 0's experts, when local) run."""
        if self.device != "cuda":
            return torch.device("cpu")
        local = self.local_device
        return local if local.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _join(self, store) -> None:
        """Form the process group with the started actors (rank 0: this process); store: shard
        0's experts when local (`_load_local`), else None."""
        opt = self.options
        addr = ray.util.get_node_ip_address()
        port = _free_port()
        self.serve_refs = [
            a.serve.remote(addr, port, opt.collective_timeout_s, opt.cuda_graphs) for a in self.actors
        ]
        backend = "nccl" if self.device == "cuda" else "gloo"
        device = self._rank0_device()
        kwargs = {"device_id": device} if backend == "nccl" else {}
        os.environ.update(opt.env_vars)
        try:
            dist.init_process_group(
                backend,
                init_method=f"tcp://{addr}:{port}",
                rank=0,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=opt.collective_timeout_s),
                **kwargs,
            )
        except Exception as e:
            failed = self._failed_shards()
            detail = f"; {failed}" if failed else ""
            raise ShardStartupError(
                f"expert shards did not join the process group at {addr}:{port} within "
                f"{opt.collective_timeout_s:g}s ({type(e).__name__}: {e}){detail}"
            ) from e
        if self.options.replicate_trunk:
            opt = self.options
            self.dispatch = ReplicaDispatch(
                self.plan, store, 0, device, opt.replica_exact, self.split, self.peer_rows,
                peer_by_default=opt.replica_peer_sum is None, attention_layers=self.attention_layers,
            )  # fmt: skip
            self.dispatch.peer_timeout_s = opt.collective_timeout_s
        else:
            self.dispatch = DistributedDispatch(self.plan, self.hidden_size, self.dtype, device, store)

    def _load_local(self, device: torch.device):
        """Shard 0's experts, in this process, when the options make shard 0 local."""
        if not self.local_shard:
            return None
        from specmoe_ray.models.loader import load_experts

        part = (0, self.plan.num_shards) if self.split else (0, 1)
        assignment = self.assignment(0)
        key = (self.path, sorted(assignment.items()), part, str(self.dtype), str(device))
        t0 = time.monotonic()
        if self._local is not None and self._local[0] == key:
            # A re-form with the same share for shard 0 (a shard failed and is replaced): the
            # experts this process holds stay, where a 48-layer model's reload took minutes.
            store = self._local[1]
            store.computed.clear()  # counted from the new group on, as the new actors count
            load_s = 0.0
            log.info("shard 0's experts (%d parameters) kept from the group before", store.num_parameters())
        else:
            self._local = None  # (the old share's memory before the new one's)
            store = load_experts(self.path, assignment, dtype=self.dtype, device=str(device), part=part)
            self._local = (key, store)
            load_s = time.monotonic() - t0
            log.info(
                "shard 0's experts (%d parameters) loaded here in %.1fs (read %.1fs, copied %.1fs)",
                store.num_parameters(),
                load_s,
                store.load_times.get("read", 0.0),
                store.load_times.get("copy", 0.0),
            )
        self.shard_info.insert(
            0,
            {
                "rank": 0,
                "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(),
                "num_parameters": store.num_parameters(),
                "held": store.held(),
                "local": True,
                "load_s": round(load_s, 1),
                "load_times": dict(store.load_times),
            },
        )
        return store

    def _failed_shards(self) -> str:
        done, _ = ray.wait(self.serve_refs, num_returns=len(self.serve_refs), timeout=0)
        errors = []
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:  # report what the shard itself raised
                errors.append(f"shard {self.serve_refs.index(ref)}: {e}")
        return "; ".join(errors)

    def begin_step(self) -> None:
        """The engine starts a step (up to its host sync): see `_heartbeat_loop`."""
        self.step_since = time.monotonic()

    def end_step(self) -> None:
        self.step_since = None

    def _silent_shards(self, actors: list[Any], timeout: float) -> list[int]:
        """Indexes of the actors that do not answer a call within timeout (a stopped or hung
        process; a busy one answers: `info` runs beside `serve`)."""
        calls = [a.info.remote() for a in actors]
        _, pending = ray.wait(calls, num_returns=len(calls), timeout=timeout)
        return [calls.index(ref) for ref in pending]

    def _heartbeat_loop(self, stop: threading.Event, refs: list[Any], actors: list[Any]) -> None:
        """The group's watcher (one per formation: stop and refs are that formation's). A shard's
            serve() that returns or fails before `shutdown` (its actor died, or it raised) breaks the
            group: record why (`failure`) and, over NCCL, abort the communicator. A collective that
            waits for a dead GPU rank never fails by itself (NCCL's watchdog would end this process
            after collective_timeout_s); aborted, it returns at once, its output garbage: the engine
            checks `failure` after the step's host sync, rolls the step back and replays it on a
            re-formed group. Between steps, ping the shards when the engine is idle. A step that has
        run for half the collective timeout (`begin_step`): ask every actor; one that does not
        answer within a quarter of it (at most 10 s; a stopped process, a hung one) breaks the
        group as a dead one does, before NCCL's watchdog or the peer sums' timeout would end this
        process (gloo's collectives still wait for their own timeout)."""
        interval = self.options.heartbeat_interval_s or self.options.collective_timeout_s / 4
        stuck_after = self.options.collective_timeout_s / 2
        probe_s = min(10.0, self.options.collective_timeout_s / 4)
        probed = None  # the step (its start) already asked about
        while not stop.is_set():
            if refs:
                done, _ = ray.wait(refs, num_returns=1, timeout=min(interval, 1.0))
            else:  # no actors (shard 0 local, alone): ray.wait would return at once
                done = []
                stop.wait(min(interval, 1.0))
            if stop.is_set():
                return
            if done:
                self._broken(refs.index(done[0]), done[0])
                return
            since = self.step_since
            if actors and since is not None and since != probed and time.monotonic() - since >= stuck_after:
                probed = since
                silent = self._silent_shards(actors, probe_s)
                if silent and not stop.is_set():
                    shard = self.remote_shards[silent[0]]
                    self._break(
                        f"shard {shard} (rank {self.rank_of(shard)}) did not answer within {probe_s:g}s "
                        f"while a step waited {time.monotonic() - since:.0f}s (its process stopped or hung)"
                    )
                    return
            if time.monotonic() - self.dispatch.last_exchange >= interval:
                try:
                    self.dispatch.ping()
                except Exception as e:  # gloo: a peer gone or stuck past the timeout
                    self._break(f"heartbeat failed: {type(e).__name__}: {e}")
                    return

    def _broken(self, index: int, ref: Any) -> None:
        """Shard actor `index`'s serve() ended while serving: `_break` with what it raised."""
        try:
            ray.get(ref, timeout=0)
            why = "its serving loop returned"
        except Exception as e:  # what the shard raised, or why its actor died
            first = (str(e).strip().splitlines() or [""])[0]
            why = f"{type(e).__name__}: {first}"
        shard = self.remote_shards[index]
        self._break(f"shard {shard} (rank {self.rank_of(shard)}) stopped: {why}")

    def _break(self, reason: str) -> None:
        """Mark the group broken (`failure`, which the engine checks after each step) and end
        whatever waits for its peers: NCCL's collectives (abort), peer sums (`PeerSum.abort`)."""
        self.failure = reason
        log.error("expert shard group broken: %s", reason)
        peer = getattr(self.dispatch, "peer", None)
        if peer is not None:  # peer sums' waits for the dead rank end (`PeerSum.abort`)
            try:
                peer.abort()
            except Exception as e:  # NCCL's waits must end all the same
                log.warning("could not stop the peer sums' waits: %s: %s", type(e).__name__, e)
        if dist.is_initialized() and dist.get_backend() == "nccl":
            try:
                dist.group.WORLD.abort()
            except Exception as e:  # the engine's next collective or NCCL's watchdog then
                log.warning("could not abort the NCCL communicator: %s", e)

    def check(self) -> None:
        """Raise ShardGroupError if the watcher found the group broken (`_heartbeat_loop`)."""
        if self.failure is not None:
            raise ShardGroupError(f"expert shard group broken: {self.failure}")

    def reform(self, plan: PlacementPlan, failed: bool = False) -> DistributedDispatch | ReplicaDispatch:
        """Tear the group down and form it again with another membership (e.g. a new shard count).

        Call it between engine steps: experts hold no per-request state, so nothing is lost
        (trunk replicas start with empty KV caches: the engine refills them, `Engine._reform`).
        failed: the group broke (a collective failed or timed out); its shards are not asked to
        stop (they would not hear it), only stopped.
        """
        if self.attention_layers is not None and plan.num_shards != self.plan.num_shards:
            raise ValueError(
                f"replica_attention 'heads' split the attention over {self.plan.num_shards} shards: the "
                f"count cannot change (asked for {plan.num_shards}); use 'replicated' to reshard"
            )
        local = self._local  # (kept if shard 0's share stays the same: `_load_local`)
        self.shutdown(graceful=not failed)
        self._local = local
        self.plan = plan
        self._stop = threading.Event()
        self._heartbeat = None
        return self.start()

    def profile(self, forwards: int, trace_dir: str | None = None, timeout_s: float = 120.0) -> list[Any]:
        """Ask every shard actor to profile its next `forwards` forwards (Chrome traces to
        `trace_dir/shard-rank<r>.json` if given) -> one ObjectRef per actor, each resolving to
        a table once the engine has stepped that far: `ray.get` them after stepping."""
        return [
            a.profile.remote(
                forwards,
                os.path.join(trace_dir, f"shard-rank{self.rank_of(s)}.json") if trace_dir else None,
                timeout_s,
            )
            for s, a in zip(self.remote_shards, self.actors)
        ]

    def computed_counts(self) -> list[dict[int, list[int]]]:
        """Per shard: pairs computed per (layer, expert); shows how replicas split a hot expert."""
        remote = ray.get(
            [a.computed.remote() for a in self.actors], timeout=self.options.collective_timeout_s
        )
        local = self.dispatch.local if self.dispatch is not None else None
        return ([local.computed_counts()] if local is not None else []) + remote

    def peer_wait_times(self) -> list[list[tuple[int, float]]] | None:
        """Trunk replicas' peer sums: every rank's (sums, microseconds waited for its peers) so
        far at each sum's position in a forward (`PeerSum.wait_times`: [rank][position]), or
        None: no peer sums yet, or their waits not timed (the environment's
        `peer_sum.WAIT_TIMES_ENV`=1, e.g. in `ShardOptions.env_vars`). Call it between steps
        (it synchronizes the engine's GPU)."""
        peer = getattr(self.dispatch, "peer", None)
        return peer.wait_times() if peer is not None else None

    def stats(self) -> dict[str, Any]:
        return {
            "num_shards": self.plan.num_shards,
            "tokens_per_shard": list(self.dispatch.tokens_per_shard) if self.dispatch else [],
            "shards": self.shard_info,
        }

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the shards: ask them (OP_STOP) and wait for them to return, then leave the group
        and end the actors. graceful=False skips the asking (a broken group)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if graceful and self.dispatch is not None and dist.is_initialized():
            try:
                self.dispatch.stop()
                ray.get(self.serve_refs, timeout=self.options.collective_timeout_s)
            except Exception as e:
                log.warning("expert shards did not stop cleanly: %s", e)
        self._teardown()
        self._local = None

    def _teardown(self) -> None:
        if isinstance(self.dispatch, ReplicaDispatch):
            self.dispatch.peer = None  # the peers' mappings go before the group
        leave_process_group()  # after the shards returned from serve(), or gave up on them
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self.dispatch = None
