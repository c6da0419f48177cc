"""The ``orchestrator`` and ``activity`` roles of ``nerve worker``."""

from __future__ import annotations

from bus import Bus
from workflow._activity import ActivityWorker
from workflow._orchestrator import Orchestrator


async def run_orchestrator(bus: Bus, opts) -> None:
    orch = Orchestrator(bus, opts.id, host_ttl=float(opts.settings.get("host_ttl", 2.0)))
    await orch.run()


async def run_activity_worker(bus: Bus, opts) -> None:
    worker = ActivityWorker(worker_id=opts.id)
    await worker.run(bus)


