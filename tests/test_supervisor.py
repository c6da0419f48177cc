"""Supervision trees (OTP semantics), OS-process children, the embedded server as a child."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from pathlib import Path

import pytest

from actors import unpack
from bus import ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision
from nerve import ConfigError, EscalationError
from persistence import RunHistory, RunStarted, StepScheduled
from supervisor import (
    ChildSpec,
    OsProcess,
    Restart,
    Strategy,
    Supervisor,
    SupervisorEvent,
    bus_event_sink,
)


class Crew:
    """Children that count their starts and crash (or exit) when told to."""

    def __init__(self) -> None:
        self.starts: collections.Counter[str] = collections.Counter()
        self.triggers: dict[str, asyncio.Future[str]] = {}

    def spec(self, cid: str, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        async def child() -> None:
            self.starts[cid] += 1
            fut = asyncio.get_running_loop().create_future()
            self.triggers[cid] = fut
            if await fut == "crash":
                raise RuntimeError(f"{cid} crashed")

        return ChildSpec(cid, child, restart=restart, shutdown=1.0)

    async def until_started(self, cid: str, n: int) -> None:
        async with asyncio.timeout(5):
            while self.starts[cid] < n or cid not in self.triggers or self.triggers[cid].done():
                await asyncio.sleep(0.005)

    def crash(self, cid: str) -> None:
        self.triggers[cid].set_result("crash")

    def exit(self, cid: str) -> None:
        self.triggers[cid].set_result("exit")


async def supervise(sup: Supervisor) -> asyncio.Task[None]:
    task = asyncio.create_task(sup.run())
    await asyncio.sleep(0.01)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("strategy", "expected"), [
    (Strategy.ONE_FOR_ONE, {"a": 1, "b": 2, "c": 1}),
    (Strategy.ONE_FOR_ALL, {"a": 2, "b": 2, "c": 2}),
    (Strategy.REST_FOR_ONE, {"a": 1, "b": 2, "c": 2}),
])
async def test_each_strategy_restarts_the_right_children(strategy: Strategy,
                                                         expected: dict[str, int]) -> None:
    crew = Crew()
    events: list[SupervisorEvent] = []
    sup = Supervisor("s", [crew.spec("a"), crew.spec("b"), crew.spec("c")],
                     strategy=strategy, on_event=[events.append])
    task = await supervise(sup)
    for cid in "abc":
        await crew.until_started(cid, 1)
    crew.crash("b")
    await crew.until_started("b", 2)
    await asyncio.sleep(0.05)
    assert dict(crew.starts) == expected
    kinds = [(e.child, e.kind) for e in events]
    assert ("b", "crashed") in kinds and ("b", "restarting") in kinds
    await stop(task)


async def test_restart_types() -> None:
    crew = Crew()
    sup = Supervisor("s", [crew.spec("perm"), crew.spec("trans", Restart.TRANSIENT),
                           crew.spec("temp", Restart.TEMPORARY)], intensity=10)
    task = await supervise(sup)
    for cid in ("perm", "trans", "temp"):
        await crew.until_started(cid, 1)
    crew.exit("perm")  # permanent: back even after a normal exit
    await crew.until_started("perm", 2)
    crew.exit("trans")  # transient, normal exit: stays down
    crew.crash("temp")  # temporary: never back
    await asyncio.sleep(0.1)
    assert crew.starts["trans"] == 1 and crew.starts["temp"] == 1
    assert sup.running() == ["perm"]
    await stop(task)

    crew2 = Crew()
    sup2 = Supervisor("s2", [crew2.spec("trans", Restart.TRANSIENT)])
    task2 = await supervise(sup2)
    await crew2.until_started("trans", 1)
    crew2.crash("trans")  # transient, crashed: back
    await crew2.until_started("trans", 2)
    await stop(task2)


async def test_exceeding_intensity_escalates_to_the_parent() -> None:
    crew = Crew()
    events: list[SupervisorEvent] = []
    child_sup = Supervisor("inner", [crew.spec("w")], intensity=2, period=10,
                           on_event=[events.append])
    parent_events: list[SupervisorEvent] = []
    parent = Supervisor("outer", [child_sup.child_spec()], intensity=5, period=10,
                        on_event=[parent_events.append])
    task = await supervise(parent)
    for n in range(1, 4):  # 3 crashes > intensity 2
        await crew.until_started("w", n)
        crew.crash("w")
    # The inner supervisor escalates, the outer one restarts it, which starts w afresh.
    await crew.until_started("w", 4)
    assert any(e.kind == "escalated" for e in events)
    crashed = [e for e in parent_events if e.kind == "crashed"]
    assert crashed and crashed[0].child == "inner" and "EscalationError" in crashed[0].reason
    await stop(task)


async def test_escalation_from_the_root_raises() -> None:
    crew = Crew()
    sup = Supervisor("root", [crew.spec("w")], intensity=1, period=10)
    task = asyncio.create_task(sup.run())
    await crew.until_started("w", 1)
    crew.crash("w")
    await crew.until_started("w", 2)
    crew.crash("w")
    with pytest.raises(EscalationError, match="root gave up"):
        await asyncio.wait_for(task, 5)


async def test_a_misconfigured_child_is_not_restarted_and_its_error_reaches_the_top() -> None:
    crew = Crew()
    starts = 0

    async def misconfigured() -> None:
        nonlocal starts
        starts += 1
        raise ConfigError("w setting x='abc' must be a number")

    events: list[SupervisorEvent] = []
    inner = Supervisor("inner", [crew.spec("sibling"), ChildSpec("w", misconfigured)],
                       intensity=10, period=10, on_event=[events.append])
    root = Supervisor("root", [inner.child_spec()], intensity=10, period=10)
    task = asyncio.create_task(root.run())
    # Restarting could not help: neither supervisor tries, and the message is the child's.
    with pytest.raises(ConfigError, match="x='abc' must be a number"):
        await asyncio.wait_for(task, 5)
    assert starts == 1 and crew.starts["sibling"] == 1
    assert [e.kind for e in events if e.child == "w"] == ["started", "crashed", "escalated"]
    assert inner.running() == [] and root.running() == []


async def test_os_process_killed_with_sigkill_is_restarted(tmp_path: Path) -> None:
    proc = OsProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                     term_timeout=2)
    events: list[SupervisorEvent] = []
    sup = Supervisor("procs", [ChildSpec("sleeper", proc.run, shutdown=5)],
                     on_event=[events.append])
    task = await supervise(sup)
    async with asyncio.timeout(10):
        while proc.pid is None:
            await asyncio.sleep(0.01)
        first = proc.pid
        os.kill(first, signal.SIGKILL)
        while proc.pid is None or proc.pid == first:
            await asyncio.sleep(0.01)
    assert any(e.kind == "crashed" and "signal 9" in e.reason for e in events)
    second = proc.pid
    await stop(task)
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)  # stopped with the tree, not left behind


# A child that needs a moment to stop cleanly on SIGTERM (as a sandbox host removing its
# sandboxes does), and one that ignores SIGTERM altogether.
_SLOW_STOP = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(1.5)
    pathlib.Path(sys.argv[1], "clean").touch()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1], "ready").touch()
time.sleep(60)
"""
_DEAF = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1], "ready").touch()
time.sleep(60)
"""


@pytest.mark.parametrize(("script", "clean"), [(_SLOW_STOP, True), (_DEAF, False)])
async def test_a_stopping_os_process_gets_its_term_timeout_however_often_it_is_cancelled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, script: str, clean: bool) -> None:
    """The supervisor cancels a child it stops again every 0.2 s; the process still gets its
    whole term_timeout to exit after SIGTERM, and only one that ignores it is killed."""
    proc = OsProcess("stopper", [sys.executable, "-c", script, str(tmp_path)], term_timeout=4)
    sup = Supervisor("procs", [ChildSpec("stopper", proc.run, shutdown=10)])
    task = await supervise(sup)
    async with asyncio.timeout(20):
        while not (tmp_path / "ready").exists():
            await asyncio.sleep(0.01)
    pid = proc.pid
    assert pid is not None
    await stop(task)
    assert (tmp_path / "clean").exists() is clean
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert ("ignored SIGTERM" in caplog.text) is not clean, caplog.text


async def test_killed_nats_server_is_restarted_with_every_acked_event(tmp_path: Path) -> None:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "nats"))
    await server.start()
    b = await connect(ConnectOptions(servers=[server.url], prefix="sk"))
    await provision(b)
    # The tree reports on the very bus whose server it restarts: the report of the crash
    # must neither hold the restart up nor be lost.
    sup = Supervisor("bus", [ChildSpec("nats-server", server.run, shutdown=10)],
                     intensity=3, period=30, on_event=[bus_event_sink(b, timeout=30)])
    task = await supervise(sup)
    history = RunHistory(b, "run1")
    await history.create(RunStarted(run_id="run1", tenant="t", workflow="w", version="1"))
    for i in range(200):
        await history.append(StepScheduled(index=i, kind="activity", name="f", args_digest="d"))
    first_pid = server.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    async with asyncio.timeout(15):
        while server.pid in (None, first_pid) or server.state.value != "running":
            await asyncio.sleep(0.02)
        await b.nc.flush(timeout=10)
    events = await RunHistory(b, "run1").read()
    assert len(events) == 201
    assert [e.index for e in events[1:]] == list(range(200))
    reports = await b.js.subscribe(b.names.event("supervisor"), ordered_consumer=True)
    seen: list[str] = []

    def restarted() -> bool:
        return "crashed" in seen and "started" in seen[seen.index("crashed"):]

    async with asyncio.timeout(20):
        while not restarted():
            seen.append(unpack((await reports.next_msg(timeout=20)).data)["kind"])
    assert seen[0] == "started" and seen.index("crashed") < seen.index("restarting")
    await stop(task)
    await b.close()


async def test_events_are_published_on_the_bus(bus) -> None:
    crew = Crew()
    sub = await bus.js.subscribe(bus.names.event("supervisor"))
    sup = Supervisor("pub", [crew.spec("x")], on_event=[bus_event_sink(bus)])
    task = await supervise(sup)
    await crew.until_started("x", 1)
    crew.crash("x")
    await crew.until_started("x", 2)
    seen = []
    async with asyncio.timeout(5):
        while ("x", "restarting") not in seen:
            msg = await sub.next_msg(timeout=5)
            data = unpack(msg.data)
            seen.append((data["child"], data["kind"]))
    await stop(task)
