"""``RunHistory``: one run's event-sourced history on ``nerve.runs.<run_id>.history``.

Single writer, enforced by the server: every append says which stream sequence it expects
to be the last on the subject (``Nats-Expected-Last-Subject-Sequence``); if anyone else
appended in between, JetStream refuses (10071) and the writer gets
:class:`~nerve.StaleWriterError`. ``Nats-Msg-Id = <run_id>:<event_index>`` makes a retried
append idempotent.

One history message holds one or more consecutive events, written atomically with one
fsync (a step's completion and the next steps it schedules, say). The message id is the
index of its first event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import msgpack
from nats.errors import Error as NatsClientError
from nats.js.errors import APIError, NotFoundError

from actors import encode, stop_task
from bus import Bus, RawHeaders
from nerve import CodecError, HistoryError, RunNotFound, StaleWriterError
from persistence._events import EVENTS_ADAPTER, Event, RunStarted
from persistence._group_commit import GroupCommit

H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_WRITER = "Nerve-Writer"
WRONG_LAST_SEQUENCE = 10071
_DIRECT_BATCH = 1024


def encode_record(events: Sequence[Event]) -> bytes:
    return encode([e.model_dump(mode="python") for e in events])


def decode_record(data: bytes) -> list[Event]:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise CodecError(f"corrupt history record: {exc}") from None
    if isinstance(raw, dict):  # a single event written by hand or by an older writer
        raw = [raw]
    return EVENTS_ADAPTER.validate_python(raw)


class RunHistory:
    """Read and append one run's history. Not safe to share between two writers: that is
    the point; the second one gets :class:`~nerve.StaleWriterError`.
    """

    def __init__(self, bus: Bus, run_id: str, writer: str | None = None,
                 commit: GroupCommit | None = None) -> None:
        self.bus = bus
        self.run_id = run_id
        self.commit = commit  # stores appends together with other runs' (one fsync)
        self.writer = writer  # stamped on every record (Nerve-Writer), for audits
        self.subject = bus.names.history(run_id)
        self.last_seq = 0  # stream sequence of the last record on the subject (0: none)
        self.length = 0  # number of events in the history
        self.written: tuple[Event, ...] = ()  # what create() wrote, when it did

    async def read(self, after_seq: int = 0) -> list[Event]:
        """Read the whole history (or the records after stream sequence ``after_seq``).

        Also positions this writer at the end, so the next :meth:`append` is fenced
        against what was read.
        """
        events: list[Event] = []
        first_index: int | None = None
        # Batch by batch, not record by record: a long replay is mostly per-record overhead.
        async for got in _direct_batches(self.bus, self.bus.names.runs_stream, self.subject,
                                         after_seq, _DIRECT_BATCH):
            if first_index is None:
                # A record's msg id names the index of its first event: a partial read
                # still knows where in the whole history it starts.
                first_index = (int(got[0][2].get(H_MSG_ID, ":0").rsplit(":", 1)[1])
                               if after_seq else 0)
            for _seq, data, _headers in got:
                events.extend(decode_record(data))
            self.last_seq = got[-1][0]
        if first_index is not None:
            self.length = first_index + len(events)
        return events

    async def records(self, after_seq: int = 0):
        """Yield ``(stream_seq, headers, events)`` per stored record, oldest first."""
        async for seq, data, headers in direct_get_subject(
                self.bus, self.bus.names.runs_stream, self.subject, after_seq):
            yield seq, headers, decode_record(data)

    async def first(self) -> RunStarted | None:
        """The run's first event (one small read), or None if there is no such run."""
        async for _seq, _headers, record in direct_first(self):
            first = record[0]
            return first if isinstance(first, RunStarted) else None
        return None

    async def create(self, started: RunStarted, *more: Event) -> bool:
        """Write the first record (``started`` and any ``more`` events after it). False if the
        run already exists (same id): an idempotent start."""
        self.last_seq = 0
        self.length = 0
        try:
            await self.append(started, *more)
        except StaleWriterError:
            return False
        self.written = (started, *more)
        return True

    async def append(self, *events: Event) -> int:
        """Append ``events`` atomically after what this writer last read or wrote.

        Returns the stream sequence of the record. Raises :class:`~nerve.StaleWriterError`
        if anyone else wrote the history since.
        """
        if not events:
            raise ValueError("append needs at least one event")
        payload = encode_record(events)
        msg_id = f"{self.run_id}:{self.length}"
        headers = {H_MSG_ID: msg_id, H_EXPECTED_SUBJECT_SEQ: str(self.last_seq)}
        if self.writer:
            headers[H_WRITER] = self.writer
        try:
            ack = await (self.commit.append(self.subject, payload, headers) if self.commit
                         else self.bus.replies.publish_stored(self.subject, payload, headers))
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise HistoryError(f"append to {self.subject} failed: {exc.description}",
                                   run_id=self.run_id, code=exc.err_code) from None
            # Our own earlier attempt may have landed with its ack lost: then the last
            # record on the subject is byte-for-byte what we are writing.
            seq = await self._ours_at_end(msg_id, payload)
            if seq is None:
                raise StaleWriterError(
                    f"run {self.run_id}: the history moved past sequence {self.last_seq}; "
                    "another orchestrator owns this run now", run_id=self.run_id,
                    expected_seq=self.last_seq, index=self.length,
                ) from None
            ack_seq = seq
        except (TimeoutError, NatsClientError) as exc:
            raise HistoryError(f"append to {self.subject} failed: {exc!r}",
                               run_id=self.run_id, retryable=True) from None
        else:
            ack_seq = ack.seq
            if ack.duplicate and await self._ours_at_end(msg_id, payload) is None:
                raise StaleWriterError(
                    f"run {self.run_id}: event {self.length} was already written by another "
                    "writer", run_id=self.run_id, index=self.length)
        self.last_seq = ack_seq
        self.length += len(events)
        return ack_seq

    async def last(self) -> list[Event]:
        """The events of the history's last record ([] if the run has none yet): one read,
        whatever the history's length."""
        try:
            msg = await self.bus.js.get_last_msg(self.bus.names.runs_stream, self.subject,
                                                 direct=True)
        except NotFoundError:
            return []
        return decode_record(msg.data)

    async def _ours_at_end(self, msg_id: str, payload: bytes) -> int | None:
        try:
            msg = await self.bus.js.get_last_msg(self.bus.names.runs_stream, self.subject,
                                                 direct=True)
        except NotFoundError:
            return None
        if (msg.headers or {}).get(H_MSG_ID) == msg_id and msg.data == payload:
            return msg.seq
        return None

    async def load_started(self) -> RunStarted:
        """The run's first event; :class:`~nerve.RunNotFound` if there is no such run."""
        first = await self.first()
        if first is None:
            raise RunNotFound(f"no run {self.run_id}", run_id=self.run_id)
        return first


_SEQ_HEADER = b"\r\nNats-Sequence:"


async def _direct_batch(bus: Bus, stream: str, subject: str, start: int, batch: int,
                        ) -> tuple[list[tuple[int, bytes, RawHeaders]], RawHeaders]:
    """One batched direct get: the messages, and the end-of-batch (or 404) status."""
    got: list[tuple[int, bytes, RawHeaders]] = []
    done: asyncio.Future[RawHeaders] = asyncio.get_running_loop().create_future()

    def sink(_subject: bytes, _reply: bytes, raw: bytes | None, data: bytes) -> None:
        raw = raw or b""
        i = raw.find(_SEQ_HEADER)
        if i < 0:  # a control message: end of batch, or nothing there
            headers = RawHeaders(raw)
            if headers.status() is not None and not done.done():
                done.set_result(headers)
            return
        start = i + len(_SEQ_HEADER)
        got.append((int(raw[start:raw.find(b"\r\n", start)]), data, RawHeaders(raw)))

    inbox = bus.nc.new_inbox()
    sub = await bus.raw_subscribe(inbox, sink)
    try:
        req = {"seq": start, "next_by_subj": subject, "batch": batch}
        await bus.nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(req).encode(),
                             reply=inbox)
        end = await asyncio.wait_for(done, timeout=10.0)
    except TimeoutError:
        raise HistoryError(f"no answer reading {subject} from {stream}",
                           subject=subject, retryable=True) from None
    finally:
        await bus.raw_unsubscribe(sub)
    status = end.status()
    if status == "503":  # no responders: no such stream
        raise HistoryError(f"no stream {stream} on this NATS to read {subject} from: nerve "
                           f"has not run here with this prefix (check --prefix / --nats-url)",
                           subject=subject)
    if status not in ("204", "404"):
        raise HistoryError(f"direct get on {stream} failed: {status} {end.raw[:200]!r}",
                           subject=subject)
    return got, end


async def _direct_batches(bus: Bus, stream: str, subject: str, after_seq: int, batch: int):
    """Yield each batch of ``(seq, data, headers)`` on ``subject`` after ``after_seq``, with
    the next batch requested while the caller works through the current one."""
    ahead: asyncio.Task[Any] | None = asyncio.create_task(
        _direct_batch(bus, stream, subject, after_seq + 1, batch))
    try:
        while ahead is not None:
            got, end = await ahead
            ahead = None
            more = end.status() == "204" and (end.get("Nats-Num-Pending", "0") != "0"
                                              or len(got) >= batch)
            if more and got:
                ahead = asyncio.create_task(
                    _direct_batch(bus, stream, subject, got[-1][0] + 1, batch))
            if got:
                yield got
    finally:
        if ahead is not None:
            await stop_task(ahead)


async def direct_get_subject(bus: Bus, stream: str, subject: str, after_seq: int = 0,
                             batch: int = _DIRECT_BATCH):
    """Yield ``(seq, data, headers)`` of every message on ``subject`` after ``after_seq``.

    Uses JetStream's batched direct get (no consumer to create or delete), up to ``batch``
    messages a round trip, read through a raw subscription, with the next batch requested
    while the caller works through the current one.
    """
    async for got in _direct_batches(bus, stream, subject, after_seq, batch):
        for item in got:
            yield item


async def direct_first(history: RunHistory):
    """Yield the first record of a history only (a batch of one)."""
    async for seq, data, headers in direct_get_subject(
            history.bus, history.bus.names.runs_stream, history.subject, 0, batch=1):
        yield seq, headers, decode_record(data)
        return
