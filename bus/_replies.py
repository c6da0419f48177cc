"""``ReplyInbox``: many requests in flight, one subscription for all of their replies.

A durable step costs a handful of request/reply exchanges (the history append and the work
item are JetStream publishes, which are requests for an ack; a worker hands its result to
the owner as a request). nats-py pays, per request, a ``Msg`` object, a parsed header dict,
a hop through a subscription task and an ``asyncio.wait_for``. Here the reply is matched to
its future by the wire parser itself (a raw subscription, see ``Bus.raw_subscribe``) and
the timeout is one timer handle. JetStream acks are decoded on the way in, so an append
awaits a :class:`StoredAck` or the server's error as nats-py's own exception types.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from bus._parser import RawHeaders

if TYPE_CHECKING:
    from bus._connect import Bus

_NO_RESPONDERS = b"NATS/1.0 503"


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply: its header block (parsed on demand) and payload."""

    headers: RawHeaders
    data: bytes


@dataclass(frozen=True, slots=True)
class StoredAck:
    """JetStream's acknowledgement of a stored message."""

    stream: str
    seq: int  # of the message; of the last one for an atomic batch
    duplicate: bool = False
    count: int = 1  # messages stored (an atomic batch's size)


@dataclass(slots=True)
class _Waiting:
    future: asyncio.Future[Any]
    timer: asyncio.TimerHandle
    stored: bool  # a JetStream publish: the reply is an ack to decode


class ReplyInbox:
    """Sends requests whose replies all come back on one wildcard inbox subscription.

    Opened on first use; nats-py re-subscribes it after a reconnect. A request that gets
    no reply within its timeout fails with nats-py's ``TimeoutError``; one nobody listens
    to fails at once with ``NoRespondersError`` (``NoStreamResponseError`` for a publish to
    a subject no stream captures).
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._prefix = ""
        self._prefix_len = 0
        self._waiting: dict[bytes, _Waiting] = {}
        self._next = 0
        self._sub: Any = None
        self._opening = asyncio.Lock()

    async def _open(self) -> None:
        async with self._opening:
            if self._sub is not None:
                return
            prefix = self._bus.nc.new_inbox() + "."
            self._sub = await self._bus.raw_subscribe(prefix + "*", self._on_reply)
            self._prefix, self._prefix_len = prefix, len(prefix)

    async def send(self, subject: str, payload: bytes, headers: dict[str, str] | None = None,
                   timeout: float = 5.0, stored: bool = False) -> asyncio.Future[Any]:
        """Publish a request now; return the future of its :class:`Reply` (or, with
        ``stored``, of the :class:`StoredAck` of a JetStream publish)."""
        if self._sub is None:
            await self._open()
        self._next += 1
        token = b"%x" % self._next
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        timer = loop.call_later(timeout, self._expire, token)
        self._waiting[token] = _Waiting(future, timer, stored)
        try:
            await self._bus.publish(subject, payload, self._prefix + token.decode(), headers)
        except BaseException:
            self._waiting.pop(token, None)
            timer.cancel()
            raise
        return future

    async def request(self, subject: str, payload: bytes,
                      headers: dict[str, str] | None = None, timeout: float = 5.0) -> Reply:
        """Send a request and wait for its reply."""
        return await (await self.send(subject, payload, headers, timeout))

    async def publish_stored(self, subject: str, payload: bytes,
                             headers: dict[str, str] | None = None, timeout: float = 5.0,
                             ) -> StoredAck:
        """A JetStream publish: wait until the stream has stored the message."""
        return await (await self.send(subject, payload, headers, timeout, stored=True))

    def _expire(self, token: bytes) -> None:
        waiting = self._waiting.pop(token, None)
        if waiting is not None and not waiting.future.done():
            waiting.future.set_exception(NatsTimeoutError())

    def _on_reply(self, subject: bytes, _reply: bytes, headers: bytes | None, data: bytes,
                  ) -> None:
        waiting = self._waiting.pop(subject[self._prefix_len:], None)
        if waiting is None:
            return  # timed out already
        waiting.timer.cancel()
        future = waiting.future
        if future.done():  # cancelled by its caller
            return
        if headers is not None and headers.startswith(_NO_RESPONDERS):
            future.set_exception(NoStreamResponseError() if waiting.stored
                                 else NoRespondersError())
        elif not waiting.stored:
            future.set_result(Reply(RawHeaders(headers), data))
        else:
            try:
                ack = json.loads(data)
                if "error" in ack:
                    APIError.from_error(ack["error"])  # raises the matching subclass
                future.set_result(StoredAck(ack["stream"], ack["seq"],
                                            ack.get("duplicate", False), ack.get("count", 1)))
            except (APIError, ValueError, KeyError, TypeError) as exc:
                future.set_exception(exc if isinstance(exc, APIError) else APIError(
                    description=f"undecodable JetStream ack {data[:200]!r}: {exc!r}"))
