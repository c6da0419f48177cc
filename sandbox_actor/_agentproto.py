"""The host's side of the agent channel (see ``_agent.py`` for the wire format).

Everything the agent says is untrusted input: frames are size-checked, headers must be
JSON objects, and a channel that breaks the protocol is treated as a crashed sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from nerve import SandboxCrashed

log = logging.getLogger("nerve.sandbox.agent")

_HDR = struct.Struct(">II")
_MAX_HEADER = 1 << 20
_MAX_BODY = 64 << 20
AGENT_PATH_IN_SANDBOX = "/run/nerve/agent.py"


@dataclass(slots=True)
class Frame:
    header: dict[str, Any]
    body: bytes = b""


@dataclass(eq=False)
class AgentChannel:
    """Request/reply and event streams over the agent's stdin/stdout."""

    sandbox_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _queues: dict[int, asyncio.Queue[Frame | None]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Future[Frame] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""

    def start(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read_loop(), name=f"agent:{self.sandbox_id}")

    async def wait_ready(self, timeout: float) -> Frame:
        assert self._ready is not None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._ready)  # shield: the future is shared
        except TimeoutError:
            raise SandboxCrashed(
                f"sandbox {self.sandbox_id}: agent not ready within {timeout}s "
                f"({self.close_reason or 'no answer'})", sandbox_id=self.sandbox_id) from None

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(_HDR.size)
                hlen, blen = _HDR.unpack(head)
                if hlen > _MAX_HEADER or blen > _MAX_BODY:
                    raise ValueError(f"frame too large ({hlen}, {blen})")
                header = json.loads(await self.reader.readexactly(hlen))
                body = await self.reader.readexactly(blen) if blen else b""
                if not isinstance(header, dict):
                    raise ValueError("frame header is not an object")
                frame = Frame(header, body)
                rid = header.get("id")
                if header.get("ev") == "ready" and self._ready and not self._ready.done():
                    self._ready.set_result(frame)
                    continue
                queue = self._queues.get(rid) if isinstance(rid, int) else None
                if queue is not None:
                    queue.put_nowait(frame)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close_reason = f"agent channel closed ({type(exc).__name__})"
        except (ValueError, UnicodeDecodeError) as exc:
            self.close_reason = f"agent broke the protocol: {exc}"
            log.warning("sandbox %s: %s", self.sandbox_id, self.close_reason)
        finally:
            self.closed.set()
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(SandboxCrashed(
                    f"sandbox {self.sandbox_id} died before its agent was ready "
                    f"({self.close_reason})", sandbox_id=self.sandbox_id))
                self._ready.exception()  # retrieved: nobody may be waiting any more
            for queue in self._queues.values():
                queue.put_nowait(None)

    def open(self) -> tuple[int, asyncio.Queue[Frame | None]]:
        rid = next(self._ids)
        queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._queues[rid] = queue
        if self.closed.is_set():
            queue.put_nowait(None)
        return rid, queue

    def done(self, rid: int) -> None:
        self._queues.pop(rid, None)

    async def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        data = json.dumps(header, separators=(",", ":")).encode()
        try:
            self.writer.write(_HDR.pack(len(data), len(body)) + data)
            if body:
                self.writer.write(body)
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise SandboxCrashed(f"sandbox {self.sandbox_id}: agent channel is gone ({exc!r})",
                                 sandbox_id=self.sandbox_id) from None

    async def call(self, header: dict[str, Any], body: bytes = b"",
                   timeout: float = 30.0) -> Frame:
        """Send one request and wait for its single ``ok``/``err`` reply."""
        rid, queue = self.open()
        try:
            await self.send({**header, "id": rid}, body)
            async with asyncio.timeout(timeout):
                frame = await queue.get()
        except TimeoutError:
            raise SandboxCrashed(f"sandbox {self.sandbox_id}: agent did not answer "
                                 f"{header.get('op')} within {timeout}s",
                                 sandbox_id=self.sandbox_id) from None
        finally:
            self.done(rid)
        if frame is None:
            raise SandboxCrashed(f"sandbox {self.sandbox_id} died during {header.get('op')} "
                                 f"({self.close_reason})", sandbox_id=self.sandbox_id)
        return frame

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
