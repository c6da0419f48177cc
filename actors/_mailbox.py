"""Mailboxes: where an actor's messages come from.

* :class:`WorkQueue`: a durable JetStream pull consumer. At least once: explicit ack,
  ``ack_wait`` kept alive by ``in_progress`` heartbeats while a handler runs, failures naked
  with backoff, and a message that cannot succeed (undecodable, a permanent error, or out of
  deliveries) ends as a visible dead letter on ``nerve.deadletter.<consumer>``.
* :class:`Requests`: a core NATS subscription for request/reply queries (at most once).

Concurrency is bounded per mailbox: a pull mailbox only asks for as many messages as it has
free handler slots, and the consumer's ``max_ack_pending`` bounds what all instances hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsClientError
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
    """Handler tasks, one per message; ``on_done`` frees the slot each one held."""

    def __init__(self, process: Processor, on_done: Callable[[], Any]) -> None:
        self.process = process
        self.on_done = on_done
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, msg: Msg) -> None:
        """Run ``process(msg)`` in a slot the caller has already taken."""
        task = asyncio.create_task(self._run_one(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_one(self, msg: Msg) -> None:
        try:
            await self.process(msg)
        finally:
            result = self.on_done()
            if asyncio.iscoroutine(result):
                await result

    async def drain(self, timeout: float) -> None:
        """Let handlers finish what they hold; unfinished ones are redelivered elsewhere."""
        if not self.tasks:
            return
        _done, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        await cancel_and_wait(pending, timeout=5.0)


# How long a pull request waits on the server, and how often an idle one says it is alive.
_PULL_EXPIRES = 30.0
_PULL_HEARTBEAT = 5.0


class PullMailbox:
    """Runs a :class:`WorkQueue` with standing pull requests (JetStream's "consume" pattern).

    The mailbox keeps pull requests open on the server for exactly as many messages as it
    has free handler slots, topping them up when half the slots have come free. Under load,
    a message costs no pull request of its own and waits for no round trip: it is on its way
    before the previous one is finished. The server's idle heartbeats show the requests are
    alive; after a silence, a reconnect or a lost consumer, the mailbox re-creates what is
    missing and asks again.
    """

    def __init__(self, spec: WorkQueue, bus: Bus, process: Processor, concurrency: int,
                 ) -> None:
        self.spec = spec
        self.bus = bus
        self.concurrency = concurrency
        self._handlers = _Handlers(process, self._slot_freed)
        self._running = 0  # handlers in progress
        self._asked = 0  # messages the open pull requests may still deliver
        self._heard = 0.0  # when the server last sent us anything
        self._reconnects = 0
        self._lost = False  # the last recovery failed
        self._recreate: StreamConfig | None = None  # the stream's config as we found it
        self._inbox = ""
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._sub: Any = None
        self._watch_task: asyncio.Task[None] | None = None
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

    async def _ensure_consumer(self) -> None:
        s = self.spec
        try:
            await self.bus.js.add_consumer(s.stream, self.consumer_config())
        except NotFoundError:
            if s.stream_config is None:
                raise
            log.warning("stream %s is gone; re-creating it", s.stream)
            await self.bus.js.add_stream(self._recreate or s.stream_config)
            await self.bus.js.add_consumer(s.stream, self.consumer_config())

    async def open(self) -> None:
        await self._ensure_consumer()
        if self.spec.stream_config is not None:
            # Re-create the stream as it was provisioned (an operator's limits), not as
            # this process's defaults would have it.
            self._recreate = (await self.bus.js.stream_info(self.spec.stream)).config
        self._inbox = self.bus.nc.new_inbox()
        self._sub = await self.bus.nc.subscribe(self._inbox, cb=self._on_msg)
        self._reconnects = self.bus.nc.stats["reconnects"]
        self._heard = time.monotonic()
        await self._ask()
        self._watch_task = asyncio.create_task(self._watch(),
                                               name=f"mailbox:{self.spec.durable}")

    def _free(self) -> int:
        return self.concurrency - self._running - self._asked

    async def _ask(self, force: bool = False) -> None:
        """Open a pull request for the free slots (once half are free, or none is asked)."""
        free = self._free()
        if self._closing or free <= 0 or not (
                force or self._asked == 0 or free >= max(1, self.concurrency // 2)):
            return
        self._asked += free
        request = {"batch": free, "expires": int(_PULL_EXPIRES * 1e9),
                   "idle_heartbeat": int(_PULL_HEARTBEAT * 1e9)}
        try:
            await self.bus.nc.publish(self._next_subject, json.dumps(request).encode(),
                                      reply=self._inbox)
        except NatsClientError as exc:
            self._asked -= free  # asked again after the next silence or reconnect
            log.warning("mailbox %s: pull request failed (%r)", self.spec.durable, exc)

    async def _slot_freed(self) -> None:
        self._running -= 1
        await self._ask()

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._asked = max(0, self._asked - 1)
            if self._running >= self.concurrency:
                # A request we had given up on delivered after all: keep the bound.
                with contextlib.suppress(NatsClientError):
                    await msg.nak(delay=0.1)
                return
            self._running += 1
            self._handlers.start(msg)
            return
        if status == "100":
            return  # idle heartbeat: the request is alive
        assert msg.headers is not None
        # 408 (expired), 409 (closed by the server): what it did not deliver is free again.
        undelivered = msg.headers.get("Nats-Pending-Messages")
        if undelivered is not None and undelivered.isdigit():
            self._asked = max(0, self._asked - int(undelivered))
        else:
            self._asked = 0
        if status == "409" and "Deleted" in (msg.headers.get("Description") or ""):
            await self._recover("consumer deleted")
        else:
            await self._ask()

    async def _watch(self) -> None:
        """Ask again after a reconnect (the server forgot our requests), a long silence, or
        a recovery that has not worked yet (retried every second)."""
        while not self._closing:
            await asyncio.sleep(1.0)
            reconnects = self.bus.nc.stats["reconnects"]
            if reconnects != self._reconnects:
                self._reconnects = reconnects
                await self._recover("reconnected")
            elif self._lost:
                await self._recover("still without a consumer")
            elif time.monotonic() - self._heard > 2 * _PULL_HEARTBEAT + 1:
                await self._recover("no heartbeat from the server")

    async def _recover(self, why: str) -> None:
        if not self._lost:
            log.warning("mailbox %s: %s; re-creating its consumer and asking again",
                        self.spec.durable, why)
        self._heard = time.monotonic()
        try:
            await self._ensure_consumer()
        except (TimeoutError, NatsClientError, NotFoundError) as exc:
            if not self._lost:
                log.warning("mailbox %s: consumer not re-created yet (%r); retrying",
                            self.spec.durable, exc)
            self._lost = True
            return
        self._lost = False
        self._asked = 0
        await self._ask(force=True)

    async def close(self, timeout: float) -> None:
        self._closing = True
        if self._watch_task is not None:
            await cancel_and_wait([self._watch_task], timeout=5.0)
        if self._sub is not None:
            # Messages already delivered to the open requests but not handled are
            # redelivered elsewhere after ack_wait.
            with contextlib.suppress(NatsClientError, asyncio.TimeoutError):
                await self._sub.unsubscribe()
        await self._handlers.drain(timeout)


class SubscriptionMailbox:
    """Runs a :class:`Requests` mailbox on a core subscription."""

    def __init__(self, spec: Requests, bus: Bus, process: Processor, concurrency: int,
                 ) -> None:
        self.spec = spec
        self.bus = bus
        self._slots = asyncio.Semaphore(concurrency)
        self._handlers = _Handlers(process, self._slots.release)
        self._sub: Any = None

    async def open(self) -> None:
        self._sub = await self.bus.nc.subscribe(
            self.spec.subject, queue=self.spec.queue or "", cb=self._on_msg,
        )

    async def _on_msg(self, msg: Msg) -> None:
        # Waiting here holds back the subscription's delivery: backpressure, bounded by
        # the client's pending limits.
        await self._slots.acquire()
        self._handlers.start(msg)

    async def close(self, timeout: float) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsClientError):
                await self._sub.unsubscribe()
        await self._handlers.drain(timeout)
