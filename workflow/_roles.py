"""The ``orchestrator`` and ``activity`` roles of ``nerve worker``."""

from __future__ import annotations

from typing import Any

from budget_actor import Ledger
from bus import Bus
from nerve import read_settings
from persistence import GroupCommit
from workflow._activity import ActivityWorker
from workflow._orchestrator import Orchestrator

# ``host_ttl``: seconds; a dead orchestrator's runs move after about this long.
# ``budget``: off starts runs without asking the tenant's budget.
# ``atomic_batch_from``: appends stored as one atomic batch from this many (``GroupCommit``).
ORCHESTRATOR_SETTINGS: dict[str, Any] = {
    "host_ttl": 2.0, "budget": True, "atomic_batch_from": GroupCommit.ATOMIC_FROM}


async def run_orchestrator(bus: Bus, opts: Any) -> None:
    """An :class:`Orchestrator` until cancelled (settings: ``ORCHESTRATOR_SETTINGS``)."""
    settings = read_settings("orchestrator", opts.settings, ORCHESTRATOR_SETTINGS)
    guard = Ledger(bus) if settings["budget"] else None
    orch = Orchestrator(bus, opts.id, host_ttl=settings["host_ttl"], spawn_guard=guard,
                        atomic_batch_from=settings["atomic_batch_from"])
    await orch.run(ready=opts.ready)


async def run_activity_worker(bus: Bus, opts: Any) -> None:
    """An :class:`ActivityWorker` until cancelled (it takes no settings)."""
    read_settings("activity", opts.settings, {})
    worker = ActivityWorker(worker_id=opts.id)
    await worker.run(bus, ready=opts.ready)
