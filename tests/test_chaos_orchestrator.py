"""Chaos: orchestrator processes SIGKILLed at the dangerous points and at random ones.

Real ``nerve worker --role orchestrator`` processes against the session's nats-server.
The activity worker runs here, appending one line per execution to a file, so a step done
twice would show. Every test is bounded in time and in the number of kills.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import tests.chaos_workflows  # noqa: F401 - registers `chaos` and `count` here too
from bus import Bus, ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision
from nerve import NatsServerCrashed, RunNotFound
from persistence import OwnerChanged, RunHistory, StepCompleted, direct_get_subject
from persistence._history import H_WRITER
from tests.role_procs import RoleProcs
from workflow import ActivityWorker, NerveClient, Orchestrator, RunRecord, WorkflowRegistry

pytestmark = pytest.mark.timeout(180)


class OrchestratorProcs(RoleProcs):
    """Orchestrator processes running the chaos workflows, counting effects in ``effects``."""

    def __init__(self, server: EmbeddedNats, prefix: str, effects: Path) -> None:
        super().__init__(server, prefix, "orchestrator", "tests.chaos_workflows",
                         settings=["host_ttl=1"], env={"NERVE_TEST_EFFECTS": str(effects)})
        self.effects = effects

    async def start(self, ident: str, crash_at: str = "") -> asyncio.subprocess.Process:
        return await super().start(ident, NERVE_CRASH_AT=crash_at)


@pytest.fixture
async def procs(nats_server: EmbeddedNats, prefix: str, bus: Bus, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OrchestratorProcs]:
    effects = tmp_path / "effects.log"
    effects.touch()
    monkeypatch.setenv("NERVE_TEST_EFFECTS", str(effects))
    worker = ActivityWorker()
    await worker.start(bus)
    p = OrchestratorProcs(nats_server, prefix, effects)
    yield p
    await p.close()
    await worker.stop()


async def is_done(client: NerveClient, run_id: str) -> bool:
    try:
        return (await client.summary(run_id)).done
    except RunNotFound:  # the task is not picked up yet: kills before that count too
        return False


async def kill_while_running(procs: OrchestratorProcs, client: NerveClient, ids: list[str],
                             rng: random.Random, tries: int, lives: tuple[float, float],
                             names: int) -> int:
    """Start an orchestrator, let it live a random while, SIGKILL it; again, until the runs
    are done or ``tries`` are used. Returns how many were killed."""
    kills = 0
    for n in range(tries):
        proc = await procs.start(f"orch-{n % names}")
        await asyncio.sleep(rng.uniform(*lives))
        if all([await is_done(client, r) for r in ids]):
            break
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
    return kills


def executions(effects: Path) -> collections.Counter[str]:
    return collections.Counter(line.split()[0] for line in effects.read_text().splitlines())


async def completed_steps(bus: Bus, run_id: str) -> int:
    return sum(isinstance(e, StepCompleted) for e in await RunHistory(bus, run_id).read())


async def check_run(bus: Bus, client: NerveClient, run_id: str, steps: int, effects: Path,
                    ) -> None:
    summary = await client.wait(run_id, timeout=60)
    assert summary.status == "completed", summary
    assert summary.result["total"] == sum(i * i for i in range(steps))
    done = executions(effects)
    mine = {k: n for k, n in done.items() if k.startswith(run_id + ":")}
    assert len(mine) == steps, f"expected {steps} distinct effects, got {sorted(mine)}"
    assert all(n == 1 for n in mine.values()), f"an effect happened twice: {mine}"
    # One writer at a time: record writers' epochs never go backwards.
    epochs = []
    async for _seq, _data, headers in direct_get_subject(bus, bus.names.runs_stream,
                                                         bus.names.history(run_id)):
        if headers.get(H_WRITER):
            epochs.append(int(headers[H_WRITER].rsplit(":", 1)[1]))
    assert epochs == sorted(epochs)


async def test_sigkill_at_every_dangerous_point(bus: Bus, procs: OrchestratorProcs) -> None:
    client = NerveClient(bus)
    steps = 12  # count(0..5) = steps 0..5, then count(6) = 6, sleep = 7, count(7..11) = 8..12
    run_id = await client.submit("acme", workflow="chaos",
                                 input={"steps": steps, "sleep_at": 6, "sleep": 0.5})
    plan = [("orch-1", "scheduled:1"), ("orch-1", "dispatched:2"), ("orch-2", "result:3"),
            ("orch-1", "scheduled:5"), ("orch-2", "dispatched:6"), ("orch-2", "scheduled:7"),
            ("orch-1", "result:8"), ("orch-3", "dispatched:10"), ("orch-1", "scheduled:12")]
    kills = 0
    for ident, point in plan:
        proc = await procs.start(ident, crash_at=point)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            pytest.fail(f"{ident} never reached {point}")
        assert code == -signal.SIGKILL, f"{ident} exited with {code} instead of dying at {point}"
        kills += 1
    assert kills == len(plan)
    await procs.start("orch-4")  # no more crashes: it must finish the run
    await check_run(bus, client, run_id, steps, procs.effects)
    owners = [e for e in await RunHistory(bus, run_id).read() if isinstance(e, OwnerChanged)]
    assert len(owners) >= len(plan)


async def test_sigkill_at_random_points_many_times(bus: Bus, procs: OrchestratorProcs) -> None:
    client = NerveClient(bus)
    steps = 60  # ~50 ms of work each: about 3 s of steps, cut by a kill every 0.3-1.2 s
    rng = random.Random(20261124)
    run_id = await client.submit("acme", workflow="chaos", input={"steps": steps, "work": 0.05})
    kills = await kill_while_running(procs, client, [run_id], rng, 12, (0.3, 1.2), names=3)
    assert kills >= 3, "the run finished before the chaos started"
    await procs.start("orch-final")
    await check_run(bus, client, run_id, steps, procs.effects)


async def test_two_orchestrators_race_for_an_orphaned_run(bus: Bus) -> None:
    """A run whose owner died; two orchestrators start at once; exactly one takes it."""
    registry = WorkflowRegistry()

    @registry.register(name="parked")
    async def parked(ctx, inp):
        return (await ctx.wait_signal("go", timeout=120)).value

    from persistence import RunStarted

    for round_ in range(5):
        run_id = f"orphan-{round_}"
        started = RunStarted(run_id=run_id, tenant="acme", workflow="parked", version="1")
        assert await RunHistory(bus, run_id).create(started)
        kv = await bus.kv(bus.names.leases_bucket)
        await kv.create(bus.names.run_lease(run_id), RunRecord("ghost", 1, "acme").encode())
        a = Orchestrator(bus, f"race-a{round_}", registry=registry, host_ttl=1)
        b = Orchestrator(bus, f"race-b{round_}", registry=registry, host_ttl=1)
        await asyncio.gather(a.start(), b.start())
        async with asyncio.timeout(10):
            while run_id not in a.drivers and run_id not in b.drivers:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert (run_id in a.drivers) != (run_id in b.drivers)
        events = await RunHistory(bus, run_id).read()
        assert [e.epoch for e in events if isinstance(e, OwnerChanged)] == [2]
        client = NerveClient(bus)
        await client.signal(run_id, "go", round_)
        assert (await client.wait(run_id, timeout=10)).result == round_
        await asyncio.gather(a.stop(), b.stop())


async def test_continue_as_new_survives_kills_and_replays_only_its_segment(
        bus: Bus, procs: OrchestratorProcs) -> None:
    from persistence import RunContinued
    from workflow import replay_run

    client = NerveClient(bus)
    steps, per = 40, 7
    run_id = await client.submit("acme", workflow="chaos_segments",
                                 input={"steps": steps, "per_segment": per, "work": 0.03})
    kills = 0
    for n in range(4):
        proc = await procs.start(f"seg-{n % 2}")
        await client.wait(run_id, timeout=30, statuses=("running",))
        await asyncio.sleep(0.6)
        if (await client.summary(run_id)).done:
            break
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
    assert kills >= 2
    await procs.start("seg-final")
    summary = await client.wait(run_id, timeout=60)
    assert summary.result == {"total": sum(i * i for i in range(steps)), "segments": 5}
    assert summary.segments == 6  # 40 steps in segments of 7
    done = executions(procs.effects)
    mine = {k: n for k, n in done.items() if k.startswith(run_id + ":")}
    assert len(mine) == steps and all(n == 1 for n in mine.values()), mine
    events = await RunHistory(bus, run_id).read()
    continued = [e for e in events if isinstance(e, RunContinued)]
    assert [c.segment for c in continued] == [1, 2, 3, 4, 5]
    # Indices keep counting across segments: keys stay unique for the whole run.
    assert continued[-1].next_index == 35
    report = await replay_run(bus, run_id)
    assert report.deterministic, report.describe()


async def test_sigkill_with_many_runs_sharing_batches_loses_and_repeats_nothing(
        bus: Bus, procs: OrchestratorProcs) -> None:
    """Many runs' appends go out as one atomic batch: a kill while a batch is in flight
    must leave every run either with the whole record or without it, never half a batch,
    and the next owner carries every run on without repeating an effect."""
    client = NerveClient(bus)
    runs, steps = 16, 40
    procs.settings.append("atomic_batch_from=2")  # 16 runs rarely have 16 appends queued
    rng = random.Random(20261207)
    ids = [await client.submit("acme", workflow="chaos", input={"steps": steps, "work": 0.04})
           for _ in range(runs)]
    kills = await kill_while_running(procs, client, ids, rng, 8, (0.4, 1.0), names=2)
    assert kills >= 3, "the runs finished before the chaos started"
    await procs.start("orch-final")
    batched = 0
    for run_id in ids:
        await check_run(bus, client, run_id, steps, procs.effects)
        async for _seq, _data, headers in direct_get_subject(bus, bus.names.runs_stream,
                                                             bus.names.history(run_id)):
            batched += headers.get("Nats-Batch-Id") is not None
    assert batched > 0, "no record was written as part of an atomic batch"


async def test_a_sigkilled_nats_server_mid_run_loses_and_repeats_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies (SIGKILL) with steps in flight and comes back on the same port with
    its file streams and without the in-memory work queue: the orchestrator and the worker
    reconnect, the work stream is re-created, open steps are dispatched again, and every
    effect still happens exactly once."""
    effects = tmp_path / "effects.log"
    effects.touch()
    monkeypatch.setenv("NERVE_TEST_EFFECTS", str(effects))
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "nats"))
    await server.start()
    b = await connect(ConnectOptions(servers=[server.url], prefix="srvkill"))
    await provision(b)
    worker, orch = ActivityWorker(), Orchestrator(b, "survivor", host_ttl=2)
    await worker.start(b)
    await orch.start()
    client = NerveClient(b)
    steps, runs = 30, 4
    try:
        ids = [await client.submit("acme", workflow="chaos",
                                   input={"steps": steps, "work": 0.02}) for _ in range(runs)]
        async with asyncio.timeout(30):
            while min([await completed_steps(b, r) for r in ids]) < 5:
                await asyncio.sleep(0.05)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        with contextlib.suppress(NatsServerCrashed):
            await server.wait()
        await server.start()
        for run_id in ids:
            summary = await client.wait(run_id, timeout=90)
            assert summary.status == "completed", summary
            assert summary.result["total"] == sum(i * i for i in range(steps))
        done = executions(effects)
        for run_id in ids:
            mine = {k: n for k, n in done.items() if k.startswith(run_id + ":")}
            assert len(mine) == steps and all(n == 1 for n in mine.values()), mine
    finally:
        await orch.stop()
        await worker.stop()
        await b.close()
        await server.stop()
