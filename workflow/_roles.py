"""The ``orchestrator`` and ``activity`` roles of ``nerve worker``."""

from __future__ import annotations

from typing import Any

from budget_actor import Ledger
from bus import Bus
from persistence import GroupCommit
from workflow._activity import ActivityWorker
from workflow._orchestrator import Orchestrator


def _flag(value: Any) -> bool:
    return str(value).strip().lower() not in ("0", "false", "no", "off")


async def run_orchestrator(bus: Bus, opts: Any) -> None:
    """Settings: ``host_ttl`` (seconds; a dead orchestrator's runs move after about this
    long), ``budget`` (``0``: start runs without asking the tenant's budget),
    ``atomic_batch_from`` (appends stored as one atomic batch from this many; see
    ``GroupCommit``)."""
    settings = opts.settings
    guard = Ledger(bus) if _flag(settings.get("budget", True)) else None
    orch = Orchestrator(bus, opts.id, host_ttl=float(settings.get("host_ttl", 2.0)),
                        spawn_guard=guard, atomic_batch_from=int(settings.get(
                            "atomic_batch_from", GroupCommit.ATOMIC_FROM)))
    await orch.run(ready=opts.ready)


async def run_activity_worker(bus: Bus, opts: Any) -> None:
    worker = ActivityWorker(worker_id=opts.id)
    await worker.run(bus, ready=opts.ready)
