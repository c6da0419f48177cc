"""A warm pool: sandboxes created ahead of time, so acquiring one costs milliseconds.

Pooled sandboxes are created with the pool's template spec (limits, no egress) under
``pool-<n>`` names; :meth:`WarmPool.acquire` hands one out renamed to the real sandbox id
with the caller's limits and egress policy applied (cgroup limits and proxy policy can
change on a live sandbox; the disk size cannot, so a spec with another ``disk_mb`` is
created cold). A background task keeps the pool full.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from actors import stop_task
from nerve import NerveError
from sandbox_actor._backend import Sandbox, SandboxBackend
from sandbox_actor._types import SandboxSpec

log = logging.getLogger("nerve.sandbox.pool")


class WarmPool:
    """Keeps ``size`` ready sandboxes of ``template`` (``size`` 0 disables it)."""

    def __init__(self, backend: SandboxBackend, size: int,
                 template: SandboxSpec | None = None) -> None:
        self.backend = backend
        self.size = size
        self.template = template or SandboxSpec()
        self._ready: asyncio.Queue[Sandbox] = asyncio.Queue()
        self._refill = asyncio.Event()
        self._filled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._names = itertools.count(1)
        self.hits = 0
        self.misses = 0

    async def start(self) -> None:
        if self.size > 0 and self._task is None:
            self._task = asyncio.create_task(self._fill(), name="warm-pool")
            self._refill.set()

    async def wait_full(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while self._ready.qsize() < self.size:
                self._filled.clear()
                await self._filled.wait()

    async def _fill(self) -> None:
        while True:
            await self._refill.wait()
            self._refill.clear()
            while self._ready.qsize() < self.size:
                name = f"pool-{os.getpid()}-{next(self._names)}"
                spec = self.template.model_copy(update={"sandbox_id": name})
                try:
                    self._ready.put_nowait(await self.backend.create(spec))
                    self._filled.set()
                except NerveError as exc:
                    log.warning("warm pool could not create a sandbox: %s", exc)
                    await asyncio.sleep(1.0)

    def compatible(self, spec: SandboxSpec) -> bool:
        t = self.template.limits
        return (spec.limits.disk_mb == t.disk_mb and spec.limits.nofile == t.nofile
                and not spec.from_snapshot)

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        """A sandbox for ``spec``: from the pool when one fits, else created now."""
        while self.size > 0 and self.compatible(spec) and not self._ready.empty():
            sandbox = self._ready.get_nowait()
            self._refill.set()
            if not sandbox.alive:
                await self.backend.destroy(sandbox)
                continue
            rename = getattr(self.backend, "rename", None)
            if rename is None:
                await self.backend.destroy(sandbox)
                break
            rename(sandbox, spec.sandbox_id)
            await self.backend.reconfigure(sandbox, spec)
            self.hits += 1
            return sandbox
        self.misses += 1
        return await self.backend.create(spec)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        while not self._ready.empty():
            await self.backend.destroy(self._ready.get_nowait())
