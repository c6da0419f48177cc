"""The runaway breaker and the kill-switch's enforcement, driven by real events on the bus."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors import ask, decode, encode, unpack
from budget_actor import (
    BreakerPolicy,
    BreakerState,
    BudgetActor,
    BudgetReport,
    KillNotice,
    KillRequest,
    Ledger,
    Limits,
    ResumeRunRequest,
    SetLimitsRequest,
    ShowRequest,
    TripEvent,
    Usage,
    kill_notices,
)
from bus import Bus
from nerve import CodecError, ConfigError, RunHalted, TenantKilled, UnknownTenant
from persistence import (
    INBOX_ADAPTER,
    CancelMessage,
    PauseMessage,
    ResumeMessage,
    RunHistory,
    RunStarted,
    StepCompleted,
    StepScheduled,
    args_digest,
)
from tests.budget_helpers import MODEL, FakeClock, until

# -- the detectors alone ----------------------------------------------------------------


def test_burn_rate_trips_inside_the_window_only() -> None:
    policy = BreakerPolicy(window_s=10, tenant_usd_per_window=0.05)
    spread = BreakerState()
    for i in range(10):  # $0.02 every 11 s: never more than $0.02 in a window
        assert spread.cost("t", "r", 100.0 + 11 * i, 20_000_000, policy) == []
    burst = BreakerState()
    assert burst.cost("t", "r", 100.0, 20_000_000, policy) == []
    assert burst.cost("t", "r", 105.0, 20_000_000, policy) == []
    trips = burst.cost("t", "r", 109.0, 20_000_000, policy)
    assert [t.detector for t in trips] == ["tenant_burn_rate"]
    assert trips[0].evidence["usd_in_window"] == pytest.approx(0.06)
    assert trips[0].evidence["calls_in_window"] == 3
    assert burst.cost("t", "r", 109.5, 20_000_000, policy) == []  # tripped once


def test_run_burn_and_call_rates() -> None:
    policy = BreakerPolicy(run_usd_per_window=0.01, run_calls_per_window=3)
    b = BreakerState()
    assert b.cost("t", "r1", 1.0, 6_000_000, policy) == []
    trips = b.cost("t", "r1", 2.0, 6_000_000, policy)
    assert [(t.detector, t.run_id) for t in trips] == [("run_burn_rate", "r1")]
    calls = BreakerState()
    for i in range(3):
        assert calls.cost("t", "r2", float(i), 1, policy) == []
    assert [t.detector for t in calls.cost("t", "r2", 3.0, 1, policy)] == ["run_call_rate"]


def test_repeated_identical_tool_calls_trip_and_retries_do_not_count() -> None:
    policy = BreakerPolicy(repeat_tool_calls=4, repeat_horizon=10)
    b = BreakerState()
    same = args_digest({"q": "weather"})
    index = 0
    for n in range(3):
        for _ in range(3):  # a step scheduled, retried and completed counts once
            assert b.step("t", "r", index, "tool", "search", same, policy) == []
        index += 1
        assert b.step("t", "r", index, "llm", "claude", args_digest(n), policy) == []
        index += 1
    trips = b.step("t", "r", index, "tool", "search", same, policy)
    assert len(trips) == 1 and trips[0].detector == "repeated_tool_call"
    assert trips[0].evidence["indexes"] == [0, 2, 4, 6] and trips[0].evidence["count"] == 4


def test_repeats_outside_the_horizon_or_with_other_arguments_do_not_trip() -> None:
    policy = BreakerPolicy(repeat_tool_calls=3, repeat_horizon=4, ignore_tools=("poll",))
    b = BreakerState()
    same = args_digest({"q": 1})
    for i in range(30):
        if i % 4 == 0:
            assert b.step("t", "r", i, "tool", "search", same, policy) == []
        else:
            assert b.step("t", "r", i, "tool", "search", args_digest(i), policy) == []
        assert b.step("t", "r2", i, "tool", "poll", same, policy) == []  # ignored tool


def test_the_same_llm_request_repeated_trips() -> None:
    policy = BreakerPolicy()
    b = BreakerState()
    req = args_digest({"messages": ["same"]})
    assert b.step("t", "r", 0, "llm", "m", req, policy) == []
    assert b.step("t", "r", 1, "llm", "m", req, policy) == []
    trips = b.step("t", "r", 2, "llm", "m", req, policy)
    assert [t.detector for t in trips] == ["repeated_llm_call"]


# -- the actor on a real bus ------------------------------------------------------------


@pytest.fixture
async def actor(bus: Bus) -> AsyncIterator[BudgetActor]:
    a = BudgetActor(sweep_interval=3600)
    await a.start(bus)
    yield a
    await a.stop()


class Collector:
    """Every message on a subject, decoded, as it arrives."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.event = asyncio.Event()

    async def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self.event.clear()
                await self.event.wait()
        return self.items


async def collect(bus: Bus, subject: str, decoder: Any) -> Collector:
    c = Collector()

    async def cb(msg: Any) -> None:
        c.items.append(decoder(msg.data))
        c.event.set()

    await bus.nc.subscribe(subject, cb=cb)
    await bus.nc.flush()
    return c


def inbox_message(data: bytes) -> Any:
    return INBOX_ADAPTER.validate_python(unpack(data))


async def start_run(bus: Bus, tenant: str, run_id: str) -> RunHistory:
    history = RunHistory(bus, run_id)
    await history.create(RunStarted(run_id=run_id, tenant=tenant, workflow="agent",
                                    version="1"))
    return history


async def append_step(history: RunHistory, index: int, kind: str, name: str,
                      args: Any, result: Any = None) -> None:
    step = {"index": index, "kind": kind, "name": name, "args_digest": args_digest(args)}
    await history.append(StepScheduled(**step, args=args))
    await history.append(StepCompleted(**step, result=result))


async def test_a_burn_rate_spike_kills_the_tenant(bus: Bus, actor: BudgetActor) -> None:
    ledger = Ledger(bus, clock=FakeClock())  # every cost event inside one window
    await ledger.set_limits("hot", Limits(usd_per_day=10.0, breaker=BreakerPolicy(
        tenant_usd_per_window=0.05)))
    trips = await collect(bus, bus.names.budget_trip_event, lambda d: decode(d, TripEvent))
    async with kill_notices(bus, "hot") as notices:
        spent = 0
        killed = None
        for _ in range(200):
            try:
                res = await ledger.reserve("hot", run_id="spender", model=MODEL,
                                           input_tokens=1000, max_output_tokens=1000)
            except TenantKilled as exc:
                killed = exc
                break
            s = await ledger.settle(res.id, tenant="hot", model=MODEL,
                                    usage=Usage(input_tokens=1000, output_tokens=1000))
            spent += s.cost_nanos
            await asyncio.sleep(0)  # an agent does other things between calls
        assert killed is not None and killed.by == "breaker"
        notice = await notices.next(timeout=5)
    assert isinstance(notice, KillNotice) and notice.source == "breaker"
    trip = (await trips.wait_for(1))[0]
    assert trip.tenant == "hot" and trip.detector == "tenant_burn_rate"
    assert trip.action == "kill_tenant" and trip.evidence["usd_in_window"] > 0.05
    assert trip.evidence["threshold_usd"] == 0.05 and trip.evidence["window_s"] == 10
    assert trip.evidence["usd_in_window"] * 1e9 <= spent
    assert await Ledger(bus).is_killed("hot")


async def test_a_run_repeating_a_tool_call_is_cancelled_by_the_breaker(
        bus: Bus, actor: BudgetActor) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("loopy", Limits(usd_per_day=10.0))
    trips = await collect(bus, bus.names.budget_trip_event, lambda d: decode(d, TripEvent))
    inbox = await collect(bus, bus.names.inbox("run-loop"), inbox_message)
    history = await start_run(bus, "loopy", "run-loop")
    index = 0
    for turn in range(5):  # the model asks for the same search every turn
        await append_step(history, index, "llm", "claude", {"turn": turn})
        await append_step(history, index + 1, "tool", "search", {"q": "same thing"}, "no news")
        index += 2
    trip = (await trips.wait_for(1))[0]
    assert trip.detector == "repeated_tool_call" and trip.run_id == "run-loop"
    assert trip.action == "cancel_run"
    assert trip.evidence["name"] == "search" and trip.evidence["count"] == 5
    assert trip.evidence["indexes"] == [1, 3, 5, 7, 9]
    assert trip.evidence["args_digest"] == args_digest({"q": "same thing"})
    stop = (await inbox.wait_for(1))[0]
    assert isinstance(stop, CancelMessage) and stop.by == "budget"
    with pytest.raises(RunHalted) as exc:
        await ledger.reserve("loopy", run_id="run-loop", model=MODEL, input_tokens=10,
                             max_output_tokens=10)
    assert exc.value.run_id == "run-loop"
    # Only that run: the tenant and its other runs go on.
    await ledger.reserve("loopy", run_id="another", model=MODEL, input_tokens=10,
                         max_output_tokens=10)
    assert not await ledger.is_killed("loopy")


async def test_pause_policy_pauses_the_run_and_a_person_resumes_it(
        bus: Bus, actor: BudgetActor) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("careful", Limits(on_trip="pause"))
    inbox = await collect(bus, bus.names.inbox("run-p"), inbox_message)
    history = await start_run(bus, "careful", "run-p")
    same = {"messages": [{"role": "user", "content": "again"}]}
    for i in range(3):  # the same LLM request three times
        await append_step(history, i, "llm", "claude", same)
    stop = (await inbox.wait_for(1))[0]
    assert isinstance(stop, PauseMessage)
    report = await ask(bus, bus.names.budget_api, ShowRequest(tenant="careful"),
                       into=BudgetReport)
    assert "run-p" in report.halted_runs and report.halted_runs["run-p"]["policy"] == "pause"
    with pytest.raises(RunHalted):
        await ledger.reserve("careful", run_id="run-p", model=MODEL, input_tokens=1,
                             max_output_tokens=1)
    reply = await ask(bus, bus.names.budget_api,
                      ResumeRunRequest(tenant="careful", run_id="run-p", by="alice"))
    assert reply["resumed"] is True
    resumed = (await inbox.wait_for(2))[1]
    assert isinstance(resumed, ResumeMessage) and resumed.by == "alice"
    await ledger.reserve("careful", run_id="run-p", model=MODEL, input_tokens=1,
                         max_output_tokens=1)


async def test_a_kill_published_by_hand_is_recorded_and_stops_only_that_tenants_runs(
        bus: Bus, actor: BudgetActor) -> None:
    ledger = Ledger(bus)
    for tenant in ("acme", "globex"):
        await ledger.set_limits(tenant, Limits(usd_per_day=5.0))
    acme_inbox = [await collect(bus, bus.names.inbox(r), inbox_message) for r in ("a1", "a2")]
    globex_inbox = await collect(bus, bus.names.inbox("g1"), inbox_message)
    for tenant, run_id in (("acme", "a1"), ("acme", "a2"), ("globex", "g1")):
        history = await start_run(bus, tenant, run_id)
        await append_step(history, 0, "llm", "claude", {"run": run_id})
    # The actor learns runs from their histories (its subscription runs on its own).
    await until(lambda: actor.active["acme"] == {"a1", "a2"} and "g1" in actor.active["globex"])
    # What an operator types: nats req nerve.ctl.tenant.acme.kill '{"reason":..,"by":..}'
    reply = await bus.nc.request(bus.names.tenant_kill("acme"),
                                 json.dumps({"reason": "runaway", "by": "ops"}).encode(),
                                 timeout=5)
    answer = unpack(reply.data)
    assert answer["ok"] is True and answer["recorded"] is True
    assert sorted(answer["runs_stopped"]) == ["a1", "a2"]
    for c in acme_inbox:
        stop = (await c.wait_for(1))[0]
        assert isinstance(stop, CancelMessage) and "runaway" in stop.reason
    assert await ledger.is_killed("acme")
    with pytest.raises(TenantKilled):
        await ledger.reserve("acme", run_id="a1", model=MODEL, input_tokens=1,
                             max_output_tokens=1)
    with pytest.raises(TenantKilled):
        await ledger.check_spawn("acme")
    # The other tenant is untouched.
    assert not await ledger.is_killed("globex")
    await ledger.reserve("globex", run_id="g1", model=MODEL, input_tokens=1, max_output_tokens=1)
    await ledger.check_spawn("globex")
    assert globex_inbox.items == []


@pytest.mark.parametrize("payload, error", [
    (b"\xc1\xff garbage", CodecError),
    (b'{"reason": "x", "by": "ops", "policy": "explode"}', CodecError),
    (b'{"reason": "x", "by": "ops", "tenant": "globex"}', ConfigError),
    (b'{"reason": "x", "by": "ops", "surprise": 1}', CodecError),
    (b'{"reason": "x", "by": ""}', CodecError),
    (b'{"at": "yesterday"}', CodecError),
    (b'[1, 2, 3]', CodecError),
])
async def test_malformed_kill_messages_get_clear_errors_and_change_nothing(
        bus: Bus, actor: BudgetActor, payload: bytes, error: type) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("acme", Limits(usd_per_day=5.0))
    async with kill_notices(bus, "acme") as notices:
        reply = await bus.nc.request(bus.names.tenant_kill("acme"), payload, timeout=5)
        assert reply.headers and reply.headers.get("Nerve-Error") == "1"
        wire = unpack(reply.data)
        assert wire["type"] == error.__name__ and "acme" in wire["message"]
        # Followers skip it too; the next good notice is what they see.
        await ledger.kill("acme", reason="real", by="ops")
        assert (await notices.next(timeout=5)).reason == "real"  # type: ignore[union-attr]


async def test_reset_resumes_the_runs_a_pause_kill_paused(bus: Bus, actor: BudgetActor) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("p", Limits(usd_per_day=5.0))
    inbox = await collect(bus, bus.names.inbox("p1"), inbox_message)
    await append_step(await start_run(bus, "p", "p1"), 0, "llm", "claude", {})
    await until(lambda: "p1" in actor.active["p"])
    reply = await ask(bus, bus.names.budget_api,
                      KillRequest(tenant="p", reason="look at it", by="ops", policy="pause"))
    assert reply["policy"] == "pause"
    assert isinstance((await inbox.wait_for(1))[0], PauseMessage)
    await ledger.reset("p", by="ops")
    resumed = (await inbox.wait_for(2))[1]
    assert isinstance(resumed, ResumeMessage)
    assert not await ledger.is_killed("p")


async def test_budget_api_sets_limits_and_refuses_bad_input(bus: Bus, actor: BudgetActor) -> None:
    report = await ask(bus, bus.names.budget_api,
                       SetLimitsRequest(tenant="api", limits={"usd_per_day": 10,
                                                              "breaker": {"window_s": 5}}),
                       into=BudgetReport)
    assert report.limits.usd_per_day == 10 and report.limits.breaker.window_s == 5
    assert report.state == "ok" and report.windows[2].limit_usd == 10
    with pytest.raises(ConfigError) as exc:
        await ask(bus, bus.names.budget_api,
                  SetLimitsRequest(tenant="api", limits={"usd_per_day": -3}))
    assert "usd_per_day" in exc.value.message
    with pytest.raises(UnknownTenant):
        await ask(bus, bus.names.budget_api, ShowRequest(tenant="nobody"))
    with pytest.raises(CodecError):
        await ask(bus, bus.names.budget_api, {"type": "show", "tenant": "a.b"})
    with pytest.raises(CodecError):
        await ask(bus, bus.names.budget_api, {"type": "explode"})
    report = await ask(bus, bus.names.budget_api, ShowRequest(tenant="api"), into=BudgetReport)
    assert report.limits.usd_per_day == 10  # unchanged by the refused request
    everyone = await ask(bus, bus.names.budget_api, ShowRequest(), into=list[BudgetReport])
    assert [r.tenant for r in everyone] == ["api"]
    assert "tenant api: OK" in everyone[0].render()


async def test_the_actor_does_not_revive_a_kill_that_was_reset(bus: Bus,
                                                               actor: BudgetActor) -> None:
    # Kill and reset notices travel on different subjects, so the actor may handle a kill
    # notice after the reset that followed it. A notice a ledger published says so
    # (in_ledger) and is never recorded again: here one arrives after its reset.
    ledger = Ledger(bus)
    await ledger.set_limits("flip", Limits(usd_per_day=1.0))
    late = KillNotice(tenant="flip", reason="oops", by="ops", in_ledger=True)
    reply = await bus.nc.request(bus.names.tenant_kill("flip"), encode(late), timeout=5)
    assert unpack(reply.data)["recorded"] is False
    assert not await ledger.is_killed("flip")
    # The same kill typed by a person is recorded.
    reply = await bus.nc.request(bus.names.tenant_kill("flip"),
                                 json.dumps({"reason": "oops", "by": "ops"}).encode(), timeout=5)
    assert unpack(reply.data)["recorded"] is True
    assert await ledger.is_killed("flip")
