"""Test fixtures: one real nats-server per test session, a fresh prefix per test.

Every test gets its own deployment prefix, so its streams, buckets and consumers are its
own and tests cannot see each other's messages.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bus import Bus, ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision

if TYPE_CHECKING:
    from sandbox_actor._placement import Placement

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path_factory.mktemp("nats")))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{next(_prefixes)}"


@pytest.fixture
async def bus(nats_server: EmbeddedNats, prefix: str) -> AsyncIterator[Bus]:
    b = await connect(ConnectOptions(servers=[nats_server.url], prefix=prefix))
    await provision(b)
    yield b
    await b.close()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(autouse=True)
def _quiet_nats_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nerve")


@pytest.fixture
async def placement(bus: Bus) -> AsyncIterator[Placement]:
    """Sandbox placement for the test's bus (the sandbox tests share it)."""
    from sandbox_actor._placement import Placement

    p = Placement(bus, reconcile_every=0.5)
    await p.start()
    yield p
    await p.stop()
