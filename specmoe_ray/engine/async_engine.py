"""An Engine driven by one loop thread, for asyncio callers (Serve replicas, batch jobs).

Only the loop thread touches the engine: requests and cancellations reach it through a
queue, so the engine's collectives are issued from one thread in one order, as every rank
of the shard group requires. Outputs go back to each caller's asyncio queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from specmoe_ray.engine.engine import Engine
from specmoe_ray.engine.sequence import RequestOutput, SamplingParams
from specmoe_ray.errors import SpecMoEError

log = logging.getLogger(__name__)


class EngineDeadError(SpecMoEError):
    """The engine loop stopped after an error; the replica must be replaced."""


@dataclasses.dataclass
class _Add:
    request_id: str
    prompt: list[int] | str
    params: SamplingParams
    sink: Callable[[Any], None]


@dataclasses.dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[Engine, float], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[Any], None]] = {}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine loop failed: {self.error}")
        if not self._thread.is_alive() and not self._stop.is_set():
            raise EngineDeadError("engine loop is not running")

    # -- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._drain(block=not engine.has_unfinished())
            if not engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step ends every running request with the error
                log.exception("engine step failed")
                self.error = e
                for rid, sink in list(self._sinks.items()):
                    engine.abort(rid)
                    sink(e)
                self._sinks.clear()
                self._fail_pending(e)
                return
            if self.on_step is not None:
                self.on_step(engine, time.perf_counter() - t0)
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                    if out.finished:
                        del self._sinks[out.request_id]

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id)
                    self._sinks[cmd.request_id] = cmd.sink
                except Exception as e:  # bad request: tell its caller, keep serving the rest
                    cmd.sink(e)
            elif isinstance(cmd, _Abort):
                self._sinks.pop(cmd.request_id, None)
                self.engine.abort(cmd.request_id)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                cmd.sink(error)

    # -- asyncio side -------------------------------------------------------------------------

    async def generate_stream(
        self, request_id: str, prompt: list[int] | str, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as steps produce them; cancelling aborts it."""
        self.check_health()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item: Any) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._commands.put(_Add(request_id, prompt, params, sink))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(_Abort(request_id))

    async def generate(
        self, request_id: str, prompt: list[int] | str, params: SamplingParams
    ) -> RequestOutput:
        last = None
        async for out in self.generate_stream(request_id, prompt, params):
            last = out
        return last

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
