"""The gateway actor on the bus: work items in, step results on the run's inbox, token events
on ``nerve.stream.<run_id>``, cost events, budget reservations, the tenant kill-switch."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors import StepResult, WorkItem, decode, encode
from budget_actor import PRICES, Ledger, Limits
from bus import Bus
from gateway_actor import (
    CostEvent,
    Fault,
    GatewayActor,
    GatewayConfig,
    LLMRequest,
    LLMResponse,
    LocalUpstream,
    Message,
    UpstreamConfig,
)
from gateway_actor._role import run_gateway
from persistence import StreamEvent
from tests._gateway_util import SYSTEM, TOOLS


# -- the real ledger, with a log of what the gateway asked of it -------------------------
class RecordingLedger:
    """``budget_actor.Ledger`` itself; each call is also written down for the assertions."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def reserve(self, tenant: str, **kwargs: Any) -> Any:
        self.calls.append(("reserve", dict(tenant=tenant, **kwargs)))
        return await self.ledger.reserve(tenant, **kwargs)

    async def settle(self, reservation_id: str, **kwargs: Any) -> Any:
        self.calls.append(("settle", dict(id=reservation_id, **kwargs)))
        return await self.ledger.settle(reservation_id, **kwargs)

    async def release(self, reservation_id: str, **kwargs: Any) -> Any:
        self.calls.append(("release", dict(id=reservation_id, **kwargs)))
        return await self.ledger.release(reservation_id, **kwargs)


CLAUDE = "claude-sonnet-4-6"  # a model the price table knows (the local upstream serves any)


# -- helpers ------------------------------------------------------------------------------
async def start(bus: Bus, config: GatewayConfig, **kwargs: Any) -> GatewayActor:
    """A gateway actor on ``bus`` (``kwargs`` go to :class:`GatewayActor`)."""
    actor = GatewayActor(config, **kwargs)
    await actor.start(bus)
    return actor


def item(bus: Bus, run_id: str, args: Any, index: int = 1, tenant: str = "acme") -> WorkItem:
    return WorkItem(run_id=run_id, tenant=tenant, index=index, kind="llm", name="llm",
                    args=args, key=f"{run_id}:{index}", reply_to=bus.names.inbox(run_id))


def llm_args(task: str, **kwargs: Any) -> dict[str, Any]:
    return LLMRequest(system=SYSTEM, tools=TOOLS, messages=[Message(role="user", content=task)],
                      max_tokens=kwargs.pop("max_tokens", 4000), **kwargs).model_dump()


class Watch:
    """Core subscriptions on a run's inbox and stream (JetStream stores them as well)."""

    def __init__(self, bus: Bus, run_id: str) -> None:
        self.bus = bus
        self.run_id = run_id
        self.results: asyncio.Queue[StepResult] = asyncio.Queue()
        self.tokens: list[dict[str, Any]] = []
        self.first_token = asyncio.Event()
        self._subs: list[Any] = []

    async def __aenter__(self) -> Watch:
        async def on_result(msg: Any) -> None:
            await self.results.put(decode(msg.data, StepResult))

        async def on_token(msg: Any) -> None:
            event = decode(msg.data, StreamEvent)
            if event.type == "token":
                self.tokens.append(event.data)
                self.first_token.set()

        nc = self.bus.nc
        self._subs = [await nc.subscribe(self.bus.names.inbox(self.run_id), cb=on_result),
                      await nc.subscribe(self.bus.names.stream(self.run_id), cb=on_token)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def result(self, timeout: float = 30.0) -> StepResult:
        return await asyncio.wait_for(self.results.get(), timeout)


async def submit(bus: Bus, work: WorkItem) -> None:
    await bus.js.publish(bus.names.work_llm, encode(work), headers={"Nats-Msg-Id": work.key})


@pytest.fixture
async def upstream() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(UpstreamConfig(replicas=2, decode_per_token=0.0005)) as up:
        yield up


# -- tests --------------------------------------------------------------------------------
async def test_a_work_item_comes_back_as_a_step_result_with_token_events(bus: Bus) -> None:
    actor = await start(bus, GatewayConfig.scripted())  # prices: budget_actor.PRICES
    costs: list[CostEvent] = []
    got_cost = asyncio.Event()

    async def on_cost(msg: Any) -> None:
        costs.append(decode(msg.data, CostEvent))
        got_cost.set()

    cost_sub = await bus.nc.subscribe(bus.names.cost_events, cb=on_cost)
    try:
        async with Watch(bus, "run-a") as watch:
            await submit(bus, item(bus, "run-a", llm_args("[scripted:long 80] a story"), 4))
            result = await watch.result()
            assert result.ok and result.key == "run-a:4" and result.index == 4
            response = LLMResponse.model_validate(result.result)
            assert response.stop_reason == "end_turn" and len(response.text.split()) == 80
            assert response.upstream == "scripted-0"
            # Token events were all published before the result; they spell the answer.
            text = ""
            for data in watch.tokens:
                assert data["index"] == 4
                text = text[: data["offset"]] + data["text"]
            assert text == response.text
            assert 1 <= len(watch.tokens) < 40  # coalesced, not one event per delta
        await asyncio.wait_for(got_cost.wait(), 10)
        cost = costs[0]
        assert (cost.run_id, cost.tenant, cost.key, cost.model) == (
            "run-a", "acme", "run-a:4", "scripted")
        assert cost.tokens["output"] == response.usage.output_tokens > 0
        assert cost.cost_usd == pytest.approx(PRICES.cost("scripted", response.usage))
        assert cost.price_version == PRICES.version and cost.ok
    finally:
        await cost_sub.unsubscribe()
        await actor.stop()


async def test_the_real_sdk_path_end_to_end(bus: Bus, upstream: LocalUpstream) -> None:
    actor = await start(bus, GatewayConfig.for_urls(upstream.urls, model="claude-test"))
    try:
        async with Watch(bus, "run-b") as watch:
            await submit(bus, item(bus, "run-b", llm_args("What is 17 * 23?")))
            result = await watch.result()
        assert result.ok, result.error
        response = LLMResponse.model_validate(result.result)
        assert response.tool_uses[0].name == "write_file"
        assert response.tool_uses[0].input["content"] == "print(17 * 23)\n"
        assert response.usage.cache_creation_input_tokens > 1000
        assert sum(r.stats.requests for r in upstream.replicas) == 1
        assert "".join(t["text"] for t in watch.tokens) == response.text
    finally:
        await actor.stop()


@pytest.mark.parametrize("args,why", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "bogus"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "first message"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}]}]}, "tool_result"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-x"}, "no upstream pool"),
    ("not a request", "invalid LLM request"),
])
async def test_an_invalid_request_is_rejected_clearly_and_not_retried(
        bus: Bus, args: Any, why: str) -> None:
    config = GatewayConfig.scripted()
    config.pools[0].models = ["scripted*", "claude-*"]
    actor = await start(bus, config)
    provider = actor.gateway.pools["scripted"].provider
    try:
        async with Watch(bus, "run-c") as watch:
            await submit(bus, item(bus, "run-c", args))
            result = await watch.result()
        assert not result.ok and result.error is not None
        assert result.error["type"] == "InvalidLLMRequest"
        assert result.error["retryable"] is False
        assert why in result.error["message"]
        assert provider.calls == 0  # type: ignore[attr-defined]
        # Answered once and acked (the ack follows the stored result): nothing redelivered.
        async with asyncio.timeout(10):
            while (info := await bus.js.consumer_info(bus.names.work_stream,
                                                      "gateway")).num_ack_pending:
                await asyncio.sleep(0.01)
        assert info.num_redelivered == 0 and info.num_pending == 0
    finally:
        await actor.stop()


async def test_budget_is_reserved_before_and_settled_after(bus: Bus) -> None:
    ledger = RecordingLedger(Ledger(bus))
    actor = await start(bus, GatewayConfig.scripted(), ledger=ledger)
    try:
        async with Watch(bus, "run-d") as watch:
            await submit(bus, item(bus, "run-d", llm_args("What is 2 + 2?", max_tokens=321)))
            result = await watch.result()
        assert result.ok
        response = LLMResponse.model_validate(result.result)
        (kind1, reserve), (kind2, settle) = ledger.calls
        assert (kind1, kind2) == ("reserve", "settle")
        assert reserve["key"] == "run-d:1" and reserve["max_output_tokens"] == 321
        assert reserve["input_tokens"] >= response.usage.total_input_tokens  # worst case
        assert settle["usage"] == response.usage and settle["run_id"] == "run-d"
        assert response.cost_usd == pytest.approx(PRICES.cost("scripted", response.usage))
        assert response.cost_usd and response.cost_usd > 0

        # A tenant with (almost) nothing to spend: refused before any model call.
        await ledger.ledger.set_limits("poor", Limits(usd_per_day=0.000001,
                                                      on_exhaustion="refuse"))
        provider = actor.gateway.pools["scripted"].provider
        before = provider.calls  # type: ignore[attr-defined]
        async with Watch(bus, "run-e") as watch:
            await submit(bus, item(bus, "run-e", llm_args("What is 3 + 3?"), tenant="poor"))
            refused = await watch.result()
        assert not refused.ok and refused.error is not None
        assert refused.error["type"] == "BudgetExceeded"
        assert provider.calls == before  # type: ignore[attr-defined]
    finally:
        await actor.stop()
        await ledger.ledger.close()


async def test_a_stream_cut_and_retried_is_charged_once(bus: Bus,
                                                         upstream: LocalUpstream) -> None:
    ledger = RecordingLedger(Ledger(bus))
    actor = await start(bus, GatewayConfig.for_urls(upstream.urls[:1], model=CLAUDE),
                        ledger=ledger)
    upstream.replica(0).inject(Fault("midstream", after_events=10))
    try:
        async with Watch(bus, "run-m") as watch:
            await submit(bus, item(bus, "run-m", llm_args("[scripted:long 60] go")))
            result = await watch.result()
        assert result.ok
        response = LLMResponse.model_validate(result.result)
        assert response.attempts == 2 and upstream.replica(0).stats.requests == 2
        kinds = [k for k, _ in ledger.calls]
        assert kinds == ["reserve", "settle"]  # one reservation, settled once
        assert ledger.calls[1][1]["usage"] == response.usage
        assert response.cost_usd == pytest.approx(PRICES.cost(CLAUDE, response.usage))
        text = ""
        for data in watch.tokens:
            text = text[: data["offset"]] + data["text"]
        assert text == response.text
        assert sum(len(t["text"]) for t in watch.tokens) == len(response.text)
    finally:
        await actor.stop()
        await ledger.ledger.close()


async def test_a_tenant_kill_cuts_its_in_flight_stream(bus: Bus) -> None:
    async with LocalUpstream(UpstreamConfig(decode_per_token=0.002)) as up:
        ledger = RecordingLedger(Ledger(bus))
        actor = await start(bus, GatewayConfig.for_urls(up.urls, model=CLAUDE), ledger=ledger)
        try:
            async with Watch(bus, "run-k") as watch, Watch(bus, "run-other") as other:
                # 3000 words at 2 ms per token: about half a minute if it were not cut.
                await submit(bus, item(bus, "run-k", llm_args("[scripted:long 3000] go")))
                await submit(bus, item(bus, "run-other", llm_args("[scripted:long 30] go"),
                                       tenant="other"))
                await asyncio.wait_for(watch.first_token.wait(), 20)
                await ledger.ledger.kill("acme", reason="over budget", by="test")
                result = await watch.result()
                assert not result.ok and result.error is not None
                assert result.error["type"] == "TenantKilled"
                assert "over budget" in result.error["message"]
                assert (await other.result()).ok  # other tenants are not touched
                seen = "".join(t["text"] for t in watch.tokens)
            assert 0 < len(seen.split()) < 3000
            assert up.replica(0).stats.disconnects == 1  # the upstream saw the client leave
            # What was consumed before the cut is settled, not the reserved worst case.
            reserved = {c["key"]: c for k, c in ledger.calls if k == "reserve"}
            assert "run-k:1" in reserved
            settles = [c for k, c in ledger.calls if k == "settle" and c["run_id"] == "run-k"]
            assert len(settles) == 1 and 0 < settles[0]["usage"].output_tokens < 3000
            # New work of the killed tenant is refused until a reset.
            async with Watch(bus, "run-k2") as again:
                await submit(bus, item(bus, "run-k2", llm_args("What is 1 + 1?")))
                refused = await again.result()
            assert not refused.ok and refused.error["type"] == "TenantKilled"  # type: ignore
            await ledger.ledger.reset("acme", by="test")
            await bus.nc.flush()
            async with Watch(bus, "run-k3") as after:
                await submit(bus, item(bus, "run-k3", llm_args("What is 1 + 1?")))
                assert (await after.result()).ok
        finally:
            await actor.stop()
            await ledger.ledger.close()


@pytest.mark.timeout(90)
async def test_a_gateway_killed_mid_stream_loses_nothing_and_shows_nothing_twice(
        bus: Bus, nats_server: Any, prefix: str) -> None:
    """SIGKILL a gateway process while it streams; another instance takes the work item
    over: one result, and the client's view (``text[:offset] + chunk``) is the answer, once."""
    async with LocalUpstream(UpstreamConfig(decode_per_token=0.003)) as up:
        nerve = str(Path(sys.executable).parent / "nerve")
        proc = await asyncio.create_subprocess_exec(
            nerve, "gateway", "--nats-url", nats_server.url, "--prefix", prefix,
            "--upstreams", f"anthropic:{up.urls[0]}", "--model", "claude-test",
            "--ack-wait", "2", stderr=asyncio.subprocess.PIPE)
        survivor: GatewayActor | None = None
        try:
            assert proc.stderr is not None
            ready = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert b"gateway actor(s) on" in ready
            async with Watch(bus, "run-x") as watch:
                await submit(bus, item(bus, "run-x", llm_args("[scripted:long 200] go")))
                await asyncio.wait_for(watch.first_token.wait(), 30)
                proc.kill()  # SIGKILL: no goodbye, the work item stays unacked
                await proc.wait()
                cut_at = len(watch.tokens)
                survivor = await start(bus, GatewayConfig.for_urls(up.urls, model="claude-test"),
                                       ack_wait=2.0)
                result = await watch.result(60)
            assert result.ok, result.error
            response = LLMResponse.model_validate(result.result)
            assert len(response.text.split()) == 200
            assert cut_at > 0 and watch.tokens[cut_at]["offset"] == 0  # the survivor restarts
            text = ""
            for data in watch.tokens:
                text = text[: data["offset"]] + data["text"]
            assert text == response.text
            assert up.replica(0).stats.requests == 2 and up.replica(0).stats.disconnects == 1
            inbox = bus.names.inbox("run-x")

            async def stored() -> int:
                info = await bus.js.stream_info(bus.names.runs_stream, subjects_filter=inbox)
                return (info.state.subjects or {}).get(inbox, 0)

            # The watcher sees the result as it is published; the store is a moment later.
            async with asyncio.timeout(10):
                while await stored() == 0:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            assert await stored() == 1  # one result for the step
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if survivor is not None:
                await survivor.stop()


async def test_the_gateway_role_serves_until_cancelled(bus: Bus) -> None:
    from cli._roles import RoleOptions

    opts = RoleOptions(id="gw-role", settings={"instances": 2})
    task = asyncio.create_task(run_gateway(bus, opts))
    try:
        await asyncio.wait_for(opts.ready.wait(), 30)
        async with Watch(bus, "run-role") as watch:
            await submit(bus, item(bus, "run-role", llm_args("What is 5 * 5?")))
            result = await watch.result()
        assert result.ok and result.worker.startswith("gw-role-")
        assert LLMResponse.model_validate(result.result).tool_uses[0].name == "write_file"
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert task.cancelled()


async def test_a_step_past_its_deadline_is_not_sent_to_the_model(bus: Bus) -> None:
    actor = await start(bus, GatewayConfig.scripted())
    provider = actor.gateway.pools["scripted"].provider
    try:
        async with Watch(bus, "run-late") as watch:
            late = item(bus, "run-late", llm_args("What is 1 + 1?"))
            late.deadline = 1.0  # long gone
            await submit(bus, late)
            result = await watch.result()
        assert not result.ok and result.error is not None
        assert "deadline" in result.error["message"] and result.error["retryable"] is False
        assert provider.calls == 0  # type: ignore[attr-defined]
    finally:
        await actor.stop()


async def test_without_a_ledger_kill_notices_alone_refuse_and_reset(bus: Bus) -> None:
    actor = await start(bus, GatewayConfig.scripted())
    try:
        await bus.nc.publish(bus.names.tenant_kill("acme"), encode(
            {"tenant": "acme", "reason": "by hand", "by": "test", "at": 0.0, "policy": "kill"}))
        await bus.nc.flush()
        async with asyncio.timeout(10):
            while "acme" not in actor._killed:
                await asyncio.sleep(0.01)
        async with Watch(bus, "run-n") as watch:
            await submit(bus, item(bus, "run-n", llm_args("What is 1 + 1?")))
            refused = await watch.result()
        assert not refused.ok and refused.error["type"] == "TenantKilled"  # type: ignore
        assert "by hand" in refused.error["message"]  # type: ignore[index]
        await bus.nc.publish(bus.names.tenant_reset("acme"), b"{}")
        async with asyncio.timeout(10):
            while "acme" in actor._killed:
                await asyncio.sleep(0.01)
        async with Watch(bus, "run-o") as watch:
            await submit(bus, item(bus, "run-o", llm_args("What is 1 + 1?")))
            assert (await watch.result()).ok
    finally:
        await actor.stop()
