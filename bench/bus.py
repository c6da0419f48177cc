"""Bus benchmark: fenced durable appends, publish rate, request/reply, replay, server start.

Targets (issue #2, this 2-core machine): fenced durable append p50 < 0.5 ms, history replay
> 100k events/s, embedded server ready < 100 ms. The baseline for appends is a bare
``js.publish`` (no fencing headers, no codec) on the same server in the same run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Actor, Delivery, Requests, ask, run
from bench._common import embedded_bus, parse_args, pct, report, summary_ms
from bus import EmbeddedNats, EmbeddedNatsConfig
from persistence import RunHistory, RunStarted, StepCompleted, StepScheduled


class Echo(Actor[dict]):
    message_type = dict

    def mailbox(self) -> Requests:
        assert self.bus is not None
        return Requests(subject=self.bus.names.ctl("bench.echo"))

    async def handle(self, message: dict, delivery: Delivery) -> dict:
        return message


def step_events(i: int) -> tuple[StepCompleted, StepScheduled]:
    return (StepCompleted(index=i, kind="activity", name="noop", args_digest="d" * 24, result=i),
            StepScheduled(index=i + 1, kind="activity", name="noop", args_digest="d" * 24,
                          args={"i": i + 1}))


async def appends(bus, n: int, tag: str) -> dict[str, float]:
    history = RunHistory(bus, f"append-{tag}")
    await history.create(RunStarted(run_id=f"append-{tag}", tenant="b", workflow="w",
                                    version="1"))
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        await history.append(*step_events(i))
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    raw = []
    subject = bus.names.history(f"raw-{tag}")
    payload = b"x" * 180
    for _ in range(n):
        s = time.perf_counter()
        await bus.js.publish(subject, payload)
        raw.append(time.perf_counter() - s)
    fenced = summary_ms(lat)
    bare = summary_ms(raw)
    return {f"fenced_append_{tag}_p50_ms": fenced["p50_ms"],
            f"fenced_append_{tag}_p99_ms": fenced["p99_ms"],
            f"fenced_append_{tag}_per_s": round(n / total),
            f"bare_publish_{tag}_p50_ms": bare["p50_ms"],
            f"fenced_over_bare_{tag}": round(fenced["p50_ms"] / bare["p50_ms"], 2)}


async def concurrent_appends(bus, writers: int, per_writer: int, tag: str) -> dict[str, float]:
    async def writer(w: int) -> None:
        h = RunHistory(bus, f"conc-{tag}-{w}")
        await h.create(RunStarted(run_id=f"conc-{tag}-{w}", tenant="b", workflow="w",
                                  version="1"))
        for i in range(per_writer):
            await h.append(*step_events(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return {f"fenced_appends_{writers}_writers_{tag}_per_s":
            round(writers * (per_writer + 1) / (time.perf_counter() - t0))}


async def pipelined_publish(bus, n: int) -> dict[str, float]:
    subject = bus.names.event("bench.pipeline")
    payload = b"y" * 200
    t0 = time.perf_counter()
    futures = [await bus.js.publish_async(subject, payload) for _ in range(n)]
    await asyncio.gather(*futures)
    return {"pipelined_publish_per_s": round(n / (time.perf_counter() - t0))}


async def request_reply(bus, n: int) -> dict[str, float]:
    echo = Echo()
    await echo.start(bus)
    lat = []
    for i in range(n):
        s = time.perf_counter()
        await ask(bus, bus.names.ctl("bench.echo"), {"i": i})
        lat.append(time.perf_counter() - s)
    raw = []
    async def respond(m) -> None:
        await bus.nc.publish(m.reply, m.data)

    sub = await bus.nc.subscribe("bench.raw.echo", cb=respond)
    for _ in range(n):
        s = time.perf_counter()
        await bus.nc.request("bench.raw.echo", b"{}", timeout=2)
        raw.append(time.perf_counter() - s)
    await sub.unsubscribe()
    await echo.stop()
    return {"request_reply_actor_p50_ms": summary_ms(lat)["p50_ms"],
            "request_reply_bare_nats_p50_ms": summary_ms(raw)["p50_ms"]}


async def replay(bus, events: int) -> dict[str, float]:
    run_id = "replay"
    h = RunHistory(bus, run_id)
    await h.create(RunStarted(run_id=run_id, tenant="b", workflow="w", version="1"))
    pending = []
    for i in range(0, events - 1, 2):  # a step's completion + the next step: one record
        pending.append(h.append(*step_events(i)))
        if len(pending) == 1:
            await pending.pop()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        got = await RunHistory(bus, run_id).read()
        best = min(best, time.perf_counter() - t0)
    assert len(got) >= events - 1
    return {"replay_events": len(got), "replay_events_per_s": round(len(got) / best),
            "replay_seconds": round(best, 4)}


async def server_start(n: int) -> dict[str, float]:
    import tempfile

    times = []
    for _ in range(n):
        server = EmbeddedNats(EmbeddedNatsConfig(store_dir=Path(tempfile.mkdtemp())))
        t0 = time.perf_counter()
        await server.start()
        times.append(time.perf_counter() - t0)
        await server.stop()
    return {"server_ready_p50_ms": round(pct(times, 50) * 1000, 1),
            "server_ready_max_ms": round(max(times) * 1000, 1)}


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    n = 300 if args.quick else 2000
    figures: dict[str, float] = {}
    async with embedded_bus(sync_always=True) as (_s, bus):
        figures |= await appends(bus, n, "sync_always")
        figures |= await concurrent_appends(bus, 32, 30 if args.quick else 100, "sync_always")
        figures |= await pipelined_publish(bus, 5000 if args.quick else 50000)
        figures |= await request_reply(bus, 500 if args.quick else 3000)
        figures |= await replay(bus, 10_000 if args.quick else 100_000)
    async with embedded_bus(sync_always=False) as (_s, bus):
        figures |= await appends(bus, n, "lazy")
        figures |= await concurrent_appends(bus, 32, 30 if args.quick else 100, "lazy")
    figures |= await server_start(5 if args.quick else 20)
    figures["targets_met"] = {
        "fenced_append_p50_under_0.5ms": figures["fenced_append_sync_always_p50_ms"] < 0.5,
        "replay_over_100k_events_per_s": figures["replay_events_per_s"] > 100_000,
        "server_ready_under_100ms": figures["server_ready_p50_ms"] < 100,
    }
    report("bus", figures, args.json)


if __name__ == "__main__":
    run(main())  # the runtime nerve processes use: uvloop, tuned GC
