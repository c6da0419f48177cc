"""The roles a ``nerve worker`` process can play, each an async function of the bus.

A role runs until cancelled. Parts register their roles here by import path, so a worker
imports only what its role needs.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus import Bus
from nerve import ConfigError


@dataclass(slots=True)
class RoleOptions:
    """What a role gets besides the bus. A role sets ``ready`` once it serves: until then
    the process does not answer pings, and ``nerve up`` does not call it started."""

    id: str
    data_dir: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


RoleRunner = Callable[[Bus, RoleOptions], Awaitable[None]]

ROLES: dict[str, str] = {
    "orchestrator": "workflow._roles:run_orchestrator",
    "activity": "workflow._roles:run_activity_worker",
    "budget": "budget_actor._role:run_budget",
    "gateway": "gateway_actor._role:run_gateway",
    "sandbox": "sandbox_actor._roles:run_sandbox_host",
    "api": "api._role:run_api",
}

# What `nerve up` starts by default, in start order.
DEFAULT_UP_ROLES: list[str] = ["orchestrator", "activity", "budget", "gateway", "sandbox", "api"]


def load_role(role: str) -> RoleRunner:
    try:
        target = ROLES[role]
    except KeyError:
        raise ConfigError(f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
