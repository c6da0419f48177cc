"""``SandboxHost``: a process that runs sandboxes for whoever the placement actor sends.

A host holds a lease ``host.<host_id>`` (data: ``role="sandbox"``, capacity, load,
backend), renewed every ``ttl / 3``. It watches the sandbox assignments
(``sandbox.*``) and, for each one naming it, brings the sandbox up (restored from its last
snapshot, forked from its origin, or fresh from the warm pool), commits ``running``,
reports a takeover to the run's inbox (``SandboxNotice`` ``lost`` then ``restored``),
re-creates the sandbox's durable consumer (so a step the dead owner held is redelivered
at once instead of after ``ack_wait``) and starts a :class:`SandboxWorker` on it.

A sandbox lives as long as its run (see :mod:`sandbox_actor._ended`): the host destroys it
when the run's end is announced (``<prefix>.ctl.run.<id>.ended``) or when its sweep finds
the end in the run's history, and never brings up or adopts one whose run has ended. A
bring-up that fails (a server that lost the work stream, a restore that timed out) is
retried with backoff while the assignment is still this host's.

At start-up the host locks its state dir (one live host per state dir), then a janitor
reclaims what a previous, crashed instance on this state dir left behind (cgroups, mounts,
directories, processes). If the host loses its lease it stops every sandbox: someone else
may already own them.
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
from bus import Bus, Names, PidLock
from nerve import ConfigError, LeaseLostError
from persistence import SandboxNotice
from sandbox_actor._backend import SandboxBackend
from sandbox_actor._ended import (
    clear_work,
    run_ended,
    run_id_of_ended_subject,
)
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
    # How often the sandboxes here are checked for a run that ended without a notice
    # reaching this host (an orchestrator that died right after the end, a reconnect).
    sweep_every: float = 10.0
    # A failed bring-up is tried again after this long, doubling up to ``retry_max``.
    retry_first: float = 0.5
    retry_max: float = 10.0


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
        self._state_lock: PidLock | None = None
        self._ended_sub = None
        self._sweep_task: asyncio.Task[None] | None = None

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
        await self._lock_state_dir()
        try:
            await self.backend.start()
            self.reclaimed = await self.backend.reclaim_orphans()
            if self.reclaimed:
                log.warning("host %s: janitor reclaimed %d leftovers: %s", self.host_id,
                            len(self.reclaimed), "; ".join(self.reclaimed))
            await self.lease.wait_acquire(timeout=self.config.lease_ttl * 3)
        except BaseException:
            self._unlock_state_dir()
            raise
        self.lease.keep_alive(on_lost=self._lease_lost)
        await self.pool.start()
        self._ended_sub = await self.bus.nc.subscribe(self.bus.names.run_ended(),
                                                      cb=self._on_run_ended)
        self._watch_task = asyncio.create_task(self._watch(), name=f"host-watch:{self.host_id}")
        self._sweep_task = asyncio.create_task(self._sweep_loop(),
                                               name=f"host-sweep:{self.host_id}")
        self.state = HostState.RUNNING
        log.info("sandbox host %s running (%s backend)", self.host_id, self.backend.name)

    async def _lock_state_dir(self) -> None:
        # Two live hosts on one state dir would take each other's sandboxes for a crashed
        # instance's leftovers (the janitor) and share cgroups: refuse the second.
        state_dir = Path(self.backend.config.state_dir)
        await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        lock = PidLock(state_dir / "host.lock")
        if not await lock.acquire(wait=1.0):
            raise ConfigError(
                f"sandbox state dir {state_dir} is in use by another sandbox host (pid "
                f"{lock.holder()}); give each host its own (--set sandbox.state_dir=..., or "
                f"its own nerve up --data-dir)", state_dir=str(state_dir))
        self._state_lock = lock

    def _unlock_state_dir(self) -> None:
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None

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
        if self._ended_sub is not None:
            with contextlib.suppress(NatsClientError):
                await self._ended_sub.unsubscribe()
            self._ended_sub = None
        await stop_task(self._sweep_task)
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
        self._unlock_state_dir()
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

            def started(t: asyncio.Task[None], s: str = sid) -> None:
                if self._starting.get(s) is t:
                    del self._starting[s]
                self._reap(t)

            task.add_done_callback(started)

    async def _adopt(self, record: SandboxAssignment, revision: int) -> None:
        delay = self.config.retry_first
        while True:
            try:
                if await self._retire_if_ended(record, revision):
                    return  # its run ended while this host was down: not restored
                moved = record.model_copy(update={
                    "generation": record.generation + 1, "state": "assigned",
                    "prev_host": record.host, "reason": f"host {record.host} restarted"})
                await self.assignments.put(moved, revision)  # the watch then brings it up
                return  # (or someone changed it first: theirs)
            except (NatsClientError, TimeoutError) as exc:
                log.warning("host %s could not adopt sandbox %s yet (%r); retrying in "
                            "%.1fs", self.host_id, record.sandbox_id, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.retry_max)

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        """A host task ended: forget it, and log what it raised (nobody awaits it)."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("host %s: %s failed: %r", self.host_id, task.get_name(), exc,
                      exc_info=exc)

    async def _bring_up(self, record: SandboxAssignment, revision: int) -> None:
        """Bring the sandbox up, retrying with backoff while the assignment is still ours."""
        sid = record.sandbox_id
        delay = self.config.retry_first
        while True:
            try:
                await self._try_bring_up(record, revision)
                return
            except Exception as exc:
                log.warning("host %s could not bring up sandbox %s (%r); trying again in "
                            "%.1fs", self.host_id, sid, exc, delay,
                            exc_info=delay == self.config.retry_first)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.retry_max)
            try:
                found = await self.assignments.get(sid)
            except (NatsClientError, TimeoutError) as exc:
                log.warning("host %s: cannot read sandbox %s's assignment (%r)", self.host_id,
                            sid, exc)
                continue
            if found is None or found[0].host != self.host_id or \
                    found[0].state not in ("assigned", "running") or \
                    found[0].generation != record.generation:
                return  # not ours any more (moved, destroyed): nothing to bring up
            record, revision = found

    async def _try_bring_up(self, record: SandboxAssignment, revision: int) -> None:
        sid = record.sandbox_id
        if sid in self._slots:
            await self._drop(sid, destroy=True)
        if await self._retire_if_ended(record, revision):
            return
        runner = SandboxRunner(record=record, revision=revision, backend=self.backend,
                               store=self.store, assignments=self.assignments,
                               host_id=self.host_id, config=self.config.runner or RunnerConfig(),
                               acquire=self.pool.acquire)
        try:
            await runner.start()
            await runner.mark_running()
        except LeaseLostError:
            await runner.stop()
            return  # reassigned meanwhile: the new owner brings it up
        except BaseException:
            await runner.stop()
            raise
        slot = _Slot(runner)
        self._slots[sid] = slot
        self.lease.data = self._lease_data()
        try:
            if record.prev_host is not None:
                await self._notify(runner, record)
            await self._reset_consumer(sid)
            worker = SandboxWorker(runner, self, stream_output=self.config.stream_output)
            await worker.start(self.bus)
        except BaseException:
            # Not serving: give the slot back; the retry starts from the assignment again.
            if self._slots.get(sid) is slot:
                await self._drop(sid, destroy=True)
            raise
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

    # -- ended runs -----------------------------------------------------------------------
    async def _on_run_ended(self, msg) -> None:
        run_id = run_id_of_ended_subject(msg.subject)
        for sid, slot in list(self._slots.items()):
            if (slot.runner.record.run_id or sid) == run_id:
                status = msg.data.decode(errors="replace") or "ended"
                self._spawn(self._retire(sid, slot, f"run {run_id} {status}"), f"retire:{sid}")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_every)
            try:
                await self.sweep()
            except (NatsClientError, TimeoutError) as exc:
                log.warning("host %s: sweep for ended runs failed (%r)", self.host_id, exc)
            except Exception:
                # A backend that fails to destroy one sandbox must not end the sweeps.
                log.exception("host %s: sweep for ended runs failed", self.host_id)

    async def sweep(self) -> list[str]:
        """Destroy the sandboxes here whose run has ended (its history's last record says
        so); returns their ids. The backstop for a run-end notice that never came."""
        done = []
        for sid, slot in list(self._slots.items()):
            run_id = slot.runner.record.run_id or sid
            ended = await run_ended(self.bus, run_id)
            if ended is not None and self._slots.get(sid) is slot:
                await self._retire(sid, slot, f"run {run_id} {ended.removeprefix('run_')} "
                                              "(found by the sweep)")
                done.append(sid)
        return done

    async def _retire(self, sid: str, slot: _Slot, reason: str) -> None:
        """The sandbox's run ended: destroy it here, free its slot, mark it destroyed."""
        if self._slots.get(sid) is not slot:
            return  # already dropped (a notice and the sweep, or a move)
        runner = slot.runner
        runner.fenced = True  # a step in flight commits, publishes and restores nothing
        await self._drop(sid, destroy=True)
        await self._mark_destroyed(runner.record, runner.revision, reason)

    async def _retire_if_ended(self, record: SandboxAssignment, revision: int) -> bool:
        """Before bringing up or adopting: if the sandbox's run has ended, mark it destroyed
        instead (nothing is started or restored). True if it had."""
        ended = await run_ended(self.bus, record.run_id or record.sandbox_id)
        if ended is None:
            return False
        await self._mark_destroyed(record, revision, f"run {record.run_id or record.sandbox_id}"
                                                     f" {ended.removeprefix('run_')}")
        return True

    async def _mark_destroyed(self, record: SandboxAssignment, revision: int,
                              reason: str) -> None:
        done = record.model_copy(update={"state": "destroyed", "reason": reason})
        if await self.assignments.put(done, revision) is None:
            # Changed meanwhile (moved, or destroyed by someone else): the sandbox is gone
            # from here all the same; whoever holds the record now decides the rest.
            log.info("host %s: sandbox %s changed hands before it was marked destroyed",
                     self.host_id, record.sandbox_id)
        await clear_work(self.bus, record.sandbox_id)
        log.info("host %s destroyed sandbox %s: %s (snapshots kept for forks)", self.host_id,
                 record.sandbox_id, reason)

    # -- dropping -------------------------------------------------------------------------
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
