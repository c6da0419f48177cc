"""``WorkflowInstance``: one run's workflow code, driven by its history.

The instance turns history events into workflow progress and workflow progress into new
events. It never does I/O: the owner (``RunDriver``) feeds it events (recorded ones when
replaying, fresh ones when live), collects what it produces (``take_events``: steps
scheduled, markers, the run's end; ``take_commands``: steps to dispatch; ``take_emits``:
live stream output) and does the writing and dispatching.

Determinism is checked as events are applied. Every step or marker the code issues gets the
next index; when the history already has that index, its identity
``(kind, name, args_digest)`` must match, and every recorded step must have been issued by
the code by the time its record is applied. A mismatch stops the instance in the
``blocked`` state with a :class:`~nerve.NondeterminismError` carrying a readable diff.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from actors import MAX_RESULT_BYTES
from nerve import (
    NerveError,
    NondeterminismError,
    ResultTooLarge,
    StepError,
    WorkflowCodeError,
    WorkflowError,
)
from persistence import (
    CancelRequested,
    Event,
    MarkerRecorded,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunStarted,
    SignalReceived,
    SignalTimedOut,
    StepCompleted,
    StepFailed,
    StepKind,
    StepScheduled,
    StreamEvent,
    TimerFired,
    WaitAbandoned,
    args_digest,
)
from workflow._loop import WorkflowLoop, WorkflowSandboxViolation
from workflow._policy import RetryPolicy

log = logging.getLogger("nerve.workflow")

# Step arguments larger than this are not copied into the history (replay recomputes them
# from the code; the digest still pins them). Keeps long conversations O(n), not O(n^2).
MAX_RECORDED_ARGS = 8 * 1024

# Seconds one activation of workflow code may hold the orchestrator's event loop before it
# is reported (blocking code: time.sleep, sync I/O).
SLOW_ACTIVATION = 0.5


class _Blocked(BaseException):
    """Unwinds workflow code after a determinism failure.

    A BaseException so that an ``except Exception`` in workflow code cannot swallow it; the
    instance has already recorded the failure.
    """


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new``: end this segment, start over with ``input``."""

    def __init__(self, input: Any) -> None:
        super().__init__("continue as new")
        self.input = input


class InstanceState(enum.Enum):
    """Where a workflow instance is: running, ended one of four ways, or blocked."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CONTINUED = "continued"
    BLOCKED = "blocked"


@dataclass(slots=True)
class Command:
    """A step the code issued that the owner must carry out (dispatch, or arm a timer)."""

    index: int
    kind: StepKind
    name: str
    args: Any
    digest: str
    deadline: float | None = None
    policy: RetryPolicy | None = None
    subject: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Signal:
    """What ``ctx.wait_signal`` returns: the payload (or the default), who sent it, and
    whether the wait ended by timeout."""

    name: str
    value: Any
    sender: str | None = None
    timed_out: bool = False


@dataclass(slots=True)
class _Recorded:
    kind: str
    name: str
    digest: str
    event: Event


WorkflowFn = Callable[[Any, Any], Awaitable[Any]]


class WorkflowInstance:
    """Drive one workflow function through its history (see the module docstring)."""

    def __init__(self, fn: WorkflowFn, started: RunStarted, make_context: Callable[..., Any],
                 recorded: list[Event] | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 segment: RunContinued | None = None,
                 fail_on: tuple[type[BaseException], ...] = ()) -> None:
        """``segment``: drive the segment that this ``RunContinued`` starts (its input and
        first index) instead of the run's beginning. ``fail_on``: exceptions that fail the run
        (with every NerveError); the code raising any other blocks it."""
        self.fn = fn
        self.fail_on = fail_on
        self.started = started
        self.segment = segment
        self.continued_with: Any = None
        self.run_id = started.run_id
        self.state = InstanceState.RUNNING
        self.wall_clock = wall_clock
        self.error: WorkflowError | None = None
        self.result: Any = None
        self.failure: dict[str, Any] | None = None
        self._loop = WorkflowLoop(self._now, self._timer_from_loop)
        self._make_context = make_context
        self._time = (segment or started).at
        self._next_index = segment.next_index if segment else 0
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._issued: dict[int, tuple[str, str, str]] = {}
        self._timer_handles: dict[int, asyncio.TimerHandle] = {}
        self._events: list[Event] = []
        self._commands: list[Command] = []
        self._emits: list[StreamEvent] = []
        self._main: asyncio.Task[Any] | None = None
        self._cancel: CancelRequested | None = None
        self._stuck_reported = False
        self._pending_history = 0
        self._recorded: dict[int, _Recorded] = {}
        self._recorded_end: Event | None = None
        if recorded:
            self.load_recorded(recorded)

    # -- the recorded history ---------------------------------------------------------------
    def load_recorded(self, events: list[Event]) -> None:
        """Index a recorded history before replaying it (``apply`` each event afterwards)."""
        for event in events:
            if isinstance(event, StepScheduled):
                self._recorded[event.index] = _Recorded(event.kind, event.name,
                                                        event.args_digest, event)
            elif isinstance(event, MarkerRecorded):
                self._recorded[event.index] = _Recorded("marker", f"{event.kind}:{event.name}",
                                                        "", event)
            elif isinstance(event, RunCompleted | RunFailed | RunCancelled | RunContinued):
                if event is not self.segment:
                    self._recorded_end = event
        self._pending_history = len(events)

    @property
    def _replaying(self) -> bool:
        # Replaying while recorded events remain to be applied: what the code does now
        # already happened once and is in the history.
        return self._pending_history > 0

    @property
    def is_replaying(self) -> bool:
        """True while recorded events remain to be applied."""
        return self._replaying

    @property
    def done(self) -> bool:
        """True once the code has ended (or blocked)."""
        return self.state is not InstanceState.RUNNING

    def _now(self) -> float:
        return self._time

    # -- applying events --------------------------------------------------------------------
    def apply(self, event: Event, recorded: bool = False) -> None:
        """Apply one event. ``recorded`` events come from the history (replay); others are
        fresh and will be written by the owner along with what they cause."""
        if recorded:
            self._pending_history -= 1
        if self.state is InstanceState.BLOCKED:
            return
        self._time = event.at
        try:
            self._apply(event, recorded)
        except NondeterminismError as exc:
            self._block(exc)

    def _apply(self, event: Event, recorded: bool) -> None:
        if isinstance(event, RunStarted) or (event is self.segment and self.segment is not None):
            self._start()
        elif isinstance(event, StepScheduled | MarkerRecorded):
            if recorded:
                self._check_recorded_was_issued(event)
        elif isinstance(event, StepCompleted):
            self._resolve(event.index, lambda f: f.set_result(event.result))
        elif isinstance(event, StepFailed):
            if event.final:
                err = StepError(
                    f"step {event.index} ({event.kind} {event.name}) failed after "
                    f"{event.attempt} attempt(s): {event.error.get('message', '')}",
                    run_id=self.run_id, index=event.index, kind=event.kind, name=event.name,
                    error_type=event.error.get("type"), attempts=event.attempt,
                    error=event.error)
                self._resolve(event.index, lambda f: f.set_exception(err))
        elif isinstance(event, TimerFired):
            self._resolve(event.index, lambda f: f.set_result(None))
        elif isinstance(event, SignalReceived):
            if event.delivered_to is not None:
                sig = Signal(event.name, event.payload, event.sender, False)
                self._resolve(event.delivered_to, lambda f: f.set_result(sig))
        elif isinstance(event, SignalTimedOut):
            sig = Signal(event.name, event.default, None, True)
            self._resolve(event.index, lambda f: f.set_result(sig))
        elif isinstance(event, CancelRequested):
            if self._main is not None and not self._main.done():
                self._cancel = event
                self._main.cancel(event.reason or "cancelled")
                self._run()
        elif isinstance(event, RunCompleted | RunFailed | RunCancelled | RunContinued):
            if recorded:
                self._check_end(event)

    def _start(self) -> None:
        ctx = self._make_context(self)
        self._main = self._loop.create_task(self._run_main(ctx), name=f"workflow:{self.run_id}")
        self._run()

    async def _run_main(self, ctx: Any) -> Any:
        return await self.fn(ctx, self.segment.input if self.segment else self.started.input)

    def _resolve(self, index: int, setter: Callable[[asyncio.Future[Any]], None]) -> None:
        fut = self._futures.pop(index, None)
        if fut is None or fut.done():
            return  # a late duplicate, or a step the code stopped waiting for
        setter(fut)
        self._run()

    def _run(self) -> None:
        started = time.perf_counter()
        self._loop.run_until_quiescent()
        held = time.perf_counter() - started
        if held > SLOW_ACTIVATION:
            # Every run of this orchestrator (and its leases) waited that long.
            log.warning("run %s: workflow %s held the event loop for %.1f s in one step of its "
                        "code. Workflow code must not block: use ctx.sleep instead of "
                        "time.sleep, and activities for I/O and heavy work", self.run_id,
                        self.started.workflow, held)
        if self._main is None or self.state is not InstanceState.RUNNING:
            return
        if self._main.done():
            self._finish(self._main)
        elif (not self._stuck_reported and not self._replaying
              and all(f.done() for f in self._futures.values())):
            self._stuck_reported = True
            log.error("run %s: workflow %s waits for something that is not a step (an "
                      "asyncio.Event, Future or task of its own?) and has no step open: "
                      "nothing but a cancel can wake it. Wait on ctx steps (activities, "
                      "ctx.wait_signal, ctx.sleep) instead", self.run_id, self.started.workflow)

    def _finish(self, main: asyncio.Task[Any]) -> None:
        end: Event
        if main.cancelled():
            self.state = InstanceState.CANCELLED
            cancel = self._cancel or CancelRequested()
            end = RunCancelled(reason=cancel.reason or "cancelled", by=cancel.by,
                               at=self._stamp())
        elif isinstance(exc := main.exception(), ContinueAsNew):
            self.state = InstanceState.CONTINUED
            self.continued_with = exc.input
            end = RunContinued(
                workflow=self.started.workflow, version=self.started.version, input=exc.input,
                next_index=self._next_index,
                segment=(self.segment.segment if self.segment else 0) + 1, at=self._stamp())
        elif exc is not None:
            if isinstance(exc, NondeterminismError):
                self._block(exc)
                return
            if not self._fails_run(exc):
                self._block(_code_error(exc, self.started.workflow))
                return
            self.state = InstanceState.FAILED
            self.failure = exc.to_wire() if isinstance(exc, NerveError) else {
                "type": type(exc).__name__, "message": str(exc), "retryable": False,
                "fields": {"traceback": "".join(traceback.format_exception(exc))[-4000:]}}
            end = RunFailed(error=self.failure, at=self._stamp())
        elif (size := _size(main.result())) > MAX_RESULT_BYTES:
            self.state = InstanceState.FAILED
            self.failure = ResultTooLarge(
                f"the workflow's result is {size:,} bytes; a run's result is at most "
                f"{MAX_RESULT_BYTES:,}. Keep big outputs elsewhere (a file in the sandbox, an "
                f"object store) and return a reference to them", run_id=self.run_id,
                size=size, limit=MAX_RESULT_BYTES, retryable=False).to_wire()
            end = RunFailed(error=self.failure, at=self._stamp())
        else:
            self.state = InstanceState.COMPLETED
            self.result = main.result()
            end = RunCompleted(result=self.result, at=self._stamp())
        if self._recorded_end is None:
            self._events.append(end)

    def _fails_run(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised out of the workflow, fails the run or blocks it as a bug.

        A failure the code chose (any NerveError, a step's StepError included, or a type in
        ``fail_on``) ends the run. Anything else is a bug that a retry of the same code would
        hit again, and that fixed code can get past: the run is blocked, as Temporal retries
        a failed workflow task, so hours of agent work are not thrown away for a KeyError.
        Two cases end the run anyway: it was being cancelled, and the history already
        recorded its failure (written before this rule, or under another ``fail_on``).
        """
        if isinstance(exc, WorkflowSandboxViolation):
            return False  # I/O or real time in workflow code: a bug like any other
        return (isinstance(exc, (NerveError, *self.fail_on)) or self._cancel is not None
                or isinstance(self._recorded_end, RunFailed))

    def _check_end(self, event: Event) -> None:
        expected = {RunCompleted: InstanceState.COMPLETED, RunFailed: InstanceState.FAILED,
                    RunCancelled: InstanceState.CANCELLED,
                    RunContinued: InstanceState.CONTINUED}[type(event)]
        if self.state is not expected:
            raise NondeterminismError(
                f"run {self.run_id}: the history ends with {event.type} but the code is "
                f"{self.state.value}. Check that your workflow is deterministic.",
                run_id=self.run_id, diff={"expected": event.type, "got": self.state.value})

    def _block(self, exc: WorkflowError) -> None:
        self.state = InstanceState.BLOCKED
        self.error = exc
        self._events.append(RunBlocked(reason=exc.message, diff=exc.fields.get("diff", {}),
                                       at=self._stamp()))
        self._loop.close()

    def _stamp(self) -> float:
        return self.wall_clock() if not self._replaying else self._time

    # -- issuing steps (called by RunContext during an activation) ---------------------------
    def issue(self, kind: StepKind, name: str, args: Any, *, policy: RetryPolicy | None = None,
              subject: str | None = None, deadline_in: float | None = None,
              meta: dict[str, Any] | None = None) -> asyncio.Future[Any]:
        """Issue a step; return the future its result will resolve."""
        try:
            digest = args_digest(args)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"the arguments of {kind} step {name!r} cannot be recorded ({exc}): step "
                "arguments are what msgpack/JSON carry (dict, list, str, int, float, bool, "
                "None, bytes, pydantic models); turn sets into lists and datetimes into "
                "strings or numbers") from None
        index = self._next_index
        self._next_index += 1
        fut = self._loop.create_future()
        self._issued[index] = (kind, name, digest)
        recorded = self._recorded.get(index)
        try:
            if recorded is not None:
                self._compare(index, kind, name, digest, recorded, args)
            else:
                self._check_not_behind(index, kind, name, digest)
        except NondeterminismError as exc:
            self._block(exc)
            raise _Blocked from None
        if recorded is not None:
            deadline = (recorded.event.deadline if isinstance(recorded.event, StepScheduled)
                        else None)
            fresh = False
        else:
            deadline = None if deadline_in is None else self.wall_clock() + deadline_in
            fresh = True
        self._futures[index] = fut
        if kind == "signal":
            fut.add_done_callback(functools.partial(self._on_wait_done, index, name))
        command = Command(index, kind, name, args, digest, deadline, policy, subject, meta or {})
        if fresh:
            recorded_args = args if _small(args) else None
            self._events.append(StepScheduled(
                index=index, kind=kind, name=name, args_digest=digest, args=recorded_args,
                deadline=deadline, meta=command.meta, at=self.wall_clock()))
        # Every open step is handed to the owner: fresh ones to start, recorded ones to
        # re-arm (timers, waits) or re-dispatch if their result never came.
        self._commands.append(command)
        return fut

    def _on_wait_done(self, index: int, name: str, fut: asyncio.Future[Any]) -> None:
        # Only the code giving up on a wait counts: not the run being cancelled, and not a
        # replay (the history has the event already, or predates it).
        if (not fut.cancelled() or self._cancel is not None or self._replaying
                or self.state is not InstanceState.RUNNING):
            return
        self._futures.pop(index, None)
        self._events.append(WaitAbandoned(index=index, name=name, at=self._stamp()))

    def marker(self, kind: str, name: str, live_value: Callable[[], Any]) -> Any:
        """A recorded value: the history's on replay, ``live_value()`` (recorded) otherwise."""
        index = self._next_index
        self._next_index += 1
        self._issued[index] = ("marker", f"{kind}:{name}", "")
        recorded = self._recorded.get(index)
        try:
            if recorded is not None:
                self._compare(index, "marker", f"{kind}:{name}", "", recorded)
            else:
                self._check_not_behind(index, "marker", f"{kind}:{name}", "")
        except NondeterminismError as exc:
            self._block(exc)
            raise _Blocked from None
        if recorded is not None:
            assert isinstance(recorded.event, MarkerRecorded)
            return recorded.event.value
        value = live_value()
        self._events.append(MarkerRecorded(index=index, kind=kind, name=name, value=value,
                                           at=self.wall_clock()))
        return value

    def patched(self, change_id: str) -> bool:
        """True for new code paths: in live execution (recorded as a marker), or in replay
        when the history has the marker at this point. Consumes no index when False."""
        index = self._next_index
        recorded = self._recorded.get(index)
        if recorded is not None:
            ev = recorded.event
            if isinstance(ev, MarkerRecorded) and ev.kind == "patched" and ev.name == change_id:
                self._next_index += 1
                self._issued[index] = ("marker", f"patched:{change_id}", "")
                return True
            return False
        if self._replaying and self._recorded and index < max(self._recorded):
            return False  # old history, recorded before this patch existed
        self.marker("patched", change_id, lambda: True)
        return True

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        """Live output for ``nerve.stream.<run_id>`` (never during replay)."""
        if not self._replaying:
            self._emits.append(StreamEvent(type=type_, run_id=self.run_id, data=data))

    def _compare(self, index: int, kind: str, name: str, digest: str, rec: _Recorded,
                 args: Any = None) -> None:
        if (rec.kind, rec.name, rec.digest) != (kind, name, digest):
            # Same step, other arguments: show both where the history kept them (small ones).
            recorded_args = getattr(rec.event, "args", None)
            shown = ((recorded_args, args) if (rec.kind, rec.name) == (kind, name)
                     and recorded_args is not None and _small(args) else None)
            # The very step the code issued, recorded at another index: an order change.
            moved = next((i for i, r in sorted(self._recorded.items())
                          if i not in self._issued and (r.kind, r.name, r.digest)
                          == (kind, name, digest)), None)
            raise_nondeterminism(self.run_id, index, expected=(rec.kind, rec.name, rec.digest),
                                 got=(kind, name, digest), args=shown, moved_from=moved)

    def _check_not_behind(self, index: int, kind: str, name: str, digest: str) -> None:
        if self._replaying and self._recorded and index < max(self._recorded):
            raise_nondeterminism(self.run_id, index, expected=None, got=(kind, name, digest))

    def _check_recorded_was_issued(self, event: StepScheduled | MarkerRecorded) -> None:
        if event.index not in self._issued:
            rec = self._recorded[event.index]
            raise_nondeterminism(self.run_id, event.index,
                                 expected=(rec.kind, rec.name, rec.digest), got=None)

    def _timer_from_loop(self, delay: float, handle: asyncio.TimerHandle) -> None:
        # asyncio.sleep / wait_for timeouts inside workflow code: durable timers.
        fut = self.issue("timer", "sleep", {"seconds": round(delay, 6)}, deadline_in=delay)
        fut.add_done_callback(lambda _f: None if handle.cancelled() else handle._run())

    # -- what the owner collects ------------------------------------------------------------
    def take_events(self) -> list[Event]:
        """The events produced since the last call, for the owner to write."""
        events, self._events = self._events, []
        return events

    def take_commands(self) -> list[Command]:
        """The steps issued since the last call, for the owner to carry out."""
        commands, self._commands = self._commands, []
        return commands

    def take_emits(self) -> list[StreamEvent]:
        """The live events emitted since the last call, for the owner to publish."""
        emits, self._emits = self._emits, []
        return emits

    def open_steps(self) -> set[int]:
        """Indices of the steps the code still waits for."""
        return {i for i, f in self._futures.items() if not f.done()}


def _size(value: Any) -> int:
    """Bytes ``value`` takes in an event (0 if it cannot be encoded: the append says why)."""
    try:
        return len(msgpack.packb(value, use_bin_type=True, default=str))
    except (TypeError, ValueError):
        return 0


def _small(value: Any) -> bool:
    return 0 < _size(value) <= MAX_RECORDED_ARGS


def raise_nondeterminism(run_id: str, index: int, *, expected: tuple[str, str, str] | None,
                         got: tuple[str, str, str] | None,
                         args: tuple[Any, Any] | None = None,
                         moved_from: int | None = None) -> None:
    def show(t: tuple[str, str, str] | None, value: Any = None) -> str:
        if t is None:
            return "nothing"
        kind, name, digest = t
        if args is not None:
            text = json.dumps(value, default=str)
            return f"{kind} {name!r} with args {text[:200]}{'...' if len(text) > 200 else ''}"
        return f"{kind} {name!r}" + (f" (args {digest[:12]})" if digest else "")

    diff: dict[str, Any] = {
        "index": index,
        "expected": None if expected is None else dict(zip(("kind", "name", "args_digest"),
                                                           expected, strict=True)),
        "got": None if got is None else dict(zip(("kind", "name", "args_digest"), got,
                                                 strict=True)),
    }
    if args is not None:
        diff["expected"]["args"], diff["got"]["args"] = args
    if moved_from is not None:
        diff["moved_from"] = moved_from
        hint = (f" The history has that very step at step {moved_from}: steps started together "
                "were started in another order. asyncio.as_completed (like iterating a set) "
                "starts them in an order that changes from one process to the next: use "
                "ctx.as_completed(...), or create their tasks in list order first.")
    elif args is not None:
        hint = (" Arguments that differ on every replay come from time, randomness or I/O in "
                "the workflow: take them from ctx.now()/ctx.random()/ctx.uuid() or an activity.")
    else:
        hint = ""
    raise NondeterminismError(
        f"run {run_id}, step {index}: the history recorded "
        f"{show(expected, args[0] if args else None)} but the code issued "
        f"{show(got, args[1] if args else None)}. Check that your workflow is deterministic, "
        f"or guard the change with ctx.patched(...).{hint}", run_id=run_id, index=index,
        diff=diff)


def _code_error(exc: BaseException, workflow: str) -> WorkflowCodeError:
    """What the run's ``RunBlocked`` says about an exception its code raised: the type, the
    message and the innermost line of code, the same on every replay (no addresses, no
    times), so replaying unfixed code does not block the run a second time."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    tb = "".join(traceback.format_exception(exc))[-4000:]
    return WorkflowCodeError(
        f"workflow {workflow} raised {type(exc).__name__}: {exc}"
        + (f" (at {where})" if where else "")
        + ". A bug blocks the run rather than failing it; to fail runs on purpose, raise a "
        "nerve.WorkflowError (or list the type in @workflow(fail_on=...))",
        error_type=type(exc).__name__, where=where,
        diff={"error": {"type": type(exc).__name__, "message": str(exc), "where": where,
                        "traceback": tb}})
