"""A sandbox lives as long as its run: destroyed when the run ends, never restored after.

* Runs past a host's capacity all finish: each ended run's sandbox is destroyed (its slot
  freed at once by the orchestrator's run-end notice), the runs that waited for room get
  it, and a fork of an ended run still starts from its snapshot.
* A sandbox whose run ended without a notice (the orchestrator died right after the end)
  is found by the host's sweep; one on a host that restarts is not restored; one on a
  dead host is not moved.
* A bring-up that fails (a work stream a restarted server lost, a server not answering)
  is retried, not left as a task exception nobody retrieves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from actors import unpack
from bus import Bus
from persistence import RunCompleted, RunHistory, RunStarted, StepCompleted, StreamEvent
from sandbox_actor import NsBackend, SandboxWorker, WorkspaceStore
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._placement import Placement
from sandbox_actor._records import Assignments, SandboxAssignment
from tests._sandbox import backend_config, needs_ns
from tests.test_sandbox_host import Inbox, publish_step
from workflow import NerveClient, Orchestrator, RunContext, WorkflowRegistry

pytestmark = [needs_ns, pytest.mark.timeout(150)]

registry = WorkflowRegistry()


@registry.register(name="boxed")
async def boxed(ctx: RunContext, inp: dict[str, Any]) -> str:
    await ctx.sandbox.exec(f"echo {inp['n']} > mine; sleep {inp.get('hold', 0)}")
    return (await ctx.sandbox.exec("cat mine"))["stdout"]


async def _host(bus: Bus, host_id: str, *, capacity: int = 32, sweep_every: float = 60.0,
                state=None) -> SandboxHost:
    backend = NsBackend(backend_config(state, host_id=host_id))
    host = SandboxHost(bus, backend, HostConfig(host_id=host_id, capacity=capacity,
                                                lease_ttl=2.0, sweep_every=sweep_every))
    await host.start()
    return host


async def _stop(host: SandboxHost, *, keep_state: bool = False) -> None:
    await host.stop()
    if not keep_state:
        shutil.rmtree(host.backend.config.state_dir, ignore_errors=True)


async def _eventually(check, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


async def _state(bus: Bus, sid: str) -> str | None:
    found = await Assignments(bus).get(sid)
    return found[0].state if found else None


async def _durables(bus: Bus) -> set[str]:
    names = bus.names
    return {c.name for c in await bus.js.consumers_info(names.work_stream)
            if c.name.startswith("sandbox_")}


async def test_runs_past_capacity_all_finish_and_each_ended_sandbox_is_destroyed(
        bus: Bus, placement: Placement) -> None:
    # The sweep is out of the picture (60 s): only the run-end notice can free a slot here.
    host = await _host(bus, "cap2", capacity=2, sweep_every=60.0)
    orch = Orchestrator(bus, "cap-o", registry=registry)
    await orch.start()
    client = NerveClient(bus)
    waiting: list[StreamEvent] = []

    async def on_stream(msg) -> None:
        event = StreamEvent.model_validate(unpack(msg.data))
        if event.type == "progress" and "waiting" in event.data:
            waiting.append(event)

    sub = await bus.nc.subscribe(bus.names.stream("*"), cb=on_stream)
    try:
        runs = [await client.submit("acme", workflow="boxed", input={"n": n, "hold": 1},
                                    run_id=f"cap-{n}") for n in range(5)]
        async with asyncio.timeout(45):
            finals = await asyncio.gather(*(client.wait(r, timeout=45) for r in runs))
        assert [f.status for f in finals] == ["completed"] * 5
        assert [f.result for f in finals] == [f"{n}\n" for n in range(5)]
        # Three runs found the host full: each was told why it waits, on its live stream.
        told = {e.run_id for e in waiting}
        assert len(told) >= 3, waiting
        assert all("capacity" in e.data["waiting"] and "cap2 2/2" in e.data["waiting"]
                   for e in waiting), [e.data for e in waiting]

        async def all_destroyed() -> bool:
            states = [await _state(bus, r) for r in runs]
            return states == ["destroyed"] * 5 and not host.sandbox_ids
        await _eventually(all_destroyed, 15, "every ended run's sandbox destroyed")
        assert host.lease.data["running"] == 0
        assert not any((host.backend.config.sandboxes_dir).iterdir())
        assert not await _durables(bus)  # no consumer left behind per sandbox
        # The snapshots stay: a fork of an ended run starts from its parent's workspace
        # (the fork runs only `cat mine`; the file comes from the parent's snapshot).
        assert await WorkspaceStore(bus).list(runs[0])
        events = await client.history(runs[0])
        cut = next(i for i, e in enumerate(events)
                   if isinstance(e, StepCompleted) and e.kind == "sandbox")
        fork = await client.fork(runs[0], at=cut + 1, tenant="acme")
        forked = await client.wait(fork, timeout=60)
        assert forked.status == "completed" and forked.result == "0\n"
        await _eventually(lambda: _is_destroyed(bus, fork), 15, "the fork's sandbox destroyed")
    finally:
        await sub.unsubscribe()
        await orch.stop()
        await _stop(host)


async def _is_destroyed(bus: Bus, sid: str) -> bool:
    return await _state(bus, sid) == "destroyed"


async def _start_run(bus: Bus, run_id: str) -> RunHistory:
    history = RunHistory(bus, run_id)
    await history.create(RunStarted(run_id=run_id, tenant="acme", workflow="by-hand",
                                    version="1"))
    return history


async def test_sweep_destroys_the_sandbox_of_a_run_that_ended_without_a_notice(
        bus: Bus, placement: Placement) -> None:
    host = await _host(bus, "sw1", capacity=1, sweep_every=0.5)
    try:
        # A run with a history, its sandbox running a step; then the run's end is appended
        # (as an orchestrator that dies right after it would leave it): no notice is sent.
        history = await _start_run(bus, "ended-quietly")
        inbox = Inbox(bus, "ended-quietly")
        await inbox.start()
        await publish_step(bus, "ended-quietly", 1, "exec", {"cmd": "echo hi > f"})
        assert (await inbox.wait_result(1)).ok
        assert host.sandbox_ids == ["ended-quietly"]
        await history.append(RunCompleted(result="done"))
        await _eventually(lambda: _is_destroyed(bus, "ended-quietly"), 10,
                          "the sweep destroys the ended run's sandbox")
        assert host.sandbox_ids == [] and host.lease.data["running"] == 0
        # The room it held is free: the next run gets this one-slot host.
        other = Inbox(bus, "next-run")
        await other.start()
        await publish_step(bus, "next-run", 1, "exec", {"cmd": "echo room"})
        assert (await other.wait_result(1, timeout=15)).result["stdout"] == "room\n"
        for box in (inbox, other):
            await box.stop()
    finally:
        await _stop(host)


async def test_a_restarted_host_does_not_restore_sandboxes_of_ended_runs(bus: Bus) -> None:
    host = await _host(bus, "rs1", sweep_every=60.0)
    state = host.backend.config.state_dir
    placement = Placement(bus, reconcile_every=0.5)
    await placement.start()
    histories = {r: await _start_run(bus, r) for r in ("live-run", "dead-run")}
    boxes = {r: Inbox(bus, r) for r in histories}
    try:
        for run_id, box in boxes.items():
            await box.start()
            await publish_step(bus, run_id, 1, "exec", {"cmd": f"echo {run_id} > f"})
            assert (await box.wait_result(1)).ok
        # The host goes away (its records still say it runs both), one run ends meanwhile,
        # and the host comes back under the same id, as `nerve up` restarts it.
        await placement.stop()
        await _stop(host, keep_state=True)
        await histories["dead-run"].append(RunCompleted(result="done"))
        host = await _host(bus, "rs1", state=state, sweep_every=60.0)

        async def settled() -> bool:
            return (await _is_destroyed(bus, "dead-run")
                    and host.sandbox_ids == ["live-run"])
        await _eventually(settled, 15, "only the live run's sandbox restored")
        await publish_step(bus, "live-run", 2, "exec", {"cmd": "cat f"})
        assert (await boxes["live-run"].wait_result(2)).result["stdout"] == "live-run\n"
        # A host that dies for good: placement moves a live run's sandbox elsewhere, but
        # not the sandbox of a run that ended while it was down.
        before = (await Assignments(bus).get("live-run"))[0]  # type: ignore[index]
        await histories["live-run"].append(RunCompleted(result="done"))
        placement = Placement(bus, reconcile_every=0.5)
        other = await _host(bus, "rs2", sweep_every=60.0)
        try:
            await _stop(host)
            await placement.start()
            await _eventually(lambda: _is_destroyed(bus, "live-run"), 15,
                              "placement retires the ended run's sandbox of a dead host")
            after = (await Assignments(bus).get("live-run"))[0]  # type: ignore[index]
            assert (after.host, after.generation) == (before.host, before.generation)
            assert other.sandbox_ids == [] and placement.placed == 0
        finally:
            await _stop(other)
    finally:
        await placement.stop()
        for box in boxes.values():
            await box.stop()
        if host.state.value != "stopped":
            await _stop(host)


async def test_a_failed_bring_up_is_retried(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    host = await _host(bus, "bu1")
    failures: list[BaseException] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: failures.append(ctx.get("exception")))
    try:
        # The server lost the (in-memory) work stream, as a SIGKILLed and restarted
        # nats-server does; the first start of the sandbox's worker also fails outright.
        await bus.js.delete_stream(bus.names.work_stream)
        real_start = SandboxWorker.start
        calls = []

        async def flaky_start(self, b) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise NotFoundError()
            await real_start(self, b)

        monkeypatch.setattr(SandboxWorker, "start", flaky_start)
        record = SandboxAssignment(sandbox_id="bu-run", run_id="bu-run", tenant="acme",
                                   inbox=bus.names.inbox("bu-run"), host="bu1",
                                   generation=1, state="assigned")
        assert await Assignments(bus).put(record, None)
        inbox = Inbox(bus, "bu-run")
        await inbox.start()

        async def serving() -> bool:
            slot = host._slots.get("bu-run")
            return slot is not None and slot.worker is not None
        await _eventually(serving, 15, "the sandbox brought up after a failed first try")
        assert len(calls) >= 2
        await publish_step(bus, "bu-run", 1, "exec", {"cmd": "echo back"})
        assert (await inbox.wait_result(1)).result["stdout"] == "back\n"
        assert not host._starting
        await inbox.stop()
        gc.collect()  # an exception nobody retrieved is reported when its task is freed
        assert not failures, failures
    finally:
        loop.set_exception_handler(previous)
        with contextlib.suppress(Exception):
            await _stop(host)
