"""Token streaming: a step's text deltas on ``nerve.stream.<run_id>``, coalesced, resumable.

Each event is ``StreamEvent(type="token", data={"text", "index", "offset"})``: ``index`` is
the step, ``offset`` how many characters of that step's text come before ``text``. A client
keeps ``text = text[:offset] + data["text"]`` per step, which makes every event idempotent
and lets the gateway correct the past:

* Deltas are batched for ``coalesce`` seconds (every JetStream write is fsync'd; one event
  per model token would cost one fsync per token).
* When an upstream stream is cut and the call is retried, the new attempt's text is compared
  with what was already published: the part the client has is not sent again; if the new
  attempt says something else, the event starts where they differ (a smaller ``offset``) and
  the client overwrites from there.
* A work item redelivered to another gateway starts again at offset 0: the client replaces
  the step's text rather than appending to it.

Publishing runs in its own task so a slow disk never holds up reading the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from nats.errors import Error as NatsClientError

from actors import Envelope, encode
from bus import Bus
from persistence import StreamEvent

log = logging.getLogger("nerve.gateway.stream")


class TokenStream:
    """Publishes one step's text as token events (see the module docstring)."""

    def __init__(self, bus: Bus, *, run_id: str, tenant: str, index: int, key: str,
                 coalesce: float = 0.015, max_chars: int = 4096) -> None:
        self.bus = bus
        self.run_id = run_id
        self.tenant = tenant
        self.index = index
        self.key = key
        self.coalesce = coalesce
        self.max_chars = max_chars
        self.subject = bus.names.stream(run_id)
        self._text = ""  # what the client has (or will have once pending is published)
        self._pos = 0  # how far the current attempt's text has got
        self._pending: list[tuple[int, str]] = []  # (offset, text) not yet published
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.events = 0
        self.failed: BaseException | None = None

    @property
    def text(self) -> str:
        """The step's text as the client will see it."""
        return self._text

    # -- the sink (called synchronously while the provider reads the upstream) ----------
    def feed(self, text: str) -> None:
        if not text or self._closing:
            return
        start, end = self._pos, self._pos + len(text)
        self._pos = end
        if start < len(self._text):
            seen = self._text[start:end]
            same = 0
            for a, b in zip(seen, text, strict=False):
                if a != b:
                    break
                same += 1
            if same == len(text):
                return  # the retry repeats what the client already has
            if same < len(seen):
                # The retry says something else from here on: overwrite from there.
                cut = start + same
                self._text = self._text[:cut]
                self._queue(cut, text[same:])
                return
            text = text[same:]  # the client has the first part; send the rest
        self._queue(len(self._text), text)

    def restart(self) -> None:
        """A new attempt begins: its text is matched against what was sent from offset 0."""
        self._pos = 0

    def _queue(self, offset: int, text: str) -> None:
        self._text = self._text[:offset] + text
        if self._pending:
            last_offset, last_text = self._pending[-1]
            if last_offset + len(last_text) == offset and len(last_text) < self.max_chars:
                self._pending[-1] = (last_offset, last_text + text)
                self._ensure_started()
                return
        self._pending.append((offset, text))
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._flusher(), name=f"tokens:{self.key}")
        self._wake.set()

    # -- publishing ----------------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            if not self._closing:
                try:
                    async with asyncio.timeout(self.coalesce):
                        await self._closed.wait()  # close() ends the batching wait early
                except TimeoutError:
                    pass
            self._wake.clear()
            batch, self._pending = self._pending, []
            for offset, text in batch:
                await self._publish(offset, text)
            if self._closing and not self._pending:
                return

    async def _publish(self, offset: int, text: str) -> None:
        event = StreamEvent(type="token", run_id=self.run_id,
                            data={"text": text, "index": self.index, "offset": offset})
        digest = hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
        headers = Envelope(run_id=self.run_id, tenant=self.tenant).to_headers(
            {"Nats-Msg-Id": f"tok:{self.key}:{offset}:{digest}"})
        try:
            await self.bus.js.publish(self.subject, encode(event), headers=headers)
            self.events += 1
        except (TimeoutError, NatsClientError) as exc:
            # Live tokens are best effort: the final message reaches the run's inbox anyway.
            self.failed = exc
            log.warning("token event for %s (offset %d) not stored: %r", self.key, offset, exc)

    async def close(self) -> None:
        """Publish what is pending and stop."""
        self._closing = True
        self._closed.set()
        task = self._task
        if task is None:
            return
        self._wake.set()
        await task

    async def abort(self) -> None:
        """Stop at once; what is pending is dropped (the stream was cut on purpose)."""
        self._closing = True
        self._pending = []
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() does not raise the flusher's CancelledError, only our own.
            await asyncio.wait({task})
