"""``RunDriver``: one owned run, from replay to its end.

The driver is the only writer of its run's history while its orchestrator owns the run. It

1. reads the history and replays it through a :class:`WorkflowInstance` (fencing out any
   previous owner first with an ``OwnerChanged`` event when it takes a run over);
2. reads the run's durable inbox for anything that arrived while nobody owned the run;
3. starts what is open: dispatches steps (same idempotency key, same attempt), re-arms
   timers and signal deadlines from their recorded deadlines;
4. then loops: inputs (step results, heartbeats, inbox messages, timers) become events;
   the events, and the events the workflow produces in reaction, are appended as one
   record (one fsync); only then are replies sent, new steps dispatched, timers armed.

Nothing the driver holds in memory is the only copy of anything: a crash at any point
leaves a history from which the next owner rebuilds exactly this state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nats.errors import Error as NatsClientError
from opentelemetry import trace

from actors import H_HEARTBEAT, Envelope, StepResult, WorkItem, decode, encode, tracing_enabled
from bus import RawHeaders
from nerve import CodecError, HistoryError, NerveError, StaleWriterError, WorkflowNotFound
from persistence import (
    INBOX_ADAPTER,
    TERMINAL_TYPES,
    CancelMessage,
    CancelRequested,
    Event,
    OwnerChanged,
    PauseMessage,
    ResumeMessage,
    RunBlocked,
    RunCancelled,
    RunContinued,
    RunHistory,
    RunPaused,
    RunResumed,
    RunStarted,
    SandboxLost,
    SandboxNotice,
    SandboxRestored,
    SignalMessage,
    SignalReceived,
    SignalRejected,
    SignalTimedOut,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StreamEvent,
    TimerFired,
    WaitAbandoned,
    direct_get_subject,
)
from workflow._chaos import crash_point
from workflow._context import RunContext
from workflow._definition import WorkflowDefinition
from workflow._instance import Command, InstanceState, WorkflowInstance
from workflow._policy import DEFAULT_POLICIES, RetryPolicy
from workflow._tracing import end_step_span, run_traceparent, start_step_span

if TYPE_CHECKING:
    from workflow._orchestrator import Orchestrator

log = logging.getLogger("nerve.workflow.driver")

_HEARTBEAT_KEY = H_HEARTBEAT.encode()


@dataclass(slots=True)
class _Result:
    result: StepResult
    reply: str | None = None


@dataclass(slots=True)
class _Inbox:
    message: Any
    seq: int | None = None


@dataclass(slots=True)
class _Timer:
    index: int
    attempt: int
    reason: str  # "fire" | "deadline" | "retry" | "timeout" | "heartbeat"


@dataclass(slots=True)
class _Heartbeat:
    index: int
    attempt: int


@dataclass(slots=True)
class _Reconnected:
    pass


@dataclass(slots=True)
class _Redispatch:
    index: int


Input = _Result | _Inbox | _Timer | _Heartbeat | _Reconnected | _Redispatch


@dataclass(slots=True)
class _Open:
    """A step that has no final outcome yet."""

    command: Command
    attempt: int = 1
    retry_at: float | None = None
    dispatched: bool = False
    last_heartbeat: float = 0.0
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    span: Any = None  # this attempt's OpenTelemetry span

    def cancel_timers(self) -> None:
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()


class RunDriver:
    """Drives one run while its orchestrator owns it (see the module docstring)."""

    def __init__(self, orchestrator: Orchestrator, run_id: str, epoch: int, takeover: bool,
                 replay_from: int = 0, created: RunHistory | None = None,
                 previous: str | None = None) -> None:
        self.orch = orchestrator
        self.previous = previous  # the owner a takeover fences out
        self.bus = orchestrator.bus
        self.names = orchestrator.bus.names
        self.run_id = run_id
        self.epoch = epoch
        self.takeover = takeover
        self.replay_from = replay_from
        self.history = RunHistory(self.bus, run_id, writer=f"{orchestrator.owner_id}:{epoch}",
                                  commit=orchestrator.group_commit)
        # A run this orchestrator has just created: its history is what it wrote, so the
        # driver starts from that instead of reading it back.
        self._created = created
        self._begun = False  # begin() ran the workflow to its first steps already
        self.instance: WorkflowInstance | None = None
        self.definition: WorkflowDefinition | None = None
        self.started: RunStarted | None = None
        self.status = "starting"
        self._queue: asyncio.Queue[Input] = asyncio.Queue()
        self._open: dict[int, _Open] = {}
        self._attempts: dict[int, int] = {}
        self._retry_at: dict[int, float] = {}
        self._closed: set[int] = set()
        self._signals_seen: set[str] = set()
        self._segment_seen: set[str] = set()  # ... since the current segment began
        self._notices_seen: set[str] = set()
        self._buffered: dict[str, deque[SignalReceived]] = defaultdict(deque)
        self._timed_out_names: set[str] = set()
        self._cancel_requested = False
        self._cancel_seq = 0  # the inbox message of the recorded CancelRequested
        self._paused = False
        self._deferred: list[_Open] = []
        self._new_commands: list[Command] = []
        self._to_dispatch: list[_Open] = []
        self._local_runs: set[asyncio.Task[None]] = set()
        self._replies: list[str] = []
        self._given_up: list[str] = []  # "<index>:<attempt>" to announce after the commit
        self._emits: list[StreamEvent] = []
        self._inbox_seq = 0
        self._pending_dispatch_retry: asyncio.TimerHandle | None = None
        self.finished = asyncio.Event()

    @property
    def tenant(self) -> str:
        return self.started.tenant if self.started else ""

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if await self._replay():
                await self._catch_up_inbox()
                self._start_open_steps()
                await self._flush_outputs()
                while self.instance is not None and not self.instance.done:
                    batch = [await self._queue.get()]
                    while not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    await self._cycle(batch)
                await self._on_end()
            if self.status == "blocked":
                await self._hold_blocked()
        except StaleWriterError as exc:
            log.warning("run %s: lost ownership (%s); stopping here", self.run_id, exc.message)
            self.status = "lost"
        finally:
            await self._teardown()
            self.finished.set()

    async def _hold_blocked(self) -> None:
        """Keep a blocked run cancellable. Its code cannot run, so nothing else is done here:
        signals stay in the inbox for the code that will replay the run."""
        cancel: tuple[CancelMessage, int | None] | None = None
        async for seq, data, _headers in direct_get_subject(
                self.bus, self.names.runs_stream, self.names.inbox(self.run_id),
                self._cancel_seq):
            with contextlib.suppress(CodecError):
                message = decode(data, INBOX_ADAPTER)
                if isinstance(message, CancelMessage) and cancel is None:
                    cancel = (message, seq)
        while cancel is None:
            item = await self._queue.get()
            if isinstance(item, _Inbox) and isinstance(item.message, CancelMessage):
                cancel = (item.message, item.seq)
        message, seq = cancel
        reason = message.reason or "cancelled"
        await self._commit([
            CancelRequested(reason=message.reason, by=message.by, source_seq=seq),
            RunCancelled(reason=f"{reason} (while blocked: the workflow code did not run)",
                         by=message.by)])
        self.status = "cancelled"
        log.info("run %s: cancelled while blocked", self.run_id)
        self._emits.append(StreamEvent(type="status", run_id=self.run_id,
                                       data={"status": self.status}))
        await self._flush_outputs()
        await self._release()

    async def _release(self) -> None:
        """The run ended: drop its record, and announce the end on
        ``<prefix>.ctl.run.<id>.ended`` (core NATS, best effort) so the host running its
        sandbox destroys it now; a host's sweep finds an end whose announcement was lost."""
        await self.orch.release_run(self.run_id)
        with contextlib.suppress(NatsClientError):
            await self.bus.nc.publish(self.names.run_ended(self.run_id),
                                      self.status.encode())

    async def _teardown(self) -> None:
        for op in self._open.values():
            op.cancel_timers()
        for task in list(self._local_runs):
            task.cancel()
        if self._pending_dispatch_retry is not None:
            self._pending_dispatch_retry.cancel()

    def put(self, item: Input) -> None:
        self._queue.put_nowait(item)

    # -- what the orchestrator routes here -----------------------------------------------------
    def on_result(self, reply: bytes, headers: bytes | None, data: bytes) -> None:
        """A worker's result (or heartbeat) on the owner's results subject."""
        if headers is not None and _HEARTBEAT_KEY in headers:
            beat = RawHeaders(headers).get(H_HEARTBEAT)
            if beat:
                index, attempt = beat.split(":", 1)
                self.put(_Heartbeat(int(index), int(attempt)))
            return
        try:
            result = decode(data, StepResult)
        except CodecError as exc:
            log.warning("run %s: undecodable step result: %s", self.run_id, exc.message)
            return
        self.put(_Result(result, reply.decode() if reply else None))

    def on_inbox(self, data: bytes) -> None:
        """A message published to the run's inbox while we own it."""
        try:
            message = decode(data, INBOX_ADAPTER)
        except CodecError as exc:
            log.warning("run %s: undecodable inbox message: %s", self.run_id, exc.message)
            return
        self.put(_Inbox(message))

    # -- replay -------------------------------------------------------------------------------
    def begin(self, started: RunStarted) -> list[Event] | None:
        """Run a new run's workflow up to its first steps, before its history exists.

        Returns the events those steps add after ``started``: the caller writes them in the
        run's first record (one fsync'd append per run fewer), then runs this driver with
        ``created`` set. None if the workflow cannot begin here (the caller then starts a
        driver that replays what was written, which reports why).
        """
        try:
            definition = self.orch.registry.get(started.workflow, started.version)
        except WorkflowNotFound:
            return None
        self.started = started
        instance = self._new_instance(definition, [started], None)
        instance.apply(started, recorded=True)
        if instance.state is InstanceState.BLOCKED:
            return None
        self._track(started)
        self._adopt(instance.take_commands(), live=False)
        fresh = instance.take_events()
        instance.take_emits()  # as on any replay of the first record
        for event in fresh:
            self._track(event)
        self._adopt(instance.take_commands(), live=True, produced=fresh)
        self._begun = True
        return fresh

    async def _replay(self) -> bool:
        """Rebuild the run from its history. False if there is nothing (left) to drive."""
        if self._begun:
            assert self._created is not None
            self.history.last_seq = self._created.last_seq
            self.history.length = self._created.length
            for event in self._created.written:
                if isinstance(event, StepScheduled):
                    crash_point("scheduled", event.index)
            self.status = "running"
            self._emit_status()
            return True
        if self._created is not None and self._created.written:
            events = list(self._created.written)
            self.started = events[0] if isinstance(events[0], RunStarted) else None
            self.history.last_seq, self.history.length = (self._created.last_seq,
                                                          self._created.length)
        else:
            # A run that continued as new replays only its current segment.
            self.started = await self.history.first()
            events = await self.history.read(max(0, self.replay_from - 1)) \
                if self.replay_from else await self.history.read()
        if self.started is None or not events:
            log.error("run %s has no history to drive", self.run_id)
            self.status = "missing"
            return False
        if events[-1].type in TERMINAL_TYPES:
            # It ended but its record outlived it (the owner died right after the end).
            self.status = events[-1].type.removeprefix("run_")
            await self._release()
            return False
        if self.takeover:
            # Fence first: any append by the previous owner now fails.
            await self.history.append(OwnerChanged(owner=self.orch.owner_id, epoch=self.epoch,
                                                   previous=self.previous,
                                                   reason="takeover"))
        try:
            definition = self.orch.registry.get(self.started.workflow, self.started.version)
        except WorkflowNotFound as exc:
            await self._block_once(events, exc.message, {})
            return False
        for event in events:
            self._track(event)
        cut = max((i for i, e in enumerate(events) if isinstance(e, RunContinued)), default=None)
        segment = events[cut:] if cut is not None else events
        instance = self._new_instance(definition, segment, segment[0] if cut is not None
                                      else None)
        for event in segment:
            instance.apply(event, recorded=True)
            self._adopt(instance.take_commands(), live=False)
        fresh = instance.take_events()
        instance.take_emits()  # replayed output was already published once
        if instance.state is InstanceState.BLOCKED:
            await self._block_once(events, instance.error.message if instance.error else "",
                                   instance.error.fields.get("diff", {}) if instance.error
                                   else {})
            return False
        self.status = "paused" if self._paused else "running"
        if _last_state_event(events) == "run_blocked":
            # It was blocked; this code replays it: say so in the history.
            fresh.insert(0, RunResumed(by=f"{self.orch.owner_id}: replay is deterministic"))
        # Steps issued at the frontier (a fresh run's first steps) are new: record them.
        for event in fresh:
            self._track(event)
        self._adopt(instance.take_commands(), live=True, produced=fresh)
        if fresh:
            await self._commit(fresh)
        self._emit_status()
        return True

    async def _block_once(self, events: list[Event], reason: str, diff: dict[str, Any]) -> None:
        self.status = "blocked"
        self._new_commands.clear()  # steps the code issued before it diverged stay as they are
        # Each restart's takeover adds an OwnerChanged, not another RunBlocked saying the same.
        last = next((e for e in reversed(events) if not isinstance(e, OwnerChanged)), None)
        if not (isinstance(last, RunBlocked) and last.reason == reason):
            await self._commit([RunBlocked(reason=reason, diff=diff)])
        self._emits.append(StreamEvent(type="status", run_id=self.run_id,
                                       data={"status": "blocked", "reason": reason,
                                             "diff": diff}))
        await self._flush_outputs()
        log.error("run %s is blocked: %s", self.run_id, reason)

    def _new_instance(self, definition: WorkflowDefinition, recorded: list[Event],
                      segment: RunContinued | None) -> WorkflowInstance:
        assert self.started is not None
        self.definition = definition
        self.instance = WorkflowInstance(definition.fn, self.started, self._make_context,
                                         recorded=recorded, wall_clock=time.time,
                                         segment=segment, fail_on=definition.fail_on)
        return self.instance

    def _make_context(self, instance: WorkflowInstance) -> RunContext:
        return RunContext(instance, self.names, self.orch.policies, self.orch.sandbox_meta)

    # -- the state the history implies ---------------------------------------------------------
    def _track(self, event: Event) -> None:
        if isinstance(event, StepFailed | StepCompleted | TimerFired | SignalTimedOut
                      | WaitAbandoned) or (
                isinstance(event, SignalReceived) and event.delivered_to is not None):
            index = event.delivered_to if isinstance(event, SignalReceived) else event.index
            op = self._open.get(index)
            if op is not None and op.span is not None:
                end_step_span(op.span, event.error if isinstance(event, StepFailed) else None)
                op.span = None
        if isinstance(event, StepFailed):
            if event.final:
                self._close(event.index)
            else:
                self._attempts[event.index] = event.attempt + 1
                self._retry_at[event.index] = event.retry_at or time.time()
                if (op := self._open.get(event.index)) is not None:
                    op.attempt = event.attempt + 1
                    op.retry_at = event.retry_at
                    op.dispatched = False
        elif isinstance(event, StepCompleted | TimerFired):
            self._close(event.index)
        elif isinstance(event, SignalTimedOut):
            self._close(event.index)
            self._timed_out_names.add(event.name)
        elif isinstance(event, WaitAbandoned):
            self._close(event.index)
        elif isinstance(event, RunContinued):
            # A takeover that replays this segment alone starts from what the last one left.
            self._inbox_seq = max(self._inbox_seq, event.inbox_seq)
            self._signals_seen.update(event.seen_signals)
            self._timed_out_names.clear()  # the old segment's waits are gone
            for raw in event.buffered_signals:
                self._track(SignalReceived.model_validate(raw))
        elif isinstance(event, SignalReceived):
            if event.signal_id:
                self._seen(event.signal_id)
            if event.delivered_to is None:
                queue = self._buffered[event.name]
                if not any(s.signal_id == event.signal_id for s in queue if s.signal_id):
                    queue.append(event)
            else:
                self._close(event.delivered_to)
                self._timed_out_names.discard(event.name)
                queue = self._buffered.get(event.name)
                if queue:
                    self._buffered[event.name] = deque(
                        s for s in queue if s.signal_id != event.signal_id)
        elif isinstance(event, SignalRejected):
            if event.signal_id:
                self._seen(event.signal_id)
        elif isinstance(event, CancelRequested):
            self._cancel_requested = True
            self._cancel_seq = event.source_seq or 0
        elif isinstance(event, RunPaused):
            self._paused = True
        elif isinstance(event, RunResumed):
            self._paused = False
        elif isinstance(event, SandboxLost | SandboxRestored):
            if event.notice_id:
                self._notices_seen.add(event.notice_id)

    def _close(self, index: int) -> None:
        self._closed.add(index)
        op = self._open.pop(index, None)
        if op is not None:
            op.cancel_timers()

    def _adopt(self, commands: list[Command], live: bool,
               produced: list[Event] | None = None) -> None:
        """Take over steps the code issued. Live waits consume buffered signals at once."""
        for command in commands:
            if command.index in self._closed or command.index in self._open:
                continue
            op = _Open(command, attempt=self._attempts.get(command.index, 1),
                       retry_at=self._retry_at.get(command.index))
            self._open[command.index] = op
            self._new_commands.append(command)
            if live and command.kind == "signal" and self._buffered.get(command.name):
                self._deliver_buffered(op, produced)

    def _deliver_buffered(self, op: _Open, produced: list[Event] | None) -> None:
        assert self.instance is not None
        if (op.command.args or {}).get("approves"):
            return  # an approval bound to one tool call must arrive while that call waits
        sig = self._buffered[op.command.name][0]
        self._apply_fresh(SignalReceived(name=sig.name, payload=sig.payload, sender=sig.sender,
                                         signal_id=sig.signal_id,
                                         delivered_to=op.command.index), produced)

    def _apply_fresh(self, event: Event, out: list[Event] | None) -> None:
        assert self.instance is not None
        self._track(event)
        self.instance.apply(event)
        produced = self.instance.take_events()
        if out is not None:
            out.append(event)
            out.extend(produced)
        for ev in produced:
            self._track(ev)
        self._emits.extend(self.instance.take_emits())
        self._adopt(self.instance.take_commands(), live=True, produced=out)

    # -- one cycle: inputs -> events -> one append -> outputs ------------------------------------
    async def _cycle(self, batch: list[Input]) -> None:
        events: list[Event] = []
        for item in batch:
            await self._handle(item, events)
        if events:
            await self._commit(events)
        await self._flush_outputs()

    async def _commit(self, events: list[Event]) -> None:
        # A segment's end carries what the next one needs that its own events will not
        # hold: where the inbox was read up to, and the signals received but not delivered.
        # A takeover replays the latest segment alone, and would otherwise read the inbox
        # from the start (signals of earlier segments again) and lose the buffered ones.
        if any(isinstance(ev, RunContinued) for ev in events):
            # Read what the inbox holds now (signals stored but not yet seen live): from
            # here on, inbox_seq bounds what a takeover must read again.
            await self._catch_up_inbox(into=events)
            events = [self._carried(ev) if isinstance(ev, RunContinued) else ev
                      for ev in events]
        for attempt in range(1, 6):
            try:
                seq = await self.history.append(*events)
                for ev in events:
                    if isinstance(ev, StepScheduled):
                        crash_point("scheduled", ev.index)
                    elif isinstance(ev, RunContinued):
                        await self._next_segment(ev, seq)
                return
            except StaleWriterError:
                raise
            except HistoryError as exc:
                if not exc.retryable or attempt == 5:
                    raise
                log.warning("run %s: append failed (%s); retrying", self.run_id, exc.message)
                await asyncio.sleep(0.2 * attempt)

    def _carried(self, continued: RunContinued) -> RunContinued:
        buffered = [sig.model_dump(mode="json") for queue in self._buffered.values()
                    for sig in queue]
        # Signals seen live in this segment may be stored past inbox_seq (the stream can
        # store a message a moment after delivering it): their ids keep them from counting
        # twice after a takeover.
        seen, self._segment_seen = sorted(self._segment_seen), set()
        return continued.model_copy(update={
            "inbox_seq": self._inbox_seq, "buffered_signals": buffered, "seen_signals": seen})

    async def _handle(self, item: Input, events: list[Event]) -> None:
        if isinstance(item, _Result):
            crash_point("result", item.result.index)
            self._on_step_result(item.result, events)
            if item.reply:
                self._replies.append(item.reply)
        elif isinstance(item, _Heartbeat):
            op = self._open.get(item.index)
            if op is not None and op.attempt == item.attempt:
                first = op.last_heartbeat == 0.0
                op.last_heartbeat = time.time()
                policy = op.command.policy
                if first and policy is not None and policy.heartbeat_timeout:
                    # The clock starts when a worker starts the step (its first beat):
                    # time in the queue is the step timeout's business.
                    self._arm_heartbeat(op, policy.heartbeat_timeout)
        elif isinstance(item, _Inbox):
            self._on_inbox_message(item.message, item.seq, events)
        elif isinstance(item, _Timer):
            await self._on_timer(item, events)
        elif isinstance(item, _Redispatch):
            op = self._open.get(item.index)
            if op is not None and not op.dispatched:
                self._new_commands.append(op.command)
        elif isinstance(item, _Reconnected):
            await self._catch_up_inbox(into=events)
            for op in self._open.values():
                if op.dispatched and not op.command.meta.get("local"):  # local: still running
                    op.dispatched = False
                    self._new_commands.append(op.command)

    def _on_step_result(self, result: StepResult, events: list[Event]) -> None:
        op = self._open.get(result.index)
        if op is None or op.attempt != result.attempt or result.run_id != self.run_id:
            return  # late, duplicate, or for an attempt we gave up on
        cmd = op.command
        if result.ok:
            self._apply_fresh(StepCompleted(
                index=cmd.index, kind=cmd.kind, name=cmd.name, args_digest=cmd.digest,
                result=result.result, attempt=op.attempt, duration_ms=result.duration_ms),
                events)
            return
        self._fail_attempt(op, result.error or {"type": "StepError", "message": "unknown"},
                           events)

    def _fail_attempt(self, op: _Open, error: dict[str, Any], events: list[Event]) -> None:
        cmd = op.command
        policy = cmd.policy or DEFAULT_POLICIES.get(cmd.kind, RetryPolicy())
        common = {"index": cmd.index, "kind": cmd.kind, "name": cmd.name,
                  "args_digest": cmd.digest, "error": error, "attempt": op.attempt}
        if policy.should_retry(op.attempt, error):
            retry_at = time.time() + policy.delay(op.attempt)
            self._apply_fresh(StepFailed(**common, final=False, retry_at=retry_at), events)
            op.cancel_timers()
            self._new_commands.append(cmd)  # re-armed for the retry after the commit
        else:
            self._apply_fresh(StepFailed(**common, final=True), events)

    def _on_inbox_message(self, message: Any, seq: int | None, events: list[Event]) -> None:
        if seq is not None:
            self._inbox_seq = max(self._inbox_seq, seq)
        if isinstance(message, StepResult):
            self._on_step_result(message, events)
        elif isinstance(message, SignalMessage):
            self._on_signal(message, seq, events)
        elif isinstance(message, CancelMessage):
            if not self._cancel_requested:
                self._apply_fresh(CancelRequested(reason=message.reason, by=message.by,
                                                  source_seq=seq), events)
        elif isinstance(message, PauseMessage):
            if not self._paused:
                self._apply_fresh(RunPaused(reason=message.reason, by=message.by), events)
                self.status = "paused"
        elif isinstance(message, ResumeMessage):
            if self._paused:
                self._apply_fresh(RunResumed(by=message.by), events)
                self.status = "running"
                for op in self._deferred:
                    self._new_commands.append(op.command)
                self._deferred.clear()
        elif isinstance(message, SandboxNotice):
            if message.notice_id not in self._notices_seen:
                cls = SandboxLost if message.event == "lost" else SandboxRestored
                fields: dict[str, Any] = {"sandbox_id": message.sandbox_id,
                                          "host": message.host, "notice_id": message.notice_id}
                if cls is SandboxLost:
                    fields["reason"] = message.reason
                else:
                    fields.update(from_snapshot=message.from_snapshot,
                                  step_index=message.step_index)
                self._apply_fresh(cls(**fields), events)

    def _seen(self, signal_id: str) -> None:
        self._signals_seen.add(signal_id)
        self._segment_seen.add(signal_id)

    def _on_signal(self, sig: SignalMessage, seq: int | None, events: list[Event]) -> None:
        if sig.signal_id in self._signals_seen:
            return
        self._seen(sig.signal_id)
        common = {"name": sig.name, "payload": sig.payload, "sender": sig.sender,
                  "signal_id": sig.signal_id, "source_seq": seq}
        waits = sorted(i for i, op in self._open.items()
                       if op.command.kind == "signal" and op.command.name == sig.name)
        if waits:
            # The oldest wait this signal may resolve: one that asks for no particular
            # approval, or one bound to exactly the tool call this signal approves.
            for index in waits:
                approves = (self._open[index].command.args or {}).get("approves")
                if not approves or approves == sig.approves:
                    self._apply_fresh(SignalReceived(**common, delivered_to=index), events)
                    return
            wanted = sorted({self._open[i].command.args.get("approves") for i in waits})
            self._apply_fresh(SignalRejected(
                **common, reason=f"approval is bound to {sig.approves or 'nothing'}, but "
                                 f"the waiting steps need one of {wanted}"), events)
            return
        if sig.name in self._timed_out_names:
            self._apply_fresh(SignalRejected(
                **common, reason="late: the wait for this signal already timed out"), events)
            return
        self._apply_fresh(SignalReceived(**common, delivered_to=None), events)

    async def _on_timer(self, t: _Timer, events: list[Event]) -> None:
        op = self._open.get(t.index)
        if op is None or op.attempt != t.attempt:
            return
        cmd = op.command
        if t.reason in ("fire", "deadline") and cmd.deadline and time.time() < cmd.deadline:
            # The event loop may wake a hair early; a durable timer never fires early.
            self._arm(op, cmd.deadline, t.reason)
            return
        if t.reason == "fire":
            self._apply_fresh(TimerFired(index=cmd.index), events)
        elif t.reason == "deadline":
            self._apply_fresh(SignalTimedOut(index=cmd.index, name=cmd.name,
                                             default=(cmd.args or {}).get("default")), events)
        elif t.reason == "retry":
            op.dispatched = False
            self._new_commands.append(cmd)
        elif t.reason in ("timeout", "heartbeat"):
            # The result may have gone to the durable inbox while we were not listening.
            await self._catch_up_inbox(into=events)
            if self._open.get(t.index) is op and op.attempt == t.attempt:
                what = "StepTimeout" if t.reason == "timeout" else "HeartbeatTimeout"
                self._fail_attempt(op, {"type": what, "retryable": True, "fields": {},
                                        "message": f"attempt {op.attempt} of step {cmd.index} "
                                                   f"({cmd.kind} {cmd.name}) timed out "
                                                   f"({t.reason})"}, events)
                # Its worker may still be at it (hung, or only slow): told after the commit,
                # it stops, so the attempt does not run on beside the next one.
                self._given_up.append(f"{cmd.index}:{t.attempt}")

    async def _catch_up_inbox(self, into: list[Event] | None = None) -> None:
        """Process what the durable inbox holds past what we have seen."""
        events: list[Event] = [] if into is None else into
        async for seq, data, _headers in direct_get_subject(
                self.bus, self.names.runs_stream, self.names.inbox(self.run_id),
                self._inbox_seq):
            try:
                message = decode(data, INBOX_ADAPTER)
            except CodecError as exc:
                log.warning("run %s: skipping undecodable inbox message %s: %s", self.run_id,
                            seq, exc.message)
                self._inbox_seq = seq
                continue
            self._on_inbox_message(message, seq, events)
        if into is None and events:
            await self._commit(events)

    # -- after each commit --------------------------------------------------------------------
    async def _flush_outputs(self) -> None:
        """Reply to workers, publish live events, start new steps: only after the commit."""
        self._start_open_steps()  # arms timers, queues dispatches and status changes
        replies, self._replies = self._replies, []
        for reply in replies:
            with contextlib.suppress(NatsClientError):
                await self.bus.publish(reply, b"")
        given_up, self._given_up = self._given_up, []
        for attempt in given_up:
            with contextlib.suppress(NatsClientError):
                await self.bus.publish(self.names.attempt_given_up(self.run_id),
                                       attempt.encode())
        if self.instance is not None:
            self._emits.extend(self.instance.take_emits())
        emits, self._emits = self._emits, []
        for ev in emits:
            # Pipelined, not awaited one by one: live output must not cost the run an fsync
            # per event. Published before the dispatches below, on the same connection, so
            # the stream shows a tool call starting before anything the tool says.
            with contextlib.suppress(NatsClientError):
                stored = await self.bus.replies.send(self.names.stream(self.run_id),
                                                     encode(ev), timeout=10.0, stored=True)
                stored.add_done_callback(self._emit_stored)
        await self._dispatch_pending()

    def _start_open_steps(self) -> None:
        """Arm timers/deadlines of new commands; queue dispatches of new work steps."""
        commands, self._new_commands = self._new_commands, []
        for cmd in commands:
            op = self._open.get(cmd.index)
            if op is None:
                continue
            if cmd.kind == "timer":
                self._trace(op)
                self._arm(op, cmd.deadline or time.time(), "fire")
            elif cmd.kind == "signal":
                self._trace(op)
                if cmd.deadline is not None:
                    self._arm(op, cmd.deadline, "deadline")
                self._emit_status()
            elif cmd.subject is not None or cmd.meta.get("local"):
                if op.retry_at is not None and op.retry_at > time.time() and not op.dispatched:
                    self._arm(op, op.retry_at, "retry")
                    op.retry_at = None
                elif self._paused:
                    self._deferred.append(op)
                else:
                    self._to_dispatch.append(op)

    async def _dispatch_pending(self) -> None:
        todo, self._to_dispatch = self._to_dispatch, []
        failed: list[_Open] = []
        for op in todo:
            if op.command.index not in self._open or op.dispatched:
                continue
            if op.command.meta.get("local"):
                self._run_local(op)
                continue
            try:
                await self._dispatch(op)
            except (TimeoutError, NatsClientError, NerveError) as exc:
                log.warning("run %s: dispatch of step %s failed (%r); retrying", self.run_id,
                            op.command.index, exc)
                failed.append(op)
        if failed:
            # Try again shortly, as after a reconnect: re-read the inbox, re-dispatch.
            self._pending_dispatch_retry = asyncio.get_running_loop().call_later(
                1.0, self.put, _Reconnected())

    async def _dispatch(self, op: _Open) -> None:
        cmd = op.command
        assert self.started is not None and cmd.subject is not None
        policy = cmd.policy or DEFAULT_POLICIES.get(cmd.kind, RetryPolicy())
        key = f"{self.run_id}:{cmd.index}"
        deadline = time.time() + policy.timeout if policy.timeout else None
        item = WorkItem(run_id=self.run_id, tenant=self.started.tenant, index=cmd.index,
                        attempt=op.attempt, kind=cmd.kind, name=cmd.name, args=cmd.args,
                        key=key, reply_to=self.names.inbox(self.run_id),
                        result_to=self.names.results(self.orch.owner_id, self.run_id),
                        deadline=deadline,
                        meta=cmd.meta)
        self._trace(op)
        envelope = Envelope(run_id=self.run_id, tenant=self.started.tenant)
        extra = {"Nats-Msg-Id": f"work:{key}:{op.attempt}"}
        if op.span is None:  # not tracing here: the worker's spans still join the run's trace
            envelope.traceparent = run_traceparent(self.run_id)
            headers = envelope.to_headers(extra)
        else:
            with trace.use_span(op.span, end_on_exit=False):  # carries the step's traceparent
                headers = envelope.to_headers(extra)
        # Not waiting for the work queue's ack keeps a round trip off every step's critical
        # path; the ack is checked when it comes and a lost item is dispatched again.
        stored = await self.bus.replies.send(cmd.subject, encode(item), headers, timeout=5.0,
                                             stored=True)
        stored.add_done_callback(functools.partial(self._dispatch_stored, op, op.attempt))
        op.dispatched = True
        crash_point("dispatched", cmd.index)
        op.last_heartbeat = 0.0  # not started by a worker yet
        if deadline is not None:
            self._arm(op, deadline, "timeout")

    def _trace(self, op: _Open) -> None:
        if op.span is None and self.started is not None and tracing_enabled():
            op.span = start_step_span(self.started, op.command, op.attempt)

    def _emit_stored(self, stored: asyncio.Future[Any]) -> None:
        if not stored.cancelled() and (exc := stored.exception()) is not None:
            log.warning("run %s: a live event was not stored: %r", self.run_id, exc)

    def _run_local(self, op: _Open) -> None:
        """A local activity: run it here, in the orchestrator, instead of on a worker.

        Same contract as a remote step (idempotency key, retries, timeout); the result goes
        through the same path. No NATS hop, so its cost is the history append alone.
        """
        op.dispatched = True
        self._trace(op)
        task = asyncio.create_task(self._local(op, op.attempt))
        self._local_runs.add(task)
        task.add_done_callback(self._local_runs.discard)

    async def _local(self, op: _Open, attempt: int) -> None:
        from workflow._activity import ActivityContext, call_activity

        cmd = op.command
        assert self.started is not None
        policy = cmd.policy or DEFAULT_POLICIES["activity"]
        key = f"{self.run_id}:{cmd.index}"
        actx = ActivityContext(key, self.run_id, self.started.tenant, cmd.index, attempt,
                               cmd.name)
        started = time.perf_counter()
        limit = asyncio.timeout(policy.timeout)
        try:
            fn = self.orch.activities.get(cmd.name)
            async with limit:
                value = await call_activity(fn, actx, cmd.args)
            result = StepResult(run_id=self.run_id, index=cmd.index, attempt=attempt, key=key,
                                ok=True, result=value, worker=f"{self.orch.owner_id}:local")
            result, _ = result.encoded(f"step {cmd.index} (local activity {cmd.name})")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and limit.expired():
                wire = {"type": "StepTimeout", "retryable": True, "fields": {},
                        "message": f"attempt {attempt} of step {cmd.index} (local activity "
                                   f"{cmd.name}) timed out after {policy.timeout}s"}
            elif isinstance(exc, NerveError):
                wire = exc.to_wire()
            else:
                wire = {"type": type(exc).__name__, "message": str(exc) or repr(exc),
                        "retryable": True, "fields": {}}
            result = StepResult(run_id=self.run_id, index=cmd.index, attempt=attempt, key=key,
                                ok=False, error=wire, worker=f"{self.orch.owner_id}:local")
        result.duration_ms = (time.perf_counter() - started) * 1000
        self.put(_Result(result))

    def _dispatch_stored(self, op: _Open, attempt: int, stored: asyncio.Future[Any]) -> None:
        exc = None if stored.cancelled() else stored.exception()
        if exc is not None and self._open.get(op.command.index) is op and op.attempt == attempt:
            log.warning("run %s: work item for step %s was not stored (%r); dispatching it "
                        "again shortly", self.run_id, op.command.index, exc)
            op.dispatched = False
            # Not at once: a work stream that is gone (a restarted server) comes back when
            # a worker re-creates it.
            op.timers.append(asyncio.get_running_loop().call_later(
                0.5, self.put, _Redispatch(op.command.index)))

    def _arm(self, op: _Open, when: float, reason: str) -> None:
        loop = asyncio.get_running_loop()
        attempt = op.attempt
        index = op.command.index
        op.timers.append(loop.call_later(max(0.0, when - time.time()),
                                         self.put, _Timer(index, attempt, reason)))

    def _arm_heartbeat(self, op: _Open, every: float) -> None:
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self._open.get(op.command.index) is not op or not op.dispatched:
                return
            if time.time() - op.last_heartbeat > every:
                self.put(_Timer(op.command.index, op.attempt, "heartbeat"))
            else:
                op.timers.append(loop.call_later(every / 2, check))

        op.timers.append(loop.call_later(every, check))

    def _emit_status(self) -> None:
        waiting = any(op.command.kind == "signal" for op in self._open.values())
        status = "paused" if self._paused else ("waiting" if waiting else "running")
        self._emits.append(StreamEvent(type="status", run_id=self.run_id,
                                       data={"status": status}))

    async def _next_segment(self, continued: RunContinued, seq: int) -> None:
        """The workflow continued as new: start its next segment from ``continued``."""
        assert self.instance is not None
        await self.orch.mark_segment(self.run_id, seq)
        for op in self._open.values():  # steps of the old segment are abandoned
            op.cancel_timers()
        self._open.clear()
        self._new_commands.clear()
        self._to_dispatch.clear()
        assert self.definition is not None
        instance = self._new_instance(self.definition, [continued], continued)
        instance.apply(continued, recorded=True)
        # The segment's first steps, then what signals buffered meanwhile do to them (each
        # delivered to its wait, recorded after that wait's StepScheduled).
        fresh = instance.take_events()
        for event in fresh:
            self._track(event)
        self._adopt(instance.take_commands(), live=True, produced=fresh)
        self._emits.extend(instance.take_emits())
        if fresh:
            await self._commit(fresh)

    async def _on_end(self) -> None:
        assert self.instance is not None
        instance = self.instance
        self.status = instance.state.value
        if instance.state is InstanceState.COMPLETED:
            self._emits.append(StreamEvent(type="final", run_id=self.run_id,
                                           data={"result": instance.result}))
        elif instance.state is InstanceState.FAILED:
            self._emits.append(StreamEvent(type="error", run_id=self.run_id,
                                           data={"error": instance.failure}))
        status: dict[str, Any] = {"status": self.status}
        if instance.state is InstanceState.BLOCKED and instance.error is not None:
            status.update(reason=instance.error.message,
                          diff=instance.error.fields.get("diff", {}))
            log.error("run %s is blocked: %s", self.run_id, instance.error.message)
        self._emits.append(StreamEvent(type="status", run_id=self.run_id, data=status))
        await self._flush_outputs()
        if instance.state is not InstanceState.BLOCKED:
            await self._release()


def _last_state_event(events: list[Event]) -> str | None:
    """The type of the last event that changes a run's visible state."""
    for event in reversed(events):
        if event.type in ("run_blocked", "run_resumed", "run_paused") or event.type.startswith(
                "step_") or event.type in ("signal_received", "timer_fired", "marker"):
            return event.type
    return None
