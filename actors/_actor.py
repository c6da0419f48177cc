"""The actor base class: lifecycle, a typed ``handle``, one mailbox, bounded concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from nats.aio.msg import Msg
from nats.errors import Error as NatsClientError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace
from pydantic import TypeAdapter

from actors._codec import MSGPACK, decode, encode, unpack
from actors._envelope import H_CONTENT_TYPE, H_ERROR, Envelope
from actors._mailbox import (
    MailboxSpec,
    PullMailbox,
    SubscriptionMailbox,
    WorkQueue,
    dead_letter_for,
    publish_dead_letter,
)
from actors._telemetry import tracing_enabled
from bus import Bus
from nerve import BusError, CodecError, NerveError, error_from_wire

log = logging.getLogger("nerve.actors")
_REPLY_HEADERS = {H_CONTENT_TYPE: MSGPACK}
_ERROR_HEADERS = {H_CONTENT_TYPE: MSGPACK, H_ERROR: "1"}
tracer = trace.get_tracer("nerve.actors")

M = TypeVar("M")


class ActorState(enum.Enum):
    """Where an actor is in its life; misuse (start twice, stop before start) is an error."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Permanent(NerveError):
    """Raise from ``handle`` to dead-letter a message at once: retrying cannot help."""


@dataclass(slots=True)
class Delivery:
    """One message as it reached the actor: its envelope, subject and delivery count."""

    msg: Msg
    envelope: Envelope
    work: bool
    settled: bool = False
    _heartbeat: float | None = field(default=None, repr=False)

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def num_delivered(self) -> int:
        return self.msg.metadata.num_delivered if self.work else 1

    @property
    def stream_seq(self) -> int | None:
        return self.msg.metadata.sequence.stream if self.work else None

    async def in_progress(self) -> None:
        """Tell JetStream the handler is alive (resets ``ack_wait``)."""
        if self.work and not self.settled:
            await self.msg.in_progress()

    async def nak(self, delay: float | None = None) -> None:
        """Hand the message back for redelivery after ``delay`` seconds."""
        if self.work and not self.settled:
            self.settled = True
            await self.msg.nak(delay=delay)

    async def ack(self) -> None:
        if self.work and not self.settled:
            self.settled = True
            await self.msg.ack()


class _Heartbeat:
    """Calls ``send`` (an ``in_progress``) every ``every`` seconds until cancelled.

    A timer, not a task: most handlers finish long before the first beat. A beat late by
    more than ``every`` means the event loop was held: held past the consumer's
    ``ack_wait``, the message goes to another worker while this one still works on it.
    """

    def __init__(self, send: Callable[[], Awaitable[None]], every: float, what: str) -> None:
        self.send = send
        self.every = every
        self.what = what
        self._beating: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._due = loop.time() + every
        self._timer = loop.call_later(every, self._beat)

    def _beat(self) -> None:
        late = asyncio.get_running_loop().time() - self._due
        if late > self.every:
            log.warning("%s: the event loop was held for %.1fs; a message held past its "
                        "ack_wait (%.1fs) is delivered again elsewhere. Run blocking code in "
                        "a thread", self.what, late, 3 * self.every)
        self._beating = asyncio.create_task(self._send())

    async def _send(self) -> None:
        with contextlib.suppress(NatsClientError):
            await self.send()
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.every
        self._timer = loop.call_later(self.every, self._beat)

    def cancel(self) -> None:
        self._timer.cancel()
        if self._beating is not None:
            self._beating.cancel()


class Actor(Generic[M]):
    """Base class for every actor.

    Subclasses set ``message_type`` (a pydantic model, any type pydantic validates, or
    ``nats.aio.msg.Msg`` to receive the raw message),
    implement :meth:`handle`, and say where messages come from with :meth:`mailbox`. What
    ``handle`` returns is the reply to a request; for work queues the message is acked when
    ``handle`` returns, naked with backoff when it raises (a :class:`Permanent` or
    non-retryable :class:`~nerve.NerveError` dead-letters it at once), and dead-lettered when
    its deliveries run out.
    """

    message_type: ClassVar[Any] = Any
    concurrency: ClassVar[int] = 16
    # How long :meth:`run` lets handlers finish when it stops, before cancelling them. It
    # must fit well inside a supervisor's grace after SIGTERM (10 s), or the process is
    # SIGKILLed and nothing of the handler's own clean-up runs.
    stop_timeout: ClassVar[float] = 5.0

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.state = ActorState.NEW
        self.bus: Bus | None = None
        self._mailbox: PullMailbox | SubscriptionMailbox | None = None
        self._spec: MailboxSpec | None = None
        self._failed: asyncio.Future[None] | None = None
        # message_type = nats Msg: the handler decodes the raw message itself.
        self._adapter = None if self.message_type is Msg else TypeAdapter(self.message_type)

    # -- to override ---------------------------------------------------------------------
    def mailbox(self) -> MailboxSpec:
        raise NotImplementedError(f"{type(self).__name__} must say where its messages come from")

    async def on_start(self) -> None:
        """Called before the mailbox opens."""

    async def on_stop(self) -> None:
        """Called after the mailbox has closed and in-flight handlers have finished."""

    async def handle(self, message: M, delivery: Delivery) -> Any:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, bus: Bus) -> None:
        if self.state not in (ActorState.NEW, ActorState.STOPPED, ActorState.FAILED):
            raise RuntimeError(f"actor {self.name} cannot start from state {self.state.value}")
        self.state = ActorState.STARTING
        self.bus = bus
        self._failed = asyncio.get_running_loop().create_future()
        try:
            await self.on_start()
            self._spec = self.mailbox()
            if isinstance(self._spec, WorkQueue):
                self._mailbox = PullMailbox(self._spec, bus, self._process, self.concurrency)
            else:
                self._mailbox = SubscriptionMailbox(self._spec, bus, self._process,
                                                    self.concurrency)
            await self._mailbox.open()
        except BaseException:
            self.state = ActorState.FAILED
            raise
        self.state = ActorState.RUNNING
        log.debug("actor %s running", self.name)

    async def stop(self, timeout: float = 10.0) -> None:
        if self.state is not ActorState.RUNNING:
            return
        self.state = ActorState.STOPPING
        errors: list[BaseException] = []
        if self._mailbox is not None:
            try:
                await self._mailbox.close(timeout)
            except Exception as exc:
                errors.append(exc)
        try:
            await self.on_stop()
        except Exception as exc:
            errors.append(exc)
        self.state = ActorState.STOPPED
        if errors:
            raise errors[0]

    def fail(self, exc: BaseException) -> None:
        """Mark the actor as crashed; :meth:`run` raises ``exc`` so a supervisor restarts it."""
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    async def run(self, bus: Bus, ready: asyncio.Event | None = None) -> None:
        """Start, serve until cancelled or :meth:`fail`-ed, then stop. A supervisor child.

        ``ready`` is set once the mailbox is open."""
        await self.start(bus)
        if ready is not None:
            ready.set()
        try:
            assert self._failed is not None
            await self._failed
        finally:
            await self.stop(self.stop_timeout)

    # -- delivery ------------------------------------------------------------------------
    async def _process(self, msg: Msg) -> None:
        work = isinstance(self._spec, WorkQueue)
        envelope = Envelope.from_headers(msg.headers)
        try:
            message = (msg if self.message_type is Msg
                       else decode(msg.data, self._adapter, envelope.content_type or None))
        except CodecError as exc:
            if work:
                await self._dead_letter(msg, f"undecodable message: {exc.message}", exc)
                await msg.term()
            else:
                await self._reply_error(msg, exc)
            return
        delivery = Delivery(msg, envelope, work)
        heartbeat = self._arm_heartbeat(delivery.in_progress) if work else None
        span = tracer.start_as_current_span(
            f"{self.name} process", context=envelope.trace_context(),
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "nats", "messaging.destination.name": msg.subject},
        ) if tracing_enabled() else contextlib.nullcontext()
        try:
            with span:
                result = await self.handle(message, delivery)
        except asyncio.CancelledError:
            raise  # not acked: JetStream redelivers it
        except Exception as exc:
            if work:
                await self._failed_delivery(msg, delivery, exc)
            else:
                await self._reply_error(msg, exc)
            return
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        if work:
            with contextlib.suppress(NatsClientError):
                await delivery.ack()
        elif msg.reply:
            assert self.bus is not None
            await self.bus.nc.publish(msg.reply, encode(result), headers=_REPLY_HEADERS)

    def _arm_heartbeat(self, send: Callable[[], Awaitable[None]]) -> _Heartbeat:
        """Keep a work message ours: ``send`` (an ``in_progress``) every ``ack_wait / 3``."""
        assert isinstance(self._spec, WorkQueue)
        return _Heartbeat(send, self._spec.ack_wait / 3, self.name)

    async def _failed_delivery(self, msg: Msg, delivery: Delivery, exc: Exception) -> None:
        assert isinstance(self._spec, WorkQueue)
        if delivery.settled:
            return
        permanent = isinstance(exc, NerveError) and not exc.retryable
        n = delivery.num_delivered
        if permanent or n >= self._spec.max_deliver:
            why = ("permanent error" if permanent
                   else f"failed {n} of {self._spec.max_deliver} deliveries")
            await self._dead_letter(msg, f"{why}: {exc!r}", exc)
            delivery.settled = True
            with contextlib.suppress(NatsClientError):
                await msg.term()
            return
        backoff = self._spec.backoff
        delay = backoff[min(n - 1, len(backoff) - 1)] if backoff else None
        log.info("%s: delivery %d of %s failed (%r); retrying in %ss", self.name, n,
                 msg.subject, exc, delay)
        with contextlib.suppress(NatsClientError):
            await delivery.nak(delay)

    async def _dead_letter(self, msg: Msg, reason: str, exc: BaseException) -> None:
        assert self.bus is not None and isinstance(self._spec, WorkQueue)
        wire = exc.to_wire() if isinstance(exc, NerveError) else {
            "type": type(exc).__name__, "message": str(exc)}
        await publish_dead_letter(self.bus, dead_letter_for(msg, self._spec.durable, reason, wire))

    async def _reply_error(self, msg: Msg, exc: Exception) -> None:
        if not msg.reply:
            log.warning("%s: request on %s failed: %r", self.name, msg.subject, exc)
            return
        err = exc if isinstance(exc, NerveError) else NerveError(f"{type(exc).__name__}: {exc}")
        assert self.bus is not None
        await self.bus.nc.publish(msg.reply, encode(err.to_wire()), headers=_ERROR_HEADERS)


async def ask(bus: Bus, subject: str, message: Any, *, into: Any = None, timeout: float = 5.0,
              envelope: Envelope | None = None) -> Any:
    """Send a request to a :class:`Requests` mailbox and return the decoded reply.

    A reply that carries an error raises it (the same class, rebuilt from the wire).
    """
    env = envelope or Envelope()
    try:
        reply = await bus.nc.request(subject, encode(message), timeout=timeout,
                                     headers=env.to_headers())
    except NoRespondersError:
        raise BusError(f"no actor is serving {subject}", subject=subject) from None
    except (TimeoutError, NatsTimeoutError):
        raise BusError(f"no reply on {subject} within {timeout}s", subject=subject) from None
    if reply.headers and H_ERROR in reply.headers:
        raise error_from_wire(unpack(reply.data))
    data = unpack(reply.data, (reply.headers or {}).get(H_CONTENT_TYPE))
    return data if into is None else TypeAdapter(into).validate_python(data)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` as a nerve process: on uvloop when it is installed, with the garbage
    collector tuned for a long-lived server.

    Replaying a history allocates a burst of small objects (events, dicts) that are not
    cycles; with the default thresholds the collector ran every 700 allocations and took
    about a third of a history read. Objects alive at start-up are frozen out of the scans
    and the young generation is collected every 50,000 allocations instead.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
