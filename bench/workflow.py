"""Workflow engine benchmark.

Per-step durable overhead (N no-op activities in a workflow vs calling them directly), run
start latency, throughput with 100 concurrent 10-step runs and with 1,000 concurrent runs
(and with 10 concurrent 20-step runs, where few appends share a group commit),
takeover time after SIGKILL of the orchestrator, replay time of a 10,000-event history.
The bare fenced, fsync'd append and a core NATS round trip to another process are measured in
the same run as the floors a step stands on.

Targets (issue #3): step overhead p50 < 0.7 ms with every history append fsync'd, > 300
workflows/s with 100 concurrent 10-step runs, 1,000 concurrent runs without errors,
takeover < 2 s, replay of 10,000 events < 1 s.

Layout, as in `nerve up`: the orchestrator and the activity worker each run in their own OS
process (`nerve worker --role ...`); this process only submits tasks and reads histories.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench._workflow_defs as defs
from actors import decode, new_id, run
from bench._common import embedded_bus, parse_args, pct, report
from persistence import GroupCommit, RunHistory, RunStarted, StepScheduled, StreamEvent
from workflow import ActivityContext, NerveClient, Orchestrator, replay_run


async def spawn(role: str, ident: str, url: str, prefix: str, *extra: str,
                ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "worker", "--role", role, "--id", ident, "--nats-url", url,
        "--prefix", prefix, "--workflows", "bench._workflow_defs", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def bare_append(bus, n: int) -> float:
    h = RunHistory(bus, "bare-append")
    await h.create(RunStarted(run_id="bare-append", tenant="b", workflow="w", version="1"))
    lat = []
    for i in range(n):
        ev = StepScheduled(index=i, kind="activity", name="noop", args_digest="d" * 24)
        t0 = time.perf_counter()
        await h.append(ev)
        lat.append(time.perf_counter() - t0)
    return pct(lat, 50) * 1000


async def batch_costs(bus, sizes: tuple[int, ...], repeats: int) -> dict[str, float]:
    """p50 time to store ``n`` runs' appends at once, as one atomic batch and one by one
    (pipelined): where ``GroupCommit.ATOMIC_FROM`` comes from."""
    figures = {}
    for n in sizes:
        for mode, commit in (("atomic_batch", GroupCommit(bus, atomic_from=2)),
                             ("one_by_one", GroupCommit(bus, atomic=False))):
            writers = [RunHistory(bus, f"batch-{mode}-{n}-{i}", commit=commit)
                       for i in range(n)]
            await asyncio.gather(*(w.create(RunStarted(run_id=w.run_id, tenant="b",
                                                       workflow="w", version="1"))
                                   for w in writers))
            lat = []
            for r in range(repeats):
                ev = StepScheduled(index=r, kind="activity", name="noop", args_digest="d" * 24)
                t0 = time.perf_counter()
                await asyncio.gather(*(w.append(ev) for w in writers))
                lat.append(time.perf_counter() - t0)
            await commit.close()
            figures[f"append_{n}_runs_{mode}_p50_ms"] = round(pct(lat, 50) * 1000, 2)
    return figures


_ECHO = """
import asyncio, sys, nats, uvloop
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await nc.publish(msg.reply, msg.data)
    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def echo_round_trip(bus, url: str, n: int) -> float:
    """p50 of a core NATS request answered by another OS process: two cross-process hops
    through the server, the transport a remote step pays on top of its append."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _ECHO, url,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 30)
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await bus.nc.request("bench.echo", b"x", timeout=5)
            lat.append(time.perf_counter() - t0)
    finally:
        proc.kill()
        await proc.wait()
    return pct(lat, 50) * 1000


async def step_overhead(client: NerveClient, steps: int, repeats: int,
                        workflow: str = "bench_steps", tag: str = "") -> dict[str, float]:
    direct = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            await defs.noop(ActivityContext("k", "r", "t", i, 1, "noop"), i)
        direct.append((time.perf_counter() - t0) / steps)
    per_step: list[float] = []
    totals = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_id = await client.submit("bench", workflow=workflow, input={"steps": steps})
        summary = await client.wait(run_id, timeout=300)
        totals.append((time.perf_counter() - t0) / steps)
        assert summary.result == sum(range(steps)), summary
        sched = [e.at for e in await client.history(run_id) if isinstance(e, StepScheduled)]
        per_step += [b - a for a, b in itertools.pairwise(sched)]
    direct_s = statistics.median(direct)
    return {
        f"step_overhead{tag}_p50_ms": round((pct(per_step, 50) - direct_s) * 1000, 3),
        f"step_overhead{tag}_p99_ms": round((pct(per_step, 99) - direct_s) * 1000, 3),
        f"step_cycle{tag}_mean_ms_incl_start": round(statistics.median(totals) * 1000, 3),
        "direct_call_us": round(direct_s * 1e6, 2),
    }


async def start_latency(client: NerveClient, n: int) -> dict[str, float]:
    started, done = [], []
    for _ in range(n):
        t0 = time.time()
        run_id = await client.submit("bench", workflow="bench_steps", input={"steps": 1})
        await client.wait(run_id, timeout=60)
        events = await client.history(run_id)
        started.append(events[0].at - t0)
        done.append(events[-1].at - t0)
    return {"run_start_p50_ms": round(pct(started, 50) * 1000, 2),
            "run_1_step_complete_p50_ms": round(pct(done, 50) * 1000, 2)}


_ENDED = ("completed", "failed", "cancelled")


async def throughput(client: NerveClient, runs: int, steps: int, tag: str,
                     rounds: int = 1) -> dict[str, float]:
    """``runs`` runs started at once, until all are done; the median of ``rounds`` rounds
    (this shared machine's speed changes from one second to the next)."""
    rates, errors = [], 0
    for _ in range(rounds):
        rate, failed = await _concurrent_round(client, runs, steps)
        rates.append(rate)
        errors += failed
    rate = statistics.median(rates)
    figures = {f"{tag}_workflows_per_s": round(rate, 1),
               f"{tag}_steps_per_s": round(rate * steps),
               f"{tag}_errors": errors}
    if rounds > 1:
        figures[f"{tag}_workflows_per_s_rounds"] = [round(r) for r in rates]
    return figures


async def _concurrent_round(client: NerveClient, runs: int, steps: int) -> tuple[float, int]:
    """Runs per second, and how many did not complete with the right result.

    The clock stops when the last run's final status arrives on its live stream, as in a UI
    following the runs; the orchestrator publishes it once the run's end is in the history.
    Each history is read after the clock stops, to check its run completed with the right
    result: reading 100 histories while the runs go on would charge the engine for this
    client's work on the same two cores.
    """
    bus = client.bus
    ids = [new_id("r") for _ in range(runs)]
    pending = set(ids)
    all_ended = asyncio.Event()

    async def on_status(msg: Any) -> None:
        event = decode(msg.data, StreamEvent)
        if event.type == "status" and event.data.get("status") in _ENDED:
            pending.discard(event.run_id)
            if not pending:
                all_ended.set()

    sub = await bus.nc.subscribe(bus.names.stream("*"), cb=on_status)
    t0 = time.perf_counter()
    await asyncio.gather(*(client.submit("bench", workflow="bench_steps", run_id=run_id,
                                         input={"steps": steps}) for run_id in ids))
    errors = 0
    try:
        await asyncio.wait_for(all_ended.wait(), 600)
    except TimeoutError:
        errors += len(pending)
    rate = runs / (time.perf_counter() - t0)
    await sub.unsubscribe()
    summaries = await asyncio.gather(*(client.wait(r, timeout=60) for r in ids),
                                     return_exceptions=True)
    errors += sum(isinstance(s, BaseException) or s.status != "completed"
                  or s.result != sum(range(steps)) for s in summaries)
    return rate, errors


async def takeover(bus, url: str, prefix: str, trials: int) -> dict[str, float]:
    """SIGKILL the owner mid-run; time until the standby orchestrator records a step."""
    client = NerveClient(bus)
    times = []
    standby = Orchestrator(bus, "standby", host_ttl=1.0, accept_tasks=False)
    await standby.start()
    leases = await bus.kv(bus.names.leases_bucket)
    for trial in range(trials):
        victim = await spawn("orchestrator", f"victim-{trial}", url, prefix, "--set",
                             "host_ttl=1", "--set", "budget=0")
        async with asyncio.timeout(30):
            while True:  # the victim holds its host lease: it is up
                try:
                    await leases.get(bus.names.host_lease(f"victim-{trial}"))
                    break
                except Exception:
                    await asyncio.sleep(0.05)
        run_id = await client.submit("bench", workflow="bench_steps",
                                     input={"steps": 100_000}, run_id=f"takeover-{trial}")
        async with asyncio.timeout(30):
            while len(await RunHistory(bus, run_id).read()) < 5:  # the victim is driving it
                await asyncio.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        await victim.wait()
        async with asyncio.timeout(30):
            while run_id not in standby.drivers:
                await asyncio.sleep(0.005)
            h = RunHistory(bus, run_id)
            base = len(await h.read())
            while len(await RunHistory(bus, run_id).read()) <= base + 1:
                await asyncio.sleep(0.01)
        times.append(time.time() - killed)
        await client.cancel(run_id)
    await standby.stop()
    return {"takeover_p50_s": round(pct(times, 50), 3), "takeover_max_s": round(max(times), 3)}


async def replay_time(client: NerveClient, bus, steps: int) -> dict[str, float]:
    run_id = await client.submit("bench", workflow="bench_steps", input={"steps": steps})
    await client.wait(run_id, timeout=900)
    best = None
    for _ in range(3):
        report_ = await replay_run(bus, run_id)
        t0 = time.perf_counter()
        report_ = await replay_run(bus, run_id)
        total = time.perf_counter() - t0
        assert report_.deterministic
        best = min(best or total, total)
        events = report_.events
    return {"replay_events": events, "replay_seconds": round(best, 3),
            "replay_events_per_s": round(events / best)}


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    q = args.quick
    figures: dict[str, float] = {}
    async with embedded_bus(prefix="wfb") as (server, bus):
        figures["bare_fenced_append_p50_ms"] = round(await bare_append(bus, 200 if q else 1000), 3)
        figures["core_round_trip_to_another_process_p50_ms"] = round(
            await echo_round_trip(bus, server.url, 500 if q else 2000), 3)
        figures |= await batch_costs(bus, (4, 16, 64), 20 if q else 60)
        worker = await spawn("activity", "bench-acts", server.url, "wfb")
        # The engine alone: runs start without a budget check (bench/budget.py measures that).
        orch = await spawn("orchestrator", "bench-orch", server.url, "wfb", "--set", "budget=0")
        client = NerveClient(bus)
        await asyncio.sleep(1.0)
        try:
            figures |= await step_overhead(client, 100 if q else 500, 2 if q else 3)
            figures |= await step_overhead(client, 100 if q else 500, 2 if q else 3,
                                           "bench_local_steps", "_local_activity")
            figures |= await start_latency(client, 10 if q else 30)
            figures |= await throughput(client, 10, 20, "c10x20", 3)
            figures |= await throughput(client, 100, 10, "c100x10", 1 if q else 5)
            figures |= await throughput(client, 300 if q else 1000, 2, "c1000", 1 if q else 3)
            figures |= await replay_time(client, bus, 1000 if q else 5000)
            orch.send_signal(signal.SIGTERM)
            await orch.wait()
            figures |= await takeover(bus, server.url, "wfb", 2 if q else 5)
        finally:
            for proc in (worker, orch):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                await proc.wait()
    figures["targets_met"] = {
        "step_overhead_p50_under_0.7ms (remote activity)": figures["step_overhead_p50_ms"] < 0.7,
        "step_overhead_p50_under_0.7ms (local activity)":
            figures["step_overhead_local_activity_p50_ms"] < 0.7,
        "over_300_workflows_per_s": figures["c100x10_workflows_per_s"] > 300,
        "1000_concurrent_without_errors": figures["c1000_errors"] == 0,
        "takeover_under_2s": figures["takeover_max_s"] < 2,
        "replay_10k_under_1s": figures["replay_seconds"] * 10_000 / figures["replay_events"] < 1,
    }
    report("workflow", figures, args.json)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    run(main())  # the runtime nerve processes use: uvloop, tuned GC
