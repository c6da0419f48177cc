"""The ``gateway`` role of ``nerve worker`` / ``nerve up``: gateway actors until cancelled.

Register it as ``"gateway": "gateway_actor._role:run_gateway"``. Settings (``--set
gateway.key=value``): ``instances`` (actors in this process, default 1), ``budget``
(``0``: call models without reserving against the tenant's budget); the model pools come
from the environment (:meth:`GatewayConfig.from_env`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from budget_actor import PRICES, Ledger
from bus import Bus
from gateway_actor._actor import GatewayActor
from gateway_actor._config import GatewayConfig


async def run_gateway(bus: Bus, opts: Any) -> None:
    """Serve ``nerve.work.llm`` until cancelled (``opts``: ``id``, ``settings``)."""
    settings = dict(getattr(opts, "settings", {}) or {})
    config = GatewayConfig.from_env()
    ident = str(getattr(opts, "id", "gateway"))
    ledger = None
    if str(settings.get("budget", "1")).strip().lower() not in ("0", "false", "no", "off"):
        ledger = Ledger(bus)
    actors = [GatewayActor(config, name=f"{ident}-{i}", worker_id=f"{ident}-{i}",
                           ledger=ledger, prices=PRICES)
              for i in range(int(settings.get("instances", 1)))]
    started: list[GatewayActor] = []
    try:
        for actor in actors:
            await actor.start(bus)
            started.append(actor)
        opts.ready.set()
        await asyncio.Event().wait()  # until cancelled
    finally:
        errors: list[BaseException] = []
        for actor in reversed(started):
            try:
                await actor.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
