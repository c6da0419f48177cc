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
from nerve import ConfigError, read_settings

GATEWAY_SETTINGS: dict[str, Any] = {"instances": 1, "budget": True}


async def run_gateway(bus: Bus, opts: Any) -> None:
    """Serve ``nerve.work.llm`` until cancelled (``opts``: ``id``, ``settings``)."""
    settings = read_settings("gateway", getattr(opts, "settings", None) or {},
                             GATEWAY_SETTINGS)
    if settings["instances"] < 1:
        raise ConfigError(f"gateway setting instances={settings['instances']} must be at "
                          f"least 1", setting="instances")
    config = GatewayConfig.from_env()
    ident = str(getattr(opts, "id", "gateway"))
    ledger = Ledger(bus) if settings["budget"] else None
    actors = [GatewayActor(config, name=f"{ident}-{i}", worker_id=f"{ident}-{i}",
                           ledger=ledger, prices=PRICES)
              for i in range(settings["instances"])]
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
