"""A worker process that dies on a poison message (``os._exit``), for the dead-letter test.

``python -m tests.crashing_worker <nats-url> <prefix> <done-file>``: handles
``{"poison": true}`` by exiting at once, anything else by appending it to ``done-file``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from actors import Actor, Delivery, WorkQueue, run
from bus import ConnectOptions, connect


class Crasher(Actor[dict]):
    message_type = dict
    concurrency = 1  # one message held at a time: the crash takes only the poison down

    def __init__(self, done_file: str) -> None:
        super().__init__("crasher")
        self.done_file = done_file

    def mailbox(self) -> WorkQueue:
        assert self.bus is not None
        return WorkQueue(stream=self.bus.names.work_stream, subjects=[self.bus.names.work_tool],
                         durable="crasher", ack_wait=1.0, max_deliver=3)

    async def handle(self, message: dict[str, Any], delivery: Delivery) -> None:
        if message.get("poison"):
            os._exit(3)  # as a segfault or an OOM kill would: no verdict, no goodbye
        await asyncio.to_thread(self._record, message)

    def _record(self, message: dict[str, Any]) -> None:
        with open(self.done_file, "a") as f:
            f.write(json.dumps(message) + "\n")


async def main(url: str, prefix: str, done_file: str) -> None:
    bus = await connect(ConnectOptions(servers=[url], prefix=prefix))
    await Crasher(done_file).run(bus)


if __name__ == "__main__":
    run(main(*sys.argv[1:4]))
