"""The orchestrator: task ingestion from any NATS client, idempotent starts, rejections,
cancellation, timers across restarts, many runs at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js.errors import KeyNotFoundError

from bus import Bus, EmbeddedNats
from nerve import TaskRejected, WorkflowError
from persistence import RunCancelled, RunHistory, TimerFired
from workflow import (
    ActivityContext,
    ActivityRegistry,
    ActivityWorker,
    NerveClient,
    Orchestrator,
    RunContext,
    WorkflowRegistry,
)

registry = WorkflowRegistry()
acts = ActivityRegistry()
# The timer test's orchestrator process imports this module and uses the default registry.
from workflow import workflows as _default  # noqa: E402


@acts.register
async def echo(actx: ActivityContext, text: str) -> str:
    return text.upper()


@registry.register(name="agent")  # stands in for the built-in agent in these tests
async def agent(ctx: RunContext, inp: dict[str, Any]) -> str:
    return await ctx.activity(echo, inp["task"])


@_default.register(name="slow")
@registry.register(name="slow")
async def slow(ctx: RunContext, inp: dict[str, Any]) -> str:
    await ctx.sleep(inp.get("seconds", 60))
    return "woke"


@pytest.fixture
async def engine(bus: Bus) -> AsyncIterator[NerveClient]:
    orch = Orchestrator(bus, "orch-t", registry=registry)
    worker = ActivityWorker(acts)
    await orch.start()
    await worker.start(bus)
    yield NerveClient(bus)
    await worker.stop()
    await orch.stop()


async def rejected(nc: nats.NATS, subject: str) -> asyncio.Queue[dict[str, Any]]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def cb(msg: Any) -> None:
        await queue.put(json.loads(msg.data))

    await nc.subscribe(subject, cb=cb)
    return queue


async def wait_for_runs(bus: Bus, tenant: str, n: int) -> list[str]:
    client = NerveClient(bus)
    info_subject = bus.names.history("*")
    async with asyncio.timeout(20):
        while True:
            info = await bus.js.stream_info(bus.names.runs_stream, subjects_filter=info_subject)
            run_ids = [s.split(".")[-2] for s in (info.state.subjects or {})]
            mine = []
            for rid in run_ids:
                s = await client.summary(rid)
                if s.tenant == tenant:
                    mine.append(rid)
            if len(mine) >= n:
                return mine
            await asyncio.sleep(0.05)


async def test_a_task_from_plain_nats_py_starts_a_run(engine: NerveClient, bus: Bus,
                                                       nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)  # plain nats-py: no nerve code on this side
    await nc.publish(f"{bus.names.prefix}.tasks.plainpy", b'{"task": "hello"}')
    await nc.flush()
    await nc.close()
    [run_id] = await wait_for_runs(bus, "plainpy", 1)
    summary = await engine.wait(run_id, timeout=20)
    assert summary.result == "HELLO" and summary.tenant == "plainpy"


async def test_a_task_from_a_raw_socket_speaking_nats_starts_a_run(
        engine: NerveClient, bus: Bus, nats_server: EmbeddedNats) -> None:
    host, port = nats_server.url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO {...}
    body = b'{"task": "from a socket"}'
    subject = f"{bus.names.prefix}.tasks.rawsock".encode()
    writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
    writer.write(b"PUB " + subject + b" " + str(len(body)).encode() + b"\r\n" + body + b"\r\n")
    writer.write(b"PING\r\n")
    await writer.drain()
    assert (await reader.readline()).strip() == b"PONG"
    writer.close()
    [run_id] = await wait_for_runs(bus, "rawsock", 1)
    assert (await engine.wait(run_id, timeout=20)).result == "FROM A SOCKET"


@pytest.mark.parametrize(("body", "content_type"), [
    (b'{"task": "typed json"}', "application/json; charset=utf-8"),
    (b'\t\r\n{"task": "typed json"}', None),
    (b'"typed json"', None),
    (b"typed json", "text/plain"),
])
async def test_tasks_however_a_nats_client_labels_them(
        engine: NerveClient, bus: Bus, nats_server: EmbeddedNats, body: bytes,
        content_type: str | None) -> None:
    nc = await nats.connect(nats_server.url)
    tenant = f"labels{abs(hash((body, content_type)))}"
    await nc.publish(bus.names.tasks(tenant), body,
                     headers={"Content-Type": content_type} if content_type else None)
    await nc.flush()
    await nc.close()
    [run_id] = await wait_for_runs(bus, tenant, 1)
    assert (await engine.wait(run_id, timeout=20)).result == "TYPED JSON"


async def test_the_same_msg_id_or_run_id_never_starts_two_runs(engine: NerveClient,
                                                                bus: Bus) -> None:
    subject = bus.names.tasks("dedupe")
    for _ in range(3):
        await bus.js.publish(subject, b'{"task": "once"}', headers={"Nats-Msg-Id": "same-1"})
    for _ in range(3):
        await bus.js.publish(subject, b'{"task": "twice", "run_id": "fixed-run"}')
    await asyncio.sleep(1.0)
    runs = await wait_for_runs(bus, "dedupe", 2)
    assert len(runs) == 2 and "fixed-run" in runs
    for rid in runs:
        await engine.wait(rid, timeout=20)
    assert len(await RunHistory(bus, "fixed-run").read()) == 4  # started, step x2, completed


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "malformed JSON"),
    (b'{"tsk": "typo"}', "tsk"),
    (b'{"task": 42}', "task"),
    (b"{}", "needs"),
    (b'{"task": "x", "workflow": "nope"}', "no workflow named 'nope'"),
    (b'{"task": "x", "run_id": "bad id!"}', "run_id"),
    (b'{"task": "x", "max_turns": -1}', "max_turns"),
    (b"\xc1\xc1", "malformed msgpack (2 bytes): FormatError; send JSON"),
    (b"plain words", "or plain text with the header Content-Type: text/plain"),
])
async def test_bad_tasks_are_rejected_with_a_reason(engine: NerveClient, bus: Bus,
                                                    nats_server: EmbeddedNats, payload: bytes,
                                                    reason: str) -> None:
    nc = await nats.connect(nats_server.url)
    notices = await rejected(nc, bus.names.tasks_rejected)
    await nc.publish(bus.names.tasks("badtasks"), payload)
    notice = await asyncio.wait_for(notices.get(), 10)
    assert reason in notice["reason"], notice
    assert notice["subject"] == bus.names.tasks("badtasks")
    # The orchestrator still serves good tasks afterwards.
    await nc.publish(bus.names.tasks("badtasks"), b'{"task": "still alive"}')
    await nc.close()
    [run_id] = await wait_for_runs(bus, "badtasks", 1)
    assert (await engine.wait(run_id, timeout=20)).result == "STILL ALIVE"


async def test_a_rejected_task_can_be_sent_again_corrected_under_the_same_run_id(
        engine: NerveClient) -> None:
    async def submit(workflow: str) -> bool:
        return await engine.until_started("fixed-later", lambda: engine.submit(
            "acme", workflow=workflow, input={"seconds": 0.01}, run_id="fixed-later"),
            timeout=10)

    with pytest.raises(TaskRejected, match="no workflow named 'slwo'"):
        await submit("slwo")
    assert await submit("slow")  # the typo fixed: not dropped as a duplicate of the first
    assert (await engine.wait("fixed-later", timeout=20)).result == "woke"
    assert await submit("slow")  # sent again: the run it started, not a second one
    assert len(await RunHistory(engine.bus, "fixed-later").read()) == 4  # one run: its timer


async def test_another_tenants_run_id_is_refused_not_dropped(
        engine: NerveClient, bus: Bus, nats_server: EmbeddedNats) -> None:
    await engine.until_started("shared-1", lambda: engine.submit(
        "acme", workflow="slow", input={"seconds": 0.01}, run_id="shared-1"), timeout=10)
    nc = await nats.connect(nats_server.url)
    notices = await rejected(nc, bus.names.tasks_rejected)
    await engine.submit("evil", workflow="slow", input={"seconds": 99}, run_id="shared-1")
    notice = await asyncio.wait_for(notices.get(), 10)
    await nc.close()
    assert notice["reason"] == "run id shared-1 is taken; choose another"
    assert notice["subject"] == bus.names.tasks("evil")
    assert (await engine.wait("shared-1", timeout=20)).tenant == "acme"


async def test_cancel_stops_a_waiting_run(engine: NerveClient, bus: Bus) -> None:
    run_id = await engine.submit("acme", workflow="slow", input={"seconds": 600})
    await engine.wait(run_id, timeout=20, statuses=("running",))
    await engine.cancel(run_id, "no longer needed", by="ops")
    summary = await engine.wait(run_id, timeout=20)
    assert summary.status == "cancelled"
    end = (await engine.history(run_id))[-1]
    assert isinstance(end, RunCancelled)
    assert (end.reason, end.by) == ("no longer needed", "ops")  # why, and who asked


async def test_many_runs_at_once_in_one_orchestrator(engine: NerveClient) -> None:
    run_ids = await asyncio.gather(*(engine.submit("many", f"t{i}") for i in range(200)))
    results = await asyncio.gather(*(engine.wait(r, timeout=60) for r in run_ids))
    assert [r.result for r in results] == [f"T{i}" for i in range(200)]


@pytest.mark.timeout(90)
async def test_a_timer_survives_a_sigkill_and_fires_once(bus: Bus, nats_server: EmbeddedNats,
                                                         tmp_path) -> None:
    client = NerveClient(bus)

    async def orchestrator() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--role", "orchestrator", "--id", "timer-o",
            "--nats-url", nats_server.url, "--prefix", bus.names.prefix,
            "--workflows", "tests.test_orchestrator", env=dict(os.environ),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    first = await orchestrator()
    run_id = await client.submit("acme", workflow="slow", input={"seconds": 3})
    await client.wait(run_id, timeout=30, statuses=("running",))
    await asyncio.sleep(0.5)  # the timer is armed in the first process
    first.send_signal(signal.SIGKILL)
    await first.wait()
    second = await orchestrator()
    try:
        summary = await client.wait(run_id, timeout=30)
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()
    assert summary.result == "woke"
    events = await client.history(run_id)
    fired = [e for e in events if isinstance(e, TimerFired)]
    assert len(fired) == 1
    scheduled = next(e for e in events if getattr(e, "kind", None) == "timer")
    assert fired[0].at >= scheduled.deadline  # it did not fire early after the restart


@registry.register(name="late")
async def late(ctx: RunContext, inp: dict[str, Any]) -> Any:
    first = await ctx.wait_signal("approve", timeout=0.2, default="no answer")
    await ctx.wait_signal("finish", timeout=60)  # still running when the late one comes
    return first.value


async def test_a_late_signal_is_recorded_as_expired_and_changes_nothing(
        engine: NerveClient, nats_server: EmbeddedNats) -> None:
    from persistence import SignalRejected, SignalTimedOut

    run_id = await engine.submit("acme", workflow="late", input={})
    await engine.wait(run_id, timeout=20, statuses=("waiting",))
    async with asyncio.timeout(20):
        while not any(isinstance(e, SignalTimedOut) for e in await engine.history(run_id)):
            await asyncio.sleep(0.05)
    assert (await engine.summary(run_id)).late_for == ["approve"]
    # `nerve signal` says so, rather than that the signal is kept for a later wait.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "signal", run_id, "approve", '"too late"', "--sender",
        "slow-sam", "--nats-url", nats_server.url, "--prefix", engine.bus.names.prefix,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert "timed out and none is open: the signal is recorded as late" in err.decode()
    async with asyncio.timeout(20):
        while not any(isinstance(e, SignalRejected) for e in await engine.history(run_id)):
            await asyncio.sleep(0.05)
    await engine.signal(run_id, "finish", None)
    summary = await engine.wait(run_id, timeout=20)
    assert summary.result == "no answer"  # the timeout won; the late signal changed nothing
    [rejected] = [e for e in await engine.history(run_id) if isinstance(e, SignalRejected)]
    assert rejected.sender == "slow-sam" and rejected.reason.startswith("late")


async def test_a_task_in_msgpack_starts_a_run(engine: NerveClient, bus: Bus,
                                              nats_server: EmbeddedNats) -> None:
    import msgpack

    nc = await nats.connect(nats_server.url)
    await nc.publish(bus.names.tasks("packed"), msgpack.packb({"task": "binary"}),
                     headers={"Content-Type": "application/msgpack"})
    await nc.publish(bus.names.tasks("packed"), msgpack.packb({"task": "sniffed"}))
    await nc.close()
    runs = await wait_for_runs(bus, "packed", 2)
    results = sorted([(await engine.wait(r, timeout=20)).result for r in runs])
    assert results == ["BINARY", "SNIFFED"]


@acts.register
async def hangs(actx: ActivityContext) -> str:
    if actx.attempt == 1:
        await asyncio.sleep(3600)  # alive but silent: as a hung worker would be
    return f"attempt {actx.attempt}"


@registry.register(name="heartbeats")
async def heartbeats(ctx: RunContext, inp: dict[str, Any]) -> Any:
    from workflow import RetryPolicy

    return await ctx.activity(hangs, retry=RetryPolicy(max_attempts=2, timeout=1.5,
                                                       initial_interval=0.05))


async def test_a_step_past_its_timeout_is_retried(engine: NerveClient) -> None:
    from persistence import StepFailed

    run_id = await engine.submit("acme", workflow="heartbeats", input={})
    summary = await engine.wait(run_id, timeout=30)
    assert summary.result == "attempt 2"
    [failed] = [e for e in await engine.history(run_id) if isinstance(e, StepFailed)]
    assert failed.error["type"] == "StepTimeout" and not failed.final


async def test_waiting_for_a_run_whose_task_was_refused_says_why(engine: NerveClient) -> None:
    run_id = await engine.submit("acme", workflow="no-such-workflow", input={})
    with pytest.raises(TaskRejected, match="no workflow named 'no-such-workflow'"):
        await engine.wait(run_id, timeout=30)
    # A client that did not submit it cannot know: its timeout says the run never started.
    with pytest.raises(WorkflowError, match="it has not started"):
        await NerveClient(engine.bus).wait(run_id, timeout=0.5)


@acts.register
async def reports_then_hangs(actx: ActivityContext, items: int) -> dict[str, Any]:
    """Works through ``items``, reporting each; its first attempt hangs halfway, alive."""
    start = (actx.heartbeat_details or {}).get("done", 0)
    if actx.attempt > 1:
        # Was the hung attempt stopped when its owner gave up on it (not only at run end)?
        for _ in range(40):
            if actx.key in STOPPED:
                break
            await asyncio.sleep(0.05)
    for done in range(start + 1, items + 1):
        await asyncio.sleep(0.05)
        actx.heartbeat({"done": done})
        if actx.attempt == 1 and done == items // 2:
            try:
                await asyncio.sleep(3600)  # hung: the worker beats on, the code is silent
            except asyncio.CancelledError:
                STOPPED.append(actx.key)
                raise
    return {"attempt": actx.attempt, "started_at": start, "first_stopped": actx.key in STOPPED}


STOPPED: list[str] = []  # keys of hung attempts their worker stopped


@acts.register
def reports_to_the_end(actx: ActivityContext, items: int) -> int:
    """A plain function whose last report comes just before it returns."""
    for done in range(1, items + 1):
        actx.heartbeat({"done": done})
    return items


@registry.register(name="reports")
async def reports(ctx: RunContext, inp: dict[str, Any]) -> Any:
    from workflow import RetryPolicy

    if inp.get("to_the_end"):
        return await ctx.activity(reports_to_the_end, inp["items"])
    return await ctx.activity(reports_then_hangs, inp["items"], retry=RetryPolicy(
        max_attempts=2, heartbeat_timeout=0.6, timeout=60, initial_interval=0.05))


async def test_an_activity_that_stops_reporting_is_retried_from_its_last_report(
        engine: NerveClient) -> None:
    """Once an activity calls actx.heartbeat, its own silence times it out, though its
    worker is alive; the retry starts from the details it last reported."""
    from persistence import StepFailed

    run_id = await engine.submit("acme", workflow="reports", input={"items": 10})
    summary = await engine.wait(run_id, timeout=30)
    # The hung attempt did not sleep on beside the retry: its worker stopped it when the
    # owner gave up on it.
    assert summary.result == {"attempt": 2, "started_at": 5, "first_stopped": True}
    [failed] = [e for e in await engine.history(run_id) if isinstance(e, StepFailed)]
    assert failed.error["type"] == "HeartbeatTimeout" and not failed.final
    # The step is done: its details are gone, and the stopped attempt did not write its own
    # back over the deletion.
    await asyncio.sleep(1.5)
    kv = await engine.bus.js.key_value(engine.bus.names.progress_bucket)
    with pytest.raises(KeyNotFoundError):
        await kv.get(engine.bus.names.progress_key(run_id, 0))


async def test_details_reported_just_before_success_are_deleted(engine: NerveClient) -> None:
    kv = await engine.bus.js.key_value(engine.bus.names.progress_bucket)
    for _ in range(5):  # the last report's write may be in flight as the step ends
        run_id = await engine.submit("acme", workflow="reports",
                                     input={"items": 3, "to_the_end": True})
        assert (await engine.wait(run_id, timeout=30)).result == 3
        with pytest.raises(KeyNotFoundError):
            await kv.get(engine.bus.names.progress_key(run_id, 0))


def test_heartbeat_details_must_be_data() -> None:
    from workflow._activity import _Progress

    async def report() -> None:
        _Progress(None, "k", None, found=False).report({"at": object()})

    with pytest.raises(TypeError, match="heartbeat details must be data the bus carries"):
        asyncio.run(report())


@pytest.mark.timeout(90)
async def test_a_silent_worker_is_noticed_by_its_heartbeat_timeout(
        bus: Bus, nats_server: EmbeddedNats, tmp_path) -> None:
    import tests.hb_activities  # noqa: F401 - registers `hb` here too
    from persistence import StepFailed

    async def worker(n: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--role", "activity", "--id", f"hbw{n}",
            "--nats-url", nats_server.url, "--prefix", bus.names.prefix,
            "--workflows", "tests.hb_activities", stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)

    workers = [await worker(1), await worker(2)]
    orch = Orchestrator(bus, "hb-o")
    await orch.start()
    client = NerveClient(bus)
    try:
        run_id = await client.submit("acme", workflow="hb",
                                     input={"marker": str(tmp_path / "died")})
        summary = await client.wait(run_id, timeout=60)
    finally:
        await orch.stop()
        for w in workers:
            if w.returncode is None:
                w.terminate()
            await w.wait()
    assert summary.result == "attempt 2"
    [failed] = [e for e in await client.history(run_id) if isinstance(e, StepFailed)]
    assert failed.error["type"] == "HeartbeatTimeout"
    assert sorted(w.returncode for w in workers)[0] == -signal.SIGKILL  # one worker died


async def test_a_second_orchestrator_under_a_live_ones_id_is_refused(
        bus: Bus, nats_server: EmbeddedNats) -> None:
    """Two `nerve worker --role orchestrator` without --id on one host share the default id:
    the second must stop with a reason, not share the first one's host lease."""
    first = Orchestrator(bus, "orchestrator-twin", registry=registry)
    await first.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--role", "orchestrator",
            "--id", "orchestrator-twin", "--nats-url", nats_server.url,
            "--prefix", bus.names.prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await first.stop()
    assert proc.returncode == 78, err.decode()
    assert f"orchestrator id orchestrator-twin is in use by pid {os.getpid()}" in err.decode()


async def test_a_run_whose_driver_keeps_crashing_is_taken_up_again_ever_more_slowly(
        bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A driver that crashes (a bug in nerve, injected here: no workflow can cause it) is
    retried with a doubling wait, not at every sweep forever."""
    import logging

    from workflow._driver import RunDriver

    async def crash(self: RunDriver) -> bool:
        raise RuntimeError("injected: a bug in the driver")

    monkeypatch.setattr(RunDriver, "_replay", crash)
    orch = Orchestrator(bus, "crashy", registry=registry, host_ttl=1)
    orch.sweep_every = 0.25  # waits of 0.25, 0.5, 1, 2, 4 s; without backing off, 40 crashes
    await orch.start()
    try:
        with caplog.at_level(logging.ERROR, logger="nerve.workflow.orchestrator"):
            run_id = await NerveClient(bus).submit("acme", workflow="slow", input={})
            await asyncio.sleep(10)
    finally:
        await orch.stop()
    crashes = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith(f"run {run_id} driver crashed")]
    assert 2 <= len(crashes) <= 7, crashes
    assert "(2 in a row; taking the run up again in 0.5 s)" in crashes[1]
