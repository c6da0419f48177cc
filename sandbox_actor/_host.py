"""``SandboxHost``: a process that runs sandboxes for whoever the placement actor sends.

A host holds a lease ``host.<host_id>`` (data: ``role="sandbox"``, capacity, load,
backend), renewed every ``ttl / 3``. It watches the sandbox assignments
(``sandbox.*``) and, for each one naming it, brings the sandbox up (restored from its last
snapshot, forked from its origin, or fresh from the warm pool), commits ``running``,
reports a takeover to the run's inbox (``SandboxNotice`` ``lost`` then ``restored``),
re-creates the sandbox's durable consumer (so a step the dead owner held is redelivered
at once instead of after ``ack_wait``) and starts a :class:`SandboxWorker` on it.

At start-up a janitor reclaims what a previous, crashed instance on this state dir left
behind (cgroups, mounts, directories, processes). If the host loses its lease it stops
every sandbox: someone else may already own them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nats.errors import Error as NatsClientError
from nats.js.errors import NotFoundError

from actors import encode, stop_task
from bus import Bus, Names
from nerve import LeaseLostError
from persistence import SandboxNotice
from sandbox_actor._backend import SandboxBackend
from sandbox_actor._pool import WarmPool
from sandbox_actor._records import Assignments, SandboxAssignment, parse_key
from sandbox_actor._runner import RunnerConfig, SandboxRunner
from sandbox_actor._snapshots import WorkspaceStore
from sandbox_actor._types import SandboxSpec
from sandbox_actor._worker import SandboxWorker
from supervisor import Lease

log = logging.getLogger("nerve.sandbox.host")


class HostState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(slots=True)
class HostConfig:
    host_id: str
    capacity: int = 32
    lease_ttl: float = 2.0
    pool_size: int = 0
    pool_template: SandboxSpec | None = None
    runner: RunnerConfig | None = None
    cache_dir: Path | None = None
    stream_output: bool = True


@dataclass(eq=False)
class _Slot:
    runner: SandboxRunner
    worker: SandboxWorker | None = None


class SandboxHost:
    """Runs the sandboxes assigned to ``config.host_id`` (see the module docstring)."""

    def __init__(self, bus: Bus, backend: SandboxBackend, config: HostConfig) -> None:
        self.bus = bus
        self.backend = backend
        self.config = config
        self.host_id = Names.host_lease(config.host_id) and config.host_id
        self.state = HostState.NEW
        self.store = WorkspaceStore(bus, config.cache_dir)
        self.assignments = Assignments(bus)
        self.pool = WarmPool(backend, config.pool_size, config.pool_template)
        self.lease = Lease(bus, Names.host_lease(self.host_id), self.host_id,
                           ttl=config.lease_ttl, data=self._lease_data())
        self._slots: dict[str, _Slot] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None
        self.reclaimed: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------
    def _lease_data(self) -> dict[str, object]:
        return {"role": "sandbox", "capacity": self.config.capacity,
                "running": len(getattr(self, "_slots", {})), "backend": self.backend.name,
                "pid": os.getpid()}

    @property
    def lease_held(self) -> bool:
        return self.lease.held

    @property
    def sandbox_ids(self) -> list[str]:
        return sorted(self._slots)

    def runner(self, sandbox_id: str) -> SandboxRunner | None:
        slot = self._slots.get(sandbox_id)
        return slot.runner if slot else None

    async def start(self) -> None:
        if self.state is not HostState.NEW:
            raise RuntimeError(f"sandbox host {self.host_id} cannot start from {self.state}")
        self._failed = asyncio.get_running_loop().create_future()
        await self.backend.start()
        self.reclaimed = await self.backend.reclaim_orphans()
        if self.reclaimed:
            log.warning("host %s: janitor reclaimed %d leftovers: %s", self.host_id,
                        len(self.reclaimed), "; ".join(self.reclaimed))
        await self.lease.wait_acquire(timeout=self.config.lease_ttl * 3)
        self.lease.keep_alive(on_lost=self._lease_lost)
        await self.pool.start()
        self._watch_task = asyncio.create_task(self._watch(), name=f"host-watch:{self.host_id}")
        self.state = HostState.RUNNING
        log.info("sandbox host %s running (%s backend)", self.host_id, self.backend.name)

    async def run(self) -> None:
        """Start, serve until cancelled (or the lease is lost), then stop. A supervisor child."""
        await self.start()
        try:
            assert self._failed is not None
            await self._failed
        finally:
            await self.stop()

    async def wait(self) -> None:
        """Until the host fails (its lease lost); raises what ended it."""
        assert self._failed is not None
        await asyncio.shield(self._failed)  # shield: several waiters share the future

    async def stop(self) -> None:
        if self.state in (HostState.STOPPING, HostState.STOPPED, HostState.NEW):
            self.state = HostState.STOPPED
            return
        self.state = HostState.STOPPING
        errors: list[BaseException] = []
        if self._watch_task is not None:
            await stop_task(self._watch_task)
        for task in list(self._starting.values()) + list(self._tasks):
            task.cancel()
        for task in list(self._starting.values()) + list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sid in list(self._slots):
            try:
                await self._drop(sid, destroy=True)
            except Exception as exc:
                errors.append(exc)
        await self.pool.stop()
        await self.backend.stop()
        with contextlib.suppress(NatsClientError, TimeoutError):
            await self.lease.release()
        self.state = HostState.STOPPED
        if errors:
            raise errors[0]

    async def _lease_lost(self, exc: LeaseLostError) -> None:
        log.error("sandbox host %s lost its lease (%s); stopping every sandbox", self.host_id,
                  exc.message)
        for slot in self._slots.values():
            slot.runner.fenced = True
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    # -- assignments ----------------------------------------------------------------------
    async def _watch(self) -> None:
        kv = await self.bus.kv(self.bus.names.leases_bucket)
        watcher = await kv.watch("sandbox.*")
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                sid = parse_key(entry.key)
                if sid is None:
                    continue
                record = None
                if entry.operation is None and entry.value:
                    with contextlib.suppress(KeyError, ValueError):
                        record = SandboxAssignment.decode(entry.value)
                self._on_assignment(sid, record, entry.revision or 0)
        finally:
            with contextlib.suppress(NatsClientError):
                await watcher.stop()

    def _on_assignment(self, sid: str, record: SandboxAssignment | None, revision: int) -> None:
        slot = self._slots.get(sid)
        mine = record is not None and record.host == self.host_id and record.state in (
            "assigned", "running")
        if slot is not None:
            if mine and record is not None and record.generation == slot.runner.record.generation:
                return  # our own commit
            # Moved elsewhere (or destroyed): this generation is over for us.
            slot.runner.fenced = True
            self._spawn(self._drop(sid, destroy=True), f"drop:{sid}")
            if not mine:
                return
        if mine and record is not None and record.state == "running" and \
                sid not in self._starting and slot is None:
            # Ours, running, but not in this process: a previous incarnation of this host
            # (same id) died. Take it over as a new generation, like any lost sandbox.
            self._spawn(self._adopt(record, revision), f"adopt:{sid}")
            return
        if mine and record is not None and record.state == "assigned" and \
                sid not in self._starting:
            task = asyncio.create_task(self._bring_up(record, revision), name=f"up:{sid}")
            self._starting[sid] = task
            task.add_done_callback(lambda _t, s=sid: self._starting.pop(s, None))

    async def _adopt(self, record: SandboxAssignment, revision: int) -> None:
        moved = record.model_copy(update={
            "generation": record.generation + 1, "state": "assigned",
            "prev_host": record.host, "reason": f"host {record.host} restarted"})
        await self.assignments.put(moved, revision)  # the watch then brings it up

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bring_up(self, record: SandboxAssignment, revision: int) -> None:
        sid = record.sandbox_id
        if sid in self._slots:
            await self._drop(sid, destroy=True)
        runner = SandboxRunner(record=record, revision=revision, backend=self.backend,
                               store=self.store, assignments=self.assignments,
                               host_id=self.host_id, config=self.config.runner or RunnerConfig(),
                               acquire=self.pool.acquire)
        try:
            await runner.start()
            await runner.mark_running()
        except LeaseLostError:
            await runner.stop()
            return
        except Exception as exc:
            log.exception("host %s could not bring up sandbox %s: %r", self.host_id, sid, exc)
            await runner.stop()
            return
        slot = _Slot(runner)
        self._slots[sid] = slot
        self.lease.data = self._lease_data()
        if record.prev_host is not None:
            await self._notify(runner, record)
        await self._reset_consumer(sid)
        worker = SandboxWorker(runner, self, stream_output=self.config.stream_output)
        await worker.start(self.bus)
        slot.worker = worker
        log.info("host %s runs sandbox %s (generation %d, from %s)", self.host_id, sid,
                 record.generation, runner.restored_from or "empty")

    async def _reset_consumer(self, sid: str) -> None:
        # A step the previous owner had fetched stays pending until ack_wait; deleting the
        # durable hands it to our new consumer at once. Safe: we own this generation, and
        # the old owner can no longer commit.
        with contextlib.suppress(NotFoundError):
            await self.bus.js.delete_consumer(self.bus.names.work_stream,
                                              Names.sandbox_durable(sid))

    async def _notify(self, runner: SandboxRunner, record: SandboxAssignment) -> None:
        if not record.inbox:
            return
        sid = record.sandbox_id
        restored = runner.restored_from
        step = runner.record.last_step_index
        notices = [
            SandboxNotice(event="lost", sandbox_id=sid, host=record.prev_host,
                          reason=record.reason or f"host {record.prev_host} lease expired",
                          notice_id=f"{sid}:{record.generation}:lost"),
            SandboxNotice(event="restored", sandbox_id=sid, host=self.host_id,
                          from_snapshot=restored, step_index=step,
                          reason=f"restored on host {self.host_id}",
                          notice_id=f"{sid}:{record.generation}:restored"),
        ]
        for notice in notices:
            try:
                await self.bus.js.publish(record.inbox, encode(notice),
                                          headers={"Nats-Msg-Id": notice.notice_id})
            except (NatsClientError, TimeoutError) as exc:
                log.warning("could not report %s of sandbox %s: %r", notice.event, sid, exc)

    def fenced(self, runner: SandboxRunner) -> None:
        """A worker found its sandbox taken over: drop it."""
        sid = runner.sandbox_id
        slot = self._slots.get(sid)
        if slot is not None and slot.runner is runner:
            self._spawn(self._drop(sid, destroy=True), f"drop:{sid}")

    async def _drop(self, sid: str, destroy: bool) -> None:
        slot = self._slots.pop(sid, None)
        if slot is None:
            return
        self.lease.data = self._lease_data()
        if slot.worker is not None:
            # The worker's handler may be the one asking for the drop: do not wait on it.
            await slot.worker.stop(timeout=0.5)
        await slot.runner.stop(destroy=destroy)
