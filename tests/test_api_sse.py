"""SSE under pressure: a client that stops reading holds back only itself; the server's
buffers stay bounded; when it reads again it gets every event once, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from actors import encode
from api import ApiClient, ApiConfig, ApiKeys, ApiServer
from bus import Bus, ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision
from persistence import RunHistory, RunStarted, StreamEvent
from tests.api_helpers import ADMIN, eventually

pytestmark = pytest.mark.timeout(120)

RING = 32


@pytest.fixture
async def server(bus: Bus, tmp_path: Path) -> AsyncIterator[ApiServer]:
    srv = ApiServer(bus, ApiConfig(db_path=tmp_path / "rm.db", ring_size=RING, heartbeat=1))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_a_stalled_client_gets_backpressure_not_buffers(server: ApiServer, bus: Bus,
                                                             ) -> None:
    run_id = "pressure"
    await RunHistory(bus, run_id).create(RunStarted(run_id=run_id, tenant="acme",
                                                    workflow="agent", version="1"))
    key, _ = await ApiKeys(bus).create("acme")
    url = f"{server.url}/v1/runs/{run_id}/events"
    headers = {"Authorization": f"Bearer {key}"}
    n, chunk = 3000, "x" * 2000  # ~6 MB of events: more than the sockets' buffers hold
    svc = server.services
    assert svc is not None
    # A client that connects and then reads nothing (a tiny receive window: no slack).
    stalled_conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=stalled_conn) as slow_http:
        slow = await slow_http.get(url, headers=headers, read_bufsize=2048)
        await slow.content.readline()  # the stream is open
        fast = ApiClient(server.url, key)
        fast_ids: list[int] = []

        async def read_fast() -> None:
            async for ev in fast.follow(run_id):
                if ev.id is not None:
                    fast_ids.append(ev.id)
                if len(fast_ids) == n:
                    return

        fast_task = asyncio.create_task(read_fast())
        ring_peak = 0
        subject = bus.names.stream(run_id)
        for i in range(n):
            ev = StreamEvent(type="token", run_id=run_id,
                             data={"text": chunk, "index": 0, "offset": i * len(chunk)})
            await bus.js.publish(subject, encode(ev))
            tail = svc.tails._tails.get(run_id)
            if tail is not None:
                ring_peak = max(ring_peak, len(tail._seqs))
        # The fast client got everything while the slow one read nothing.
        await asyncio.wait_for(fast_task, 60)
        await fast.close()
        assert fast_ids == sorted(set(fast_ids)) and len(fast_ids) == n
        # What the server holds for the run is bounded by the ring, not by the backlog.
        assert 0 < ring_peak <= 2 * RING
        # The slow client now reads: every event, once, in order (from the stream itself,
        # since it fell far behind the ring).
        ids: list[int] = []
        async with asyncio.timeout(60):
            async for raw in slow.content:
                line = raw.decode().strip()
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                    if len(ids) == n:
                        break
        slow.close()
    assert ids == fast_ids
    # It fell behind the ring (the sockets held a few MB, the ring 2 x 32 events) and
    # caught up by reading the stream at its own pace (batched direct gets).
    reads = [line for line in server.metrics.render().splitlines()
             if line.startswith("nerve_api_sse_stream_reads_total ")]
    assert reads and float(reads[0].split()[1]) >= 1


async def test_while_nats_is_down_the_api_answers_503_and_recovers(tmp_path: Path) -> None:
    nats = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "nats"))
    await nats.start()
    bus = await connect(ConnectOptions(servers=[nats.url], prefix="down"))
    await provision(bus)
    srv = ApiServer(bus, ApiConfig(db_path=tmp_path / "rm.db", admin_keys=[ADMIN],
                                   key_cache_ttl=60))
    await srv.start()
    client = ApiClient(srv.url, ADMIN)
    try:
        await RunHistory(bus, "r1").create(RunStarted(run_id="r1", tenant="acme",
                                                      workflow="agent", version="1"))
        await eventually(lambda: _listed(client))
        await nats.stop()
        # The read model still answers; what needs the bus says so, with a retry hint.
        assert (await client.call("GET", "/v1/runs"))[0] == 200
        for path in ("/v1/runs/r1", "/v1/runs/r1/events", "/healthz"):
            status, body = await client.call("GET", path)
            assert status == 503, (path, body)
            if path != "/healthz":
                assert body["error"]["retry_after_ms"] > 0, body
        await nats.start()  # same port, same store
        await eventually(lambda: _healthy(client), timeout=30)
        assert (await client.call("GET", "/v1/runs/r1"))[0] == 200
    finally:
        await client.close()
        await srv.stop()
        await bus.close()
        await nats.stop()


async def _listed(client: ApiClient) -> bool:
    return bool((await client.request("GET", "/v1/runs"))["runs"])


async def _healthy(client: ApiClient) -> bool:
    return (await client.call("GET", "/healthz"))[0] == 200
