"""The built-in agent loop, end to end: the real gateway (scripted model), real sandboxes.

Model -> tool calls -> results -> model until it stops; caps; the repeat stop; tool errors
as values; approvals bound to the exact tool call, including a denial and a late one.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors import decode
from bus import Bus
from gateway_actor import GatewayActor, GatewayConfig
from nerve import TaskRejected
from persistence import SignalReceived, SignalRejected, StepCompleted, StreamEvent
from sandbox_actor import HostConfig, NsBackend, Placement, SandboxHost
from tests._sandbox import backend_config, needs_ns
from workflow import NerveClient, Orchestrator, call_digest
from workflow._agent import ToolUseBlock

pytestmark = [needs_ns, pytest.mark.timeout(120)]

SCRIPT_TASK = ("Write this to a file, run it and tell me what it prints:\n"
               "```python\nprint(6 * 7)\n```")


@pytest.fixture
async def agent(bus: Bus) -> AsyncIterator[NerveClient]:
    backend = NsBackend(backend_config(host_id="agent-host"))
    host = SandboxHost(bus, backend, HostConfig(host_id="agent-host", lease_ttl=2.0))
    placement = Placement(bus, reconcile_every=0.5)
    gateway = GatewayActor(GatewayConfig.scripted())
    orch = Orchestrator(bus, "agent-o")  # the default registry: the built-in `agent`
    for part in (host, placement):
        await part.start()
    await gateway.start(bus)
    await orch.start()
    yield NerveClient(bus)
    await orch.stop()
    await gateway.stop()
    for part in (placement, host):
        await part.stop()
    shutil.rmtree(backend.config.state_dir, ignore_errors=True)


async def stream_of(bus: Bus, run_id: str) -> list[StreamEvent]:
    sub = await bus.js.subscribe(bus.names.stream(run_id), ordered_consumer=True)
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=2)
            out.append(decode(msg.data, StreamEvent))
    except Exception:
        return out
    finally:
        await sub.unsubscribe()


async def test_the_agent_writes_a_script_runs_it_and_answers_from_its_output(
        agent: NerveClient, bus: Bus) -> None:
    run_id = await agent.submit("acme", SCRIPT_TASK)
    summary = await agent.wait(run_id, timeout=60)
    assert summary.status == "completed", summary
    assert summary.result["answer"] == "The answer is 42."
    assert summary.result["stop"] == "end_turn" and summary.result["turns"] == 3
    done = [e for e in await agent.history(run_id) if isinstance(e, StepCompleted)]
    assert [(e.kind, e.name) for e in done] == [
        ("llm", "default"), ("sandbox", "write_file"), ("llm", "default"),
        ("sandbox", "exec"), ("llm", "default")]
    assert done[3].result["stdout"] == "42\n"
    events = await stream_of(bus, run_id)
    kinds = [e.type for e in events]
    assert kinds.count("tool_call_started") == 2 and kinds.count("tool_call_finished") == 2
    text = "".join(e.data["text"] for e in events if e.type == "token")
    assert "The answer is 42." in text


async def test_the_same_tool_call_three_times_stops_the_loop(agent: NerveClient) -> None:
    run_id = await agent.submit("acme", "check again [scripted:repeat]")
    summary = await agent.wait(run_id, timeout=60)
    assert summary.result["stop"] == "repeated_tool_call" and summary.result["turns"] == 3


async def test_the_turn_cap_stops_a_model_that_never_finishes(agent: NerveClient) -> None:
    run_id = await agent.submit("acme", "go on [scripted:loop]", max_turns=4)
    summary = await agent.wait(run_id, timeout=60)
    assert summary.result["stop"] == "max_turns" and summary.result["turns"] == 4


async def test_tool_errors_go_back_to_the_model_as_values(agent: NerveClient) -> None:
    task = "Write this and run it:\n```python\nraise SystemExit('boom')\n```"
    run_id = await agent.submit("acme", task)
    summary = await agent.wait(run_id, timeout=60)
    assert summary.status == "completed"
    exec_step = next(e for e in await agent.history(run_id)
                     if isinstance(e, StepCompleted) and e.name == "exec")
    assert exec_step.result["exit_code"] == 1 and "boom" in exec_step.result["stderr"]


async def approval_request(bus: Bus, run_id: str) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            for ev in await stream_of(bus, run_id):
                if ev.type == "approval_requested":
                    return ev.data
            await asyncio.sleep(0.1)


async def test_a_tool_requiring_approval_waits_for_a_human_bound_to_that_call(
        agent: NerveClient, bus: Bus) -> None:
    run_id = await agent.submit("acme", SCRIPT_TASK, input={"requires_approval": ["run"]})
    request = await approval_request(bus, run_id)
    assert request["tool"] == "run" and request["args"] == {"command": "python3 main.py"}
    assert request["digest"] == call_digest(ToolUseBlock(id="x", name="run",
                                                         input=request["args"]))
    # An approval for some other call does not count; the right one does.
    await agent.signal(run_id, "approval", {"approved": True}, sender="mallory",
                       approves="0" * 24)
    await agent.signal(run_id, "approval", {"approved": True}, sender="alice",
                       approves=request["digest"])
    summary = await agent.wait(run_id, timeout=60)
    assert summary.result["answer"] == "The answer is 42."
    events = await agent.history(run_id)
    rejected = [e for e in events if isinstance(e, SignalRejected)]
    assert [r.sender for r in rejected] == ["mallory"] and "bound to" in rejected[0].reason
    assert [(e.sender) for e in events if isinstance(e, SignalReceived)] == ["alice"]


async def test_a_denied_tool_call_is_not_run_and_the_model_is_told(
        agent: NerveClient, bus: Bus) -> None:
    run_id = await agent.submit("acme", SCRIPT_TASK, input={"requires_approval": ["run"]})
    request = await approval_request(bus, run_id)
    await agent.signal(run_id, "approval", {"approved": False, "reason": "not today"},
                       sender="bob", approves=request["digest"])
    summary = await agent.wait(run_id, timeout=60)
    assert summary.status == "completed"
    steps = [e for e in await agent.history(run_id) if isinstance(e, StepCompleted)]
    assert not [e for e in steps if e.name == "exec"]  # never ran
    events = await stream_of(bus, run_id)
    finished = [e for e in events if e.type == "tool_call_finished" and e.data["name"] == "run"]
    assert finished[0].data["is_error"] and "denied by bob: not today" in \
        finished[0].data["result"]


async def test_an_agent_run_forked_after_a_model_call_replays_and_finishes(
        agent: NerveClient) -> None:
    parent = await agent.submit("acme", SCRIPT_TASK)
    assert (await agent.wait(parent, timeout=60)).status == "completed"
    events = await agent.history(parent)
    # Just after the first sandbox step (write_file) completed: its model call replays.
    cut = next(i for i, e in enumerate(events)
               if isinstance(e, StepCompleted) and e.kind == "sandbox")
    fork = await agent.fork(parent, at=cut + 1, tenant="acme")
    summary = await agent.wait(fork, timeout=60)
    assert summary.status == "completed", summary
    assert summary.result["answer"] == "The answer is 42."
    # The fork's sandbox started from the parent's snapshot after write_file: main.py is
    # there without being written again.
    fork_steps = [e for e in await agent.history(fork) if isinstance(e, StepCompleted)]
    assert [e.name for e in fork_steps].count("write_file") == 1  # the copied one


@pytest.mark.parametrize(("extra", "reason"), [
    ({"input": {"requires_approvals": ["run"]}}, "requires_approvals: Extra inputs"),
    ({"input": {"requires_approval": ["Run"]}}, "requires_approval names ['Run']"),
    ({"tools": ["runn"]}, "unknown tools ['runn']"),
    ({"tools": ["read_file"], "input": {"requires_approval": ["run"]}},
     "which this run does not have"),
])
async def test_a_misspelt_agent_input_is_rejected_not_run_without_its_gate(
        agent: NerveClient, extra: dict[str, Any], reason: str) -> None:
    run_id = "r-typo-" + str(abs(hash(reason)))
    with pytest.raises(TaskRejected, match=re.escape(reason)):
        await agent.until_started(run_id, lambda: agent.submit(
            "acme", "compute 6*7 in python", run_id=run_id, **extra), timeout=10)
