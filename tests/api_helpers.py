"""Shared pieces of the API tests: the engine (orchestrator + gateway), runs to wait for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import ApiClient, ApiConfig, ApiKeys, ApiServer
from budget_actor import Ledger
from bus import Bus
from gateway_actor import GatewayActor, GatewayConfig
from workflow import NerveClient, Orchestrator

PRICED_MODEL = "claude-haiku-4-5"  # served by the scripted model, priced by the budget table


@asynccontextmanager
async def engine(bus: Bus, *, token_delay: float = 0.0, ident: str = "o-api",
                 ) -> AsyncIterator[NerveClient]:
    """The real orchestrator (built-in ``agent`` workflow) and the real gateway actor over
    the scripted model, in this process, both wired to the budget's ledger."""
    ledger = Ledger(bus)
    orch = Orchestrator(bus, ident, spawn_guard=ledger)
    config = GatewayConfig.scripted(token_delay=token_delay)
    config.default_model = PRICED_MODEL  # the budget refuses models it has no price for
    gateway = GatewayActor(config, ledger=ledger, worker_id=f"{ident}-gw")
    await orch.start()
    await gateway.start(bus)
    try:
        yield NerveClient(bus)
    finally:
        await gateway.stop()
        await orch.stop()
        await ledger.close()


def long_task(words: int, salt: str = "") -> str:
    """A task the scripted model answers with ``words`` words of deterministic text."""
    return f"[scripted:long {words}] {salt}".strip()


async def submit_approval_run(client: NerveClient, tenant: str, *, timeout: float = 600.0,
                              task: str = "compute 6 * 7") -> str:
    """An agent run whose one tool (``run``) needs a human's approval."""
    return await client.submit(tenant, task, tools=["run"], model=PRICED_MODEL,
                               input={"requires_approval": ["run"],
                                      "approval_timeout": timeout})


async def wait_status(client: NerveClient, run_id: str, *statuses: str,
                      timeout: float = 30.0) -> Any:
    return await client.wait(run_id, timeout=timeout, statuses=statuses or (
        "completed", "failed", "cancelled"))


async def eventually(predicate: Any, timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(every)


ADMIN = "admin-key-for-tests-0123456789abcdef"


@dataclass
class Api:
    server: ApiServer
    nerve: NerveClient
    acme: ApiClient
    globex: ApiClient
    admin: ApiClient
    keys: ApiKeys


@asynccontextmanager
async def api_stack(bus: Bus, tmp_path: Path, *, token_delay: float = 0.002,
                    **config: Any) -> AsyncIterator[Api]:
    """The engine, an API server in this process, and clients for two tenants and admin.

    A test may replace ``stack.server`` (a restart); the one there at the end is stopped.
    """
    async with engine(bus, token_delay=token_delay) as nerve:
        settings: dict[str, Any] = {"db_path": tmp_path / "rm.db", "admin_keys": [ADMIN],
                                    "heartbeat": 0.5, "instance": "t", **config}
        server = ApiServer(bus, ApiConfig(**settings))
        await server.start()
        keys = ApiKeys(bus)
        acme_key, _ = await keys.create("acme", name="tests")
        globex_key, _ = await keys.create("globex")
        clients = [ApiClient(server.url, k) for k in (acme_key, globex_key, ADMIN)]
        stack = Api(server, nerve, *clients, keys)
        try:
            yield stack
        finally:
            for c in clients:
                await c.close()
            await stack.server.stop()


