"""Mailboxes: where an actor's messages come from.

* :class:`WorkQueue`: a durable JetStream pull consumer. At least once: explicit ack,
  ``ack_wait`` kept alive by ``in_progress`` heartbeats while a handler runs, failures naked
  with backoff, and a message that cannot succeed (undecodable, a permanent error, or out of
  deliveries) ends as a visible dead letter on ``nerve.deadletter.<consumer>``.
* :class:`Requests`: a core NATS subscription for request/reply queries (at most once).

Concurrency is bounded per mailbox: a pull mailbox only fetches as many messages as it has
free handler slots, and the consumer's ``max_ack_pending`` bounds what all instances hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoServersError
from nats.errors import Error as NatsClientError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field

from actors._codec import encode
from actors._tasks import cancel_and_wait
from bus import Bus

log = logging.getLogger("nerve.actors.mailbox")

MAX_DEAD_PAYLOAD = 64 * 1024


@dataclass(slots=True)
class WorkQueue:
    """A durable pull consumer on a JetStream stream (work queue semantics).

    ``backoff`` is the nak delay after the 1st, 2nd, ... failed delivery (the last value
    repeats). ``ack_wait`` is how long a silent handler may hold a message before it is
    redelivered elsewhere; handlers send a heartbeat every ``ack_wait / 3``.
    """

    stream: str
    subjects: list[str]
    durable: str
    ack_wait: float = 30.0
    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.2, 1.0, 5.0, 30.0)
    max_ack_pending: int = 1000
    poll: float = 5.0
    # Re-created if the stream vanishes (a memory stream after a server restart).
    stream_config: StreamConfig | None = None


@dataclass(slots=True)
class Requests:
    """A core NATS subscription for request/reply; ``queue`` spreads load over instances."""

    subject: str
    queue: str | None = None


MailboxSpec = WorkQueue | Requests


class DeadLetter(BaseModel):
    """A message that was given up on, and why. Published to ``nerve.deadletter.<consumer>``."""

    consumer: str
    subject: str
    reason: str
    stream: str | None = None
    stream_seq: int | None = None
    num_delivered: int = 1
    error: dict[str, Any] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    payload: bytes = b""
    payload_truncated: bool = False
    at: float = Field(default_factory=time.time)


async def publish_dead_letter(bus: Bus, letter: DeadLetter) -> None:
    """Store a dead letter durably (deduplicated per stream sequence)."""
    msg_id = (f"dead:{letter.stream}:{letter.stream_seq}" if letter.stream_seq
              else f"dead:{letter.consumer}:{letter.at}")
    try:
        await bus.js.publish(bus.names.dead_letter(letter.consumer), encode(letter),
                             headers={"Nats-Msg-Id": msg_id})
    except (TimeoutError, NatsClientError) as exc:
        # Losing the dead letter itself must not take the actor down; the log keeps it.
        log.error("could not store dead letter for %s seq %s: %r", letter.subject,
                  letter.stream_seq, exc)
    log.warning("dead-lettered %s (consumer %s, seq %s): %s", letter.subject, letter.consumer,
                letter.stream_seq, letter.reason)


def dead_letter_for(msg: Msg, consumer: str, reason: str, error: dict[str, Any] | None = None,
                    ) -> DeadLetter:
    meta = None
    with contextlib.suppress(Exception):  # core messages have no JetStream metadata
        meta = msg.metadata
    payload = msg.data or b""
    return DeadLetter(
        consumer=consumer, subject=msg.subject, reason=reason, error=error,
        stream=meta.stream if meta else None,
        stream_seq=meta.sequence.stream if meta else None,
        num_delivered=meta.num_delivered if meta else 1,
        headers=dict(msg.headers or {}),
        payload=payload[:MAX_DEAD_PAYLOAD], payload_truncated=len(payload) > MAX_DEAD_PAYLOAD,
    )


Processor = Callable[[Msg], Awaitable[None]]


class _Handlers:
    """Bounded handler slots and the tasks in them (shared by both mailboxes)."""

    def __init__(self, process: Processor, concurrency: int) -> None:
        self.process = process
        self.concurrency = concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, msg: Msg) -> None:
        """Run ``process(msg)`` in a slot the caller has already acquired."""
        task = asyncio.create_task(self._run_one(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_one(self, msg: Msg) -> None:
        try:
            await self.process(msg)
        finally:
            self.slots.release()

    async def drain(self, timeout: float) -> None:
        """Let handlers finish what they hold; unfinished ones are redelivered elsewhere."""
        if not self.tasks:
            return
        _done, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        await cancel_and_wait(pending, timeout=5.0)


class PullMailbox:
    """Runs a :class:`WorkQueue`: fetches only into free slots, hands each message over."""

    def __init__(self, spec: WorkQueue, bus: Bus, process: Processor, concurrency: int,
                 ) -> None:
        self.spec = spec
        self.bus = bus
        self._handlers = _Handlers(process, concurrency)
        self._loop_task: asyncio.Task[None] | None = None
        self._sub: Any = None
        self._closing = False

    def consumer_config(self) -> ConsumerConfig:
        s = self.spec
        cfg = ConsumerConfig(
            durable_name=s.durable, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=s.ack_wait,
            max_deliver=s.max_deliver, max_ack_pending=s.max_ack_pending,
        )
        if len(s.subjects) == 1:
            cfg.filter_subject = s.subjects[0]
        else:
            cfg.filter_subjects = list(s.subjects)
        return cfg

    async def _subscribe(self) -> None:
        s = self.spec
        try:
            await self.bus.js.add_consumer(s.stream, self.consumer_config())
        except NotFoundError:
            if s.stream_config is None:
                raise
            log.warning("stream %s is gone; re-creating it", s.stream)
            await self.bus.js.add_stream(s.stream_config)
            await self.bus.js.add_consumer(s.stream, self.consumer_config())
        self._sub = await self.bus.js.pull_subscribe_bind(s.durable, s.stream)

    async def open(self) -> None:
        await self._subscribe()
        self._loop_task = asyncio.create_task(self._loop(), name=f"mailbox:{self.spec.durable}")

    async def _loop(self) -> None:
        slots, concurrency = self._handlers.slots, self._handlers.concurrency
        while not self._closing:
            await slots.acquire()
            want = 1
            while want < concurrency and not slots.locked():
                await slots.acquire()
                want += 1
            try:
                msgs = await self._sub.fetch(want, timeout=self.spec.poll)
            except (TimeoutError, NatsTimeoutError):
                msgs = []
            except NotFoundError:
                msgs = []
                await self._recover("consumer or stream not found")
            except (ConnectionClosedError, NoServersError, NatsClientError) as exc:
                msgs = []
                await self._recover(repr(exc))
            for _ in range(want - len(msgs)):
                slots.release()
            for msg in msgs:
                self._handlers.start(msg)

    async def _recover(self, why: str) -> None:
        log.warning("mailbox %s lost its consumer (%s); re-subscribing", self.spec.durable, why)
        await asyncio.sleep(0.2)
        with contextlib.suppress(NatsClientError, asyncio.TimeoutError, NotFoundError):
            if self._sub is not None:
                await self._sub.unsubscribe()
            await self._subscribe()

    async def close(self, timeout: float) -> None:
        if self._loop_task is not None:
            self._closing = True
            # nats-py's fetch can swallow a cancellation (asyncio.wait_for on Python 3.11
            # drops it when the awaited get completes at the same moment): the flag ends
            # the loop at the latest when the fetch in flight returns; the repeated cancel
            # usually sooner.
            if await cancel_and_wait([self._loop_task], timeout=self.spec.poll + 1.0):
                log.error("mailbox %s: the fetch loop did not stop; abandoning it",
                          self.spec.durable)
        await self._handlers.drain(timeout)
        if self._sub is not None:
            with contextlib.suppress(NatsClientError, asyncio.TimeoutError):
                await self._sub.unsubscribe()


class SubscriptionMailbox:
    """Runs a :class:`Requests` mailbox on a core subscription."""

    def __init__(self, spec: Requests, bus: Bus, process: Processor, concurrency: int,
                 ) -> None:
        self.spec = spec
        self.bus = bus
        self._handlers = _Handlers(process, concurrency)
        self._sub: Any = None

    async def open(self) -> None:
        self._sub = await self.bus.nc.subscribe(
            self.spec.subject, queue=self.spec.queue or "", cb=self._on_msg,
        )

    async def _on_msg(self, msg: Msg) -> None:
        # Waiting here holds back the subscription's delivery: backpressure, bounded by
        # the client's pending limits.
        await self._handlers.slots.acquire()
        self._handlers.start(msg)

    async def close(self, timeout: float) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsClientError):
                await self._sub.unsubscribe()
        await self._handlers.drain(timeout)
