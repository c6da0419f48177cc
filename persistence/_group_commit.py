"""``GroupCommit``: many runs' history appends stored together, with one fsync.

JetStream stores a stream's messages one at a time, and with ``sync_interval: always`` each
one is fsync'd before it is acked: a stream's appends queue behind each other's fsyncs, and
an orchestrator driving a hundred runs spends most of its time waiting for the disk.

An orchestrator's drivers hand their appends to one ``GroupCommit``. While a batch is being
stored, new appends queue; the next batch takes all of them as one JetStream atomic batch
(``allow_atomic``, nats-server 2.12+): every message, fenced and deduplicated as usual, is
stored or none is, with one fsync for the lot. Each append still returns only once its own
record is durable, so nothing about a run's history changes but the number of fsyncs.

A batch is all or nothing, so one stale writer's fence (or a retried append the stream
already has) fails it for everyone: then each of its appends is stored on its own, and gets
its own answer exactly as without batching.

An atomic batch has a fixed price. On a single-replica file stream nats-server stages it in
a store of its own (a directory, two synced metadata files, directory fsyncs), about 3 ms
here whatever its size, while an append stored alone costs one fsync (0.2-0.3 ms). A few
appends are stored one by one, pipelined; from ``atomic_from`` on (16: where the two took
as long in ``bench/workflow.py``'s measurement) they go as one batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass, field

from nats.errors import Error as NatsClientError
from nats.js.errors import APIError

from actors import stop_task
from bus import Bus, StoredAck
from nerve import ConfigError

log = logging.getLogger("nerve.persistence.commit")

_MAX_BATCH = 256  # nats-server accepts up to 1,000 messages in an atomic batch


@dataclass(slots=True)
class _Append:
    subject: str
    payload: bytes
    headers: dict[str, str]
    stored: asyncio.Future[StoredAck] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """Stores history appends in atomic batches, one batch in flight at a time.

    ``atomic=False`` (a stream without ``allow_atomic``, or a server older than 2.12)
    stores each append on its own, pipelined; so is any batch of fewer than
    ``atomic_from`` appends.
    """

    ATOMIC_FROM = 16

    def __init__(self, bus: Bus, atomic: bool = True, timeout: float = 5.0,
                 atomic_from: int = ATOMIC_FROM) -> None:
        if atomic_from < 2:
            raise ConfigError(f"atomic_from must be at least 2 (a batch of one is a plain "
                              f"append), got {atomic_from}")
        self.bus = bus
        self.atomic = atomic
        self.atomic_from = atomic_from
        self.timeout = timeout
        self._queue: list[_Append] = []
        self._flusher: asyncio.Task[None] | None = None
        self._batch_ids = itertools.count(1)
        self._prefix = f"gc-{os.getpid()}-{os.urandom(4).hex()}-"
        self.batches = 0  # stored as one atomic batch (for tests and benchmarks)
        self.appends = 0

    async def append(self, subject: str, payload: bytes, headers: dict[str, str],
                     ) -> StoredAck:
        """Store one record; returns once it is durable (raises as a plain publish would)."""
        item = _Append(subject, payload, headers)
        self._queue.append(item)
        if self._flusher is None:
            # Started, not run: appends made in this same turn of the event loop join it.
            self._flusher = asyncio.create_task(self._flush())
        return await item.stored

    async def close(self) -> None:
        if self._flusher is not None:
            await stop_task(self._flusher)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:_MAX_BATCH]
                del self._queue[:len(batch)]
                if self.atomic and len(batch) >= self.atomic_from:
                    await self._store_batch(batch)
                else:
                    await self._store_each(batch)
        finally:
            self._flusher = None
            for item in self._queue:  # cancelled with appends still queued
                if not item.stored.done():
                    item.stored.set_exception(NatsClientError("group commit stopped"))
            self._queue.clear()

    async def _store_batch(self, batch: list[_Append]) -> None:
        batch_id = f"{self._prefix}{next(self._batch_ids)}"
        last = len(batch)
        try:
            for n, item in enumerate(batch, 1):
                headers = {**item.headers, "Nats-Batch-Id": batch_id,
                           "Nats-Batch-Sequence": str(n)}
                if n < last:
                    await self.bus.publish(item.subject, item.payload, headers=headers)
                else:
                    headers["Nats-Batch-Commit"] = "1"
                    committed = await self.bus.replies.send(
                        item.subject, item.payload, headers, self.timeout, stored=True)
            ack: StoredAck = await committed
            if ack.count != last:
                raise NatsClientError(f"atomic batch of {last} acked as {ack.count} messages")
        except APIError as exc:
            # Someone's fence or a duplicate failed the whole batch: nothing was stored.
            log.debug("atomic batch of %d not stored (%s); storing each alone", last,
                      exc.description)
            await self._store_each(batch)
            return
        except (TimeoutError, NatsClientError) as exc:
            for item in batch:  # unknown outcome: each caller retries its own append
                if not item.stored.done():
                    item.stored.set_exception(exc)
            return
        # An atomic batch occupies consecutive stream sequences, ending at the ack's.
        first = ack.seq - last + 1
        self.batches += 1
        self.appends += last
        for n, item in enumerate(batch):
            if not item.stored.done():
                item.stored.set_result(StoredAck(ack.stream, first + n))

    async def _store_each(self, batch: list[_Append]) -> None:
        futures = []
        for item in batch:
            try:
                futures.append(await self.bus.replies.send(
                    item.subject, item.payload, item.headers, self.timeout, stored=True))
            except NatsClientError as exc:
                futures.append(None)
                if not item.stored.done():
                    item.stored.set_exception(exc)
        for item, future in zip(batch, futures, strict=True):
            if future is None:
                continue
            try:
                ack = await future
            except (APIError, TimeoutError, NatsClientError) as exc:
                if not item.stored.done():
                    item.stored.set_exception(exc)
            else:
                if not item.stored.done():
                    item.stored.set_result(ack)
