"""Determinism and versioning: golden histories, NondeterminismError, ctx.patched."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, EmbeddedNats
from nerve import ConfigError, NondeterminismError, WorkflowError
from persistence import OwnerChanged, RunBlocked
from tests.golden import workflows as golden
from workflow import (
    ActivityContext,
    ActivityRegistry,
    ActivityWorker,
    NerveClient,
    Orchestrator,
    RunContext,
    WorkflowRegistry,
    assert_replays,
    load_history,
    replay_history,
    replay_run,
)

GOLDEN = Path(__file__).parent / "golden"


def changed_registry() -> WorkflowRegistry:
    """``approval`` after an incompatible change: an extra step before the first one."""
    reg = WorkflowRegistry()

    @reg.register(name="approval", version="2")
    async def approval(ctx: RunContext, inp: dict[str, Any]) -> Any:
        await ctx.activity(golden.double, 0)  # new, unguarded
        first = await ctx.activity(golden.double, inp["x"])
        return first

    return reg


def patched_registry() -> WorkflowRegistry:
    """The same change behind ctx.patched: old histories keep their old path."""
    reg = WorkflowRegistry()

    @reg.register(name="approval", version="3")
    async def approval(ctx: RunContext, inp: dict[str, Any]) -> Any:
        if ctx.patched("warm-up-step"):
            await ctx.activity(golden.double, 0)
        return await golden.approval(ctx, inp)  # the v1 body, unchanged

    return reg


@pytest.mark.parametrize("name", ["approval_approved", "approval_rejected"])
def test_golden_histories_replay_cleanly(name: str) -> None:
    report = assert_replays(str(GOLDEN / f"{name}.jsonl"), golden.registry)  # str or Path
    assert report.deterministic and report.state in ("completed",)


@pytest.mark.parametrize("name", ["approval_approved", "approval_rejected"])
def test_a_breaking_change_is_caught_with_a_readable_diff(name: str) -> None:
    report = replay_history(load_history(GOLDEN / f"{name}.jsonl"), changed_registry())
    assert not report.deterministic
    assert report.diff["index"] == 0
    assert report.diff["expected"]["name"] == "double" and report.diff["got"]["name"] == "double"
    assert report.diff["expected"]["args_digest"] != report.diff["got"]["args_digest"]
    # The same step with other arguments: both sides' arguments, not only their digests.
    recorded = load_history(GOLDEN / f"{name}.jsonl")[1].args
    assert report.diff["expected"]["args"] == recorded == {"args": [21], "kwargs": {}}
    assert report.diff["got"]["args"] == {"args": [0], "kwargs": {}}
    text = report.describe()
    assert "NOT deterministic" in text and "expected (history)" in text
    assert "got (code):         activity 'double' args {\"args\": [0]" in text
    assert "ctx.now()/ctx.random()" in report.error
    with pytest.raises(NondeterminismError, match="step 0"):
        assert_replays(GOLDEN / f"{name}.jsonl", changed_registry())


@pytest.mark.parametrize("name", ["approval_approved", "approval_rejected"])
def test_the_same_change_behind_patched_replays_cleanly(name: str) -> None:
    report = assert_replays(GOLDEN / f"{name}.jsonl", patched_registry())
    assert report.deterministic and report.code_version == "3"


def test_removing_a_step_is_caught() -> None:
    reg = WorkflowRegistry()

    @reg.register(name="approval", version="1")
    async def approval(ctx: RunContext, inp: dict[str, Any]) -> Any:
        return 42  # the recorded first step is never issued

    report = replay_history(load_history(GOLDEN / "approval_approved.jsonl"), reg)
    assert not report.deterministic
    assert report.diff["got"] is None and report.diff["expected"]["name"] == "double"


# -- live: a running history meets changed code ------------------------------------------------
live_acts = ActivityRegistry()


@live_acts.register
async def inc(actx: ActivityContext, x: int) -> int:
    return x + 1


def evolving_registry(variant: str) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.register(name="evolving", version={"v1": "1", "broken": "2", "patched": "3"}[variant])
    async def evolving(ctx: RunContext, inp: dict[str, Any]) -> Any:
        if variant == "broken":
            await ctx.activity(inc, 100)
        if variant == "patched" and ctx.patched("pre-step"):
            await ctx.activity(inc, 100)
        a = await ctx.activity(inc, 1)
        sig = await ctx.wait_signal("go", timeout=120)
        b = await ctx.activity(inc, a + (sig.value or 0))
        return {"a": a, "b": b, "variant": variant}

    return reg


async def test_changed_code_under_a_running_history_blocks_the_run_visibly(bus: Bus) -> None:
    client = NerveClient(bus)
    worker = ActivityWorker(live_acts)
    await worker.start(bus)
    o1 = Orchestrator(bus, "o-v1", registry=evolving_registry("v1"), host_ttl=1)
    await o1.start()
    run_id = await client.submit("acme", workflow="evolving", input={})
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    await o1.stop()

    o2 = Orchestrator(bus, "o-broken", registry=evolving_registry("broken"), host_ttl=1)
    await o2.start()
    summary = await client.wait(run_id, timeout=20, statuses=("blocked",))
    assert summary.blocked["diff"]["index"] == 0
    blocked = [e for e in await client.history(run_id) if isinstance(e, RunBlocked)]
    assert len(blocked) == 1 and "ctx.patched" in blocked[0].reason
    report = await replay_run(bus, run_id, evolving_registry("broken"))
    assert not report.deterministic
    await o2.stop()

    # The fix ships behind ctx.patched: the blocked run resumes and completes.
    o3 = Orchestrator(bus, "o-patched", registry=evolving_registry("patched"), host_ttl=1)
    await o3.start()
    await client.wait(run_id, timeout=20, statuses=("waiting",))
    await client.signal(run_id, "go", 10)
    done = await client.wait(run_id, timeout=20)
    assert done.result == {"a": 2, "b": 13, "variant": "patched"}
    owners = [(e.owner, e.previous) for e in await client.history(run_id)
              if isinstance(e, OwnerChanged)]
    assert owners == [("o-broken", "o-v1"), ("o-patched", "o-broken")]  # who fenced out whom
    # A new run takes the new path: its first step is the patched one.
    new_id = await client.submit("acme", workflow="evolving", input={})
    await client.wait(new_id, timeout=20, statuses=("waiting",))
    history = await client.history(new_id)
    assert [(e.type, getattr(e, "kind", None)) for e in history[1:3]] == [
        ("marker", "patched"), ("step_scheduled", "activity")]
    await o3.stop()
    await worker.stop()


async def test_a_blocked_run_can_still_be_cancelled(bus: Bus) -> None:
    """Its code cannot run, but an operator can end it: a cancel sent while it is blocked,
    or one sent before (while no orchestrator owned it), is recorded and ends the run."""
    client = NerveClient(bus)
    worker = ActivityWorker(live_acts)
    await worker.start(bus)
    o1 = Orchestrator(bus, "o-v1", registry=evolving_registry("v1"), host_ttl=1)
    await o1.start()
    live, early = [await client.submit("acme", workflow="evolving", input={}) for _ in "ab"]
    for run_id in (live, early):
        await client.wait(run_id, timeout=20, statuses=("waiting",))
    await o1.stop()
    await client.cancel(early, "sent while nobody owned it", by="ops")
    o2 = Orchestrator(bus, "o-broken", registry=evolving_registry("broken"), host_ttl=1)
    await o2.start()
    try:
        summary = await client.wait(early, timeout=20)
        assert summary.status == "cancelled"
        await client.wait(live, timeout=20, statuses=("blocked",))
        await client.cancel(live, "this run is beyond repair", by="ops")
        summary = await client.wait(live, timeout=20)
        assert summary.status == "cancelled"
    finally:
        await o2.stop()
        await worker.stop()
    for run_id, reason in ((early, "sent while nobody owned it"),
                           (live, "this run is beyond repair")):
        events = await client.history(run_id)
        assert [e.type for e in events[-3:]] == ["run_blocked", "cancel_requested",
                                                 "run_cancelled"]
        assert events[-1].by == "ops" and events[-1].reason.startswith(reason)
        assert "while blocked" in events[-1].reason
        assert (await client.summary(run_id)).blocked is None  # ended: no longer blocked


async def test_the_cli_says_when_a_run_it_waits_for_blocks_and_goes_on_waiting(
        bus: Bus, nats_server: EmbeddedNats, prefix: str) -> None:
    """`nerve run --wait/--follow` on a run that blocks: told why and how it resumes, and
    still there to report the end once fixed code takes the run over."""
    worker = ActivityWorker(live_acts)
    await worker.start(bus)
    o1 = Orchestrator(bus, "o-v1", registry=evolving_registry("v1"), host_ttl=1)
    await o1.start()
    target = ["--nats-url", nats_server.url, "--prefix", prefix]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "run", "x", "--workflow", "evolving", "--input", "{}",
        "--tenant", "acme", *mode, *target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for mode in (("--wait", "--json"), ("--follow",))]
    client = NerveClient(bus)
    try:
        run_ids: list[str] = []
        while len(run_ids) < 2:  # both submitted and waiting for the signal
            await asyncio.sleep(0.2)
            run_ids = [r for r in await _run_ids(bus) if (await client.summary(r)).status
                       == "waiting"]
        await o1.stop()
        o2 = Orchestrator(bus, "o-broken", registry=evolving_registry("broken"), host_ttl=1)
        await o2.start()
        for run_id in run_ids:
            await client.wait(run_id, timeout=20, statuses=("blocked",))
        await asyncio.sleep(1.0)  # time for the CLIs to see it (and, before the fix, to quit)
        assert all(p.returncode is None for p in procs), "a CLI stopped at the block"
        await o2.stop()
        o3 = Orchestrator(bus, "o-patched", registry=evolving_registry("patched"), host_ttl=1)
        await o3.start()
        for run_id in run_ids:
            await client.wait(run_id, timeout=20, statuses=("waiting",))
            await client.signal(run_id, "go", 10)
        outputs = [[b.decode() for b in await asyncio.wait_for(p.communicate(), 30)]
                   for p in procs]
        await o3.stop()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
        await worker.stop()
    (wait_out, wait_err), (follow_out, _) = outputs
    assert [p.returncode for p in procs] == [0, 0]
    assert json.loads(wait_out)["result"] == {"a": 2, "b": 13, "variant": "patched"}
    assert "is blocked: run" in wait_err and "ctx.patched" in wait_err
    assert "Still waiting" in wait_err and "nerve replay" in wait_err
    assert wait_err.startswith("run r") and " started; waiting for its end" in wait_err
    # --follow shows the block in the stream, then the resumed run to its end.
    blocked_at = follow_out.index("[blocked]")
    assert "Still following" in follow_out
    assert '"status": "completed"' in follow_out[blocked_at:]
    assert follow_out.startswith("run r")  # the run id first, before anything can go wrong
    last = follow_out.strip().splitlines()[-1]
    assert " completed: " in last and json.loads(last.split(": ", 1)[1])["variant"] == "patched"


async def _run_ids(bus: Bus) -> list[str]:
    info = await bus.js.stream_info(bus.names.runs_stream,
                                    subjects_filter=bus.names.history("*"))
    return [s.split(".")[-2] for s in (info.state.subjects or {})]


# -- a bug in workflow code blocks the run; fixed code resumes it --------------------------------
bug_acts = ActivityRegistry()
BUG_CALLS: dict[str, int] = {}


@bug_acts.register(name="inc")
async def counted_inc(actx: ActivityContext, x: int) -> int:
    BUG_CALLS[actx.key] = BUG_CALLS.get(actx.key, 0) + 1
    return x + 1


def buggy_registry(variant: str) -> WorkflowRegistry:
    """``variant``: "bug" (a KeyError after the first step), "fixed", "fail_on" (the same
    bug, declared a failure), "chosen" (a WorkflowError raised on purpose)."""
    reg = WorkflowRegistry()

    @reg.register(name="buggy", fail_on=(KeyError,) if variant == "fail_on" else ())
    async def buggy(ctx: RunContext, inp: dict[str, Any]) -> Any:
        a = await ctx.activity(counted_inc, 1)
        if variant == "chosen":
            raise WorkflowError("nothing to do for this input")
        extra = inp.get("extra", 0) if variant == "fixed" else inp["extra"]
        return await ctx.activity(counted_inc, a + extra)

    return reg


async def test_an_exception_in_workflow_code_blocks_the_run_and_fixed_code_resumes_it(
        bus: Bus) -> None:
    client = NerveClient(bus)
    worker = ActivityWorker(bug_acts)
    await worker.start(bus)
    o1 = Orchestrator(bus, "o-bug", registry=buggy_registry("bug"), host_ttl=1)
    await o1.start()
    try:
        run_id = await client.submit("acme", workflow="buggy", input={})
        summary = await client.wait(run_id, timeout=20, statuses=("blocked",))
        # Waiting for its end says where it is when the wait gives up.
        with pytest.raises(WorkflowError, match=r"within 0\.5s: it is blocked: workflow buggy "
                                                r"raised KeyError"):
            await client.wait(run_id, timeout=0.5)
        raised = summary.blocked["diff"]["error"]
        assert raised["type"] == "KeyError" and "test_determinism.py" in raised["where"]
        assert "inp[\"extra\"]" in raised["traceback"]
        reason = summary.blocked["reason"]
        assert "raised KeyError: 'extra'" in reason and "fail_on" in reason
        # nerve replay says the same about the unfixed code, and that it is not a divergence.
        report = await replay_run(bus, run_id, buggy_registry("bug"))
        assert not report.deterministic and "the workflow code raised" in report.describe()
        assert (await replay_run(bus, run_id, buggy_registry("fixed"))).deterministic
        await o1.stop()
        # Restarting unfixed code (twice) blocks it again, without another RunBlocked.
        for n in (2, 3):
            o2 = Orchestrator(bus, f"o-bug-{n}", registry=buggy_registry("bug"), host_ttl=1)
            await o2.start()
            await _until(lambda n=n: _owned_by(client, run_id, f"o-bug-{n}"))
            await o2.stop()
        o3 = Orchestrator(bus, "o-fixed", registry=buggy_registry("fixed"), host_ttl=1)
        await o3.start()
        done = await client.wait(run_id, timeout=20)
        await o3.stop()
    finally:
        await worker.stop()
    assert done.status == "completed" and done.result == 3
    types = [e.type for e in await client.history(run_id)]
    assert types.count("run_blocked") == 1 and "run_resumed" in types
    assert "run_failed" not in types
    # The step before the bug ran once: replay took its result from the history.
    assert BUG_CALLS[f"{run_id}:0"] == 1 and BUG_CALLS[f"{run_id}:1"] == 1


async def test_failures_the_code_chooses_still_fail_the_run(bus: Bus) -> None:
    client = NerveClient(bus)
    worker = ActivityWorker(bug_acts)
    await worker.start(bus)
    try:
        for variant, error_type in (("fail_on", "KeyError"), ("chosen", "WorkflowError")):
            orch = Orchestrator(bus, f"o-{variant}", registry=buggy_registry(variant),
                                host_ttl=1)
            await orch.start()
            try:
                run_id = await client.submit("acme", workflow="buggy", input={})
                summary = await client.wait(run_id, timeout=20)
            finally:
                await orch.stop()
            assert summary.status == "failed" and summary.error["type"] == error_type
            # A history that recorded the failure replays as it is, whatever fail_on says now.
            events = await client.history(run_id)
            report = replay_history(events, buggy_registry("bug"))
            assert report.deterministic and report.state == "failed"
    finally:
        await worker.stop()


def test_fail_on_takes_exception_classes() -> None:
    with pytest.raises(ConfigError, match="fail_on takes exception classes"):
        WorkflowRegistry().register(name="x", fail_on=("KeyError",))  # type: ignore[arg-type]


async def _owned_by(client: NerveClient, run_id: str, owner: str) -> bool:
    return any(isinstance(e, OwnerChanged) and e.owner == owner
               for e in await client.history(run_id))


async def _until(check: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


def lifecycle_registry(stage: str) -> WorkflowRegistry:
    """One patch's life: "guarded" (old and new paths), "kept" (old path deleted, the call
    kept), "removed" (the call deleted too)."""
    reg = WorkflowRegistry()

    @reg.register(name="lifecycle")
    async def lifecycle(ctx: RunContext, inp: dict[str, Any]) -> Any:
        if stage == "guarded":
            new = ctx.patched("double-first")
        elif stage == "kept":
            ctx.patched("double-first")
            new = True
        else:
            new = True
        first = await ctx.activity(inc, 2 if new else 1)
        return await ctx.activity(inc, first)

    return reg


async def test_a_patch_is_retired_by_keeping_its_call_until_no_run_recorded_it(
        bus: Bus) -> None:
    client = NerveClient(bus)
    worker = ActivityWorker(live_acts)
    await worker.start(bus)
    orch = Orchestrator(bus, "o-lifecycle", registry=lifecycle_registry("guarded"))
    await orch.start()
    try:
        run_id = await client.submit("acme", workflow="lifecycle", input={})
        assert (await client.wait(run_id, timeout=20)).result == 4
    finally:
        await orch.stop()
        await worker.stop()
    history = await client.history(run_id)
    # The old path deleted, the call kept: histories with the marker replay.
    assert replay_history(history, lifecycle_registry("kept")).deterministic
    # The call deleted while such histories may still replay: caught, with the marker named.
    report = replay_history(history, lifecycle_registry("removed"))
    assert not report.deterministic
    assert report.diff["expected"]["name"] == "patched:double-first"
