"""Forking runs at a history index."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from bus import Bus, EmbeddedNats
from persistence import RunStarted, StepCompleted
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
KEYS: collections.Counter[str] = collections.Counter()


@acts.register
async def square(actx: ActivityContext, n: int) -> int:
    KEYS[actx.key] += 1
    return n * n


@registry.register(name="squares")
async def squares(ctx: RunContext, inp: dict[str, Any]) -> list[int]:
    out = []
    for i in range(inp["n"]):
        out.append(await ctx.activity(square, i))
    choice = await ctx.wait_signal("pick", timeout=60, default="none")
    return [*out, choice.value]


@pytest.fixture
async def client(bus: Bus) -> AsyncIterator[NerveClient]:
    orch = Orchestrator(bus, "fork-o", registry=registry)
    worker = ActivityWorker(acts)
    await orch.start()
    await worker.start(bus)
    yield NerveClient(bus)
    await worker.stop()
    await orch.stop()


async def test_a_fork_replays_the_prefix_and_diverges(client: NerveClient) -> None:
    parent = await client.submit("acme", workflow="squares", input={"n": 4})
    await client.wait(parent, timeout=20, statuses=("waiting",))
    await client.signal(parent, "pick", "parent-choice")
    assert (await client.wait(parent, timeout=20)).result == [0, 1, 4, 9, "parent-choice"]
    events = await client.history(parent)
    # Fork just after step 1 completed: steps 2 and 3 must run again, in the fork.
    cut = next(i for i, e in enumerate(events) if isinstance(e, StepCompleted) and e.index == 1)
    fork = await client.fork(parent, at=cut + 1, tenant="acme")
    await client.wait(fork, timeout=20, statuses=("waiting",))
    await client.signal(fork, "pick", "fork-choice")
    assert (await client.wait(fork, timeout=20)).result == [0, 1, 4, 9, "fork-choice"]
    fork_events = await client.history(fork)
    started = fork_events[0]
    assert isinstance(started, RunStarted) and started.parent_run_id == parent
    assert started.forked_from["index"] == cut + 1
    # The prefix is the parent's, event for event (after RunStarted).
    assert [e.model_dump() for e in fork_events[1:cut + 1]] == \
        [e.model_dump() for e in events[1:cut + 1]]
    # Steps 0-1 ran once (in the parent); 2-3 ran in both, under each run's own key.
    assert KEYS[f"{parent}:0"] == 1 and f"{fork}:0" not in KEYS
    assert KEYS[f"{fork}:2"] == 1 and KEYS[f"{parent}:2"] == 1
    # The parent is untouched.
    assert await client.history(parent) == events


async def test_fork_requests_that_cannot_work_are_rejected(client: NerveClient, bus: Bus,
                                                           nats_server: EmbeddedNats) -> None:
    parent = await client.submit("acme", workflow="squares", input={"n": 1})
    await client.wait(parent, timeout=20, statuses=("waiting",))
    nc = await nats.connect(nats_server.url)
    notices: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def cb(msg: Any) -> None:
        await notices.put(json.loads(msg.data))

    await nc.subscribe(bus.names.tasks_rejected, cb=cb)
    other = json.dumps({"fork": {"run_id": parent, "at": 2}}).encode()
    await nc.publish(bus.names.tasks("intruder"), other)  # another tenant's run
    assert "no such run" in (await asyncio.wait_for(notices.get(), 10))["reason"]
    await nc.publish(bus.names.tasks("acme"),
                     json.dumps({"fork": {"run_id": parent, "at": 999}}).encode())
    assert "fork at 1.." in (await asyncio.wait_for(notices.get(), 10))["reason"]
    await nc.publish(bus.names.tasks("acme"),
                     json.dumps({"fork": {"run_id": "nope", "at": 1}}).encode())
    assert "no such run" in (await asyncio.wait_for(notices.get(), 10))["reason"]
    await nc.close()
