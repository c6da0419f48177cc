"""The durable workflow engine end to end: a real orchestrator, real workers, real NATS."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors import MAX_RESULT_BYTES, encode
from bus import Bus
from nerve import ConfigError, Conflict, StepError
from persistence import (
    MarkerRecorded,
    RunCompleted,
    RunStarted,
    SignalMessage,
    SignalReceived,
    SignalRejected,
    StepCompleted,
    StepFailed,
    StepScheduled,
    TimerFired,
    WaitAbandoned,
)
from workflow import (
    ActivityContext,
    ActivityRegistry,
    ActivityWorker,
    NerveClient,
    Orchestrator,
    RetryPolicy,
    RunContext,
    WorkflowRegistry,
    replay_history,
)

wf = WorkflowRegistry()
acts = ActivityRegistry()
CALLS: collections.Counter[str] = collections.Counter()


@acts.register
async def add(actx: ActivityContext, a: int, b: int) -> int:
    CALLS[actx.key] += 1
    return a + b


@acts.register
def flaky(actx: ActivityContext, fail_until: int) -> str:
    CALLS[actx.key] += 1
    if actx.attempt < fail_until:
        raise RuntimeError(f"attempt {actx.attempt} fails")
    return f"ok on attempt {actx.attempt}"


@wf.register(name="mixed")
async def mixed(ctx: RunContext, inp: dict[str, Any]) -> dict[str, Any]:
    x = await ctx.activity(add, 1, 2)
    started = ctx.now()
    await ctx.sleep(0.2)
    a, b = await asyncio.gather(ctx.activity(add, x, 10), ctx.activity(add, x, 20))
    sig = await ctx.wait_signal("go", timeout=30, default={"v": 0})
    token = ctx.uuid()
    return {"x": x, "a": a, "b": b, "sig": sig.value, "sender": sig.sender,
            "slept": ctx.now() - started >= 0.2, "token_len": len(token)}


@wf.register(name="retrying")
async def retrying(ctx: RunContext, inp: dict[str, Any]) -> str:
    return await ctx.activity(flaky, inp["fail_until"],
                              retry=RetryPolicy(max_attempts=inp["max"], initial_interval=0.05))


@wf.register(name="waits")
async def waits(ctx: RunContext, inp: dict[str, Any]) -> Any:
    sig = await ctx.wait_signal("approve", timeout=inp["timeout"], default="nope")
    return {"value": sig.value, "timed_out": sig.timed_out}


@pytest.fixture
async def engine(bus: Bus) -> AsyncIterator[tuple[Orchestrator, NerveClient]]:
    orch = Orchestrator(bus, "orch-a", registry=wf)
    worker = ActivityWorker(acts)
    await orch.start()
    await worker.start(bus)
    yield orch, NerveClient(bus)
    await worker.stop()
    await orch.stop()


async def test_llm_activity_timer_signal_workflow_completes_with_exact_history(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="mixed", input={})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    await client.signal(run_id, "go", {"v": 7}, sender="alice")
    summary = await client.wait(run_id, timeout=20)
    assert summary.status == "completed", summary
    assert summary.result == {"x": 3, "a": 13, "b": 23, "sig": {"v": 7}, "sender": "alice",
                              "slept": True, "token_len": 36}
    events = await client.history(run_id)
    kinds = [(e.type, getattr(e, "index", getattr(e, "delivered_to", None))) for e in events]
    assert kinds[:8] == [
        ("run_started", None),
        ("step_scheduled", 0),                                          # add(1, 2)
        ("step_completed", 0), ("marker", 1), ("step_scheduled", 2),    # now(), sleep
        ("timer_fired", 2), ("step_scheduled", 3), ("step_scheduled", 4),  # gather: 2 adds
    ]
    # The two concurrent adds finish in either order; the wait is issued after both.
    assert sorted(kinds[8:10]) == [("step_completed", 3), ("step_completed", 4)]
    assert kinds[10:] == [("step_scheduled", 5), ("signal_received", 5), ("marker", 6),
                          ("marker", 7), ("run_completed", None)]
    assert isinstance(events[0], RunStarted) and events[0].tenant == "acme"
    assert isinstance(events[4], StepScheduled) and events[4].deadline is not None
    assert isinstance(events[5], TimerFired)
    assert isinstance(events[-1], RunCompleted)
    # Every activity ran exactly once, under its own key.
    keys = [k for k in CALLS if k.startswith(run_id)]
    assert sorted(keys) == [f"{run_id}:0", f"{run_id}:3", f"{run_id}:4"]
    assert all(CALLS[k] == 1 for k in keys)


async def test_transient_failures_are_retried_then_succeed(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="retrying", input={"fail_until": 3, "max": 5})
    summary = await client.wait(run_id, timeout=20)
    assert summary.result == "ok on attempt 3"
    failed = [e for e in await client.history(run_id) if isinstance(e, StepFailed)]
    assert [(f.attempt, f.final) for f in failed] == [(1, False), (2, False)]


async def test_a_step_that_keeps_failing_fails_the_run_with_the_evidence(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="retrying", input={"fail_until": 99, "max": 2})
    summary = await client.wait(run_id, timeout=20)
    assert summary.status == "failed"
    assert summary.error["type"] == "StepError"
    assert summary.error["fields"]["attempts"] == 2
    assert "attempt 2 fails" in summary.error["fields"]["error"]["message"]


async def test_signal_after_timeout_changes_nothing(
        engine: tuple[Orchestrator, NerveClient], bus: Bus) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="waits", input={"timeout": 0.3})
    summary = await client.wait(run_id, timeout=20)
    assert summary.result == {"value": "nope", "timed_out": True}
    with pytest.raises(Conflict, match="has ended \\(completed\\); a signal would change"):
        await client.signal(run_id, "approve", "yes", sender="late-bob")
    with pytest.raises(Conflict):
        await client.cancel(run_id)
    # Past the client's check (a raw publish to the inbox), it changes nothing either.
    await bus.js.publish(bus.names.inbox(run_id), encode(SignalMessage(
        name="approve", payload="yes", sender="late-bob", signal_id="late-1")))
    await asyncio.sleep(0.3)
    events = await client.history(run_id)
    assert isinstance(events[-1], RunCompleted)  # nothing appended after the end
    assert not [e for e in events if isinstance(e, SignalReceived)]


async def test_first_of_signal_or_timeout_wins_and_late_signals_are_rejected(
        engine: tuple[Orchestrator, NerveClient], bus: Bus) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="waits", input={"timeout": 30})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    first = await client.signal(run_id, "approve", "yes", sender="alice")
    # Straight to the inbox: the run may have ended already, which the client would refuse.
    for sig in (SignalMessage(name="approve", payload="second", sender="bob", signal_id="b"),
                SignalMessage(name="approve", payload="yes", sender="alice", signal_id=first)):
        await bus.js.publish(bus.names.inbox(run_id), encode(sig))  # the last: a duplicate
    summary = await client.wait(run_id, timeout=20)
    assert summary.result == {"value": "yes", "timed_out": False}
    events = await client.history(run_id)
    delivered = [(e.sender, e.payload) for e in events
                 if isinstance(e, SignalReceived) and e.delivered_to == 0]
    assert delivered == [("alice", "yes")]
    # Bob's later signal found no open wait: it is buffered or dropped with the run's end,
    # never delivered; alice's duplicate is not recorded twice.
    ids = [e.signal_id for e in events if isinstance(e, SignalReceived | SignalRejected)]
    assert ids.count(first) == 1


@wf.register(name="gives_up")
async def gives_up(ctx: RunContext, inp: dict[str, Any]) -> Any:
    try:
        first = (await asyncio.wait_for(ctx.wait_signal("approve"), 0.3)).value
    except TimeoutError:
        first = "gave up"
    second = await ctx.wait_signal("approve", timeout=60, default="no signal")
    return {"first": first, "second": second.value}


async def test_a_signal_goes_to_the_open_wait_not_to_one_the_code_gave_up_on(bus: Bus) -> None:
    """``wait_for`` around ``wait_signal`` gives up on the wait: the history says so, and
    the next signal of that name resolves the wait that is open, across a takeover too."""
    client = NerveClient(bus)
    first = Orchestrator(bus, "abandon-a", registry=wf, host_ttl=1)
    await first.start()
    run_id = await client.submit("acme", workflow="gives_up", input={})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    async with asyncio.timeout(20):
        while not [e for e in await client.history(run_id) if isinstance(e, WaitAbandoned)]:
            await asyncio.sleep(0.05)
    summary = await client.summary(run_id)
    assert summary.status == "waiting" and summary.waiting_for == ["approve"]
    await first.stop()
    second = Orchestrator(bus, "abandon-b", registry=wf, host_ttl=1)
    await second.start()
    async with asyncio.timeout(20):
        while run_id not in second.drivers or second.drivers[run_id].instance is None:
            await asyncio.sleep(0.02)
    await client.signal(run_id, "approve", "yes", sender="alice")
    summary = await client.wait(run_id, timeout=20)
    await second.stop()
    assert summary.result == {"first": "gave up", "second": "yes"}
    events = await client.history(run_id)
    abandoned = [e for e in events if isinstance(e, WaitAbandoned)]
    delivered = [e.delivered_to for e in events if isinstance(e, SignalReceived)]
    # Step 0 is the wait_for's timer (armed before its awaitable starts), 1 the wait it
    # gave up on, 2 the open one.
    assert [(e.index, e.name) for e in abandoned] == [(1, "approve")]
    assert delivered == [2]


async def test_markers_and_completed_steps_are_in_the_history(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="mixed", input={})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    await client.signal(run_id, "go", None)
    await client.wait(run_id, timeout=20)
    events = await client.history(run_id)
    assert any(isinstance(e, MarkerRecorded) and e.kind == "uuid" for e in events)
    assert [e.result for e in events if isinstance(e, StepCompleted) and e.index == 0] == [3]


@wf.register(name="segmented")
async def segmented(ctx: RunContext, inp: dict[str, Any]) -> Any:
    n = inp.get("n", 0)
    await ctx.activity(add, n, 1)
    if n < 3:
        ctx.continue_as_new({"n": n + 1})
    return (await ctx.wait_signal("finish", timeout=60)).value


async def test_a_takeover_replays_only_the_latest_segment(bus: Bus) -> None:
    from persistence import RunContinued, RunHistory
    from workflow import RunRecord

    client = NerveClient(bus)
    worker = ActivityWorker(acts)
    await worker.start(bus)
    first = Orchestrator(bus, "seg-a", registry=wf, host_ttl=1)
    await first.start()
    run_id = await client.submit("acme", workflow="segmented", input={"n": 0})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    kv = await bus.kv(bus.names.leases_bucket)
    record = RunRecord.decode((await kv.get(bus.names.run_lease(run_id))).value)
    last_segment_seq = 0
    async for seq, _h, events in RunHistory(bus, run_id).records():
        if any(isinstance(e, RunContinued) for e in events):
            last_segment_seq = seq
    assert record.replay_from == last_segment_seq > 0
    await first.stop()

    second = Orchestrator(bus, "seg-b", registry=wf, host_ttl=1)
    await second.start()
    async with asyncio.timeout(10):
        while run_id not in second.drivers or second.drivers[run_id].instance is None:
            await asyncio.sleep(0.02)
    driver = second.drivers[run_id]
    assert driver.instance.segment is not None and driver.instance.segment.segment == 3
    await client.signal(run_id, "finish", "done")
    assert (await client.wait(run_id, timeout=20)).result == "done"
    await second.stop()
    await worker.stop()


LOCAL_CALLS: collections.Counter[str] = collections.Counter()


@acts.register
async def local_flaky(actx: ActivityContext, fail_until: int) -> int:
    LOCAL_CALLS[actx.key] += 1
    if actx.attempt < fail_until:
        raise RuntimeError(f"local attempt {actx.attempt}")
    return actx.attempt


@wf.register(name="local_steps")
async def local_steps(ctx: RunContext, inp: dict[str, Any]) -> Any:
    a = await ctx.activity(add, 20, 22, local=True)
    b = await ctx.activity(local_flaky, 2, local=True,
                           retry=RetryPolicy(max_attempts=3, initial_interval=0.05))
    return [a, b]


async def test_local_activities_run_in_the_orchestrator_with_the_same_contract(bus: Bus) -> None:
    orch = Orchestrator(bus, "orch-local", registry=wf, activities=acts)
    await orch.start()  # no activity worker at all: local steps must not need one
    client = NerveClient(bus)
    run_id = await client.submit("acme", workflow="local_steps", input={})
    summary = await client.wait(run_id, timeout=20)
    assert summary.result == [42, 2]
    events = await client.history(run_id)
    failed = [e for e in events if isinstance(e, StepFailed)]
    assert [(f.index, f.attempt, f.final) for f in failed] == [(1, 1, False)]
    assert LOCAL_CALLS[f"{run_id}:1"] == 2 and CALLS[f"{run_id}:0"] == 1
    await orch.stop()


@acts.register
async def huge(actx: ActivityContext, size: int) -> str:
    return "x" * size


@acts.register
async def stalls(actx: ActivityContext) -> None:
    await asyncio.sleep(30)


@wf.register(name="too_big")
async def too_big(ctx: RunContext, inp: dict[str, Any]) -> Any:
    if inp["where"] == "workflow":
        return "y" * inp["size"]
    try:
        await ctx.activity(huge, inp["size"], local=inp["where"] == "local")
    except StepError as exc:
        return exc.fields["error"]


@wf.register(name="local_timeout")
async def local_timeout(ctx: RunContext, inp: dict[str, Any]) -> Any:
    try:
        await ctx.activity(stalls, local=True, retry=RetryPolicy(max_attempts=1, timeout=0.2))
    except StepError as exc:
        return exc.fields["error"]


async def test_a_result_too_big_for_the_history_fails_at_once_saying_so(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    """Remote, local or the workflow's own: a result over MAX_RESULT_BYTES is a permanent,
    named failure, not a step retried into timeouts or a run stuck on an append."""
    orch, client = engine
    orch.activities = acts
    size = MAX_RESULT_BYTES + 1
    for where in ("remote", "local"):
        run_id = await client.submit("acme", workflow="too_big",
                                     input={"where": where, "size": size})
        error = (await client.wait(run_id, timeout=20)).result
        assert error["type"] == "ResultTooLarge" and error["fields"]["limit"] == size - 1
        assert "huge" in error["message"] and "return a reference" in error["message"]
        failed = [e for e in await client.history(run_id) if isinstance(e, StepFailed)]
        assert [(f.attempt, f.final) for f in failed] == [(1, True)]  # not retried
    run_id = await client.submit("acme", workflow="too_big",
                                 input={"where": "workflow", "size": size})
    summary = await client.wait(run_id, timeout=20)
    assert summary.status == "failed" and summary.error["type"] == "ResultTooLarge"
    # Just under the limit is fine.
    run_id = await client.submit("acme", workflow="too_big",
                                 input={"where": "remote", "size": MAX_RESULT_BYTES // 2})
    assert (await client.wait(run_id, timeout=20)).result is None


async def test_a_local_activity_that_times_out_says_so(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    orch, client = engine
    orch.activities = acts
    run_id = await client.submit("acme", workflow="local_timeout", input={})
    error = (await client.wait(run_id, timeout=20)).result
    assert error["type"] == "StepTimeout"
    assert "(local activity stalls) timed out after 0.2s" in error["message"]


def test_a_retry_policy_that_cannot_work_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_attempts is 0"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="timeout is 0"):
        RetryPolicy(timeout=0)
    with pytest.raises(ConfigError, match="initial_interval"):
        RetryPolicy(initial_interval=-1)


@wf.register(name="needs_add")
async def needs_add(ctx: RunContext, inp: dict[str, Any]) -> Any:
    return await ctx.activity(add, 2, 3, retry=RetryPolicy(max_attempts=20, initial_interval=0.1,
                                                           backoff=1.0))


async def test_a_worker_without_the_activity_fails_the_attempt_not_the_step(bus: Bus) -> None:
    """A rolling deploy: the only worker up does not have the activity yet. Its attempts
    fail saying what is missing where, and are retried; a worker that has it finishes it."""
    orch = Orchestrator(bus, "orch-roll", registry=wf)
    await orch.start()
    old = ActivityWorker(ActivityRegistry(), worker_id="old-worker")
    await old.start(bus)
    client = NerveClient(bus)
    run_id = await client.submit("acme", workflow="needs_add", input={})
    await client.wait(run_id, timeout=20, statuses=("running",))
    async with asyncio.timeout(20):
        while not (failed := [e for e in await client.history(run_id)
                              if isinstance(e, StepFailed)]):
            await asyncio.sleep(0.05)
    await old.stop()
    new = ActivityWorker(acts, worker_id="new-worker")
    await new.start(bus)
    summary = await client.wait(run_id, timeout=20)
    await new.stop()
    await orch.stop()
    assert not failed[0].final
    assert "no activity named 'add' is registered on activity worker old-worker" in \
        failed[0].error["message"]
    assert summary.result == 5


@wf.register(name="bad_args")
async def bad_args(ctx: RunContext, inp: dict[str, Any]) -> Any:
    try:
        await ctx.activity(add, {1, 2}, 3)
    except TypeError as exc:
        return str(exc)


async def test_step_arguments_that_cannot_be_recorded_name_the_step(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="bad_args", input={})
    message = (await client.wait(run_id, timeout=20)).result
    assert message.startswith("the arguments of activity step 'add' cannot be recorded")
    assert "turn sets into lists" in message


@wf.register(name="misbehaves")
async def misbehaves(ctx: RunContext, inp: dict[str, Any]) -> Any:
    time.sleep(0.6)  # noqa: ASYNC251 - the mistake this test is about
    await asyncio.Event().wait()  # not a step: nothing will ever set it


async def test_blocking_or_unwakeable_workflow_code_is_reported(
        engine: tuple[Orchestrator, NerveClient], caplog: pytest.LogCaptureFixture) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="misbehaves", input={})
    await client.wait(run_id, timeout=20, statuses=("running",))
    async with asyncio.timeout(10):
        while "waits for something that is not a step" not in caplog.text:
            await asyncio.sleep(0.05)
    assert f"run {run_id}: workflow misbehaves held the event loop for 0." in caplog.text
    assert "use ctx.sleep instead of time.sleep" in caplog.text
    await client.cancel(run_id)  # a cancel still wakes it
    assert (await client.wait(run_id, timeout=20)).status == "cancelled"


STOPPED: list[str] = []


@acts.register
async def outlives_its_timeout(actx: ActivityContext) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        STOPPED.append(actx.key)
        raise


@wf.register(name="times_out")
async def times_out(ctx: RunContext, inp: dict[str, Any]) -> Any:
    await ctx.activity(outlives_its_timeout, retry=RetryPolicy(max_attempts=1, timeout=0.5))


async def test_an_activity_past_its_timeout_is_stopped_not_left_running(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="times_out", input={})
    summary = await client.wait(run_id, timeout=20)
    assert summary.status == "failed" and summary.error["fields"]["error_type"] == "StepTimeout"
    async with asyncio.timeout(10):  # the worker stops it too, at the same deadline
        while f"{run_id}:0" not in STOPPED:
            await asyncio.sleep(0.05)


@wf.register(name="cancelled_while_busy")
async def cancelled_while_busy(ctx: RunContext, inp: dict[str, Any]) -> Any:
    await ctx.activity(outlives_its_timeout)  # the default timeout: 300 s


async def test_an_activity_whose_run_is_cancelled_is_stopped_with_it(
        engine: tuple[Orchestrator, NerveClient], bus: Bus) -> None:
    _, client = engine
    run_id = await client.submit("acme", workflow="cancelled_while_busy", input={})
    await client.wait(run_id, timeout=20, statuses=("running",))
    async with asyncio.timeout(20):  # the activity is running on the worker
        while not [e for e in await client.history(run_id) if isinstance(e, StepScheduled)]:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await client.cancel(run_id, "not needed any more", by="ops")
    assert (await client.wait(run_id, timeout=20)).status == "cancelled"
    async with asyncio.timeout(10):
        while f"{run_id}:0" not in STOPPED:
            await asyncio.sleep(0.05)


@wf.register(name="entity")
async def entity(ctx: RunContext, inp: dict[str, Any]) -> Any:
    """A long-lived entity: adds up signals, continuing as new every ``per`` of them."""
    state = {"total": inp.get("total", 0), "seen": inp.get("seen", [])}
    for _ in range(inp.get("per", 5)):
        sig = await ctx.wait_signal("add")
        if sig.value == "stop":
            return state
        state["total"] += sig.value
        state["seen"].append(sig.value)
    ctx.continue_as_new({**inp, **state})


async def test_signals_that_arrive_while_a_run_continues_as_new_reach_the_next_segment(
        engine: tuple[Orchestrator, NerveClient]) -> None:
    """A burst of signals lands in the same batch as the end of a segment: they are
    buffered, recorded, and delivered in order to the next segments' waits."""
    _, client = engine
    run_id = await client.submit("acme", workflow="entity", input={"per": 5})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    # All at once: many land in the batch whose first signal ends a segment.
    sends = [asyncio.ensure_future(client.signal(run_id, "add", n)) for n in range(1, 31)]
    await asyncio.gather(*sends)
    await client.signal(run_id, "add", "stop")
    summary = await client.wait(run_id, timeout=30)
    assert summary.result["total"] == sum(range(1, 31))
    assert sorted(summary.result["seen"]) == list(range(1, 31))
    assert summary.segments == 7


async def test_a_takeover_after_continue_as_new_delivers_no_signal_twice(bus: Bus) -> None:
    """The takeover replays the latest segment alone: it reads the inbox from where that
    segment began, not from the start (the earlier segments' signals again)."""
    from persistence import RunContinued, RunHistory

    client = NerveClient(bus)
    worker = ActivityWorker(acts)
    await worker.start(bus)
    first = Orchestrator(bus, "entity-a", registry=wf, host_ttl=1)
    await first.start()
    try:
        run_id = await client.submit("acme", workflow="entity", input={"per": 3})
        for n in range(1, 8):
            await client.wait(run_id, timeout=20, statuses=("waiting",))
            await client.signal(run_id, "add", n)
            await asyncio.sleep(0.05)
        async with asyncio.timeout(20):  # 7 signals: two segments ended, the third has one
            while (await client.summary(run_id)).segments < 3:
                await asyncio.sleep(0.05)
        await first.stop()
        second = Orchestrator(bus, "entity-b", registry=wf, host_ttl=1)
        await second.start()
        try:
            for n in range(8, 11):
                await client.signal(run_id, "add", n)
            await client.signal(run_id, "add", "stop")
            summary = await client.wait(run_id, timeout=30)
        finally:
            await second.stop()
    finally:
        await worker.stop()
    assert summary.result == {"total": sum(range(1, 11)), "seen": list(range(1, 11))}
    continued = [e for e in await RunHistory(bus, run_id).read() if isinstance(e, RunContinued)]
    assert continued[0].inbox_seq > 0
    assert len(continued[0].seen_signals) == 3  # the ids of the signals its segment took


def ordered_registry(order: list[int], as_completed: bool) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.register(name="ordered")
    async def ordered(ctx: RunContext, inp: dict[str, Any]) -> Any:
        steps = [ctx.activity(add, n, 0) for n in order]
        if as_completed:
            return [await f for f in ctx.as_completed(steps)]
        return await asyncio.gather(*steps)

    return reg


async def test_ctx_as_completed_starts_steps_in_list_order(bus: Bus) -> None:
    """Unlike asyncio.as_completed, whose set starts them in an order that changes between
    processes; and a replay that meets steps in another order says so."""
    from persistence import StepScheduled

    client = NerveClient(bus)
    worker = ActivityWorker(acts)
    await worker.start(bus)
    orch = Orchestrator(bus, "ordered", registry=ordered_registry([3, 1, 2], True))
    await orch.start()
    try:
        run_id = await client.submit("acme", workflow="ordered", input={})
        summary = await client.wait(run_id, timeout=20)
    finally:
        await orch.stop()
        await worker.stop()
    assert sorted(summary.result) == [1, 2, 3]
    history = await client.history(run_id)
    assert [e.args["args"][0] for e in history if isinstance(e, StepScheduled)] == [3, 1, 2]
    report = replay_history(history, ordered_registry([1, 3, 2], False))
    assert not report.deterministic and report.diff["moved_from"] == 1
    assert "asyncio.as_completed" in report.error and "ctx.as_completed" in report.error
