"""``ActivityWorker``: runs user-defined activities (``ctx.activity``) from ``NERVE_WORK``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgpack
from nats.errors import Error as NatsClientError
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from actors import Delivery, StepPulse, StepWorker, WorkItem, encode
from nerve import CodecError, ConfigError, NerveError, StepError
from persistence import TERMINAL_TYPES, RunHistory, StepCompleted, StepFailed
from workflow._definition import ActivityRegistry, activities

log = logging.getLogger("nerve.workflow.activity")


@dataclass(frozen=True, slots=True)
class ActivityContext:
    """What an activity knows about the step it performs.

    ``key`` is the same on every attempt and every redelivery of this step: use it to make
    the effect idempotent (a payment id, a ``create``-only KV key, an upsert key).
    ``heartbeat_details`` is what an earlier attempt last passed to :meth:`heartbeat` (None
    on a first attempt): start from there instead of from the beginning.
    """

    key: str
    run_id: str
    tenant: str
    index: int
    attempt: int
    name: str
    heartbeat_details: Any = None
    _report: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)

    def heartbeat(self, details: Any = None) -> None:
        """Report progress; callable from a coroutine or a plain function's thread.

        From the first call on, the step's ``heartbeat_timeout`` (if its policy has one)
        counts the time between these calls: an activity that stops calling (hung) has its
        attempt timed out and retried, where without calls only the worker's own liveness
        counts. ``details`` (any data the bus carries: a cursor, the last file done; sets
        and tuples come back as lists) are kept durably and given to the next attempt, after
        a retry or a worker's crash, as ``heartbeat_details``. Activities run with
        ``local=True`` have nowhere to report to: the call does nothing there.
        """
        if self._report is not None:
            self._report(details)


async def call_activity(fn: Any, actx: ActivityContext, args: Any) -> Any:
    """Call an activity function: coroutines on the loop, plain functions in a thread."""
    positional = (args or {}).get("args", [])
    keywords = (args or {}).get("kwargs", {})
    if inspect.iscoroutinefunction(fn):
        return await fn(actx, *positional, **keywords)
    return await asyncio.to_thread(fn, actx, *positional, **keywords)


class _Progress:
    """One running activity step's heartbeat details on their way to the progress bucket.

    ``report`` (from any thread) keeps the latest details; a writer stores them at most
    once a second while the step runs, and once more when an attempt fails, so the next
    attempt (here, on a peer, or after this worker's crash: then the last second's details
    may be missing) starts from them. A step that succeeds deletes them; an attempt given
    up (see :meth:`close`) writes nothing.
    """

    WRITE_EVERY = 1.0

    def __init__(self, kv: KeyValue | None, key: str, pulse: StepPulse | None,
                 found: bool) -> None:
        self._kv = kv
        self._key = key
        self._pulse = pulse
        self._loop = asyncio.get_running_loop()
        self._latest: bytes | None = None
        self._written: bytes | None = None
        self._stored = found  # the bucket holds details for this step
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def report(self, details: Any) -> None:
        if self._pulse is not None:
            self._pulse.report()
        if details is None:
            return
        try:
            payload = encode(details)
        except CodecError as exc:
            raise TypeError(f"heartbeat details must be data the bus carries (dict, list, "
                            f"str, numbers, bytes, pydantic models): {exc.message}") from None
        self._latest = payload
        with contextlib.suppress(RuntimeError):  # a thread outliving its worker's loop
            self._loop.call_soon_threadsafe(self._wake_writer)

    def _wake_writer(self) -> None:
        if self._kv is None or self._closed:
            return  # closed: a late report (from a thread that outlived its step) is moot
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._write()
            await asyncio.sleep(self.WRITE_EVERY)

    async def _write(self) -> None:
        latest = self._latest
        if self._kv is None or latest is None or latest == self._written:
            return
        self._stored = True  # before the put: cancelled in flight, it may land all the same
        try:
            await self._kv.put(self._key, latest)
        except (NatsClientError, TimeoutError) as exc:
            log.warning("heartbeat details of step %s not stored: %r", self._key, exc)
            return
        self._written = latest

    async def close(self, outcome: Literal["succeeded", "failed", "given up"]) -> None:
        """The attempt is over: a success deletes the step's details; a failure stores the
        last ones for the next attempt; an attempt given up (its run ended, or its owner runs
        another one) writes nothing, or it could overwrite the details of the attempt that
        replaced it."""
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if outcome == "failed":
            await self._write()
        elif outcome == "succeeded" and self._stored and self._kv is not None:
            with contextlib.suppress(NatsClientError, TimeoutError):
                await self._kv.delete(self._key)


class ActivityWorker(StepWorker):
    """Pulls ``nerve.work.activity`` and runs the registered function for each item.

    Async activities run on the event loop; plain functions run in a worker thread so they
    cannot block it. An async activity must not hold the loop either (``time.sleep``,
    heavy CPU): the loop sends the ``in_progress`` beats that keep a step with this worker,
    and a step silent for ``ack_wait`` (5 s) goes to another worker while this one still
    runs it. That is also how a dead worker's steps come back within seconds, to a peer or
    to its own restart.

    An async activity is cancelled when its step's timeout passes, when its owner gives up
    on the attempt (its heartbeat timeout: another attempt runs) and when its run ends
    (cancelled, failed, or done without it): it gets ``CancelledError`` where it awaits, so
    its ``finally`` blocks run. A plain function's thread cannot be stopped, but it stops
    counting: its heartbeats and result are ignored. An item delivered again after its
    worker died is not run if the run's history shows the step done or that attempt
    replaced by a later one.
    """

    durable: ClassVar[str] = "activities"

    def __init__(self, registry: ActivityRegistry | None = None, worker_id: str | None = None,
                 ) -> None:
        super().__init__("activity-worker", worker_id)
        self.registry = registry or activities
        # run id -> its running activities and their items
        self._running: dict[str, dict[asyncio.Task[Any], WorkItem]] = {}
        # Activities cancelled because they are moot (their run ended, or their owner gave
        # up on the attempt), with why.
        self._stopped: dict[asyncio.Task[Any], str] = {}
        self._subs: list[Any] = []
        self._progress: KeyValue | None = None

    async def on_start(self) -> None:
        assert self.bus is not None
        names = self.bus.names
        self._subs = [await self.bus.nc.subscribe(names.run_ended(), cb=self._on_run_ended),
                      await self.bus.nc.subscribe(names.attempt_given_up(),
                                                  cb=self._on_given_up)]
        try:
            self._progress = await self.bus.js.key_value(self.bus.names.progress_bucket)
        except NotFoundError:
            log.warning("no KV bucket %s (run `nerve` once against this server to provision "
                        "it): heartbeat details are not kept for the next attempt",
                        self.bus.names.progress_bucket)

    async def on_stop(self) -> None:
        await super().on_stop()
        for sub in self._subs:
            with contextlib.suppress(NatsClientError):
                await sub.unsubscribe()

    async def _on_run_ended(self, msg: Any) -> None:
        run_id = msg.subject.rsplit(".", 2)[-2]
        for task in self._running.get(run_id, {}):
            self._stop(task, "its run ended")

    async def _on_given_up(self, msg: Any) -> None:
        run_id = msg.subject.rsplit(".", 2)[-2]
        index, _, attempt = msg.data.decode(errors="replace").partition(":")
        with contextlib.suppress(ValueError):
            for task, item in self._running.get(run_id, {}).items():
                if item.index == int(index) and item.attempt <= int(attempt):
                    self._stop(task, f"its owner gave up on attempt {item.attempt} (timed "
                                     "out) and runs another")

    def _stop(self, task: asyncio.Task[Any], why: str) -> None:
        if task not in self._stopped:
            self._stopped[task] = why
            task.cancel()

    async def superseded(self, item: WorkItem, delivery: Delivery) -> str | None:
        """Why an item delivered again (its worker died, or went silent) must not run: its
        run's history shows the step done, this attempt given up for a later one, or the
        run ended. Read only on a redelivery; an unreadable history runs it (at least
        once)."""
        if delivery.num_delivered <= 1 or self.bus is None:
            return None
        try:
            events = await RunHistory(self.bus, item.run_id).read()
        except (NatsClientError, TimeoutError, NerveError) as exc:
            log.warning("history of run %s not read (%r): running redelivered step %s",
                        item.run_id, exc, item.key)
            return None
        for ev in reversed(events):
            if ev.type in TERMINAL_TYPES:
                return f"its run has ended ({ev.type.removeprefix('run_')})"
            if isinstance(ev, StepCompleted) and ev.index == item.index:
                return "the step has completed"
            if isinstance(ev, StepFailed) and ev.index == item.index and (
                    ev.final or ev.attempt >= item.attempt):
                return f"attempt {ev.attempt} of the step failed ({ev.error.get('type')})" + (
                    "" if ev.final else "; a later attempt runs it")
        return None

    def work_subjects(self) -> list[str]:
        """The ``NERVE_WORK`` subject of activity steps."""
        assert self.bus is not None
        return [self.bus.names.work_activity]

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        """Run the activity the item names with the step's :class:`ActivityContext`."""
        try:
            fn = self.registry.get(item.name)
        except ConfigError:
            # Retryable: in a rolling deploy another worker (or this one, updated) has it.
            raise ConfigError(
                f"no activity named {item.name!r} is registered on activity worker "
                f"{self.worker_id} (it has: {', '.join(self.registry.names()) or 'none'}). "
                "Every activity worker takes any activity step, so each must register every "
                "activity the workflows call", activity=item.name, worker=self.worker_id,
                retryable=True) from None
        key = self.bus.names.progress_key(item.run_id, item.index) if self.bus else item.key
        found = None
        if self._progress is not None and (item.attempt > 1 or delivery.num_delivered > 1):
            # Only a step tried before can have progress: a first try pays no read.
            found = await self._last_details(key)
        progress = _Progress(self._progress, key, self.pulse(item), found is not None)
        actx = ActivityContext(item.key, item.run_id, item.tenant, item.index, item.attempt,
                               item.name, heartbeat_details=found, _report=progress.report)
        # Past its timeout the owner has given up on this attempt (and may have started the
        # next): an async activity is cancelled there rather than left running beside it. A
        # plain function in its thread cannot be stopped; its result is then ignored.
        left = None if item.deadline is None else item.deadline - time.time()
        task = asyncio.current_task()
        assert task is not None
        running = self._running.setdefault(item.run_id, {})
        running[task] = item
        outcome: Literal["succeeded", "failed", "given up"] = "failed"
        try:
            async with asyncio.timeout(left):
                value = await call_activity(fn, actx, item.args)
            outcome = "succeeded"
            return value
        except TimeoutError:
            if left is not None and time.time() >= item.deadline:  # type: ignore[operator]
                raise StepError(f"attempt {item.attempt} of step {item.index} (activity "
                                f"{item.name}) was stopped at its timeout", run_id=item.run_id,
                                index=item.index, retryable=True) from None
            raise
        except asyncio.CancelledError:
            if task not in self._stopped:
                raise  # the worker is stopping: the step is redelivered
            task.uncancel()
            outcome = "given up"
            raise StepError(f"activity {item.name} (step {item.index}, attempt "
                            f"{item.attempt}) was stopped: {self._stopped[task]}",
                            run_id=item.run_id, index=item.index, retryable=False) from None
        finally:
            self._stopped.pop(task, None)
            running.pop(task, None)
            if not running:
                self._running.pop(item.run_id, None)
            await progress.close(outcome)

    async def _last_details(self, key: str) -> Any:
        """What an earlier attempt of the step last reported, if anything."""
        assert self._progress is not None
        try:
            entry = await self._progress.get(key)
        except KeyNotFoundError:
            return None
        except (NatsClientError, TimeoutError) as exc:
            log.warning("heartbeat details of step %s not read (%r): the attempt starts "
                        "without them", key, exc)
            return None
        return msgpack.unpackb(entry.value, raw=False) if entry.value else None
