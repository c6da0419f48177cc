"""``NerveClient``: submit tasks, signal, cancel, and read runs, from any process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.errors import Error as NatsClientError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError
from pydantic import BaseModel, ValidationError

from actors import decode, encode, encode_json, new_id
from bus import Bus, check_token
from nerve import (
    BusError,
    CodecError,
    ConfigError,
    Conflict,
    RunNotFound,
    TaskRejected,
    WorkflowError,
)
from persistence import (
    TERMINAL_TYPES,
    CancelMessage,
    Event,
    ForkSpec,
    PauseMessage,
    ResumeMessage,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunHistory,
    RunPaused,
    RunResumed,
    RunStarted,
    SignalMessage,
    SignalReceived,
    SignalTimedOut,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StreamEvent,
    TaskRequest,
    WaitAbandoned,
)

M = TypeVar("M", bound=BaseModel)

# The statuses of a run that has ended: nothing more happens to it.
ENDED_STATUSES = ("completed", "failed", "cancelled")


@dataclass(slots=True)
class RunSummary:
    """A run's state as its history tells it."""

    run_id: str
    tenant: str
    workflow: str
    version: str
    status: str  # running | waiting | paused | blocked | completed | failed | cancelled
    started_at: float
    ended_at: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    steps: int = 0
    events: int = 0
    waiting_for: list[str] = field(default_factory=list)
    # The approvals the run waits for: {"index", "name", "digest"} (the digest of the tool
    # call each one decides, which a signal must name in ``approves``).
    approvals: list[dict[str, Any]] = field(default_factory=list)
    blocked: dict[str, Any] | None = None
    segments: int = 1
    # Signal names whose last wait timed out, with no wait of that name open since: such a
    # signal is recorded as late and changes nothing.
    late_for: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """True once the run has ended (completed, failed or cancelled)."""
        return self.status in ENDED_STATUSES

    def is_approval(self, name: str, approves: str | None) -> bool:
        """Whether a signal must be checked as a tool-call approval (``{"approved": ...}``
        naming a pending digest): it names a digest, or it is called ``approval`` and no
        open wait takes it as a plain signal. The agent's approvals are bound to a tool
        call; a workflow's own ``ctx.wait_signal("approval")`` is not."""
        if approves:
            return True
        if name != "approval":
            return False
        return name not in self.waiting_for or any(a["name"] == name for a in self.approvals)


def summarize(events: list[Event]) -> RunSummary:
    """Fold a history into a :class:`RunSummary`."""
    if not events or not isinstance(events[0], RunStarted):
        raise RunNotFound("no such run")
    first = events[0]
    s = RunSummary(first.run_id, first.tenant, first.workflow, first.version, "running",
                   first.at, events=len(events))
    waits: dict[int, str] = {}
    approves: dict[int, str] = {}
    late: set[str] = set()
    for ev in events[1:]:
        if isinstance(ev, StepScheduled):
            s.steps += 1
            if ev.kind == "signal":
                waits[ev.index] = ev.name
                if isinstance(ev.args, dict) and ev.args.get("approves"):
                    approves[ev.index] = str(ev.args["approves"])
        elif isinstance(ev, SignalReceived) and ev.delivered_to is not None:
            waits.pop(ev.delivered_to, None)
            late.discard(ev.name)
        elif isinstance(ev, SignalTimedOut | StepCompleted | WaitAbandoned) or (
                isinstance(ev, StepFailed) and ev.final):
            waits.pop(ev.index, None)
            if isinstance(ev, SignalTimedOut):
                late.add(ev.name)
        elif isinstance(ev, RunContinued):
            s.segments += 1
            waits.clear()
            late.clear()
        elif isinstance(ev, RunPaused):
            s.status = "paused"
        elif isinstance(ev, RunResumed):
            s.status, s.blocked = "running", None
        elif isinstance(ev, RunBlocked):
            s.status, s.blocked = "blocked", {"reason": ev.reason, "diff": ev.diff}
        elif isinstance(ev, RunCompleted):
            s.status, s.result, s.ended_at, s.blocked = "completed", ev.result, ev.at, None
        elif isinstance(ev, RunFailed):
            s.status, s.error, s.ended_at, s.blocked = "failed", ev.error, ev.at, None
        elif isinstance(ev, RunCancelled):
            s.status, s.ended_at, s.blocked = "cancelled", ev.at, None
    if s.done:
        waits.clear()  # an ended run waits for nothing, whatever its code left open
    s.waiting_for = sorted(set(waits.values()))
    s.late_for = sorted(late - set(s.waiting_for)) if not s.done else []
    s.approvals = [{"index": i, "name": waits[i], "digest": d}
                   for i, d in sorted(approves.items()) if i in waits]
    if s.status == "running" and s.waiting_for:
        s.status = "waiting"
    return s


class NerveClient:
    """What the CLI, the HTTP API and tests use to talk to a running nerve."""

    # How many of its submitted runs a client remembers, to tell a rejection to ``wait``.
    REMEMBERED_SUBMISSIONS = 10_000

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        # Runs this client submitted -> the orchestrator's reason, once it refuses the task.
        self._refusals: collections.OrderedDict[str, asyncio.Future[str]] = (
            collections.OrderedDict())
        self._refusals_sub: Any = None

    async def _expect(self, run_id: str) -> asyncio.Future[str]:
        """Listen for a refusal of the task of ``run_id``, about to be sent: a refused task
        never becomes a run, and the refusal goes out once, on ``nerve.tasks.rejected``, to
        whoever listens then."""
        if self._refusals_sub is None:
            async def on_rejected(msg: Any) -> None:
                with contextlib.suppress(ValueError, AttributeError):
                    notice = json.loads(msg.data)
                    refusal = self._refusals.get(notice.get("run_id"))
                    if refusal is not None and not refusal.done():
                        refusal.set_result(str(notice.get("reason") or "rejected"))

            self._refusals_sub = await self.bus.nc.subscribe(self.bus.names.tasks_rejected,
                                                             cb=on_rejected)
        refusal = self._refusals.get(run_id)
        if refusal is None or refusal.done():  # a refused task may be sent again, corrected
            refusal = self._refusals[run_id] = asyncio.get_running_loop().create_future()
        while len(self._refusals) > self.REMEMBERED_SUBMISSIONS:
            self._refusals.popitem(last=False)
        return refusal

    async def submit(self, tenant: str, task: str | None = None, *, input: dict[str, Any] | None
                     = None, workflow: str = "agent", run_id: str | None = None,
                     labels: dict[str, str] | None = None, **extra: Any) -> str:
        """Publish a task on ``nerve.tasks.<tenant>``; returns the run id it will start."""
        check_token("tenant", tenant)
        run_id = run_id or new_id("r")
        request = _valid(TaskRequest, "task", task=task, input=input, workflow=workflow,
                         run_id=run_id, labels=labels or {}, **extra)
        await self._expect(run_id)
        await self._publish_task(tenant, request)
        return run_id

    async def until_started(self, run_id: str, publish: Callable[[], Awaitable[Any]],
                            timeout: float | None = None) -> bool:
        """Publish the task of ``run_id`` (``publish()``) and wait until its run has started.

        True once its history exists (at once if it existed already), False if it had not
        started within ``timeout`` (it is queued). Raises :class:`~nerve.TaskRejected` with
        the orchestrator's reason if the task is refused (an unknown workflow, an invalid
        input, a tenant over budget): such a run never starts, so waiting for it without
        listening for the refusal would never end. The refusal goes out once, to whoever
        listens then: hence the publishing here.
        """
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_history(msg: Any) -> None:
            if not started.done():
                started.set_result(None)

        rejected = await self._expect(run_id)
        subs = [await self.bus.nc.subscribe(self.bus.names.history(run_id), cb=on_history)]
        try:
            await publish()
            if await RunHistory(self.bus, run_id).first() is not None:
                return True  # it existed already
            done, _ = await asyncio.wait({started, rejected}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if rejected in done:
                raise TaskRejected(rejected.result(), run_id=run_id)
            return started in done
        finally:
            for sub in subs:
                with contextlib.suppress(NatsClientError):
                    await sub.unsubscribe()
            started.cancel()

    async def fork(self, run_id: str, at: int, *, tenant: str,
                   new_run_id: str | None = None) -> str:
        """Start a new run from the first ``at`` events of ``run_id``; returns its id."""
        check_token("tenant", tenant)
        new_run_id = new_run_id or new_id("r")
        request = _valid(TaskRequest, "fork", run_id=new_run_id,
                         fork=_valid(ForkSpec, "fork", run_id=run_id, at=at))
        await self._publish_task(tenant, request)
        return new_run_id

    async def _publish_task(self, tenant: str, request: TaskRequest) -> None:
        body = encode_json(request.model_dump(exclude_none=True))
        # The same task sent twice is stored once; a different one under the same run id
        # (a rejected task, corrected) gets through, and the orchestrator starts at most one
        # run per id whatever it receives.
        digest = hashlib.sha256(body).hexdigest()[:16]
        await self._store(self.bus.names.tasks(tenant), body,
                          {"Nats-Msg-Id": f"task:{request.run_id}:{digest}",
                           "Content-Type": "application/json"})

    async def _to_inbox(self, run_id: str, message: Any, msg_id: str) -> None:
        check_token("run id", run_id)
        # A run that has not started yet gets it when it does; one that has ended never would.
        last = await RunHistory(self.bus, run_id).last()
        if last and last[-1].type in TERMINAL_TYPES:
            raise Conflict(f"run {run_id} has ended ({last[-1].type.removeprefix('run_')}); "
                           f"a {message.type} would change nothing",
                           run_id=run_id)
        await self._store(self.bus.names.inbox(run_id), encode(message), {"Nats-Msg-Id": msg_id})

    async def _store(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            await self.bus.js.publish(subject, data, headers=headers)
        except NoStreamResponseError:
            raise BusError(f"no stream stores {subject}: nerve's streams are not on this "
                           f"NATS (prefix {self.bus.names.prefix!r}) yet; start `nerve up "
                           f"--nats-url ...` or a `nerve worker` there, which create them "
                           f"(embedding nerve: `await provision(bus)`, from `bus`), or check "
                           f"--prefix", subject=subject) from None

    async def signal(self, run_id: str, name: str, payload: Any = None, *,
                     sender: str | None = None, approves: str | None = None,
                     signal_id: str | None = None) -> str:
        """Send a signal (durably); returns its id. Sending the same id twice counts once.

        A run that has not started yet receives it when it starts; one that has ended
        raises :class:`~nerve.Conflict`.
        """
        sig = _valid(SignalMessage, "signal", name=name, payload=payload, sender=sender,
                     approves=approves, signal_id=signal_id or new_id("sig-"))
        await self._to_inbox(run_id, sig, f"signal:{sig.signal_id}")
        return sig.signal_id

    async def cancel(self, run_id: str, reason: str = "", by: str | None = None) -> None:
        """Ask the run to stop: its code gets ``CancelledError`` at the step it awaits
        (cleanup may still run steps), then the run ends ``cancelled``. A blocked run ends at
        once. :class:`~nerve.Conflict` if the run has ended already."""
        await self._to_inbox(run_id, CancelMessage(reason=reason, by=by), new_id("cancel-"))

    async def pause(self, run_id: str, reason: str = "", by: str | None = None) -> None:
        """Hold the run's new steps until :meth:`resume` (running steps finish)."""
        await self._to_inbox(run_id, PauseMessage(reason=reason, by=by), new_id("pause-"))

    async def resume(self, run_id: str, by: str | None = None) -> None:
        """Let a paused run start its held steps."""
        await self._to_inbox(run_id, ResumeMessage(by=by), new_id("resume-"))

    async def history(self, run_id: str) -> list[Event]:
        """The run's whole history; :class:`~nerve.RunNotFound` if it has none."""
        check_token("run id", run_id)
        events = await RunHistory(self.bus, run_id).read()
        if not events:
            raise RunNotFound(f"no run {run_id}: nothing on {self.bus.names.history(run_id)}",
                              run_id=run_id)
        return events

    async def summary(self, run_id: str) -> RunSummary:
        """The run's state, folded from its history (:func:`summarize`)."""
        return summarize(await self.history(run_id))

    async def wait(self, run_id: str, timeout: float | None = None,
                   statuses: tuple[str, ...] = ENDED_STATUSES) -> RunSummary:
        """Wait until the run reaches one of ``statuses`` (by default: it ended).

        A run this client submitted whose task the orchestrator refused raises
        :class:`~nerve.TaskRejected` with the reason. A blocked run (nondeterminism, a bug in
        its code) is waited through, as it resumes once fixed code replays it: pass
        ``statuses=(*ENDED_STATUSES, "blocked")`` to get its summary (``blocked`` says why)
        instead. The timeout's error says where the run was.
        """
        begun = time.monotonic()
        deadline = None if timeout is None else begun + timeout
        # Re-read the history when the run publishes a status change (live), and every few
        # seconds in case a live event was missed.
        sub = await self.bus.nc.subscribe(self.bus.names.stream(run_id))
        summary: RunSummary | None = None
        try:
            while True:
                try:
                    summary = await self.summary(run_id)
                    if summary.status in statuses:
                        return summary
                except RunNotFound:
                    # Not started yet; or never will be, if its task was refused.
                    refusal = self._refusals.get(run_id)
                    if refusal is not None and refusal.done():
                        raise TaskRejected(f"the task of run {run_id} was rejected: "
                                           f"{refusal.result()}", run_id=run_id) from None
                # A run we just submitted: look again soon, its start (or refusal) is near.
                soon = (summary is None and run_id in self._refusals
                        and time.monotonic() - begun < 30)
                poll_until = time.monotonic() + (0.2 if soon else 5.0)
                while True:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise WorkflowError(
                            f"run {run_id} did not reach {'/'.join(statuses)} within "
                            f"{timeout}s: {_where(summary)}", run_id=run_id, retryable=True)
                    wait = min(poll_until - time.monotonic(), left if left is not None else 5.0)
                    if wait <= 0:
                        break
                    try:
                        msg = await sub.next_msg(timeout=wait)
                    except (NatsTimeoutError, TimeoutError):
                        break
                    if b"status" in msg.data and _announces(msg.data, statuses):
                        break
        finally:
            await sub.unsubscribe()


def _where(summary: RunSummary | None) -> str:
    """Where a run is, for an error that says it is not where it was expected."""
    if summary is None:
        return ("it has not started (no orchestrator has taken its task yet: is one running "
                "against this NATS and prefix?)")
    if summary.status == "blocked":
        return (f"it is blocked: {(summary.blocked or {}).get('reason', '')}. It resumes when "
                "an orchestrator running fixed code replays it")
    if summary.status == "waiting":
        return f"it waits for a signal ({', '.join(summary.waiting_for)})"
    return f"it is {summary.status}"


def _valid(model_type: type[M], what: str, /, **fields: Any) -> M:
    """``model_type(**fields)``, or a ConfigError naming the first field that is wrong.
    Positional-only: a task has a field called ``model``."""
    try:
        return model_type(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or what
        raise ConfigError(f"invalid {what}: {where}: {first['msg']}") from None


def _announces(data: bytes, statuses: tuple[str, ...]) -> bool:
    """Whether a live event says the run reached one of ``statuses`` (re-read then)."""
    try:
        event = decode(data, StreamEvent)
    except CodecError:
        return True  # cannot tell: look at the history
    return event.type == "status" and event.data.get("status") in statuses
