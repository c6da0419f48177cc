"""Step work: what an orchestrator dispatches on ``NERVE_WORK`` and what comes back.

A :class:`WorkItem` asks a worker (gateway, tool gateway, sandbox host, activity worker) to
perform one step of one run. The worker answers with a :class:`StepResult` published on
``item.reply_to`` (the run's inbox). Delivery is at least once; ``key``
(``<run_id>:<step index>``) is the idempotency key every effect must honour.

:class:`StepWorker` is the base for every such worker: subclasses implement ``execute``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, ClassVar, Literal

from nats.errors import Error as NatsClientError
from pydantic import BaseModel, Field

from actors._actor import Actor, Delivery
from actors._codec import encode
from actors._envelope import Envelope
from actors._mailbox import WorkQueue
from nerve._errors import NerveError

log = logging.getLogger("nerve.actors.work")

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
    reply_to: str  # the run's inbox subject
    deadline: float | None = None  # epoch seconds after which the result is useless
    meta: dict[str, Any] = Field(default_factory=dict)


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
    subjects: ClassVar[list[str]] = []
    durable: ClassVar[str] = ""
    ack_wait: ClassVar[float] = 30.0
    max_deliver: ClassVar[int] = 20
    recent_results: ClassVar[int] = 4096

    def __init__(self, name: str | None = None, worker_id: str | None = None) -> None:
        super().__init__(name)
        self.worker_id = worker_id or self.name
        self._recent: collections.OrderedDict[tuple[str, int], StepResult] = (
            collections.OrderedDict())

    def mailbox(self) -> WorkQueue:
        assert self.bus is not None
        return WorkQueue(stream=self.bus.names.work_stream, subjects=list(self.subjects),
                         durable=self.durable or self.name, ack_wait=self.ack_wait,
                         max_deliver=self.max_deliver)

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        raise NotImplementedError

    async def handle(self, message: WorkItem, delivery: Delivery) -> None:
        cached = self._recent.get((message.key, message.attempt))
        if cached is None:
            started = time.perf_counter()
            try:
                value = await self.execute(message, delivery)
                result = StepResult(run_id=message.run_id, index=message.index,
                                    attempt=message.attempt, key=message.key, ok=True,
                                    result=value, worker=self.worker_id)
            except asyncio.CancelledError:
                raise
            except NerveError as exc:
                result = self._error(message, exc.to_wire())
            except Exception as exc:
                log.exception("%s: step %s failed", self.name, message.key)
                result = self._error(message, {"type": type(exc).__name__, "message": str(exc),
                                               "retryable": True, "fields": {}})
            result.duration_ms = (time.perf_counter() - started) * 1000
            self._remember(message, result)
        else:
            result = cached
        await self.reply(message, result)

    def _error(self, item: WorkItem, wire: dict[str, Any]) -> StepResult:
        return StepResult(run_id=item.run_id, index=item.index, attempt=item.attempt,
                          key=item.key, ok=False, error=wire, worker=self.worker_id)

    def _remember(self, item: WorkItem, result: StepResult) -> None:
        self._recent[(item.key, item.attempt)] = result
        while len(self._recent) > self.recent_results:
            self._recent.popitem(last=False)

    async def reply(self, item: WorkItem, result: StepResult) -> None:
        """Store ``result`` on the run's inbox (durably: we wait for JetStream's ack)."""
        assert self.bus is not None
        headers = Envelope(run_id=item.run_id, tenant=item.tenant).to_headers(
            {"Nats-Msg-Id": f"result:{item.key}:{item.attempt}"})
        try:
            await self.bus.js.publish(item.reply_to, encode(result), headers=headers)
        except (TimeoutError, NatsClientError) as exc:
            # Not stored: raise so the item is naked and the result is sent again later.
            raise NerveError(f"could not deliver the result of {item.key}: {exc!r}",
                             retryable=True, key=item.key) from None
