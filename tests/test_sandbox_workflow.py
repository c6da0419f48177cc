"""The full run: an agent-style workflow writing files over several sandbox steps, with its
sandbox host SIGKILLed mid-step, repeatedly; then a fork of the run from a snapshot.

The run must complete with the workspace an undisturbed run leaves (each step's line
exactly once), and its history must record the loss and the restore.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors import unpack
from bus import Bus
from persistence import SandboxLost, SandboxRestored, StepCompleted, StreamEvent
from sandbox_actor import Assignments, Placement
from tests._sandbox import needs_ns, state_dir
from tests.test_sandbox_chaos import HostProcess
from workflow import NerveClient, Orchestrator, RunContext, WorkflowRegistry

pytestmark = [needs_ns, pytest.mark.timeout(240)]

registry = WorkflowRegistry()
STEPS = 5
EXPECTED = "".join(f"step{i}\n" for i in range(STEPS))


@registry.register(name="writer")
async def writer(ctx: RunContext, inp: dict[str, Any]) -> str:
    for i in range(inp["steps"]):
        await ctx.sandbox.exec(f"echo step{i} >> log; echo started{i}; sleep 0.6")
    return (await ctx.sandbox.read_file("log"))["content"]


@pytest.fixture
async def hosts(nats_server, prefix: str) -> AsyncIterator[dict[str, HostProcess]]:
    made = {h: HostProcess(h, nats_server.url, prefix, state_dir()) for h in ("wA", "wB", "wC")}
    await asyncio.gather(*(h.start() for h in made.values()))
    yield made
    for h in made.values():
        await h.stop()
        shutil.rmtree(h.state, ignore_errors=True)


async def test_run_survives_host_sigkills_mid_step_and_forks(
        bus: Bus, hosts: dict[str, HostProcess]) -> None:
    orch = Orchestrator(bus, "sbx-o", registry=registry)
    placement = Placement(bus, reconcile_every=0.5)
    await orch.start()
    await placement.start()
    client = NerveClient(bus)
    started: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(STEPS)}
    run_id = None

    async def on_stream(msg) -> None:
        event = StreamEvent.model_validate(unpack(msg.data))
        text = event.data.get("text", "") if event.type == "progress" else ""
        for i in range(STEPS):
            if f"started{i}" in text:
                started[i].set()

    sub = await bus.nc.subscribe(bus.names.stream("*"), cb=on_stream)
    try:
        run_id = await client.submit("acme", workflow="writer", input={"steps": STEPS})
        killed = []
        for step in (1, 3):  # two different points, each on whichever host owns it then
            async with asyncio.timeout(60):
                await started[step].wait()
            owner = (await Assignments(bus).get(run_id))[0].host  # type: ignore[index]
            hosts[owner].kill()
            killed.append(owner)
        final = await client.wait(run_id, timeout=120)
        assert final.result == EXPECTED  # each step's line exactly once, in order
        assert len(set(killed)) == 2
        events = await client.history(run_id)
        lost = [e for e in events if isinstance(e, SandboxLost)]
        restored = [e for e in events if isinstance(e, SandboxRestored)]
        assert [e.host for e in lost] == killed
        assert len(restored) == 2 and all(e.from_snapshot for e in restored)
        assert [e.step_index for e in restored] == sorted(e.step_index for e in restored)

        # Fork the finished run just after its second sandbox step: the fork's sandbox
        # starts from that step's snapshot and runs the rest itself.
        cut = [i for i, e in enumerate(events)
               if isinstance(e, StepCompleted) and e.kind == "sandbox"][1]
        fork = await client.fork(run_id, at=cut + 1, tenant="acme")
        forked = await client.wait(fork, timeout=120)
        assert forked.result == EXPECTED
    finally:
        await sub.unsubscribe()
        await placement.stop()
        await orch.stop()
