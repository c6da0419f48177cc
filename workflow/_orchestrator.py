"""The orchestrator: starts runs from tasks, owns runs through leases, takes over orphans.

Ownership has two levels, so that renewing costs O(orchestrators), not O(runs):

* every orchestrator holds a **host lease** ``host.<owner_id>`` (a TTL key it renews);
* every active run has a **run record** ``run.<run_id>`` = ``{owner, epoch, tenant}`` (no
  TTL), created when the run starts and deleted when it ends.

A run's owner is valid while its host lease lives. When a host lease expires (its
orchestrator died), every other orchestrator sees the delete marker on its watch of the
bucket and races to claim that host's runs with a compare-and-set on each run record; the
winner bumps the epoch, fences the history with ``OwnerChanged``, replays and carries on.
An orchestrator restarted under the same ``owner_id`` picks its own runs up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from nats.aio.msg import Msg
from nats.errors import Error as NatsClientError
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError

from actors import (
    H_HEARTBEAT,
    H_NOT_OWNER,
    Actor,
    Delivery,
    WorkQueue,
    cancel_and_wait,
    encode,
    encode_json,
    unpack,
)
from budget_actor import KillNotice, KillNotices, kill_notices
from bus import Bus, check_token, pid_alive
from nerve import (
    CodecError,
    ConfigError,
    LeaseLostError,
    NerveError,
    TaskRejected,
)
from persistence import (
    CancelMessage,
    Event,
    GroupCommit,
    PauseMessage,
    RunHistory,
    RunStarted,
    TaskRequest,
)
from supervisor import Lease, lease_entries, watch_leases
from workflow._definition import ActivityRegistry, WorkflowRegistry, workflows
from workflow._definition import activities as default_activities
from workflow._driver import RunDriver, _Inbox, _Reconnected
from workflow._fork import fork_history
from workflow._policy import RetryPolicy

log = logging.getLogger("nerve.workflow.orchestrator")

REJECTED_TENANT = "rejected"
# The longest wait before a run whose driver keeps crashing is taken up again.
CRASH_BACKOFF_MAX = 300.0


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Who owns an active run."""

    owner: str
    epoch: int
    tenant: str
    replay_from: int = 0  # stream seq of the current segment's first record (continue-as-new)

    def encode(self) -> bytes:
        """The record as stored in the leases bucket (msgpack)."""
        return msgpack.packb({"owner": self.owner, "epoch": self.epoch, "tenant": self.tenant,
                              "replay_from": self.replay_from})

    @classmethod
    def decode(cls, raw: bytes) -> RunRecord:
        """The record :meth:`encode` wrote."""
        d = msgpack.unpackb(raw)
        return cls(d["owner"], int(d["epoch"]), d.get("tenant", ""),
                   int(d.get("replay_from", 0)))


class _TaskIntake(Actor[Msg]):
    """Consumes ``NERVE_TASKS`` (JSON or msgpack, decoded by the orchestrator)."""

    message_type = Msg
    concurrency = 256

    def __init__(self, orchestrator: Orchestrator) -> None:
        super().__init__("task-intake")
        self.orch = orchestrator

    def mailbox(self) -> WorkQueue:
        names = self.orch.bus.names
        return WorkQueue(stream=names.tasks_stream, subjects=[names.tasks("*")],
                         durable="orchestrator-tasks", ack_wait=30, max_deliver=10)

    async def handle(self, message: Msg, delivery: Delivery) -> None:
        # A rejected task is answered on nerve.tasks.rejected and acked: retrying it cannot
        # help, and it is not lost. Transient failures raise and are retried with backoff.
        with contextlib.suppress(TaskRejected):
            await self.orch.accept_task(message)


class Orchestrator:
    """Runs workflows: accepts tasks, drives owned runs, takes over the runs of dead peers."""

    def __init__(self, bus: Bus, owner_id: str, *, registry: WorkflowRegistry | None = None,
                 host_ttl: float = 2.0, policies: dict[str, RetryPolicy] | None = None,
                 sandbox_meta: dict[str, Any] | None = None, spawn_guard: Any = None,
                 accept_tasks: bool = True, kill_switch: bool = True,
                 activities: ActivityRegistry | None = None,
                 atomic_batch_from: int = GroupCommit.ATOMIC_FROM) -> None:
        check_token("orchestrator id", owner_id)
        self.bus = bus
        self.owner_id = owner_id
        self.registry = registry or workflows
        self.activities = activities or default_activities  # for local activities
        self.policies = policies or {}
        self.sandbox_meta = sandbox_meta or {}
        self.spawn_guard = spawn_guard  # budget: check_spawn(tenant) before a run starts
        self.accept_tasks = accept_tasks  # False: only drive runs taken over from peers
        self.kill_switch = kill_switch  # act on nerve.ctl.tenant.<t>.kill notices
        # Where the holder runs: a second orchestrator started under the same id on this host
        # (two `nerve worker --role orchestrator` without --id) is refused instead of both
        # "holding" one lease and taking each other's runs.
        self.host_lease = Lease(bus, bus.names.host_lease(owner_id), owner_id, ttl=host_ttl,
                                data={"host": socket.gethostname(), "pid": os.getpid()})
        self.drivers: dict[str, RunDriver] = {}
        self._driver_tasks: dict[str, asyncio.Task[None]] = {}
        self._intake = _TaskIntake(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._claim_lock = asyncio.Lock()
        # Runs we own whose driver stopped without ending them (blocked, missing): not
        # claimed again by our own sweeps until this process restarts.
        self._parked: set[str] = set()
        # Runs whose driver crashed (a bug in nerve, not in the workflow): crashes in a row
        # and when to take the run up again. Backing off keeps a run that crashes its driver
        # every time from growing its history by an OwnerChanged every sweep, forever.
        self._crashed: dict[str, tuple[int, float]] = {}
        self.sweep_every = max(5.0, 3 * host_ttl)
        self._kill_notices: KillNotices | None = None
        self._subs: list[Any] = []
        # Every run this orchestrator writes shares its fsyncs (see GroupCommit): one group
        # for the histories, one for the run records.
        self.group_commit = GroupCommit(bus, atomic=False, atomic_from=atomic_batch_from)
        self._records = GroupCommit(bus, atomic=False, atomic_from=atomic_batch_from)
        self.ready = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Supervisor child: start, serve until cancelled, stop."""
        await self.start()
        if ready is not None:
            ready.set()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            await self.stop()

    async def start(self) -> None:
        """Provision, take this host's lease, and start taking tasks and orphaned runs."""
        # One subscription each for all our runs' results and inboxes, routed by run id:
        # starting a run costs no subscription.
        self._subs = [
            await self.bus.raw_subscribe(self.bus.names.results(self.owner_id, "*"),
                                         self._on_result),
            await self.bus.raw_subscribe(self.bus.names.inbox("*"), self._on_inbox),
        ]
        self.group_commit.atomic = await self._atomic_batches(self.bus.names.runs_stream)
        self._records.atomic = await self._atomic_batches(
            f"KV_{self.bus.names.leases_bucket}")
        await self._refuse_a_twin()
        await self.host_lease.wait_acquire(poll=0.2, timeout=max(10.0, 3 * self.host_lease.ttl))
        self.host_lease.keep_alive(on_lost=self._on_lease_lost)
        self._spawn(self._watch())
        self._spawn(self._sweep())
        if self.kill_switch:
            self._kill_notices = kill_notices(self.bus)
            await self._kill_notices.open()
            self._spawn(self._follow_kills())
        if self.accept_tasks:
            await self._intake.start(self.bus)
        self.bus.on_reconnect(self._on_reconnect)
        await self.ready.wait()
        log.info("orchestrator %s ready", self.owner_id)

    async def _refuse_a_twin(self) -> None:
        """ConfigError if a live process on this host already holds our id's lease."""
        current = await self.host_lease.current()
        if current is None or current[0].holder != self.owner_id:
            return
        other = current[0].data
        pid = other.get("pid")
        # A dead one may be our predecessor (we are its restart): the lease is ours to take.
        if other.get("host") != socket.gethostname() or pid == os.getpid() \
                or not pid_alive(pid):
            return
        raise ConfigError(f"orchestrator id {self.owner_id} is in use by pid {pid} on this "
                          "host; give this one another id (nerve worker --id ...)",
                          owner=self.owner_id, pid=pid)

    async def _atomic_batches(self, stream: str) -> bool:
        """Whether ``stream`` takes atomic batches (nats-server 2.12+, provisioned so)."""
        try:
            info = await self.bus.js.stream_info(stream)
        except (NatsClientError, TimeoutError) as exc:
            log.warning("orchestrator %s: cannot read the config of stream %s (%r); storing "
                        "writes to it one by one", self.owner_id, stream, exc)
            return False
        if not info.config.allow_atomic:
            log.warning("orchestrator %s: stream %s does not allow atomic batches (nats-server "
                        "older than 2.12?); every write to it costs its own fsync",
                        self.owner_id, stream)
        return bool(info.config.allow_atomic)

    def _on_result(self, subject: bytes, reply: bytes, headers: bytes | None, data: bytes,
                   ) -> None:
        driver = self.drivers.get(subject.rpartition(b".")[2].decode())
        if driver is not None:
            driver.on_result(reply, headers, data)
        elif reply and not (headers and H_HEARTBEAT.encode() in headers):
            # Not ours (any more): tell the worker now, so it stores the result on the
            # run's durable inbox instead of waiting out its reply timeout.
            self._spawn(self._not_owner(reply.decode()))

    async def _not_owner(self, reply: str) -> None:
        with contextlib.suppress(NatsClientError):
            await self.bus.nc.publish(reply, b"", headers={H_NOT_OWNER: self.owner_id})

    def _on_inbox(self, subject: bytes, _reply: bytes, _headers: bytes | None, data: bytes,
                  ) -> None:
        # <prefix>.runs.<run_id>.inbox
        driver = self.drivers.get(subject.rsplit(b".", 2)[1].decode())
        if driver is not None:
            driver.on_inbox(data)

    async def _on_reconnect(self) -> None:
        # The server may have restarted and lost queued work (NERVE_WORK is in memory):
        # every driver re-reads its inbox and re-dispatches what is still open.
        for driver in list(self.drivers.values()):
            driver.put(_Reconnected())

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop driving runs and release the host lease, so peers take the runs over at once."""
        self._stopping = True
        await self._intake.stop()
        if self._kill_notices is not None:
            await self._kill_notices.close()
        stuck = await cancel_and_wait([*self._driver_tasks.values(), *self._tasks], timeout)
        if stuck:
            log.error("orchestrator %s: %d tasks still running %.0fs after being cancelled",
                      self.owner_id, len(stuck), timeout)
        for sub in self._subs:
            await self.bus.raw_unsubscribe(sub)
        self._subs.clear()
        await self.group_commit.close()
        await self._records.close()
        # Release the host lease so peers take our runs now rather than after the TTL.
        with contextlib.suppress(NatsClientError, TimeoutError):
            await asyncio.wait_for(self.host_lease.release(), timeout)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_lease_lost(self, exc: LeaseLostError) -> None:
        # Our clock says our lease may have lapsed: peers may be taking our runs. Stop
        # driving them (their histories are fenced anyway), then come back as a new holder.
        log.error("orchestrator %s lost its host lease: %s", self.owner_id, exc.message)
        await cancel_and_wait(list(self._driver_tasks.values()))
        while not self._stopping:
            try:
                await self.host_lease.wait_acquire(poll=0.2)
                self.host_lease.keep_alive(on_lost=self._on_lease_lost)
                await self._claim_orphans()
                return
            except (NatsClientError, TimeoutError, NerveError) as err:
                log.warning("orchestrator %s: cannot re-acquire its lease yet (%r)",
                            self.owner_id, err)
                await asyncio.sleep(1.0)

    # -- ownership ------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Follow host leases; when one goes away, claim that host's runs."""
        while True:
            initial = asyncio.Event()
            try:
                async for change in watch_leases(self.bus, "host.*", initial_done=initial):
                    if initial.is_set() and not self.ready.is_set():
                        self.ready.set()
                        self._spawn(self._claim_orphans())
                    if change is not None and change.record is None:
                        self._spawn(self._claim_orphans())
            except (NatsClientError, TimeoutError, NerveError) as exc:
                log.warning("orchestrator %s: lease watch failed (%r); watching again",
                            self.owner_id, exc)
                await asyncio.sleep(0.5)

    async def _sweep(self) -> None:
        """A safety net under the watch: look for orphaned runs every few host TTLs."""
        while True:
            await asyncio.sleep(self.sweep_every)
            try:
                await self._claim_orphans()
            except (NatsClientError, TimeoutError, NerveError) as exc:
                log.warning("orchestrator %s: orphan sweep failed (%r)", self.owner_id, exc)

    async def _raw_record(self, key: str) -> tuple[RunRecord, int] | None:
        kv = await self.bus.kv(self.bus.names.leases_bucket)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return RunRecord.decode(entry.value), entry.revision or 0

    async def _claim_orphans(self) -> None:
        """Claim every active run whose owner is us (restarted) or not alive."""
        # One sweep at a time: two overlapping sweeps would both see a run we just claimed
        # as "ours" and claim it again from ourselves.
        async with self._claim_lock:
            # Runs first, hosts second: an owner writes its host key before it claims
            # anything, so an owner named in a run record we read is in the host list read
            # after it unless it is really gone. The other order can see a peer's fresh
            # claim but not its fresh host key, and claim the run back from a live owner.
            runs = await lease_entries(self.bus, "run.*")
            hosts = {key.partition(".")[2]
                     for key in await lease_entries(self.bus, "host.*")}
            for key, (value, revision) in runs.items():
                run_id = key.partition(".")[2]
                if run_id in self.drivers or run_id in self._parked:
                    continue
                if run_id in self._crashed and time.monotonic() < self._crashed[run_id][1]:
                    continue
                record = RunRecord.decode(value)
                if record.owner == self.owner_id or record.owner not in hosts:
                    await self._claim(run_id, record, revision)

    async def _claim(self, run_id: str, record: RunRecord, revision: int) -> bool:
        kv = await self.bus.kv(self.bus.names.leases_bucket)
        new = RunRecord(self.owner_id, record.epoch + 1, record.tenant, record.replay_from)
        try:
            await kv.update(self.bus.names.run_lease(run_id), new.encode(), last=revision)
        except (KeyWrongLastSequenceError, APIError):
            return False  # a peer claimed it first
        log.info("orchestrator %s took over run %s from %s (epoch %d)", self.owner_id, run_id,
                 record.owner, new.epoch)
        self._start_driver(run_id, new.epoch, takeover=True, replay_from=new.replay_from,
                           previous=record.owner)
        return True

    async def mark_segment(self, run_id: str, seq: int) -> None:
        """Remember where the run's current segment starts, so a takeover replays from there.

        Best effort: if it is lost, the next owner replays from an older segment start and
        still ends in the same state.
        """
        key = self.bus.names.run_lease(run_id)
        for _ in range(3):
            found = await self._raw_record(key)
            if found is None or found[0].owner != self.owner_id:
                return
            record, revision = found
            kv = await self.bus.kv(self.bus.names.leases_bucket)
            try:
                await kv.update(key, RunRecord(record.owner, record.epoch, record.tenant,
                                               seq).encode(), last=revision)
                return
            except (KeyWrongLastSequenceError, APIError):
                continue

    async def release_run(self, run_id: str) -> None:
        """The run ended: drop its record so nobody tries to take it over."""
        with contextlib.suppress(APIError, NatsClientError, TimeoutError):
            await self._records.append(self._record_subject(run_id), b"",
                                       {"KV-Operation": "DEL"})

    def _start_driver(self, run_id: str, epoch: int, takeover: bool,
                      replay_from: int = 0, created: RunHistory | None = None,
                      previous: str | None = None) -> RunDriver:
        return self._run_driver(RunDriver(self, run_id, epoch, takeover, replay_from, created,
                                          previous))

    def _run_driver(self, driver: RunDriver) -> RunDriver:
        run_id = driver.run_id
        self.drivers[run_id] = driver
        task = asyncio.create_task(driver.run(), name=f"run:{run_id}")
        self._driver_tasks[run_id] = task

        def done(t: asyncio.Task[None]) -> None:
            self.drivers.pop(run_id, None)
            self._driver_tasks.pop(run_id, None)
            if driver.status in ("blocked", "missing"):
                self._parked.add(run_id)
            if t.cancelled() or t.exception() is None:
                self._crashed.pop(run_id, None)
                return
            crashes = self._crashed.get(run_id, (0, 0.0))[0] + 1
            delay = min(CRASH_BACKOFF_MAX, self.sweep_every * 2 ** (crashes - 1))
            self._crashed[run_id] = (crashes, time.monotonic() + delay)
            log.error("run %s driver crashed (%d in a row; taking the run up again in %.1f s): "
                      "%r", run_id, crashes, delay, t.exception(), exc_info=t.exception())

        task.add_done_callback(done)
        return driver

    # -- tasks ----------------------------------------------------------------------------------
    async def accept_task(self, msg: Msg) -> str | None:
        """Start a run for a task message (idempotently). Returns the run id."""
        tenant = msg.subject.rsplit(".", 1)[-1]
        if tenant == REJECTED_TENANT:
            # Our own rejection notices, captured by the work queue; anything else here is a
            # task sent to a tenant that cannot exist.
            if b'"reason"' not in msg.data:
                log.warning("a message on %s is not a rejection notice: tenant %r is reserved "
                            "for them; send tasks to another tenant", msg.subject,
                            REJECTED_TENANT)
            return None
        try:
            check_token("tenant", tenant)
            raw = unpack(msg.data, (msg.headers or {}).get("Content-Type"))
            if isinstance(raw, str):
                raw = {"task": raw}
            request = TaskRequest.model_validate(raw)
            if request.task is None and request.input is None and request.fork is None:
                raise TaskRejected("a task needs \"task\" (text), \"input\" (an object) or "
                                   "\"fork\"")
        except (CodecError, ConfigError, TaskRejected) as exc:
            await self.reject(msg, exc.message)
            raise TaskRejected(exc.message) from None
        except ValueError as exc:  # pydantic's ValidationError
            reason = _validation_reason(exc)
            await self.reject(msg, reason)
            raise TaskRejected(reason) from None
        run_id = request.run_id or self._run_id_for(tenant, msg)
        if request.fork is not None:
            try:
                if self.spawn_guard is not None:
                    await self.spawn_guard.check_spawn(tenant)
                first = await fork_history(self.bus, request.fork, tenant, run_id,
                                           (msg.headers or {}).get("Nats-Msg-Id"))
                await self.start_run(first[0], prefix=first[1:])
            except NerveError as exc:
                if exc.retryable:
                    raise
                await self.reject(msg, exc.message, run_id=run_id)
                raise TaskRejected(exc.message) from None
            return run_id
        try:
            definition = self.registry.get(request.workflow, request.version)
            workflow_input = request.input if request.input is not None else {}
            if request.task is not None:
                workflow_input = {**workflow_input, "task": request.task}
            for key in ("tools", "model", "max_turns"):
                if getattr(request, key) is not None:
                    workflow_input[key] = getattr(request, key)
            definition.parse_input(workflow_input)
            if self.spawn_guard is not None:
                await self.spawn_guard.check_spawn(tenant)
        except NerveError as exc:
            if exc.retryable:
                raise
            await self.reject(msg, exc.message, run_id=run_id)
            raise TaskRejected(exc.message) from None
        started = RunStarted(run_id=run_id, tenant=tenant, workflow=definition.name,
                             version=definition.version, input=workflow_input,
                             task_id=(msg.headers or {}).get("Nats-Msg-Id"),
                             labels=request.labels)
        try:
            await self.start_run(started)
        except TaskRejected as exc:
            await self.reject(msg, exc.message, run_id=run_id)
            raise
        return run_id

    async def start_run(self, started: RunStarted, prefix: list[Event] | None = None) -> None:
        """Write the run's first record (idempotent by run id) and take ownership of it.

        ``prefix``: events copied from a parent run after ``RunStarted`` (a fork).
        """
        history = RunHistory(self.bus, started.run_id, commit=self.group_commit)
        driver = first = None
        if not prefix:
            # The first record also schedules the run's first steps: one append per run.
            driver = RunDriver(self, started.run_id, 1, takeover=False, created=history)
            first = driver.begin(started)
        created = await history.create(started, *(prefix or first or []))
        if not created:
            events = await history.read()
            if events and isinstance(events[0], RunStarted) and \
                    events[0].tenant != started.tenant:
                # Idempotency is per run id: another tenant's id is not a duplicate to drop
                # in silence (nor a run to show it).
                raise TaskRejected(f"run id {started.run_id} is taken; choose another",
                                   run_id=started.run_id)
            if events and events[-1].type in ("run_completed", "run_failed", "run_cancelled"):
                return  # a duplicate of a finished run
        if not await self._create_record(started.run_id,
                                         RunRecord(self.owner_id, 1, started.tenant)):
            return  # someone owns it already (a duplicate delivery of the same task)
        if created:
            log.info("run %s started (%s %s, tenant %s)", started.run_id, started.workflow,
                     started.version, started.tenant)
        if created and first is not None and driver is not None:
            self._run_driver(driver)
        else:
            self._start_driver(started.run_id, 1, takeover=not created,
                               created=history if created else None)

    def _record_subject(self, run_id: str) -> str:
        return f"$KV.{self.bus.names.leases_bucket}.{self.bus.names.run_lease(run_id)}"

    async def _create_record(self, run_id: str, record: RunRecord) -> bool:
        """Create the run's record (grouped with other runs'); False if it exists."""
        try:
            await self._records.append(self._record_subject(run_id), record.encode(),
                                       {"Nats-Expected-Last-Subject-Sequence": "0"})
            return True
        except APIError:
            pass
        # The key has a revision: a live record (someone owns the run), or the delete
        # marker of an ended one, which nats-py's create knows to write over.
        kv = await self.bus.kv(self.bus.names.leases_bucket)
        try:
            await kv.create(self.bus.names.run_lease(run_id), record.encode())
        except (KeyWrongLastSequenceError, APIError):
            return False
        return True

    @staticmethod
    def _run_id_for(tenant: str, msg: Msg) -> str:
        """Stable per task message: a redelivery or a re-publish with the same
        ``Nats-Msg-Id`` maps to the same run id, so it never starts two runs."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        if msg_id:
            basis = f"{tenant}\x00id\x00{msg_id}"
        else:
            meta = msg.metadata
            basis = f"{tenant}\x00seq\x00{meta.sequence.stream}\x00{meta.timestamp}"
        return "r" + hashlib.sha256(basis.encode()).hexdigest()[:20]

    async def reject(self, msg: Msg, reason: str, run_id: str | None = None) -> None:
        """Tell whoever listens (``nats sub nerve.tasks.rejected``) why a task was refused."""
        notice = {"reason": reason, "subject": msg.subject, "run_id": run_id,
                  "task": (msg.data or b"")[:2048].decode("utf-8", "replace"), "at": time.time()}
        log.warning("task on %s rejected: %s", msg.subject, reason)
        names = self.bus.names
        with contextlib.suppress(NatsClientError, asyncio.TimeoutError):
            await self.bus.nc.publish(names.tasks_rejected, encode_json(notice),
                                      headers={"Content-Type": "application/json"})
            await self.bus.js.publish(names.event("tasks.rejected"), encode(notice))

    # -- operations on owned runs ---------------------------------------------------------------
    def runs_of(self, tenant: str) -> list[str]:
        """The runs of ``tenant`` this orchestrator drives now."""
        return [rid for rid, d in self.drivers.items() if d.tenant == tenant]

    async def _follow_kills(self) -> None:
        """A killed tenant's runs stop here at once: cancelled, or paused for a human."""
        assert self._kill_notices is not None
        async for notice in self._kill_notices:
            if not isinstance(notice, KillNotice):
                continue
            message: CancelMessage | PauseMessage
            reason = f"tenant {notice.tenant} killed: {notice.reason}"
            if notice.policy == "pause":
                message = PauseMessage(reason=reason, by=notice.by or "budget")
            else:
                message = CancelMessage(reason=reason, by=notice.by or "budget")
            runs = self.runs_of(notice.tenant)
            for run_id in runs:
                driver = self.drivers.get(run_id)
                if driver is not None:
                    driver.put(_Inbox(message))
            log.warning("orchestrator %s: %s -> %s %d run(s)", self.owner_id, reason,
                        "pausing" if notice.policy == "pause" else "cancelling", len(runs))


def _validation_reason(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "task"
        return f"invalid task: {where}: {first['msg']}"
    return f"invalid task: {exc}"
