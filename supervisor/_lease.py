"""``Lease``: exclusive, expiring ownership of a key in the ``nerve-leases`` bucket.

The server enforces both halves. Exclusivity: acquiring is a create (it fails if the key
exists) and renewing or releasing is a compare-and-set on the revision the holder last
wrote. Expiry: every write carries a per-message TTL (``Nats-TTL``), so a holder that stops
renewing loses the key after ``ttl`` seconds, and the bucket's delete markers let watchers
see it go.

A holder must stop acting on what the lease protects once its own clock says the lease may
have lapsed (``held`` turns false), even before it learns the key was taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nats.errors import Error as NatsClientError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from actors import stop_task
from bus import Bus
from nerve import ConfigError, LeaseHeldError, LeaseLostError

log = logging.getLogger("nerve.supervisor.lease")

_MIN_TTL = 1.0  # JetStream's per-message TTL floor
H_TTL = "Nats-TTL"
H_EXPECTED = "Nats-Expected-Last-Subject-Sequence"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a lease key holds: who, since when, and anything the holder attached."""

    holder: str
    acquired_at: float
    renewed_at: float
    ttl: float
    data: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return msgpack.packb({"holder": self.holder, "acquired_at": self.acquired_at,
                              "renewed_at": self.renewed_at, "ttl": self.ttl, "data": self.data})

    @classmethod
    def decode(cls, raw: bytes) -> LeaseRecord:
        d = msgpack.unpackb(raw)
        return cls(d["holder"], d["acquired_at"], d["renewed_at"], d["ttl"], d.get("data") or {})


class Lease:
    """One holder's handle on one lease key.

    ``acquire`` / ``renew`` / ``release`` are single operations; :meth:`keep_alive` renews in
    the background every ``ttl / 3`` and calls ``on_lost`` if it cannot.
    """

    def __init__(self, bus: Bus, key: str, holder: str, ttl: float = 5.0,
                 data: dict[str, Any] | None = None) -> None:
        if ttl < _MIN_TTL:
            raise ConfigError(f"lease ttl {ttl}s is below JetStream's {_MIN_TTL}s minimum",
                              key=key, ttl=ttl)
        self.bus = bus
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self.data = data or {}
        self.revision: int | None = None
        self._valid_until = 0.0  # monotonic
        self._acquired_at = 0.0
        self._keeper: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        """True while this holder's own clock says the lease cannot have lapsed."""
        return self.revision is not None and time.monotonic() < self._valid_until

    async def _kv(self) -> KeyValue:
        return await self.bus.kv(self.bus.names.leases_bucket)

    def _subject(self) -> str:
        return f"$KV.{self.bus.names.leases_bucket}.{self.key}"

    async def _write(self, expected: int) -> int:
        now = time.time()
        record = LeaseRecord(self.holder, self._acquired_at or now, now, self.ttl, self.data)
        headers = {H_TTL: f"{int(self.ttl * 1000)}ms", H_EXPECTED: str(expected)}
        started = time.monotonic()
        # Waiting longer than the TTL is pointless: the lease would have lapsed anyway.
        ack = await self.bus.js.publish(self._subject(), record.encode(), headers=headers,
                                        timeout=max(1.0, self.ttl / 2))
        # Count validity from before the write: the server's clock started no earlier.
        self._valid_until = started + self.ttl
        return ack.seq

    async def current(self) -> tuple[LeaseRecord, int] | None:
        """The lease's record and revision, or None when nobody holds it."""
        kv = await self._kv()
        try:
            entry = await kv.get(self.key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation is not None:
            return None
        return LeaseRecord.decode(entry.value), entry.revision or 0

    async def acquire(self) -> bool:
        """Take the lease if it is free (or already ours). False if someone else holds it."""
        # One read decides what we expect to replace: nothing, a delete/expiry marker, or
        # our own record from before a restart. The write is then a compare-and-set on
        # exactly that, so a concurrent contender makes it fail instead of overwriting.
        last = await self._last_message()
        expected = 0
        if last is not None:
            seq, record = last
            if record is not None and record.holder != self.holder:
                return False
            expected = seq
        self._acquired_at = time.time()
        try:
            self.revision = await self._write(expected)
        except APIError as exc:
            if exc.err_code == 10071:  # someone else got there first
                return False
            raise
        log.debug("lease %s acquired by %s (rev %s)", self.key, self.holder, self.revision)
        return True

    async def _last_message(self) -> tuple[int, LeaseRecord | None] | None:
        """The key's last stream message: its sequence, and its record unless a marker."""
        try:
            msg = await self.bus.js.get_last_msg(f"KV_{self.bus.names.leases_bucket}",
                                                 self._subject())
        except APIError:  # includes "no message on this subject"
            return None
        headers = msg.headers or {}
        if headers.get("KV-Operation") or headers.get("Nats-Marker-Reason") or not msg.data:
            return msg.seq, None
        return msg.seq, LeaseRecord.decode(msg.data)

    async def acquire_or_raise(self) -> None:
        if not await self.acquire():
            found = await self.current()
            raise LeaseHeldError(
                f"lease {self.key} is held by {found[0].holder if found else 'someone else'}",
                key=self.key, holder=found[0].holder if found else None)

    async def wait_acquire(self, poll: float = 0.25, timeout: float | None = None) -> None:
        """Wait until the lease is free and take it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not await self.acquire():
            if deadline is not None and time.monotonic() > deadline:
                raise LeaseHeldError(f"lease {self.key} still held after {timeout}s", key=self.key)
            await asyncio.sleep(poll)

    async def renew(self) -> None:
        """Extend the lease; :class:`~nerve.LeaseLostError` if it was taken or had expired."""
        if self.revision is None:
            raise LeaseLostError(f"lease {self.key} is not held by {self.holder}", key=self.key)
        try:
            self.revision = await self._write(self.revision)
        except (APIError, KeyWrongLastSequenceError) as exc:
            self.revision = None
            raise LeaseLostError(
                f"lease {self.key} was lost by {self.holder} (expired or taken over)",
                key=self.key, holder=self.holder) from exc

    async def release(self) -> None:
        """Give the lease up now (so others need not wait for the TTL)."""
        await self.stop_keep_alive()
        if self.revision is None:
            return
        kv = await self._kv()
        with contextlib.suppress(APIError, KeyWrongLastSequenceError, NatsClientError):
            await kv.delete(self.key, last=self.revision)
        self.revision = None

    def keep_alive(self, on_lost: Callable[[LeaseLostError], Any] | None = None) -> None:
        """Renew every ``ttl / 3`` in the background until released or lost. ``on_lost`` may
        re-acquire the lease and call this again: renewals then start over."""
        # From inside on_lost the old keeper is still running (it awaits on_lost, then ends).
        if self._keeper is None or self._keeper.done() or self._keeper is asyncio.current_task():
            self._keeper = asyncio.create_task(self._keep(on_lost), name=f"lease:{self.key}")

    async def _keep(self, on_lost: Callable[[LeaseLostError], Any] | None) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
                continue
            except LeaseLostError as exc:
                lost = exc
            except (TimeoutError, NatsClientError) as exc:
                # The bus is briefly away: keep trying while the lease may still be valid.
                if self.held:
                    continue
                self.revision = None
                lost = LeaseLostError(f"lease {self.key} lapsed while NATS was unreachable "
                                      f"({exc!r})", key=self.key)
            log.warning("%s", lost)
            if on_lost is not None:
                result = on_lost(lost)
                if asyncio.iscoroutine(result):
                    await result
            return

    async def stop_keep_alive(self) -> None:
        # stop_task cancels again until the keeper ends: a single cancel can be lost while
        # a renewal's wait_for completes, and the keeper would renew on for ever.
        await stop_task(self._keeper)
        self._keeper = None


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """A lease key appeared, was renewed, or went away (``record`` is None)."""

    key: str
    record: LeaseRecord | None
    revision: int


async def watch_leases(bus: Bus, pattern: str = ">",
                       initial_done: asyncio.Event | None = None,
                       ) -> AsyncIterator[LeaseChange | None]:
    """Follow lease keys matching ``pattern``: current values first, then every change.

    An expired or released lease shows up as a change with ``record=None``. With
    ``initial_done``, the event is set and ``None`` is yielded once the current values have
    all been delivered.
    """
    kv = await bus.kv(bus.names.leases_bucket)
    watcher = await kv.watch(pattern)
    try:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                if initial_done is not None and not initial_done.is_set():
                    initial_done.set()
                    yield None
                continue
            record = None
            if entry.operation is None and entry.value:
                record = LeaseRecord.decode(entry.value)
            yield LeaseChange(entry.key, record, entry.revision or 0)
    finally:
        with contextlib.suppress(NatsClientError):
            await watcher.stop()


async def lease_entries(bus: Bus, pattern: str) -> dict[str, tuple[bytes, int]]:
    """The live keys matching a subject ``pattern`` (``run.*``) in the leases bucket, with
    their values and revisions, read in one pass.

    Reads through an ephemeral pull consumer (last message per subject) until its pending
    count reaches zero: it delivers nothing until asked, so where the current values end is
    exact. nats-py's ``KeyValue.watch`` infers that end from a consumer-info call made while
    its push consumer is already delivering; with it, the orchestrator race test once in
    about ten runs claimed a run from a live peer missing from the host snapshot, and with
    this, in none of 50. (``KeyValue.keys(filters=...)`` matches substrings, not subject
    wildcards.)
    """
    bucket = bus.names.leases_bucket
    prefix = f"$KV.{bucket}."
    stream = f"KV_{bucket}"
    name = bus.nc.new_inbox().rpartition(".")[2]
    info = await bus.js.add_consumer(stream, ConsumerConfig(
        name=name, filter_subject=prefix + pattern, mem_storage=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0))
    found: dict[str, tuple[bytes, int]] = {}
    try:
        # A pull consumer delivers nothing until asked, so the pending count it was created
        # with is exact, and each message says how many are left after it.
        pending = info.num_pending or 0
        if pending:
            sub = await bus.js.pull_subscribe_bind(consumer=name, stream=stream)
            try:
                while pending:
                    for msg in await sub.fetch(min(pending, 512), timeout=5.0):
                        meta = msg.metadata
                        pending = meta.num_pending
                        headers = msg.headers or {}
                        if msg.data and not (headers.get("KV-Operation")
                                             or headers.get("Nats-Marker-Reason")):
                            found[msg.subject[len(prefix):]] = (msg.data,
                                                                meta.sequence.stream)
            finally:
                with contextlib.suppress(NatsClientError):
                    await sub.unsubscribe()
    finally:
        with contextlib.suppress(NatsClientError, APIError, TimeoutError):
            await bus.js.delete_consumer(stream, name)
    return found
