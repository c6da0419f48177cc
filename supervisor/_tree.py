"""Supervision trees with OTP semantics.

A :class:`Supervisor` starts its children in order and watches them. When one ends, its
:class:`Restart` type decides whether it comes back (``permanent``: always; ``transient``:
only after a crash; ``temporary``: never) and the :class:`Strategy` decides who restarts
with it (``one_for_one``: itself; ``one_for_all``: everyone; ``rest_for_one``: itself and
the children started after it). More than ``intensity`` restarts within ``period`` seconds
means restarting does not help: the supervisor stops every child and fails with
:class:`~nerve.EscalationError`, which its own parent sees as a crashed child. A child that
fails with :class:`~nerve.ConfigError` is not restarted at all (the same configuration
would fail the same way): the supervisor stops every child and raises that error.

A child is anything that runs as a coroutine until it ends: an actor's ``run``, an
:class:`~supervisor.OsProcess`'s ``run``, another supervisor's ``run``. Shutdown cancels it
and waits ``shutdown`` seconds (an OS process gets SIGTERM, then SIGKILL).

Every start, exit, restart and escalation is a :class:`SupervisorEvent` given to the
``on_event`` callbacks (``bus_event_sink`` publishes them on ``nerve.events.supervisor``).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from actors import cancel_and_wait
from nerve import ConfigError, EscalationError

log = logging.getLogger("nerve.supervisor")


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


@dataclass(slots=True)
class ChildSpec:
    """How to run one child. ``start`` is called afresh for every (re)start."""

    id: str
    start: Callable[[], Awaitable[Any]]
    restart: Restart = Restart.PERMANENT
    shutdown: float = 5.0


@dataclass(frozen=True, slots=True)
class SupervisorEvent:
    """Something a supervisor did or saw. ``kind``: started, exited, crashed, restarting,
    escalated, stopped."""

    supervisor: str
    child: str | None
    kind: str
    reason: str = ""
    at: float = field(default_factory=time.time)


EventSink = Callable[[SupervisorEvent], Any]


@dataclass(eq=False)
class _Running:
    spec: ChildSpec
    task: asyncio.Task[Any]
    stopping: bool = False


class Supervisor:
    """An OTP-style supervisor over asyncio tasks (see the module docstring)."""

    def __init__(self, name: str, children: list[ChildSpec], *,
                 strategy: Strategy = Strategy.ONE_FOR_ONE, intensity: int = 3,
                 period: float = 5.0, on_event: list[EventSink] | None = None) -> None:
        ids = [c.id for c in children]
        if len(set(ids)) != len(ids):
            raise ValueError(f"supervisor {name}: child ids must be unique, got {ids}")
        self.name = name
        self.specs = list(children)
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self.sinks: list[EventSink] = list(on_event or [])
        self._running: dict[str, _Running] = {}
        self._restarts: collections.deque[float] = collections.deque()
        self._ended: asyncio.Queue[tuple[str, asyncio.Task[Any]]] = asyncio.Queue()
        self.restart_count = 0

    # -- events --------------------------------------------------------------------------
    async def _emit(self, child: str | None, kind: str, reason: str = "") -> None:
        event = SupervisorEvent(self.name, child, kind, reason)
        level = logging.WARNING if kind in ("crashed", "escalated") else logging.INFO
        log.log(level, "[%s] %s %s %s", self.name, child or "-", kind, reason)
        for sink in self.sinks:
            try:
                result = sink(event)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("supervisor event sink failed")

    # -- children ------------------------------------------------------------------------
    async def _start(self, spec: ChildSpec) -> None:
        task = asyncio.create_task(self._guard(spec), name=f"{self.name}/{spec.id}")
        self._running[spec.id] = _Running(spec, task)
        task.add_done_callback(lambda t, cid=spec.id: self._ended.put_nowait((cid, t)))
        await self._emit(spec.id, "started")

    @staticmethod
    async def _guard(spec: ChildSpec) -> Any:
        return await spec.start()

    async def _stop_child(self, child_id: str) -> None:
        running = self._running.pop(child_id, None)
        if running is None or running.task.done():
            return
        running.stopping = True
        if await cancel_and_wait([running.task], timeout=running.spec.shutdown):
            log.error("[%s] child %s ignored cancellation for %.1fs; abandoning it",
                      self.name, child_id, running.spec.shutdown)
        await self._emit(child_id, "stopped")

    async def _stop_all(self, ids: list[str]) -> None:
        for child_id in reversed(ids):  # reverse start order, as OTP does
            await self._stop_child(child_id)

    def _order(self) -> list[str]:
        return [s.id for s in self.specs]

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Start the children and supervise them until cancelled or escalating."""
        # A parent may run us again after an escalation: start from a clean slate.
        self._running.clear()
        self._restarts.clear()
        self._ended = asyncio.Queue()
        try:
            for spec in self.specs:
                await self._start(spec)
            while True:
                child_id, task = await self._ended.get()
                running = self._running.get(child_id)
                if running is None or running.task is not task or running.stopping:
                    continue  # a child we stopped ourselves
                del self._running[child_id]
                await self._on_exit(running.spec, task)
        finally:
            await self._stop_all([cid for cid in self._order() if cid in self._running])

    async def _on_exit(self, spec: ChildSpec, task: asyncio.Task[Any]) -> None:
        exc = None if task.cancelled() else task.exception()
        crashed = exc is not None or task.cancelled()
        reason = repr(exc) if exc is not None else ("cancelled" if task.cancelled() else "normal")
        await self._emit(spec.id, "crashed" if crashed else "exited", reason)
        if isinstance(exc, ConfigError):
            await self._emit(spec.id, "escalated", f"{spec.id} is misconfigured, so "
                             f"restarting it cannot help: {exc.message}")
            raise exc
        if spec.restart is Restart.TEMPORARY:
            self.specs.remove(spec)
            return
        if spec.restart is Restart.TRANSIENT and not crashed:
            return
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > self.period:
            self._restarts.popleft()
        if len(self._restarts) > self.intensity:
            reason = (f"{len(self._restarts)} restarts within {self.period}s "
                      f"(intensity {self.intensity}); last: {spec.id} {reason}")
            await self._emit(spec.id, "escalated", reason)
            raise EscalationError(f"supervisor {self.name} gave up: {reason}",
                                  supervisor=self.name, child=spec.id)
        order = self._order()
        if self.strategy is Strategy.ONE_FOR_ONE:
            again = [spec.id]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            again = order
        else:
            again = order[order.index(spec.id):]
        await self._stop_all([cid for cid in again if cid in self._running])
        self.restart_count += 1
        for cid in again:
            await self._emit(cid, "restarting", f"after {spec.id}: {reason}")
            await self._start(next(s for s in self.specs if s.id == cid))

    def child_spec(self, restart: Restart = Restart.PERMANENT, shutdown: float = 30.0,
                   ) -> ChildSpec:
        """This supervisor as a child of another one."""
        return ChildSpec(id=self.name, start=self.run, restart=restart, shutdown=shutdown)

    def running(self) -> list[str]:
        return [cid for cid in self._order() if cid in self._running]
