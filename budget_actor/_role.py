"""The ``budget`` role of ``nerve worker`` / ``nerve up``: one :class:`BudgetActor`.

Settings (``nerve up --set budget.KEY=VALUE``): ``sweep_interval`` (seconds, default 1),
``breaker`` (``0`` turns the runaway breaker off in this process), ``lease_ttl`` (seconds
the breaker leader holds its lease).
"""

from __future__ import annotations

from typing import Any

from budget_actor._actor import BudgetActor
from bus import Bus


def _flag(value: Any) -> bool:
    return str(value).strip().lower() not in ("0", "false", "no", "off")


async def run_budget(bus: Bus, opts: Any) -> None:
    settings = opts.settings
    actor = BudgetActor(instance_id=opts.id,
                        sweep_interval=float(settings.get("sweep_interval", 1.0)),
                        breaker=_flag(settings.get("breaker", True)),
                        lease_ttl=float(settings.get("lease_ttl", 5.0)))
    await actor.run(bus, ready=opts.ready)
