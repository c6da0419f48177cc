"""Step work: what an orchestrator dispatches on ``NERVE_WORK`` and what comes back.

A :class:`WorkItem` asks a worker (gateway, tool gateway, sandbox host, activity worker) to
perform one step of one run. Delivery is at least once; ``key`` (``<run_id>:<step index>``)
is the idempotency key every effect must honour.

The worker answers with a :class:`StepResult`, first straight to the run's owner
(a request on ``item.result_to``; the owner replies once the result is in the run's
history, so the happy path costs one fsync per step, the history's). If no owner answers
(it died, or is being replaced), the worker stores the result on the run's durable inbox
(``item.reply_to``), where the next owner finds it when it takes the run over. Only then is
the work item acked.

While a step with a ``heartbeat_timeout`` runs, the worker heartbeats to ``result_to`` so
the owner can tell a dead worker from a slow one; once the step's own code reports progress
(:class:`StepPulse`), only its reports count, so hung code is told from slow code too.
Every step also keeps its work item with ``in_progress`` acks until the item is acked, so
the queue redelivers it only after its worker has been silent for ``ack_wait`` (5 s): a
dead worker's steps run again within seconds (on a peer, or on its own restart), and a live
worker's stay with it however long they run (unless it goes silent: its event loop held,
or cut off from the server).

:class:`StepWorker` is the base for every such worker: subclasses implement ``execute``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from nats.errors import Error as NatsClientError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, Field

from actors._actor import Actor, Delivery
from actors._codec import encode
from actors._envelope import Envelope
from actors._mailbox import WorkQueue
from bus import StreamLimits, stream_configs
from nerve import NerveError, ResultTooLarge

log = logging.getLogger("nerve.actors.work")

H_HEARTBEAT = "Nerve-Heartbeat"
# On the owner's reply to a result: "I do not drive this run"; store the result instead.
H_NOT_OWNER = "Nerve-Not-Owner"

StepKindName = Literal["llm", "tool", "sandbox", "activity", "timer", "signal", "marker", "child"]


class WorkItem(BaseModel):
    """One step for a worker to perform."""

    run_id: str
    tenant: str
    index: int
    attempt: int = 1
    kind: StepKindName
    name: str
    args: Any = None
    key: str  # idempotency key: "<run_id>:<index>"
    reply_to: str  # the run's durable inbox subject
    result_to: str | None = None  # the owner's direct result subject (core NATS)
    deadline: float | None = None  # epoch seconds after which the result is useless
    meta: dict[str, Any] = Field(default_factory=dict)


# A step's result becomes one event of the run's history, in one NATS message (1 MB by
# default, shared with the events beside it). Temporal draws its line at 2 MB. Past this a
# step fails for good, saying why, instead of the server refusing the append forever.
MAX_RESULT_BYTES = 512 * 1024


class StepResult(BaseModel):
    """A worker's answer to a :class:`WorkItem`, sent to the run's inbox."""

    type: Literal["step_result"] = "step_result"
    run_id: str
    index: int
    attempt: int
    key: str
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None  # NerveError.to_wire()
    worker: str = ""
    duration_ms: float = 0.0
    at: float = Field(default_factory=time.time)

    def encoded(self, what: str) -> tuple[StepResult, bytes]:
        """This result and its encoding; one too big to record (over
        :data:`MAX_RESULT_BYTES`) becomes a permanent ``ResultTooLarge`` failure of ``what``."""
        payload = encode(self)
        if not self.ok or len(payload) <= MAX_RESULT_BYTES:
            return self, payload
        error = ResultTooLarge(
            f"the result of {what} is {len(payload):,} bytes; a step's result is at most "
            f"{MAX_RESULT_BYTES:,}. Keep big outputs elsewhere (a file in the sandbox, an "
            f"object store) and return a reference to them", run_id=self.run_id,
            index=self.index, size=len(payload), limit=MAX_RESULT_BYTES, retryable=False)
        failed = self.model_copy(update={"ok": False, "result": None, "error": error.to_wire()})
        return failed, encode(failed)


@dataclass(slots=True)
class StepPulse:
    """Whether a running step is alive, as its worker tells the step's owner.

    Until the step's code reports (``report``, which ``ActivityContext.heartbeat`` calls),
    the worker beats for it every third of its ``heartbeat_timeout``: the worker is alive.
    Once the code has reported, only its reports count: code that stops reporting (hung on
    a lock, a socket without a timeout) goes silent, and the owner's heartbeat timeout
    retries the step. ``report`` may be called from any thread.
    """

    explicit: bool = False
    reported: bool = False

    def report(self) -> None:
        self.explicit = True
        self.reported = True

    def due(self) -> bool:
        """Whether to beat in the period that ends now."""
        if not self.explicit:
            return True
        due, self.reported = self.reported, False
        return due


class StepWorker(Actor[WorkItem]):
    """Base class for workers that perform steps.

    Implement :meth:`execute`; its return value becomes ``StepResult.result``. A raised
    :class:`~nerve.NerveError` becomes an error result (``retryable`` tells the orchestrator
    whether to try again); any other exception is reported as a retryable error. The result
    is stored on the run's inbox before the work item is acked, so a crash in between
    redelivers the item rather than losing the answer.

    Recently finished keys are remembered so a redelivered duplicate is answered with the
    same result instead of being performed twice by this worker.
    """

    message_type = WorkItem
    subjects: ClassVar[list[str]] = []  # or override work_subjects() when they need the prefix
    durable: ClassVar[str] = ""
    # How long a silent worker holds a step before the queue hands it to another worker
    # (or to its own restart). Nothing else gives back the steps of a worker that died:
    # which worker holds which message is known only to that worker, so neither its
    # restart under the same id nor a peer can tell them from a live worker's. So the wait
    # is short, and a live worker keeps a step however long it takes by sending
    # ``in_progress`` every ``ack_wait / 3`` while the step runs and while its result is
    # on its way: a step is redelivered only once its worker has been silent this long.
    ack_wait: ClassVar[float] = 5.0
    # A step still running when the worker stops is cancelled (its code's finally blocks
    # run) rather than waited for: its work item, not acked, comes back within ack_wait to
    # a peer or to this worker's restart.
    stop_timeout: ClassVar[float] = 2.0
    max_deliver: ClassVar[int] = 20
    recent_results: ClassVar[int] = 4096
    # How long the owner may take to record a result before we store it durably instead
    # (it may have died holding our request). Short: a takeover waits on it.
    reply_timeout: ClassVar[float] = 1.0
    passthrough: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, name: str | None = None, worker_id: str | None = None) -> None:
        super().__init__(name)
        self.worker_id = worker_id or self.name
        self._recent: collections.OrderedDict[tuple[str, int], StepResult] = (
            collections.OrderedDict())
        self._deliveries: set[asyncio.Task[None]] = set()
        self._pulses: dict[tuple[str, int], StepPulse] = {}

    def pulse(self, item: WorkItem) -> StepPulse | None:
        """The pulse of ``item`` while this worker performs it."""
        return self._pulses.get((item.key, item.attempt))

    def work_subjects(self) -> list[str]:
        """The ``NERVE_WORK`` subjects this worker pulls from."""
        return list(self.subjects)

    def mailbox(self) -> WorkQueue:
        assert self.bus is not None
        names = self.bus.names
        # The work stream lives in memory by default: a restarted server has lost it, and
        # the workers bring it back (the orchestrators re-dispatch what was in it). The
        # mailbox re-creates it as it found it; this config is for a stream never seen.
        config = next(c for c in stream_configs(names, StreamLimits())
                      if c.name == names.work_stream)
        return WorkQueue(stream=names.work_stream, subjects=self.work_subjects(),
                         durable=self.durable or self.name, ack_wait=self.ack_wait,
                         max_deliver=self.max_deliver, stream_config=config)

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        raise NotImplementedError

    async def perform(self, message: WorkItem, delivery: Delivery) -> StepResult:
        """Run the step (or recall its result) and turn the outcome into a ``StepResult``.

        Exceptions in ``passthrough`` are not results: they propagate to the caller.
        """
        cached = self._recent.get((message.key, message.attempt))
        if cached is not None:
            return cached
        started = time.perf_counter()
        beat = None
        pulse = self._pulses[(message.key, message.attempt)] = StepPulse()
        if message.meta.get("heartbeat_timeout") and message.result_to:
            # "Started" reaches the owner before the effect begins, so a worker that dies
            # inside the step is noticed by its heartbeat timeout, not by redelivery.
            await self._beat(message, flush=True)
            beat = asyncio.create_task(self._heartbeat_owner(message, pulse))
        try:
            value = await self.execute(message, delivery)
            result = StepResult(run_id=message.run_id, index=message.index,
                                attempt=message.attempt, key=message.key, ok=True,
                                result=value, worker=self.worker_id)
        except self.passthrough:
            raise
        except asyncio.CancelledError:
            raise
        except NerveError as exc:
            result = self._error(message, exc.to_wire())
        except Exception as exc:
            log.exception("%s: step %s failed", self.name, message.key)
            result = self._error(message, {"type": type(exc).__name__, "message": str(exc),
                                           "retryable": True, "fields": {}})
        finally:
            self._pulses.pop((message.key, message.attempt), None)
            if beat is not None:
                beat.cancel()
        result.duration_ms = (time.perf_counter() - started) * 1000
        self._remember(message, result)
        return result

    async def superseded(self, item: WorkItem, delivery: Delivery) -> str | None:
        """Why ``item`` must not run (a redelivery of a step that is over), or None. Such an
        item is acked and nothing is sent: the owner has moved on."""
        return None

    async def handle(self, message: WorkItem, delivery: Delivery) -> None:
        if (why := await self.superseded(message, delivery)) is not None:
            log.info("%s: not running step %s (attempt %d) again: %s", self.name, message.key,
                     message.attempt, why)
            return
        result = await self.perform(message, delivery)
        # The slot this handler holds bounds how many steps run at once, not how many
        # results are on their way: deliver in the background, ack (or nak) when delivered.
        delivery.settled = True
        task = asyncio.create_task(self._deliver(message, result, delivery))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, item: WorkItem, result: StepResult, delivery: Delivery) -> None:
        # The handler's heartbeat ended with it; the item stays ours until it is acked, or a
        # slow delivery (an owner slow to answer, then a slow store) would let the queue
        # hand the finished step to another worker, which would run it again.
        heartbeat = self._arm_heartbeat(delivery.msg.in_progress)
        try:
            await self.reply(item, result)
        except NerveError as exc:
            log.warning("%s: %s; the step will be redelivered", self.name, exc.message)
            with contextlib.suppress(NatsClientError):
                await delivery.msg.nak(delay=1.0)
            return
        finally:
            heartbeat.cancel()
        with contextlib.suppress(NatsClientError):
            await delivery.msg.ack()

    async def on_stop(self) -> None:
        if self._deliveries:
            # Results on their way are worth waiting for; unacked ones are redelivered.
            await asyncio.wait(set(self._deliveries), timeout=self.reply_timeout + 5)

    def _error(self, item: WorkItem, wire: dict[str, Any]) -> StepResult:
        return StepResult(run_id=item.run_id, index=item.index, attempt=item.attempt,
                          key=item.key, ok=False, error=wire, worker=self.worker_id)

    def _remember(self, item: WorkItem, result: StepResult) -> None:
        self._recent[(item.key, item.attempt)] = result
        while len(self._recent) > self.recent_results:
            self._recent.popitem(last=False)

    async def _beat(self, item: WorkItem, flush: bool = False) -> None:
        assert self.bus is not None and item.result_to
        with contextlib.suppress(NatsClientError, TimeoutError):
            await self.bus.nc.publish(item.result_to, b"",
                                      headers={H_HEARTBEAT: f"{item.index}:{item.attempt}"})
            if flush:
                await self.bus.nc.flush(timeout=2)

    async def _heartbeat_owner(self, item: WorkItem, pulse: StepPulse) -> None:
        every = float(item.meta["heartbeat_timeout"]) / 3
        while True:
            await asyncio.sleep(every)
            if pulse.due():
                await self._beat(item)

    async def reply(self, item: WorkItem, result: StepResult) -> None:
        """Hand ``result`` to the run's owner; failing that, store it on the durable inbox."""
        assert self.bus is not None
        result, payload = result.encoded(f"step {item.index} ({item.kind} {item.name})")
        if item.result_to:
            try:
                answer = await self.bus.replies.request(item.result_to, payload,
                                                        timeout=self.reply_timeout)
                if answer.headers.get(H_NOT_OWNER) is None:
                    return  # the owner has it in the history
            except (TimeoutError, NoRespondersError, NatsTimeoutError):
                pass  # no owner right now: the next one reads the inbox
            except NatsClientError as exc:
                log.warning("%s: direct result for %s failed (%r); storing it", self.name,
                            item.key, exc)
        headers = Envelope(run_id=item.run_id, tenant=item.tenant).to_headers(
            {"Nats-Msg-Id": f"result:{item.key}:{item.attempt}"})
        try:
            await self.bus.js.publish(item.reply_to, payload, headers=headers)
        except (TimeoutError, NatsClientError) as exc:
            # Not stored: raise so the item is naked and the result is sent again later.
            raise NerveError(f"could not deliver the result of {item.key}: {exc!r}",
                             retryable=True, key=item.key) from None
