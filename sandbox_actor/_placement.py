"""``Placement``: puts every sandbox that has work on a live sandbox host.

Nobody asks for a sandbox to be created. The placement actor notices work for a sandbox
that has no live owner and assigns it to a host:

* a core subscription on ``nerve.work.sandbox.*`` sees every step as it is published
  (JetStream publishes are ordinary NATS messages too), so a new sandbox is placed at once;
* a reconcile loop (every ``reconcile_every`` seconds, and at once when a host's lease
  disappears) asks the work stream which sandbox subjects hold messages and checks each
  one, so work published while placement was down, or held by a host that died, is found;
* host liveness comes from the ``host.*`` leases (only those whose data says
  ``role: sandbox``); a sandbox whose host's lease expired is moved to a live host
  (``generation`` + 1, ``prev_host`` = the dead one) even when it has no pending step,
  so it is back before it is needed.

Assignments are compare-and-set writes, so any number of placement actors can run: the
first write wins and the others see the sandbox owned.

A sandbox whose run has ended is never placed (nor moved off a dead host): it is marked
``destroyed`` and the steps left for it are dropped (:mod:`sandbox_actor._ended`). A
sandbox that waits because every live host is full is reported, with each host's load and
capacity, in this actor's log (again every minute while it waits) and once on its run's
live stream (a ``progress`` event with ``waiting``), where ``nerve run --follow`` and SSE
clients see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from nats.errors import Error as NatsClientError
from nats.js.errors import APIError, NotFoundError

from actors import WorkItem, cancel_and_wait, decode, encode
from bus import Bus
from persistence import StreamEvent
from sandbox_actor._ended import clear_work, run_ended
from sandbox_actor._records import Assignments, SandboxAssignment, parse_key
from sandbox_actor._snapshots import WorkspaceStore
from sandbox_actor._types import SandboxSpec
from supervisor import watch_leases

log = logging.getLogger("nerve.sandbox.placement")

# While a sandbox waits for room, the warning is repeated (and its run's end re-checked)
# this often.
WAITING_REPORT_EVERY = 60.0


@dataclass(slots=True)
class HostView:
    host_id: str
    capacity: int
    running: int
    backend: str
    seen_at: float = field(default_factory=time.time)


class Placement:
    """The placement actor (see the module docstring)."""

    def __init__(self, bus: Bus, *, reconcile_every: float = 2.0) -> None:
        self.bus = bus
        self.assignments = Assignments(bus)
        self.reconcile_every = reconcile_every
        self.hosts: dict[str, HostView] = {}
        self.index: dict[str, SandboxAssignment] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub = None
        self.placed = 0
        self.waiting: dict[str, tuple[float, float]] = {}  # sid -> (since, last reported)
        # Hosts chosen for sandboxes whose assignment is being written: counted as load, so
        # placements running side by side do not all take the same last free slot.
        self._choosing: dict[str, str] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._watch_hosts(ready), name="placement:hosts"),
            asyncio.create_task(self._watch_assignments(), name="placement:index"),
            asyncio.create_task(self._reconcile_loop(), name="placement:reconcile"),
        ]
        self._sub = await self.bus.nc.subscribe(self.bus.names.work_sandbox("*"),
                                                cb=self._on_work)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await ready.wait()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsClientError):
                await self._sub.unsubscribe()
            self._sub = None
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def run(self) -> None:
        """Run until cancelled (a supervisor child)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # -- views ----------------------------------------------------------------------------
    async def _watch_hosts(self, ready: asyncio.Event) -> None:
        # Initial values first; the snapshot is complete once the watcher catches up.
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, ready.set)
        async for change in watch_leases(self.bus, "host.*"):
            host_id = change.key[len("host."):]
            data = change.record.data if change.record else {}
            if change.record is not None and data.get("role") == "sandbox":
                self.hosts[host_id] = HostView(host_id, int(data.get("capacity", 32)),
                                               int(data.get("running", 0)),
                                               str(data.get("backend", "?")))
            elif host_id in self.hosts:
                del self.hosts[host_id]
                log.warning("placement: sandbox host %s is gone (lease expired or "
                            "released)", host_id)
                self._poke.set()  # re-place its sandboxes now

    async def _watch_assignments(self) -> None:
        kv = await self.bus.kv(self.bus.names.leases_bucket)
        watcher = await kv.watch("sandbox.*")
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                sid = parse_key(entry.key)
                if sid is None:
                    continue
                if entry.operation is None and entry.value:
                    with contextlib.suppress(KeyError, ValueError):
                        self.index[sid] = SandboxAssignment.decode(entry.value)
                else:
                    self.index.pop(sid, None)
                record = self.index.get(sid)
                if self.waiting and (record is None or record.state == "destroyed"):
                    self._poke.set()  # a slot came free: place what waits for one now
        finally:
            with contextlib.suppress(NatsClientError):
                await watcher.stop()

    def owner_alive(self, record: SandboxAssignment | None) -> bool:
        return (record is not None and record.state in ("assigned", "running")
                and record.host in self.hosts)

    # -- triggers -------------------------------------------------------------------------
    async def _on_work(self, msg) -> None:
        sid = msg.subject.rsplit(".", 1)[-1]
        if self.owner_alive(self.index.get(sid)):
            return
        hint = None
        with contextlib.suppress(Exception):  # a malformed item is the worker's problem
            hint = decode(msg.data, WorkItem)
        task = asyncio.create_task(self.ensure_placed(sid, hint), name=f"place:{sid}")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.reconcile_every):
                    await self._poke.wait()
            self._poke.clear()
            try:
                await self.reconcile()
            except (NatsClientError, TimeoutError, APIError) as exc:
                log.warning("placement reconcile failed: %r", exc)

    async def pending_sandboxes(self) -> set[str]:
        """Sandbox ids with steps waiting in the work stream."""
        names = self.bus.names
        try:
            info = await self.bus.js.stream_info(names.work_stream,
                                                 subjects_filter=names.work_sandbox("*"))
        except NotFoundError:
            return set()
        subjects = info.state.subjects or {}
        return {s.rsplit(".", 1)[-1] for s, n in subjects.items() if n}

    async def reconcile(self) -> None:
        wanted = await self.pending_sandboxes()
        wanted |= {sid for sid, rec in self.index.items()
                   if rec.state in ("assigned", "running") and rec.host not in self.hosts}
        for sid in set(self.waiting) - wanted:
            del self.waiting[sid]  # placed by another placement actor, or its work is gone
        for sid in sorted(wanted):
            if not self.owner_alive(self.index.get(sid)):
                await self.ensure_placed(sid, None)

    # -- placing --------------------------------------------------------------------------
    def _load(self) -> dict[str, int]:
        load: dict[str, int] = dict.fromkeys(self.hosts, 0)
        for rec in self.index.values():
            if rec.host in load and rec.state in ("assigned", "running"):
                load[rec.host] += 1
        for sid, host in self._choosing.items():
            rec = self.index.get(sid)
            # The watch may have indexed the assignment being written already: count it once.
            if host in load and not (rec is not None and rec.host == host
                                     and rec.state in ("assigned", "running")):
                load[host] += 1
        return load

    def _choose(self) -> str | None:
        load = self._load()
        free = [h for h in self.hosts.values() if load[h.host_id] < h.capacity]
        if not free:
            return None
        return min(free, key=lambda h: (load[h.host_id] / max(h.capacity, 1),
                                        h.host_id)).host_id

    async def _first_item(self, sid: str) -> WorkItem | None:
        names = self.bus.names
        try:
            raw = await self.bus.js.get_msg(names.work_stream, seq=1,
                                            subject=names.work_sandbox(sid), next=True)
        except (NotFoundError, APIError):
            return None
        with contextlib.suppress(Exception):
            return decode(raw.data or b"", WorkItem)
        return None

    async def _fork_origin(self, fork_of: dict) -> str | None:
        """The snapshot a forked run's sandbox starts from: the parent sandbox's snapshot
        after its last sandbox step at or before the fork point (the workflow side sends
        ``fork_of = {"sandbox_id", "step_index"}``)."""
        parent, index = fork_of.get("sandbox_id"), fork_of.get("step_index")
        if not parent or index is None:
            return None
        ref = await WorkspaceStore(self.bus).at_step(str(parent), int(index))
        return ref.name if ref else None

    async def ensure_placed(self, sid: str, hint: WorkItem | None) -> SandboxAssignment | None:
        """Make sure ``sid`` is assigned to a live host; return its assignment."""
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            found = await self.assignments.get(sid)
            current, revision = found if found else (None, None)
            if current is not None:
                self.index[sid] = current
            if self.owner_alive(current):
                self.waiting.pop(sid, None)
                return current
            host = self._choose()
            if host is None:
                await self._no_room(sid, current, revision, hint)
                return None
            self._choosing[sid] = host
            try:
                return await self._place(sid, host, current, revision, hint)
            finally:
                del self._choosing[sid]

    async def _place(self, sid: str, host: str, current: SandboxAssignment | None,
                     revision: int | None, hint: WorkItem | None) -> SandboxAssignment | None:
        """Write ``sid``'s assignment to ``host`` (unless its run ended); None if not."""
        item = None
        if current is None:
            item = hint or await self._first_item(sid)
            if item is None:
                return None
        # Never start (or move off a dead host) the sandbox of a run that has ended.
        if await self._ended(sid, current, revision, item):
            return None
        if current is not None:
            lost = current.state in ("assigned", "running") and current.host is not None
            record = current.model_copy(update={
                "host": host, "generation": current.generation + 1, "state": "assigned",
                "prev_host": current.host if lost else None,
                "reason": f"host {current.host} lease expired" if lost else "new work"})
        else:
            assert item is not None
            meta = item.meta.get("sandbox") if isinstance(item.meta, dict) else None
            spec = SandboxSpec.model_validate(meta or {}).model_copy(update={
                "sandbox_id": sid, "run_id": item.run_id,
                "tenant": (meta or {}).get("tenant") or item.tenant})
            fork_of = (meta or {}).get("fork_of")
            if spec.from_snapshot is None and isinstance(fork_of, dict):
                spec.from_snapshot = await self._fork_origin(fork_of)
            record = SandboxAssignment(sandbox_id=sid, run_id=item.run_id,
                                       tenant=spec.tenant, inbox=item.reply_to,
                                       spec=spec, host=host, generation=1,
                                       state="assigned")
        if await self.assignments.put(record, revision) is None:
            return None  # someone else placed it first
        self.index[sid] = record
        self.placed += 1
        since = self.waiting.pop(sid, None)
        log.info("placement: sandbox %s -> host %s (generation %d%s%s)", sid, host,
                 record.generation,
                 f", moved off {record.prev_host}" if record.prev_host else "",
                 f", after waiting {time.time() - since[0]:.1f}s for room" if since
                 else "")
        return record

    async def _ended(self, sid: str, current: SandboxAssignment | None, revision: int | None,
                     item: WorkItem | None = None) -> bool:
        """If the sandbox's run has ended: mark it destroyed, drop its queued steps; True."""
        run_id = (current.run_id if current else None) or (item.run_id if item else None) \
            or sid
        ended = await run_ended(self.bus, run_id)
        if ended is None:
            return False
        self.waiting.pop(sid, None)
        if current is not None and current.state != "destroyed":
            done = current.model_copy(update={
                "state": "destroyed", "reason": f"run {run_id} {ended.removeprefix('run_')}"})
            if await self.assignments.put(done, revision) is not None:
                self.index[sid] = done
        await clear_work(self.bus, sid)
        log.info("placement: not placing sandbox %s: its run %s has ended (%s)", sid, run_id,
                 ended)
        return True

    def no_room_reason(self) -> str:
        """Why nothing can be placed now, naming every host's load and capacity."""
        if not self.hosts:
            return ("no live sandbox host (none holds a host lease with role sandbox); start "
                    "one (nerve worker --role sandbox)")
        load = self._load()
        hosts = ", ".join(f"{h.host_id} {load[h.host_id]}/{h.capacity}"
                          for h in sorted(self.hosts.values(), key=lambda h: h.host_id))
        return (f"every live sandbox host is at capacity ({hosts} sandboxes); it waits "
                f"for a run to end (its sandbox is destroyed then) or for more room "
                f"(raise sandbox.capacity, or add sandbox hosts)")

    async def _no_room(self, sid: str, current: SandboxAssignment | None,
                       revision: int | None, hint: WorkItem | None) -> None:
        now = time.time()
        since, reported = self.waiting.get(sid, (now, 0.0))
        if now - reported < WAITING_REPORT_EVERY:
            return
        item = hint if current is None else None
        if current is None and item is None:
            item = await self._first_item(sid)
        if await self._ended(sid, current, revision, item):
            return
        self.waiting[sid] = (since, now)
        reason = self.no_room_reason()
        log.warning("placement: sandbox %s cannot be placed%s: %s", sid,
                    f" (waiting {now - since:.0f}s)" if reported else "", reason)
        run_id = (current.run_id if current else None) or (item.run_id if item else None)
        if reported or not run_id:
            return
        event = StreamEvent(type="progress", run_id=run_id,
                            data={"sandbox_id": sid, "waiting": f"sandbox {sid} is not "
                                  f"running yet: {reason}"})
        try:
            await self.bus.js.publish(self.bus.names.stream(run_id), encode(event))
        except (NatsClientError, TimeoutError) as exc:
            log.debug("could not tell run %s its sandbox waits: %r", run_id, exc)
