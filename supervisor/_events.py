"""Publishing supervisor events on the bus, for anyone to subscribe to."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

from nats.errors import Error as NatsClientError

from actors import encode
from bus import Bus
from supervisor._tree import EventSink, SupervisorEvent

log = logging.getLogger("nerve.supervisor")


def bus_event_sink(bus: Bus, *, timeout: float = 5.0) -> EventSink:
    """An ``on_event`` callback storing every event on ``nerve.events.supervisor``.

    Events are stored in order by a task of their own: the supervisor never waits for the
    bus, because the child it is about to restart may be the bus's server. An event not
    stored within ``timeout`` seconds is logged and dropped; once the connection has been
    closed (a shutdown), events are dropped quietly.
    """
    queue: collections.deque[SupervisorEvent] = collections.deque()
    worker: asyncio.Task[None] | None = None

    async def store() -> None:  # runs while there is something to store
        while queue:
            event = queue.popleft()
            if bus.nc.is_closed:
                continue
            try:
                await bus.js.publish(bus.names.event("supervisor"),
                                     encode(dataclasses.asdict(event)), timeout=timeout)
            except (NatsClientError, TimeoutError) as exc:
                if not bus.nc.is_closed:
                    log.warning("could not publish supervisor event %s of %s: %r",
                                event.kind, event.child, exc)

    def sink(event: SupervisorEvent) -> None:
        nonlocal worker
        if bus.nc.is_closed:
            return
        queue.append(event)
        if worker is None or worker.done():
            worker = asyncio.create_task(store(), name="supervisor-events")

    return sink
