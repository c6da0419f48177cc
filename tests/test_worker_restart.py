"""A step a dead activity worker held comes back within seconds, not after 30; a step a
live worker is running stays with it however long it runs.

Real ``nerve worker --role activity`` processes against the session's nats-server (they
import this module, which registers the workflow and the activity below); the orchestrator
runs here. The activity appends a line to a file when it starts and when it ends, so every
execution shows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors import StepWorker
from bus import Bus, EmbeddedNats
from persistence import StepCompleted
from tests.role_procs import RoleProcs
from workflow import ActivityContext, NerveClient, Orchestrator, RunContext, activity, workflow

pytestmark = pytest.mark.timeout(120)

MODULE = "tests.test_worker_restart"


@activity
def worker_restart_long(actx: ActivityContext, log: str, seconds: float) -> str:
    """Records its start and end; sleeps in between (a worker thread: the loop stays free)."""
    with open(log, "a") as f:
        f.write(f"start {actx.attempt} {os.getpid()} {time.time()}\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"done {actx.attempt} {os.getpid()} {time.time()}\n")
    return f"slept in {os.getpid()}"


@workflow(name="worker_restart_long")
async def worker_restart_run(ctx: RunContext, inp: dict[str, Any]) -> str:
    # The default activity policy: no heartbeat_timeout, so the orchestrator does not retry
    # the step while it waits; whatever runs it again is the work queue's redelivery.
    return await ctx.activity(worker_restart_long, inp["log"], inp["seconds"])


@pytest.fixture
async def engine(bus: Bus, nats_server: EmbeddedNats,
                 ) -> AsyncIterator[tuple[NerveClient, RoleProcs]]:
    orch = Orchestrator(bus, "restart-o")
    await orch.start()
    workers = RoleProcs(nats_server, bus.names.prefix, "activity", MODULE)
    yield NerveClient(bus), workers
    await workers.close()
    await orch.stop()


def lines(log: Path, what: str) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines() if line.startswith(what)]


async def until_lines(log: Path, what: str, n: int, timeout: float) -> list[list[str]]:
    async with asyncio.timeout(timeout):
        while len(found := lines(log, what)) < n:
            await asyncio.sleep(0.05)
    return found


async def one_completion(client: NerveClient, run_id: str) -> None:
    history = await client.history(run_id)
    assert len([e for e in history if isinstance(e, StepCompleted)]) == 1


async def test_a_worker_restarted_under_its_id_runs_its_unfinished_step_again_at_once(
        engine: tuple[NerveClient, RoleProcs], tmp_path: Path) -> None:
    client, workers = engine
    log = tmp_path / "activity.log"
    first = await workers.start("activity-1")
    # Longer than ack_wait: the restarted worker runs it to the end without it being
    # delivered again (to itself, in another handler slot).
    run_id = await client.submit("acme", workflow="worker_restart_long",
                                 input={"log": str(log), "seconds": 8})
    [started] = await until_lines(log, "start", 1, timeout=60)
    assert int(started[2]) == first.pid
    first.send_signal(signal.SIGKILL)  # mid-activity, as `nerve up`'s tester did
    killed_at = time.time()
    await first.wait()
    second = await workers.start("activity-1")  # what `nerve up` does: the same id

    again = (await until_lines(log, "start", 2, timeout=40))[1]
    assert int(again[2]) == second.pid
    assert again[1] == "1"  # the same attempt: the queue gave it back, no retry was needed
    # A behaviour bound, not a benchmark: the work queue's old ack_wait was 30 s.
    assert float(again[3]) - killed_at < 15, f"started again {float(again[3]) - killed_at:.1f}s " \
        "after the kill"

    summary = await client.wait(run_id, timeout=60)
    assert summary.status == "completed", summary
    assert summary.result == f"slept in {second.pid}"
    assert len(lines(log, "start")) == 2  # the dead worker's start and the restart's
    assert [d[2] for d in lines(log, "done")] == [str(second.pid)]  # completed once
    await one_completion(client, run_id)


async def test_a_long_activity_on_a_live_worker_is_not_redelivered_to_another(
        engine: tuple[NerveClient, RoleProcs], tmp_path: Path) -> None:
    client, workers = engine
    log = tmp_path / "activity.log"
    for ident in ("activity-1", "activity-2"):
        await workers.start(ident)
    seconds = 2.5 * StepWorker.ack_wait  # silent past ack_wait twice over: only beats hold it
    run_id = await client.submit("acme", workflow="worker_restart_long",
                                 input={"log": str(log), "seconds": seconds})
    summary = await client.wait(run_id, timeout=60 + seconds)
    assert summary.status == "completed", summary
    assert len(lines(log, "start")) == 1, log.read_text()
    assert len(lines(log, "done")) == 1
    await one_completion(client, run_id)


@activity
async def worker_restart_async(actx: ActivityContext, log: str, seconds: float) -> str:
    """An async activity that records its start, and its end however it ends."""
    def record(what: str) -> None:
        with open(log, "a") as f:
            f.write(f"{what} {actx.attempt} {os.getpid()} {time.time()}\n")

    record("start")  # a line to a local file: short enough to do on the loop in a test
    try:
        await asyncio.sleep(seconds)
    finally:
        record("finally")
    return f"slept in {os.getpid()}"


@workflow(name="worker_restart_async")
async def worker_restart_async_run(ctx: RunContext, inp: dict[str, Any]) -> str:
    return await ctx.activity(worker_restart_async, inp["log"], inp["seconds"])


async def test_a_worker_told_to_stop_mid_activity_stops_in_its_grace_and_runs_finally(
        engine: tuple[NerveClient, RoleProcs], tmp_path: Path) -> None:
    """What Ctrl-C on `nerve up` does to an activity role: SIGTERM, 10 s of grace, then
    SIGKILL. The worker must be gone well inside the grace, its activity's clean-up run,
    and the step must come back to the next worker."""
    client, workers = engine
    log = tmp_path / "activity.log"
    first = await workers.start("activity-1")
    run_id = await client.submit("acme", workflow="worker_restart_async",
                                 input={"log": str(log), "seconds": 30})
    await until_lines(log, "start", 1, timeout=60)
    first.send_signal(signal.SIGTERM)
    stopped_at = time.time()
    await asyncio.wait_for(first.wait(), 30)
    # A behaviour bound, not a benchmark: past 10 s `nerve up` would have SIGKILLed it.
    assert time.time() - stopped_at < 8
    assert [f[2] for f in lines(log, "finally")] == [str(first.pid)]
    second = await workers.start("activity-2")
    again = (await until_lines(log, "start", 2, timeout=40))[1]
    assert int(again[2]) == second.pid
    await client.cancel(run_id)  # enough: it came back


@activity
def worker_restart_resumable(actx: ActivityContext, marker: str, items: int) -> dict:
    """Reports each item done (from its worker thread); the first worker to run it dies at
    the middle, SIGKILLed."""
    start = (actx.heartbeat_details or {}).get("done", 0)
    for done in range(start + 1, items + 1):
        actx.heartbeat({"done": done})
        if done == items // 2 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(2 * 1.0)  # past the details' write interval (1 s)
            os.kill(os.getpid(), signal.SIGKILL)
    return {"resumed_from": start, "pid": os.getpid()}


@workflow(name="worker_restart_resumable")
async def worker_restart_resumable_run(ctx: RunContext, inp: dict[str, Any]) -> dict:
    return await ctx.activity(worker_restart_resumable, inp["marker"], inp["items"])


async def test_a_step_taken_over_from_a_dead_worker_resumes_from_its_last_heartbeat(
        engine: tuple[NerveClient, RoleProcs], bus: Bus, tmp_path: Path) -> None:
    """Heartbeat details are durable: the worker that gets the step after a SIGKILL starts
    where the dead one last reported, and the details are gone once the step is done."""
    from nats.js.errors import KeyNotFoundError

    client, workers = engine
    procs = [await workers.start(f"activity-{n}") for n in (1, 2)]
    run_id = await client.submit("acme", workflow="worker_restart_resumable",
                                 input={"marker": str(tmp_path / "died"), "items": 10})
    summary = await client.wait(run_id, timeout=60)
    assert summary.status == "completed", summary
    assert summary.result["resumed_from"] == 5
    dead = [p for p in procs if p.returncode == -signal.SIGKILL]
    assert len(dead) == 1 and summary.result["pid"] != dead[0].pid
    await one_completion(client, run_id)
    kv = await bus.js.key_value(bus.names.progress_bucket)
    with pytest.raises(KeyNotFoundError):
        await kv.get(bus.names.progress_key(run_id, 0))



@activity
def worker_restart_replaced(actx: ActivityContext, log: str, marker: str) -> str:
    """Attempt 1 dies (its worker SIGKILLed) while reporting; a later attempt reports for
    7 s: long enough for the queue to hand the dead worker's item back meanwhile."""
    with open(log, "a") as f:
        f.write(f"start {actx.attempt} {os.getpid()} {time.time()}\n")
    if not os.path.exists(marker):
        open(marker, "w").close()
        for _ in range(8):
            actx.heartbeat({"at": "first"})
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(35):
        actx.heartbeat({"at": "later"})
        time.sleep(0.2)
    return f"attempt {actx.attempt}"


@workflow(name="worker_restart_replaced")
async def worker_restart_replaced_run(ctx: RunContext, inp: dict[str, Any]) -> str:
    from workflow import RetryPolicy

    return await ctx.activity(worker_restart_replaced, inp["log"], inp["marker"],
                              retry=RetryPolicy(heartbeat_timeout=1.0, timeout=60,
                                                initial_interval=0.05))


async def test_a_dead_workers_attempt_that_was_replaced_is_not_run_again(
        engine: tuple[NerveClient, RoleProcs], tmp_path: Path) -> None:
    """The owner's heartbeat timeout starts attempt 2 on a live worker; when the queue then
    hands back the dead worker's attempt 1, the history says it was given up: not run."""
    client, workers = engine
    log = tmp_path / "activity.log"
    for ident in ("activity-1", "activity-2"):
        await workers.start(ident)
    run_id = await client.submit("acme", workflow="worker_restart_replaced",
                                 input={"log": str(log), "marker": str(tmp_path / "died")})
    summary = await client.wait(run_id, timeout=60)
    assert summary.status == "completed" and summary.result == "attempt 2", summary
    await asyncio.sleep(StepWorker.ack_wait)  # any redelivery has come and gone by now
    assert [s[1] for s in lines(log, "start")] == ["1", "2"], log.read_text()
    await one_completion(client, run_id)
