"""Reading a run's live stream (``nerve.stream.<run_id>``) for SSE clients.

Every event is addressed by its ``NERVE_STREAM`` sequence, which is the SSE event id. A
client reads "every event of this run after sequence N" from two sources:

* **the tail**, one per run per API process, shared by all of that run's clients: a
  JetStream ordered consumer that starts just after the subject's last stored event and
  keeps the newest events, already rendered as SSE frames, in a bounded ring. It knows
  ``base``: it holds every event of the run from ``base`` on (until the ring drops the
  oldest). A client whose position is at or past ``base - 1`` reads from the ring and
  waits on it for more; that is the live path, one server push per event per process,
  however many clients watch.
* **direct gets**: a client behind the ring (a reconnect after a long gap, a client too
  slow for the ring) reads batches of stored events after its position with JetStream's
  batched direct get, at its own pace.

Nothing is buffered per client: a client's position is one integer and what it has not
read stays in the stream, so a slow client slows only itself (each write waits for the
socket to drain) and cannot grow the server's memory. Correctness rests on the stream
sequence alone: the ring is a cache, and a client that finds the stream ahead of a tail
(the tail's consumer died with a server restart, say) restarts the tail.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsClientError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actors import decode, stop_task
from bus import Bus
from nerve._errors import CodecError, HistoryError, Overloaded
from persistence import StreamEvent
from workflow import ENDED_STATUSES

log = logging.getLogger("nerve.api.tail")


@dataclass(frozen=True, slots=True)
class Frame:
    """One stream event, rendered once as an SSE frame for every client."""

    seq: int
    type: str
    frame: bytes
    terminal: str | None = None  # the run's final status, on its last ``status`` event


def render(seq: int, data: bytes) -> Frame:
    """An SSE frame for the stream event stored at ``seq`` (a comment if undecodable)."""
    try:
        ev = decode(data, StreamEvent)
    except CodecError as exc:
        log.warning("stream event %d is undecodable: %s", seq, exc.message)
        return Frame(seq, "invalid", f"id: {seq}\n: undecodable event skipped\n\n".encode())
    body = json.dumps({"type": ev.type, "run_id": ev.run_id, "at": ev.at, "data": ev.data},
                      separators=(",", ":"), default=str, ensure_ascii=False)
    terminal = None
    if ev.type == "status" and ev.data.get("status") in ENDED_STATUSES:
        terminal = str(ev.data["status"])
    return Frame(seq, ev.type, f"id: {seq}\nevent: {ev.type}\ndata: {body}\n\n".encode(),
                 terminal)


async def direct_batch(bus: Bus, subject: str, after: int, limit: int) -> list[Frame]:
    """Up to ``limit`` stored events of ``subject`` after sequence ``after`` (one request)."""
    nc = bus.nc
    inbox = nc.new_inbox()
    got: list[Any] = []
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    async def collect(msg: Any) -> None:
        if (msg.headers or {}).get("Status") is None:
            got.append(msg)
        elif not done.done():
            done.set_result(msg)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        req = {"seq": after + 1, "next_by_subj": subject, "batch": limit}
        await nc.publish(f"$JS.API.DIRECT.GET.{bus.names.stream_stream}",
                         json.dumps(req).encode(), reply=inbox)
        end = await asyncio.wait_for(done, timeout=10.0)
    except TimeoutError:
        raise HistoryError(f"no answer reading {subject}", subject=subject,
                           retryable=True) from None
    finally:
        with contextlib.suppress(NatsClientError):
            await sub.unsubscribe()
    status = (end.headers or {}).get("Status")
    if status not in ("204", "404"):
        raise HistoryError(f"direct get on {subject} failed: {status} "
                           f"{(end.headers or {}).get('Description', '')}", subject=subject)
    return [render(int(m.headers["Nats-Sequence"]), m.data) for m in got]


class RunTail:
    """The shared live reader of one run's stream (see the module docstring)."""

    def __init__(self, tails: Tails, run_id: str) -> None:
        self.tails = tails
        self.bus = tails.bus
        self.run_id = run_id
        self.subject = tails.bus.names.stream(run_id)
        self.base = 1 << 62  # nothing is covered until started
        self.users = 0
        self.generation = 0  # bumped by every restart
        self.terminal: str | None = None
        self._seqs: list[int] = []
        self._frames: list[Frame] = []
        self._bytes = 0
        self._changed = asyncio.Event()
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self.idle_since: float | None = None

    async def start(self) -> None:
        async with self._lock:
            await self._stop_sub()
            last = 0
            with contextlib.suppress(NotFoundError):
                msg = await self.bus.js.get_last_msg(self.bus.names.stream_stream, self.subject,
                                                     direct=True)
                last = msg.seq
            self._seqs, self._frames, self._bytes = [], [], 0
            self.base = last + 1
            self.generation += 1
            self._sub = await self.bus.js.subscribe(
                self.subject, stream=self.bus.names.stream_stream, cb=self._on_msg,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=last + 1),
                pending_msgs_limit=self.tails.ring_size * 4,
                pending_bytes_limit=self.tails.ring_bytes * 4)
            self._notify()

    async def restart(self, generation: int) -> None:
        """Restart the consumer unless someone already did since ``generation``."""
        if generation == self.generation:
            log.warning("tail of run %s fell behind its stream; restarting it", self.run_id)
            self.tails.restarts += 1
            await self.start()

    async def _stop_sub(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(NatsClientError, TimeoutError):
                await sub.unsubscribe()

    async def close(self) -> None:
        async with self._lock:
            await self._stop_sub()
        self.base = 1 << 62
        self._notify()

    async def _on_msg(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        if self._seqs and seq <= self._seqs[-1]:
            return  # a redelivery after the ordered consumer reset itself
        frame = render(seq, msg.data)
        self._seqs.append(seq)
        self._frames.append(frame)
        self._bytes += len(frame.frame)
        if frame.terminal:
            self.terminal = frame.terminal
        # Trimmed in halves so that appending stays O(1) amortized.
        if len(self._seqs) > 2 * self.tails.ring_size or self._bytes > 2 * self.tails.ring_bytes:
            drop = max(1, len(self._seqs) // 2)
            self.base = self._seqs[drop - 1] + 1
            self._bytes -= sum(len(f.frame) for f in self._frames[:drop])
            del self._seqs[:drop]
            del self._frames[:drop]
        self.tails.events_in += 1
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def after(self, position: int, limit: int) -> list[Frame] | None:
        """Frames after ``position`` from the ring; ``None`` when the ring does not cover it."""
        if position + 1 < self.base:
            return None
        i = bisect.bisect_right(self._seqs, position)
        return self._frames[i:i + limit]

    @property
    def last_seq(self) -> int:
        return self._seqs[-1] if self._seqs else self.base - 1

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a new event; True if one came."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Tails:
    """The tails of one API process, by run; a tail lingers a while after its last client."""

    def __init__(self, bus: Bus, *, ring_size: int = 2048, ring_bytes: int = 4 << 20,
                 linger: float = 30.0, max_tails: int = 10_000) -> None:
        self.bus = bus
        self.ring_size = ring_size
        self.ring_bytes = ring_bytes
        self.linger = linger
        self.max_tails = max_tails
        self._tails: dict[str, RunTail] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.events_in = 0
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._tails)

    async def acquire(self, run_id: str) -> RunTail:
        async with self._lock:
            tail = self._tails.get(run_id)
            if tail is None:
                if len(self._tails) >= self.max_tails:
                    await self._reap(force=True)
                    if len(self._tails) >= self.max_tails:
                        raise Overloaded(f"this API process follows {len(self._tails)} runs "
                                         "already; try again shortly or use another replica",
                                         retry_after_ms=2000)
                tail = RunTail(self, run_id)
                await tail.start()
                self._tails[run_id] = tail
            tail.users += 1
            tail.idle_since = None
            if self._reaper is None or self._reaper.done():
                self._reaper = asyncio.create_task(self._reap_loop(), name="tail-reaper")
            return tail

    def release(self, tail: RunTail) -> None:
        tail.users -= 1
        if tail.users <= 0:
            tail.idle_since = time.monotonic()

    async def _reap_loop(self) -> None:
        while self._tails:
            await asyncio.sleep(max(0.5, self.linger / 4))
            async with self._lock:
                await self._reap()

    async def _reap(self, force: bool = False) -> None:
        now = time.monotonic()
        for run_id, tail in list(self._tails.items()):
            idle = tail.idle_since
            if tail.users <= 0 and idle is not None and (
                    force or now - idle >= self.linger or tail.terminal is not None):
                del self._tails[run_id]
                await tail.close()

    async def restart_all(self) -> None:
        """After a reconnect: the server may have lost the consumers."""
        for tail in list(self._tails.values()):
            with contextlib.suppress(NatsClientError, TimeoutError, HistoryError):
                await tail.restart(tail.generation)

    async def close(self) -> None:
        await stop_task(self._reaper)
        for tail in list(self._tails.values()):
            await tail.close()
        self._tails.clear()


__all__ = ["Frame", "RunTail", "Tails", "direct_batch", "render"]
