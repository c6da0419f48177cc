"""Create every stream, KV bucket and object store nerve needs, idempotently."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from bus._connect import Bus
from nerve import ProvisioningError

log = logging.getLogger("nerve.bus.provision")

_DAY = 24 * 3600.0


@dataclass(slots=True)
class StreamLimits:
    """Retention knobs a deployment may want to change; the defaults suit one machine.

    ``work_storage`` is memory by default: a work item is regenerated from the run history
    on takeover (and after a server restart), so it need not cost an fsync on every step's
    critical path. Set it to ``file`` to keep queued work across server restarts anyway.

    ``live_persist`` is how ``NERVE_STREAM`` (live tokens and progress) is written. ``async``
    acks an event before it is on disk: with ``sync_interval: always`` every other stream
    pays an fsync per message, and a model streaming tokens would pay one per token. A
    crash of nats-server can lose its last few milliseconds of live output; the run history
    holds everything that matters. ``default`` fsyncs live output like the rest. The server
    fixes the mode when it creates the stream and takes ``async`` only on one replica.
    """

    stream_max_age: float = 7 * _DAY
    dead_max_age: float = 30 * _DAY
    events_max_age: float = 7 * _DAY
    duplicate_window: float = 120.0
    max_msg_size: int = 8 * 1024 * 1024
    work_storage: StorageType = StorageType.MEMORY
    live_persist: PersistMode = PersistMode.ASYNC
    replicas: int = 1


def stream_configs(names, limits: StreamLimits) -> list[StreamConfig]:
    p = names.prefix
    common = dict(num_replicas=limits.replicas, max_msg_size=limits.max_msg_size)
    live_persist = limits.live_persist if limits.replicas == 1 else None
    return [
        StreamConfig(
            name=names.tasks_stream, subjects=[f"{p}.tasks.*"],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            duplicate_window=limits.duplicate_window, **common,
        ),
        StreamConfig(
            name=names.runs_stream, subjects=[f"{p}.runs.*.history", f"{p}.runs.*.inbox"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            duplicate_window=limits.duplicate_window, allow_direct=True,
            # Orchestrators store many runs' appends as one atomic batch: one fsync.
            allow_atomic=True, **common,
        ),
        StreamConfig(
            name=names.work_stream, subjects=[f"{p}.work.>"],
            retention=RetentionPolicy.WORK_QUEUE, storage=limits.work_storage,
            duplicate_window=limits.duplicate_window, **common,
        ),
        StreamConfig(
            name=names.stream_stream, subjects=[f"{p}.stream.*"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            max_age=limits.stream_max_age, allow_direct=True, persist_mode=live_persist,
            **common,
        ),
        StreamConfig(
            name=names.dead_stream, subjects=[f"{p}.deadletter.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            max_age=limits.dead_max_age, **common,
        ),
        # JetStream's "out of deliveries" advisories for the work queues, kept so that a
        # message whose handler crashed on every attempt is dead-lettered even if nobody
        # was listening at that moment.
        StreamConfig(
            name=names.advisories_stream,
            subjects=[names.max_deliveries_advisory(names.tasks_stream),
                      names.max_deliveries_advisory(names.work_stream)],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            max_age=limits.dead_max_age, **common,
        ),
        StreamConfig(
            name=names.events_stream, subjects=[f"{p}.events.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            max_age=limits.events_max_age, discard=DiscardPolicy.OLD, **common,
        ),
    ]


async def _ensure_stream(bus: Bus, config: StreamConfig) -> None:
    try:
        info = await bus.js.stream_info(config.name)
    except NotFoundError:
        try:
            await bus.js.add_stream(config)
            log.info("created stream %s", config.name)
            return
        except BadRequestError as exc:
            # Another process created it between our look and our create: fall through.
            if exc.err_code != 10058:
                raise ProvisioningError(
                    f"cannot create stream {config.name}: {exc.description}",
                    stream=config.name, code=exc.err_code,
                ) from None
        info = await bus.js.stream_info(config.name)
    if _differs(info.config, config):
        # The server refuses to change a stream's persist mode: keep the one it has.
        config = dataclasses.replace(config, persist_mode=info.config.persist_mode)
        try:
            await bus.js.update_stream(config)
            log.info("updated stream %s", config.name)
        except BadRequestError as exc:
            raise ProvisioningError(
                f"stream {config.name} exists with a config nerve cannot change "
                f"({exc.description}); delete it (`nats stream rm {config.name}`) or use "
                "another --prefix", stream=config.name, code=exc.err_code,
            ) from None


def _differs(have: StreamConfig, want: StreamConfig) -> bool:
    fields = ("subjects", "retention", "storage", "max_age", "duplicate_window",
              "max_msg_size", "allow_direct", "allow_atomic", "num_replicas")
    # A duplicate window of 0 is "the server's default" (2 min), which the server then
    # reports: not a difference, or every start would update four streams for nothing.
    return any(
        getattr(want, f) is not None and getattr(have, f) != getattr(want, f)
        and not (f == "duplicate_window" and not getattr(want, f))
        for f in fields
    )


# How long a step's progress outlives its last heartbeat (a week: longer than any retry).
PROGRESS_MAX_AGE = 7 * 24 * 3600.0


async def provision(bus: Bus, limits: StreamLimits | None = None,
                    lease_marker_ttl: float = 60.0) -> None:
    """Create (or check) every stream, KV bucket and object store for ``bus.names``.

    Safe to call from every process at start-up, concurrently: what exists with the right
    config is left alone; a compatible difference is updated; an incompatible one raises
    :class:`~nerve.ProvisioningError` naming the resource and the fix.
    """
    await bus.require_jetstream()
    limits = limits or StreamLimits()
    names = bus.names
    for config in stream_configs(names, limits):
        await _ensure_stream(bus, config)

    # Leases: one value per key; keys may carry their own TTL (Nats-TTL). Expiry leaves a
    # delete marker so watchers see a holder die instead of having to poll.
    await _ensure_kv(bus, KeyValueConfig(
        bucket=names.leases_bucket, history=1, storage=StorageType.FILE,
        replicas=limits.replicas, limit_marker_ttl=lease_marker_ttl,
    ))
    # Orchestrators write run records (one created and one deleted per run) in atomic
    # batches, like history appends: one fsync for many.
    await _allow_atomic(bus, f"KV_{names.leases_bucket}")
    # Budgets: a few revisions of history make ledger changes auditable.
    await _ensure_kv(bus, KeyValueConfig(
        bucket=names.budgets_bucket, history=8, storage=StorageType.FILE,
        replicas=limits.replicas,
    ))
    # Activity progress (heartbeat details), read by a step's next attempt; a step that
    # ends deletes its value, and the age limit clears those of runs that ended without it.
    await _ensure_kv(bus, KeyValueConfig(
        bucket=names.progress_bucket, history=1, storage=StorageType.FILE,
        replicas=limits.replicas, ttl=PROGRESS_MAX_AGE,
    ))
    # API keys: one record per key id holding the key's hash and tenant, never the key.
    await _ensure_kv(bus, KeyValueConfig(
        bucket=names.apikeys_bucket, history=1, storage=StorageType.FILE,
        replicas=limits.replicas,
    ))
    try:
        await bus.js.object_store(names.snapshots_bucket)
    except NotFoundError:
        try:
            await bus.js.create_object_store(names.snapshots_bucket, config=ObjectStoreConfig(
                storage=StorageType.FILE, replicas=limits.replicas,
            ))
        except BadRequestError as exc:
            if exc.err_code != 10058:
                raise ProvisioningError(
                    f"cannot create object store {names.snapshots_bucket}: {exc.description}",
                    bucket=names.snapshots_bucket, code=exc.err_code,
                ) from None


async def _allow_atomic(bus: Bus, stream: str) -> None:
    info = await bus.js.stream_info(stream)
    if info.config.allow_atomic:
        return
    info.config.allow_atomic = True
    try:
        await bus.js.update_stream(info.config)
    except BadRequestError as exc:  # a server older than 2.12: batches are not used then
        log.warning("stream %s cannot take atomic batches (%s); writes to it are not "
                    "grouped", stream, exc.description)


async def _ensure_kv(bus: Bus, config: KeyValueConfig) -> None:
    try:
        await bus.js.key_value(config.bucket)
        return
    except NotFoundError:
        pass
    try:
        await bus.js.create_key_value(config=config)
    except BadRequestError as exc:
        if exc.err_code != 10058:
            raise ProvisioningError(
                f"cannot create KV bucket {config.bucket}: {exc.description}",
                bucket=config.bucket, code=exc.err_code,
            ) from None
