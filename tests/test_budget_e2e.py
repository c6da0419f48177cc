"""The budget with the real workflow engine: a looping agent is stopped by the breaker; a
kill stops every run of the tenant and its LLM calls, and leaves other tenants alone.

The brain is the real ``GatewayActor`` (scripted provider, with this ledger) when
``gateway_actor`` has it; until it lands, a stand-in that follows the same contract (reserve
the worst case with the work item's key, call, settle with the real usage, refuse on any
budget error) over a scripted model. LLM calls are counted by the ledger's settlements.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors import Delivery, StepWorker, WorkItem, decode, unpack
from budget_actor import PRICES, BudgetActor, Ledger, Limits, TripEvent, Usage
from bus import Bus
from gateway_actor._protocol import LLMRequest, LLMResponse, TextBlock
from nerve import Conflict, RunHalted
from persistence import CancelRequested, RunCancelled
from workflow import NerveClient, Orchestrator, RunContext, WorkflowRegistry

try:  # the real brain, once the gateway is merged
    from gateway_actor import GatewayActor, GatewayConfig  # type: ignore[attr-defined]
except ImportError:
    GatewayActor = GatewayConfig = None

MODEL = "scripted"  # the gateway's offline model, priced at Sonnet's rates
wf = WorkflowRegistry()


def _ask(text: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 300,
            "messages": [{"role": "user", "content": text}]}


@wf.register(name="looper")
async def looper(ctx: RunContext, inp: dict[str, Any]) -> str:
    """An agent stuck in a loop: every turn the model asks for the same search."""
    for turn in range(inp.get("turns", 200)):
        await ctx.llm(_ask(f"turn {turn}: what is new?"))
        await ctx.tool("search", {"q": "anything new?"})
    return "gave up"


@wf.register(name="chatty")
async def chatty(ctx: RunContext, inp: dict[str, Any]) -> str:
    """Talks to the model, waits for a person, talks again."""
    first = await ctx.llm(_ask("hello"))
    await ctx.wait_signal("go", timeout=120)
    second = await ctx.llm(_ask("and again"))
    return first.text + " / " + second.text


class SearchTool(StepWorker):
    durable = "budget-e2e-tools"

    def __init__(self) -> None:
        super().__init__("search-tool")
        self.calls: collections.Counter[str] = collections.Counter()

    def work_subjects(self) -> list[str]:
        assert self.bus is not None
        return [self.bus.names.work_tool]

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        self.calls[item.run_id] += 1
        return {"results": []}


class BudgetedScriptedLLM(StepWorker):
    """Reserve -> (scripted) call -> settle, as a gateway does."""

    durable = "budget-e2e-llm"

    def __init__(self, ledger: Ledger) -> None:
        super().__init__("scripted-llm")
        self.ledger = ledger

    def work_subjects(self) -> list[str]:
        assert self.bus is not None
        return [self.bus.names.work_llm]

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        req = LLMRequest.model_validate(item.args)
        estimate = 20 + sum(len(str(m.content)) for m in req.messages) // 4
        res = await self.ledger.reserve(item.tenant, run_id=item.run_id, model=req.model,
                                        input_tokens=estimate, max_output_tokens=req.max_tokens,
                                        key=f"{item.key}:{item.attempt}")
        usage = Usage(input_tokens=estimate, output_tokens=40)
        settled = await self.ledger.settle(res.id, tenant=item.tenant, model=req.model,
                                           usage=usage)
        return LLMResponse(model=req.model, content=[TextBlock(text="let me search again")],
                           stop_reason="end_turn", usage=usage,
                           cost_usd=settled.cost_usd).model_dump(mode="json")


@pytest.fixture
async def nerve(bus: Bus) -> AsyncIterator[dict[str, Any]]:
    budget = BudgetActor(sweep_interval=3600)
    llm: StepWorker = (GatewayActor(GatewayConfig.scripted(), ledger=Ledger(bus), prices=PRICES)
                       if GatewayActor is not None else BudgetedScriptedLLM(Ledger(bus)))
    tools = SearchTool()
    orch = Orchestrator(bus, "orch-budget", registry=wf, spawn_guard=Ledger(bus))
    await budget.start(bus)
    await llm.start(bus)
    await tools.start(bus)
    await orch.start()
    yield {"budget": budget, "llm": llm, "tools": tools, "orch": orch,
           "client": NerveClient(bus), "ledger": Ledger(bus)}
    await orch.stop()
    await tools.stop()
    await llm.stop()
    await budget.stop()


@pytest.mark.timeout(90)
async def test_a_looping_agent_is_stopped_by_the_breaker_within_its_budget(
        bus: Bus, nerve: dict[str, Any]) -> None:
    ledger: Ledger = nerve["ledger"]
    await ledger.set_limits("loopy", Limits(usd_per_day=0.5, breaker={"repeat_tool_calls": 5}))
    trips: list[TripEvent] = []

    async def on_trip(msg: Any) -> None:
        trips.append(decode(msg.data, TripEvent))

    await bus.nc.subscribe(bus.names.budget_trip_event, cb=on_trip)
    client: NerveClient = nerve["client"]
    run_id = await client.submit("loopy", workflow="looper", input={"turns": 200})
    summary = await client.wait(run_id, timeout=60)
    assert summary.status == "cancelled"
    events = await client.history(run_id)
    cancel = next(e for e in events if isinstance(e, CancelRequested))
    assert cancel.by == "budget" and "runaway breaker" in cancel.reason
    assert isinstance(events[-1], RunCancelled)
    assert nerve["tools"].calls[run_id] < 200  # stopped long before the loop's end
    [trip] = [t for t in trips if t.run_id == run_id]
    assert trip.detector == "repeated_tool_call" and trip.evidence["count"] == 5
    # The run can spend nothing more, and the tenant spent within its limit plus what was
    # in flight (nothing is in flight now: every call was settled).
    with pytest.raises(RunHalted):
        await ledger.reserve("loopy", run_id=run_id, model=MODEL, input_tokens=1,
                             max_output_tokens=1)
    state = await ledger.state("loopy")
    assert state.reserved_nanos == 0
    assert 0 < state.lifetime_nanos <= 500_000_000


@pytest.mark.timeout(90)
async def test_a_kill_stops_every_run_of_the_tenant_and_its_llm_calls_only(
        bus: Bus, nerve: dict[str, Any]) -> None:
    ledger: Ledger = nerve["ledger"]
    client: NerveClient = nerve["client"]
    for tenant in ("acme", "globex"):
        await ledger.set_limits(tenant, Limits(usd_per_day=5.0))
    acme = [await client.submit("acme", workflow="chatty", input={}) for _ in range(2)]
    globex = await client.submit("globex", workflow="chatty", input={})
    for run_id in (*acme, globex):
        await client.wait(run_id, timeout=30, statuses=("waiting",))

    async def calls(tenant: str) -> int:  # LLM calls made (each one settled)
        return (await ledger.state(tenant)).calls

    assert await calls("acme") == 2 and await calls("globex") == 1

    await ledger.kill("acme", reason="over budget", by="ops")  # what `nerve kill` does
    for run_id in acme:
        summary = await client.wait(run_id, timeout=30)
        assert summary.status == "cancelled"
    # Signals to the dead runs are refused; a new task of the tenant is refused too.
    rejected: asyncio.Queue[Any] = asyncio.Queue()
    await bus.nc.subscribe(bus.names.tasks_rejected, cb=rejected.put)
    for run_id in acme:
        with pytest.raises(Conflict):  # the client refuses: the run has ended
            await client.signal(run_id, "go")
    refused_run = await client.submit("acme", workflow="chatty", input={})
    notice = unpack((await asyncio.wait_for(rejected.get(), 30)).data)
    assert notice["run_id"] == refused_run and "killed" in notice["reason"]

    # The other tenant is untouched: its run goes on and calls the model again.
    await client.signal(globex, "go")
    done = await client.wait(globex, timeout=30)
    assert done.status == "completed"
    assert await calls("globex") == 2
    assert await calls("acme") == 2  # no LLM call of the killed tenant after the kill
