"""``SandboxWorker``: the step consumer of one sandbox (``nerve.work.sandbox.<id>``)."""

from __future__ import annotations

import logging
from typing import Any

from nats.errors import Error as NatsClientError

from actors import Delivery, StepWorker, WorkItem, WorkQueue, encode
from bus import Names, StreamLimits, stream_configs
from persistence import StreamEvent
from sandbox_actor._runner import Fenced, SandboxRunner

log = logging.getLogger("nerve.sandbox.worker")


class SandboxWorker(StepWorker):
    """Performs one sandbox's steps, one at a time, under the runner's commit protocol.

    A step the runner refuses because this host lost the sandbox (:class:`Fenced`) is
    neither answered nor acked: it goes back to the queue for the new owner. Unlike the
    base class, the result is delivered before ``handle`` returns (and the item is acked
    only then): the commit order is snapshot, assignment, result, ack.
    """

    concurrency = 1  # a sandbox's steps are sequential
    passthrough = (Fenced,)  # not a result: the item goes back to the queue
    ack_wait = 30.0
    max_deliver = 20

    def __init__(self, runner: SandboxRunner, host: Any, *, stream_output: bool = True) -> None:
        super().__init__(name=f"sandbox-{runner.sandbox_id}", worker_id=runner.host_id)
        self.runner = runner
        self.host = host
        self.stream_output = stream_output

    def mailbox(self) -> WorkQueue:
        assert self.bus is not None
        sid = self.runner.sandbox_id
        # With the work stream's config, as every step worker's: a restarted server has
        # lost that (in-memory) stream, and this mailbox re-creates it instead of failing.
        names = self.bus.names
        config = next(c for c in stream_configs(names, StreamLimits())
                      if c.name == names.work_stream)
        return WorkQueue(stream=names.work_stream, subjects=[names.work_sandbox(sid)],
                         durable=Names.sandbox_durable(sid), ack_wait=self.ack_wait,
                         max_deliver=self.max_deliver, backoff=(0.1, 0.5, 2.0),
                         stream_config=config)

    async def handle(self, message: WorkItem, delivery: Delivery) -> None:
        if not self.host.lease_held:
            raise Fenced(f"host {self.runner.host_id} may have lost its lease; not running "
                         f"{message.key}", key=message.key)
        try:
            result = await self.perform(message, delivery)
        except Fenced:
            self.host.fenced(self.runner)
            raise
        await self.reply(message, result)

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        return await self.runner.perform(item, self._streamer(item))

    def _streamer(self, item: WorkItem):
        if not self.stream_output or item.name != "exec":
            return None
        bus = self.bus
        assert bus is not None
        subject = bus.names.stream(item.run_id)

        async def on_output(fd: int, chunk: bytes) -> None:
            event = StreamEvent(type="progress", run_id=item.run_id,
                                data={"index": item.index, "sandbox_id": self.runner.sandbox_id,
                                      "fd": fd, "text": chunk.decode(errors="replace")})
            try:
                await bus.js.publish(subject, encode(event))
            except (NatsClientError, TimeoutError) as exc:
                # Live output is best effort; the step's result still carries it.
                log.debug("could not stream output of %s: %r", item.key, exc)

        return on_output
