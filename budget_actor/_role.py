"""The ``budget`` role of ``nerve worker`` / ``nerve up``: one :class:`BudgetActor`.

Settings (``nerve up --set budget.KEY=VALUE``): ``sweep_interval`` (seconds, default 1),
``breaker`` (``0`` turns the runaway breaker off in this process), ``lease_ttl`` (seconds
the breaker leader holds its lease).
"""

from __future__ import annotations

from typing import Any

from budget_actor._actor import BudgetActor
from bus import Bus
from nerve import read_settings

BUDGET_SETTINGS: dict[str, Any] = {"sweep_interval": 1.0, "breaker": True, "lease_ttl": 5.0}


async def run_budget(bus: Bus, opts: Any) -> None:
    """A :class:`BudgetActor` until cancelled (settings: ``BUDGET_SETTINGS``)."""
    settings = read_settings("budget", opts.settings, BUDGET_SETTINGS)
    actor = BudgetActor(instance_id=opts.id, sweep_interval=settings["sweep_interval"],
                        breaker=settings["breaker"], lease_ttl=settings["lease_ttl"])
    await actor.run(bus, ready=opts.ready)
