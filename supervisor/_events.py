"""Publishing supervisor events on the bus, for anyone to subscribe to."""

from __future__ import annotations

import dataclasses
import logging

from nats.errors import Error as NatsClientError

from actors import encode
from bus import Bus
from supervisor._tree import EventSink, SupervisorEvent

log = logging.getLogger("nerve.supervisor")


def bus_event_sink(bus: Bus) -> EventSink:
    """An ``on_event`` callback storing every event on ``nerve.events.supervisor``."""

    async def sink(event: SupervisorEvent) -> None:
        try:
            await bus.js.publish(bus.names.event("supervisor"), encode(dataclasses.asdict(event)))
        except (NatsClientError, TimeoutError) as exc:
            log.warning("could not publish supervisor event %s: %r", event.kind, exc)

    return sink
