"""``Projector``: keeps a :class:`ReadModel` up to date from ``NERVE_RUNS``; ``rebuild``.

The feed is a durable pull consumer on the history subjects (``nerve.runs.*.history``),
named per read model (``readmodel-<instance>``). The database, not the consumer, is the
source of truth for where the feed is: each batch is applied and its position committed in
one transaction, then acknowledged. So the consumer is (re)created at the database's
position + 1 whenever the projector starts, and whenever the delivery sequence shows a gap
(a message lost in flight, a server restart): records then arrive exactly in stream order,
none skipped, and any record the database has already seen is ignored by
:meth:`ReadModel.apply`.

:func:`rebuild` reads the histories from the start with batched direct gets (no consumer)
into a fresh database: ``nerve reindex``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from nats.errors import Error as NatsClientError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actors import stop_task
from api._projections import Record
from api._readmodel import ReadModel
from bus import Bus
from nerve._errors import CodecError, NerveError, ReadModelError
from persistence import decode_record, direct_get_subject

log = logging.getLogger("nerve.api.projector")


def _run_id(subject: str) -> str:
    # <prefix>.runs.<run_id>.history
    return subject.split(".")[-2]


def _record(seq: int, subject: str, data: bytes) -> Record | None:
    try:
        return Record(seq, _run_id(subject), decode_record(data))
    except (CodecError, ValueError) as exc:
        # One bad record must not stop every projection; it is logged and skipped (its
        # run's row keeps what came before). ValueError covers pydantic's ValidationError.
        log.error("history record %d on %s is undecodable; skipped: %s", seq, subject, exc)
        return None


class Projector:
    """Feeds a read model from the run histories until stopped (see the module docstring)."""

    def __init__(self, bus: Bus, model: ReadModel, *, instance: str = "api", batch: int = 512,
                 idle_wait: float = 1.0) -> None:
        self.bus = bus
        self.model = model
        self.durable = bus.names.readmodel_consumer(instance)
        self.batch = batch
        self.idle_wait = idle_wait
        self.applied = 0
        self.resets = 0
        self.last_apply_at: float | None = None
        self._sub = None
        self._last_dseq = 0
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()
        self.caught_up = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None and not self._task.done():
            raise ReadModelError("the projector is already running")
        self._task = asyncio.create_task(self._run(), name="readmodel-projector")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        await self._unsubscribe()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._open()
                delay = 0.1
                while True:
                    await self._step()
            except (NerveError, NatsClientError, TimeoutError, OSError) as exc:
                # The bus or the database hiccuped: start over from the database's position.
                log.warning("read model feed interrupted (%r); resuming in %.1fs", exc, delay)
                await self._unsubscribe()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(NatsClientError, TimeoutError):
                await sub.unsubscribe()

    async def _open(self) -> None:
        """(Re)create the durable consumer at the database's position + 1."""
        js = self.bus.js
        stream = self.bus.names.runs_stream
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, self.durable)
        start = self.model.position + 1
        config = ConsumerConfig(
            durable_name=self.durable, filter_subject=self.bus.names.history("*"),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            ack_policy=AckPolicy.ALL, ack_wait=60.0, max_ack_pending=20_000,
            # A read model whose API is gone for good must not leave its consumer behind.
            inactive_threshold=7 * 24 * 3600.0, description="nerve API read model feed")
        await js.add_consumer(stream, config)
        self._sub = await js.pull_subscribe_bind(self.durable, stream=stream)
        self._last_dseq = 0
        self.resets += 1
        log.info("read model feed %s starts at sequence %d", self.durable, start)

    async def _step(self) -> None:
        assert self._sub is not None
        try:
            msgs = await self._sub.fetch(self.batch, timeout=self.idle_wait)
        except (NatsTimeoutError, TimeoutError):
            msgs = []
        if not msgs:
            await self._note_idle()
            return
        records: list[Record] = []
        gap = False
        for msg in msgs:
            meta = msg.metadata
            if meta.sequence.consumer != self._last_dseq + 1:
                gap = True  # a delivery we never saw: re-read from the database's position
                break
            self._last_dseq = meta.sequence.consumer
            rec = _record(meta.sequence.stream, msg.subject, msg.data)
            if rec is not None:
                records.append(rec)
        if records:
            await self.model.apply(records)
            self.applied += len(records)
            self.last_apply_at = time.time()
        if gap:
            log.warning("read model feed %s: delivery gap after consumer sequence %d; "
                        "re-reading from stream sequence %d", self.durable, self._last_dseq,
                        self.model.position + 1)
            await self._unsubscribe()
            await self._open()
        else:
            with contextlib.suppress(NatsClientError, TimeoutError):
                await msgs[-1].ack()  # AckAll: acknowledges the whole batch
            if msgs[-1].metadata.num_pending == 0:
                await self._note_idle()
        async with self._progress:
            self._progress.notify_all()

    async def _note_idle(self) -> None:
        if not self.caught_up.is_set():
            self.caught_up.set()
        async with self._progress:
            self._progress.notify_all()

    async def sync(self, timeout: float = 10.0) -> int:
        """Wait until every history record stored before this call is applied."""
        target = 0
        with contextlib.suppress(NotFoundError):
            last = await self.bus.js.get_last_msg(self.bus.names.runs_stream,
                                                  self.bus.names.history("*"), direct=True)
            target = last.seq
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self.model.position >= target)
        return self.model.position


async def rebuild(bus: Bus, path: Path | str, *, batch: int = 2000) -> ReadModel:
    """Build a read model at ``path`` (which must not exist) from the histories alone.

    Returns the model, open. Its position is the last history record it read; a projector
    started on it carries on from there.
    """
    path = Path(path)
    if path.exists():
        raise ReadModelError(f"{path} exists; rebuild writes a fresh database", path=str(path))
    model = await ReadModel(path).open()
    try:
        pending: list[Record] = []
        async for seq, data, headers in direct_get_subject(
                bus, bus.names.runs_stream, bus.names.history("*"), 0, batch=1024):
            rec = _record(seq, headers.get("Nats-Subject", ""), data)
            if rec is not None:
                pending.append(rec)
            if len(pending) >= batch:
                await model.apply(pending)
                pending = []
        if pending:
            await model.apply(pending)
    except BaseException:
        await model.close()
        raise
    return model


__all__ = ["Projector", "rebuild"]
