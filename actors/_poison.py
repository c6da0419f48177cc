"""``PoisonKeeper``: dead-letters messages that ran out of deliveries without a verdict.

A handler that crashes its process (or hangs past ``ack_wait``) on every delivery never gets
to dead-letter the message itself. JetStream then stops delivering it and publishes a
"max deliveries" advisory, which ``NERVE_ADVISORIES`` keeps. This actor, run by every
``nerve worker`` process (they share one durable consumer, so each advisory is handled
once), turns each advisory into a dead letter with the original message and removes the
message from its work queue.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from nats.errors import Error as NatsClientError
from nats.js.errors import NotFoundError

from actors._actor import Actor, Delivery
from actors._mailbox import MAX_DEAD_PAYLOAD, DeadLetter, WorkQueue, publish_dead_letter


class PoisonKeeper(Actor[dict]):
    """Turns JetStream max-delivery advisories into dead letters (see the module doc)."""

    message_type = dict
    concurrency: ClassVar[int] = 4

    def __init__(self) -> None:
        super().__init__("poison-keeper")

    def mailbox(self) -> WorkQueue:
        assert self.bus is not None
        names = self.bus.names
        return WorkQueue(stream=names.advisories_stream,
                         subjects=[names.max_deliveries_advisory(names.tasks_stream, ">"),
                                   names.max_deliveries_advisory(names.work_stream, ">")],
                         durable="poison-keeper", ack_wait=30, max_deliver=5)

    async def handle(self, message: dict[str, Any], delivery: Delivery) -> None:
        assert self.bus is not None
        stream, consumer = str(message.get("stream", "")), str(message.get("consumer", ""))
        seq = int(message.get("stream_seq", 0))
        deliveries = int(message.get("deliveries", 0))
        try:
            raw = await self.bus.js.get_msg(stream, seq)
        except NotFoundError:
            return  # acked or removed since: nothing is stuck
        payload = raw.data or b""
        await publish_dead_letter(self.bus, DeadLetter(
            consumer=consumer, subject=raw.subject or "", stream=stream, stream_seq=seq,
            num_delivered=deliveries,
            reason=(f"out of deliveries ({deliveries}) without a verdict: the handler "
                    "crashed its process, hung past ack_wait, or lost its connection on "
                    "every attempt"),
            headers={k: str(v) for k, v in (raw.headers or {}).items()},
            payload=payload[:MAX_DEAD_PAYLOAD],
            payload_truncated=len(payload) > MAX_DEAD_PAYLOAD))
        # The work queue would keep it forever: it is in the dead-letter stream now.
        with contextlib.suppress(NotFoundError, NatsClientError):
            await self.bus.js.delete_msg(stream, seq)
