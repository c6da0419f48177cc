"""``GET /v1/runs/{id}/events``: a run's live events as Server-Sent Events, resumable.

* Every event's ``id`` is its ``NERVE_STREAM`` sequence. A client that reconnects with
  ``Last-Event-ID: N`` (or ``?after=N``) gets every event of the run after N, in order, each
  once: the position is the only state, and it lives in the client.
* ``event`` is the stream event's type (``token``, ``tool_call_started``,
  ``tool_call_finished``, ``status``, ``approval_requested``, ``final``, ``error``,
  ``progress``); ``data`` is ``{"type", "run_id", "at", "data"}`` as JSON.
* The stream opens with ``retry: <ms>``; a comment (``: hb``) goes out whenever it has been
  silent for ``heartbeat`` seconds.
* It ends when the run has finished and every event is out: after the run's final
  ``status`` event the server sends ``event: end`` (no id, so it never moves a client's
  position) with ``{"status", "last_id"}`` and closes. ``?follow=0`` sends what is stored
  now and ends the same way.
* Revoking the key a stream was opened with ends it at once, in any API process: the
  server sends ``event: revoked`` (no id) with ``{"code", "message"}`` and closes; coming
  back with that key gets 401.
* Writes wait for the socket to drain, and what a client has not read stays in the stream,
  so a slow client holds back only itself (see :mod:`api._tail`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from nats.errors import Error as NatsClientError
from nats.js.errors import NotFoundError

from actors import cancel_and_wait
from api._appkeys import SERVICES
from api._http import principal, query_bool
from api._services import Services
from api._tail import Frame, RunTail, direct_batch
from nerve._errors import CodecError, HistoryError, InvalidRequest, Overloaded
from persistence import TERMINAL_TYPES, decode_record

log = logging.getLogger("nerve.api.sse")

BATCH = 256
# After the history says the run ended, how long to wait for its last live events (they are
# published right after the history append that ended it).
END_GRACE = 2.0


def _position(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidRequest(f"Last-Event-ID / ?after= must be an event id (an integer), got "
                             f"{raw[:40]!r}", field="after") from None
    if value < 0:
        raise InvalidRequest("Last-Event-ID / ?after= must not be negative", field="after")
    return value


async def _history_end(svc: Services, run_id: str) -> tuple[str | None, float | None]:
    """The run's final status and when it ended, if its history says it ended."""
    try:
        msg = await svc.bus.js.get_last_msg(svc.bus.names.runs_stream,
                                            svc.bus.names.history(run_id), direct=True)
    except NotFoundError:
        return None, None
    try:
        events = decode_record(msg.data)
    except CodecError:
        return None, None  # an unreadable record says nothing about the end
    if events and events[-1].type in TERMINAL_TYPES:
        return events[-1].type.removeprefix("run_"), events[-1].at
    return None, None


class _Stream:
    """One client's stream: its position, its writes, its heartbeats."""

    def __init__(self, svc: Services, request: web.Request, resp: web.StreamResponse,
                 tail: RunTail, run_id: str, position: int) -> None:
        self.svc = svc
        self.request = request
        self.resp = resp
        self.tail = tail
        self.run_id = run_id
        self.subject = svc.bus.names.stream(run_id)
        self.position = position  # the last event id sent (or known to be none before)
        self.last_write = time.monotonic()
        self.status: str | None = None
        self.sent = 0

    async def write(self, data: bytes) -> None:
        await self.resp.write(data)  # waits for the socket to drain: backpressure
        self.last_write = time.monotonic()

    async def send(self, frames: list[Frame]) -> None:
        if not frames:
            return
        await self.write(b"".join(f.frame for f in frames))
        self.position = frames[-1].seq
        self.sent += len(frames)
        self.svc.metrics.inc("nerve_api_sse_events_total", len(frames))
        for f in frames:
            if f.terminal:
                self.status = f.terminal

    async def next_frames(self) -> list[Frame]:
        """What follows the position: from the ring when it covers it, else the stream."""
        frames = self.tail.after(self.position, BATCH)
        if frames is not None:
            return frames
        # The ring's bounds before the read: everything below `base` was stored by then,
        # so an empty answer means nothing lies between our position and the ring.
        generation, base = self.tail.generation, self.tail.base
        frames = await direct_batch(self.svc.bus, self.subject, self.position, BATCH)
        self.svc.metrics.inc("nerve_api_sse_stream_reads_total")
        if not frames:
            if self.tail.generation == generation:  # not restarted meanwhile (a new base)
                self.position = max(self.position, base - 1)
            return self.tail.after(self.position, BATCH) or []
        return frames

    async def drain(self) -> None:
        """Send whatever the stream holds past our position (the end of a stream)."""
        while True:
            frames = await direct_batch(self.svc.bus, self.subject, self.position, BATCH)
            if not frames:
                return
            await self.send(frames)

    async def end(self, status: str | None) -> None:
        body = json.dumps({"status": status, "last_id": self.position})
        await self.write(f"event: end\ndata: {body}\n\n".encode())

    async def run(self, follow: bool) -> None:
        svc = self.svc
        heartbeat = svc.config.heartbeat
        poll = min(heartbeat, 5.0)
        next_end_check = 0.0
        ended_at: float | None = None
        while not svc.stopping.is_set():
            frames = await self.next_frames()
            if frames:
                await self.send(frames)
                continue
            if self.status is not None or not follow:
                await self.drain()
                await self.end(self.status or (await _history_end(svc, self.run_id))[0])
                return
            now = time.monotonic()
            if now >= next_end_check:
                # The stream may never carry the final status (it aged out, or the owner
                # died between ending the run and publishing it): ask the history.
                next_end_check = now + poll
                status, at = await _history_end(svc, self.run_id)
                if status is not None:
                    if ended_at is None:
                        ended_at = now
                    if at is None or time.time() - at > END_GRACE or now - ended_at > END_GRACE:
                        await self.drain()
                        await self.end(self.status or status)
                        return
                    next_end_check = now + 0.1
            generation = self.tail.generation
            quiet = heartbeat - (time.monotonic() - self.last_write)
            timeout = max(0.01, min(quiet, poll, max(0.01, next_end_check - time.monotonic())))
            if await self.tail.wait(timeout):
                continue
            if time.monotonic() - self.last_write >= heartbeat - 0.05:
                await self.write(b": hb\n\n")
            # Safety net: the stream must never be ahead of what the tail shows us.
            missed = await direct_batch(svc.bus, self.subject, self.position, BATCH)
            if missed:
                await self.send(missed)
                if self.tail.after(self.position, 1) is not None:
                    await self.tail.restart(generation)


async def _until_revoked(work: Coroutine[Any, Any, None], revoked: asyncio.Event) -> bool:
    """Run ``work`` unless ``revoked`` fires first (then cancel it); False if it did.

    Cancelling a stream mid-write cuts no frame short: aiohttp hands a whole frame to the
    transport before it waits for the socket to drain.
    """
    task = asyncio.create_task(work)
    gate = asyncio.create_task(revoked.wait())
    try:
        await asyncio.wait((task, gate), return_when=asyncio.FIRST_COMPLETED)
    finally:
        revoked_first = not task.done()
        await cancel_and_wait([gate, task])
    if revoked_first:
        return False
    task.result()  # its error, if it failed
    return True


async def stream_events(request: web.Request) -> web.StreamResponse:
    svc: Services = request.app[SERVICES]
    p = principal(request)
    run_id = request.match_info["run_id"]
    tenant = await svc.resolve(p, run_id)
    position = _position(request)
    follow = query_bool(request, "follow", True)
    if svc.stopping.is_set():
        raise Overloaded("this API process is shutting down; reconnect (to another replica, "
                         "or to this one once it is back)", retry_after_ms=500)
    if svc.streams >= svc.config.max_streams:
        raise Overloaded(f"this API process serves {svc.streams} streams already; retry "
                         "shortly (or use another replica)", retry_after_ms=2000)
    if svc.streams_by_tenant.get(tenant, 0) >= svc.config.max_streams_per_tenant:
        raise Overloaded(f"tenant {tenant} has {svc.config.max_streams_per_tenant} streams "
                         "open on this process; close some or retry later",
                         retry_after_ms=5000)
    tail = await svc.tails.acquire(run_id)
    svc.streams += 1
    svc.streams_by_tenant[tenant] = svc.streams_by_tenant.get(tenant, 0) + 1
    if position:
        svc.metrics.inc("nerve_api_sse_resumes_total")
    try:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
        })
        await resp.prepare(request)
        stream = _Stream(svc, request, resp, tail, run_id, position)
        await stream.write(f"retry: {svc.config.retry_ms}\n: run {run_id} after {position}\n\n"
                           .encode())
        with contextlib.suppress(ConnectionResetError, BrokenPipeError), \
                svc.keys.revocation(p) as revoked:
            try:
                if not await _until_revoked(stream.run(follow), revoked):
                    # No id: a client that resumes starts after its last event, and is
                    # refused (401) unless it comes back with a valid key.
                    body = json.dumps({"code": "unauthenticated", "message":
                                       f"API key {p.key_id} was revoked; this stream ends"})
                    await stream.write(f"event: revoked\ndata: {body}\n\n".encode())
            except (HistoryError, NatsClientError, TimeoutError) as exc:
                # The bus is away: the client reconnects with its last id and loses nothing.
                log.warning("stream of run %s cut: %r", run_id, exc)
                return resp
            await resp.write_eof()
        return resp
    finally:
        svc.streams -= 1
        svc.streams_by_tenant[tenant] -= 1
        if not svc.streams_by_tenant[tenant]:
            del svc.streams_by_tenant[tenant]
        svc.tails.release(tail)

__all__ = ["stream_events"]
