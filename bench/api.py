"""API benchmark: token latency to SSE clients, fan-out, and ``GET /v1/runs`` on 100k runs.

The API server runs as its own process (``nerve worker --role api``), as under ``nerve up``;
publishers and clients run here, on the embedded nats-server (``sync_interval: always``).

* **Token latency**: a token event is published the way the gateway publishes one
  (``js.publish`` of a msgpack ``StreamEvent`` on ``nerve.stream.<run_id>``, acked once
  stored); the clock runs from just before that publish until an SSE client holds the
  event. Baseline, same run: the same publish received by a JetStream ordered consumer in
  this process (the floor the stream itself sets).
* **Fan-out**: R runs, C SSE clients on each; every run's events are published as fast as
  the stream stores them; events delivered to clients per second. Baseline: the same
  events stored with nobody watching (publish rate).
* **List latency**: a read model of N runs (default 100,000, across 50 tenants), then
  ``GET /v1/runs`` pages through HTTP: a tenant's first page, a status filter, a deep page
  by cursor, a search. Baseline: the same query straight on the read model (no HTTP).

Targets (issue #6): p50 token latency < 5 ms on loopback; list latency < 50 ms.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from nats.js.api import ConsumerConfig, DeliverPolicy

from actors import encode
from api import ApiKeys, ReadModel, Record
from bench._common import embedded_bus, parse_args, pct, report, summary_ms
from persistence import (
    RunCompleted,
    RunHistory,
    RunStarted,
    StepCompleted,
    StepScheduled,
    StreamEvent,
)

ADMIN = "bench-admin-key-0123456789abcdefghijkl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiProcess:
    def __init__(self, nats_url: str, prefix: str, db: Path) -> None:
        self.nats_url, self.prefix, self.db = nats_url, prefix, db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ApiProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--role", "api", "--id", "bench-api",
            "--nats-url", self.nats_url, "--prefix", self.prefix,
            "--set", f"port={self.port}", "--set", f"db_path={self.db}",
            "--set", "max_streams_per_tenant=100000",
            env=dict(os.environ, NERVE_ADMIN_KEY=ADMIN), cwd=Path(__file__).parent.parent,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                try:
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def start_runs(bus, tenant: str, n: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    await asyncio.gather(*(RunHistory(bus, r).create(RunStarted(
        run_id=r, tenant=tenant, workflow="agent", version="1", input={"task": "bench"}))
        for r in ids))
    return ids


def token(run_id: str, i: int) -> bytes:
    return encode(StreamEvent(type="token", run_id=run_id,
                              data={"text": f"word{i} ", "index": 1, "offset": i * 8}))


class SseReader:
    """Counts SSE events on one connection (cheap: finds ``id:`` lines in the chunks)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self.http, self.url, self.key = http, url, key
        self.count = 0
        self.ready = asyncio.Event()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async with self.http.get(self.url, headers={"Authorization": f"Bearer {self.key}"},
                                 timeout=aiohttp.ClientTimeout(total=None)) as resp:
            assert resp.status == 200, resp.status
            carry = b""
            async for chunk in resp.content.iter_any():
                self.ready.set()
                data = carry + chunk
                n = data.count(b"\nid: ") + (1 if data.startswith(b"id: ") else 0)
                if n:
                    self.count += n
                    self.arrived.set()
                carry = data[-5:]


async def token_latency(bus, url: str, key: str, n: int) -> dict[str, float]:
    (run_id,) = await start_runs(bus, "lat", 1, "latency")
    subject = bus.names.stream(run_id)
    # Baseline: a JetStream ordered consumer of the same subject in this process.
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(msg) -> None:
        await got.put(time.perf_counter())

    sub = await bus.js.subscribe(subject, stream=bus.names.stream_stream, cb=on_msg,
                                 ordered_consumer=True,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))
    async with aiohttp.ClientSession() as http:
        reader = SseReader(http, f"{url}/v1/runs/{run_id}/events", key)
        reader.task = asyncio.create_task(reader.run())
        await asyncio.wait_for(reader.ready.wait(), 10)
        sse, raw = [], []
        for i in range(n + 20):
            reader.arrived.clear()
            before = reader.count
            t0 = time.perf_counter()
            await bus.js.publish(subject, token(run_id, i))
            t_raw = await asyncio.wait_for(got.get(), 10)
            while reader.count == before:
                await asyncio.wait_for(reader.arrived.wait(), 10)
                reader.arrived.clear()
            t_sse = time.perf_counter()
            if i >= 20:  # warm-up
                sse.append(t_sse - t0)
                raw.append(t_raw - t0)
            await asyncio.sleep(0.002)
        reader.task.cancel()
        await asyncio.gather(reader.task, return_exceptions=True)
    await sub.unsubscribe()
    s, r = summary_ms(sse), summary_ms(raw)
    return {"token_latency_p50_ms": s["p50_ms"], "token_latency_p99_ms": s["p99_ms"],
            "baseline_consumer_p50_ms": r["p50_ms"], "baseline_consumer_p99_ms": r["p99_ms"],
            "token_latency_over_consumer_p50": round(s["p50_ms"] / r["p50_ms"], 2)}


async def fan_out(bus, url: str, key: str, runs: int, clients: int, events: int,
                  tag: str = "fanout") -> dict[str, float]:
    ids = await start_runs(bus, "fan", runs, tag)
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as http:
        readers = [SseReader(http, f"{url}/v1/runs/{r}/events", key)
                   for r in ids for _ in range(clients)]
        for rd in readers:
            rd.task = asyncio.create_task(rd.run())
        await asyncio.wait_for(asyncio.gather(*(rd.ready.wait() for rd in readers)), 60)

        async def publish(run_id: str) -> None:
            subject = bus.names.stream(run_id)
            acks = [await bus.js.publish_async(subject, token(run_id, i)) for i in
                    range(events)]
            await asyncio.gather(*acks)

        expected = runs * clients * events
        t0 = time.perf_counter()
        await asyncio.gather(*(publish(r) for r in ids))
        stored = time.perf_counter() - t0
        async with asyncio.timeout(300):
            while sum(rd.count for rd in readers) < expected:
                await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        for rd in readers:
            assert rd.task is not None
            rd.task.cancel()
        await asyncio.gather(*(rd.task for rd in readers if rd.task), return_exceptions=True)
    # Baseline: the same number of events stored with nobody watching.
    quiet = await start_runs(bus, "fan", runs, f"{tag}-quiet")
    t1 = time.perf_counter()

    async def publish_quiet(run_id: str) -> None:
        acks = [await bus.js.publish_async(bus.names.stream(run_id), token(run_id, i))
                for i in range(events)]
        await asyncio.gather(*acks)

    await asyncio.gather(*(publish_quiet(r) for r in quiet))
    alone = time.perf_counter() - t1
    return {f"{tag}_streams": runs * clients, f"{tag}_runs": runs,
            f"{tag}_delivered_events_per_s": round(expected / elapsed),
            f"{tag}_published_events_per_s": round(runs * events / stored),
            f"{tag}_baseline_publish_alone_events_per_s": round(runs * events / alone),
            f"{tag}_seconds": round(elapsed, 2)}


def synthetic_records(n: int, tenants: int) -> list[Record]:
    base = 1_700_000_000.0
    out = []
    statuses = ("completed", "completed", "completed", "running", "waiting")
    for i in range(n):
        run_id = f"run-{i:07d}"
        at = base + i * 0.5
        events = [RunStarted(run_id=run_id, tenant=f"tenant{i % tenants}", workflow="agent",
                             version="1", input={"task": f"task number {i}"}, at=at),
                  StepScheduled(index=0, kind="llm", name="m", args_digest="d" * 24,
                                at=at + 0.1)]
        kind = statuses[i % len(statuses)]
        if kind == "completed":
            events += [StepCompleted(index=0, kind="llm", name="m", args_digest="d" * 24,
                                     result={"cost_usd": 0.001, "usage": {
                                         "input_tokens": 100, "output_tokens": 20}},
                                     at=at + 0.2),
                       RunCompleted(result={"answer": "ok"}, at=at + 0.3)]
        elif kind == "waiting":
            events.append(StepScheduled(index=1, kind="signal", name="approval",
                                        args_digest="e" * 24, args={"approves": "ab" * 12},
                                        at=at + 0.2))
        out.append(Record(i + 1, run_id, events))
    return out


async def build_model(path: Path, n: int, tenants: int) -> tuple[float, ReadModel]:
    model = await ReadModel(path).open()
    records = synthetic_records(n, tenants)
    t0 = time.perf_counter()
    for i in range(0, len(records), 2000):
        await model.apply(records[i:i + 2000])
    return time.perf_counter() - t0, model


async def list_latency(bus, nats_url: str, prefix: str, n: int, reps: int) -> dict[str, float]:
    tenants = 50
    tmp = Path(tempfile.mkdtemp(prefix="nerve-bench-rm-"))
    build_s, model = await build_model(tmp / "rm.db", n, tenants)
    # Straight on the read model (the baseline), then through HTTP on the API process.
    direct: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await model.list_runs(tenant="tenant7", limit=50)
        direct.append(time.perf_counter() - t0)
    _page, cursor = await model.list_runs(tenant="tenant7", limit=50)
    for _ in range(20):  # a cursor 20 pages deep
        _page, cursor = await model.list_runs(tenant="tenant7", limit=50, cursor=cursor)
    await model.close()
    key, _ = await ApiKeys(bus).create("tenant7")
    out: dict[str, float] = {"readmodel_runs": n,
                             "readmodel_build_records_per_s": round(n / build_s)}
    async with ApiProcess(nats_url, prefix, tmp / "rm.db") as api, aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"}) as http:
        cases = {"list_first_page": {"limit": "50"},
                 "list_status_filter": {"limit": "50", "status": "waiting"},
                 "list_deep_cursor": {"limit": "50", "cursor": cursor or ""},
                 "list_search": {"limit": "50", "q": "task number 1234"}}
        for name, params in cases.items():
            lat = []
            for _ in range(reps):
                t0 = time.perf_counter()
                async with http.get(api.url + "/v1/runs", params=params) as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
                lat.append(time.perf_counter() - t0)
            s = summary_ms(lat)
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = s["p50_ms"], s["p99_ms"]
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            for name, params in {"admin_all_tenants": {"limit": "50"},
                                 "admin_search_all_tenants": {"limit": "50",
                                                              "q": "task number 1234"}}.items():
                lat = []
                for _ in range(max(10, reps // 4)):
                    t0 = time.perf_counter()
                    async with admin.get(api.url + "/v1/runs", params=params) as resp:
                        assert resp.status == 200, await resp.text()
                        await resp.read()
                    lat.append(time.perf_counter() - t0)
                s = summary_ms(lat)
                out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = s["p50_ms"], s["p99_ms"]
    out["baseline_readmodel_query_p50_ms"] = round(pct(direct, 50) * 1000, 3)
    return out


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    figures: dict[str, float] = {}
    async with embedded_bus(prefix="benchapi") as (server, bus):
        key, _ = await ApiKeys(bus).create("lat")
        fan_key, _ = await ApiKeys(bus).create("fan")
        db = Path(tempfile.mkdtemp(prefix="nerve-bench-api-")) / "rm.db"
        async with ApiProcess(server.url, "benchapi", db) as api:
            figures.update(await token_latency(bus, api.url, key, 200 if quick else 1000))
            runs, clients, events = (10, 10, 50) if quick else (50, 10, 100)
            figures.update(await fan_out(bus, api.url, fan_key, runs, clients, events))
            # Many clients on few runs: one push per event per process, rendered once.
            runs, clients, events = (4, 50, 50) if quick else (10, 100, 100)
            figures.update(await fan_out(bus, api.url, fan_key, runs, clients, events,
                                         tag="fanout_wide"))
        figures.update(await list_latency(bus, server.url, "benchapi",
                                          20_000 if quick else 100_000, 50 if quick else 200))
    report("API: token latency, fan-out, list latency", figures, args.json)


if __name__ == "__main__":
    from actors import run

    run(main())
