"""The router: runs stick to the replica holding their prefix, move when it dies and come
back when it heals, and load stays bounded when the workload is skewed."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import ExitStack

import pytest

from gateway_actor import (
    BreakerConfig,
    CircuitBreaker,
    Gateway,
    GatewayConfig,
    LLMRequest,
    LocalUpstream,
    Message,
    Router,
    ToolResultBlock,
    Upstream,
    UpstreamConfig,
)
from tests._gateway_util import SYSTEM, TOOLS, agent_run


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def replicas() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(UpstreamConfig(replicas=4)) as up:
        yield up


def keys(n: int) -> list[bytes]:
    return [hashlib.blake2b(f"run-{i}".encode(), digest_size=16).digest() for i in range(n)]


async def test_runs_stick_to_replicas(replicas: LocalUpstream) -> None:
    gw = Gateway(GatewayConfig.for_urls(replicas.urls, model="claude-test"))
    runs = await asyncio.gather(*[agent_run(gw, f"run-{i}", f"[scripted:loop] task {i}",
                                            turns=4) for i in range(24)])
    homes = [{r.upstream for r in run} for run in runs]
    assert all(len(h) == 1 for h in homes)  # every turn of a run on one replica
    assert len({next(iter(h)) for h in homes}) == 4  # and the runs spread over all four
    # Sticking is what makes the cache work: every turn after the first reads its prefix.
    for run in runs:
        assert all(t.usage.cache_read_input_tokens > 0 for t in run[1:])
    await gw.close()


def test_affinity_is_the_same_in_every_gateway_and_survives_restarts() -> None:
    def router() -> Router:
        return Router([Upstream(f"r{i}") for i in range(4)])

    a, b = router(), router()
    ks = keys(300)
    assert [a.pick(k).name for k in ks] == [b.pick(k).name for k in ks]
    # Removing one replica moves only its own keys (rendezvous hashing).
    three = Router([Upstream(f"r{i}") for i in (0, 1, 3)])
    moved = [k for k in ks if a.pick(k).name != three.pick(k).name]
    assert moved and all(a.pick(k).name == "r2" for k in moved)


async def test_a_dead_replicas_runs_move_and_come_back(replicas: LocalUpstream) -> None:
    clock = FakeClock()
    config = GatewayConfig.for_urls(replicas.urls, model="claude-test",
                                    breaker=BreakerConfig(open_for=5.0))
    config.pools[0].load_factor = 100.0  # this test is about health, not load
    gw = Gateway(config, clock=clock)
    conversations = {f"run-{i}": [Message(role="user", content=f"[scripted:loop] task {i}")]
                     for i in range(16)}

    async def turn() -> dict[str, str]:
        async def one(run_id: str) -> tuple[str, str]:
            messages = conversations[run_id]
            response = await gw.call(LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages,
                                                max_tokens=200), run_id=run_id)
            messages.append(Message(role="assistant", content=response.content))
            messages.append(Message(role="user", content=[
                ToolResultBlock(tool_use_id=u.id, content="again") for u in response.tool_uses]))
            assert response.upstream is not None
            return run_id, response.upstream

        return dict(await asyncio.gather(*[one(r) for r in conversations]))

    home = await turn()
    victim = Counter(home.values()).most_common(1)[0][0]
    index = int(victim.rsplit("-", 1)[1])
    displaced = {r for r, u in home.items() if u == victim}
    await replicas.replica(index).stop()

    moved = await turn()
    assert all(moved[r] != victim for r in displaced)
    assert all(moved[r] == home[r] for r in home if r not in displaced)  # others stay put
    stopped_requests = replicas.replica(index).stats.requests

    await replicas.replica(index).start()
    clock.now += 6.0  # past the breaker's cool-down: one probe may go through
    probe = await turn()
    assert sum(1 for r in displaced if probe[r] == victim) == 1  # exactly one probe
    assert replicas.replica(index).stats.requests == stopped_requests + 1
    back = await turn()
    assert back == home  # everyone is home again, the displaced runs included
    await gw.close()


def test_load_stays_bounded_under_a_skewed_workload() -> None:
    upstreams = [Upstream(f"r{i}") for i in range(4)]
    router = Router(upstreams, load_factor=1.25)
    # A skewed workload: 3 of every 4 calls in flight belong to runs whose home is r0.
    ks = keys(2000)
    hot = [k for k in ks if router.ranking(k)[0].name == "r0"][:75]
    cold = [k for k in ks if router.ranking(k)[0].name != "r0"][:25]
    workload = [k for pair in zip(hot[::3], hot[1::3], hot[2::3], cold, strict=False)
                for k in pair]
    chosen: dict[bytes, str] = {}
    with ExitStack() as stack:
        for k in workload:
            upstream = router.pick(k)
            chosen[k] = upstream.name
            stack.enter_context(router.using(upstream))
            total = sum(u.in_flight for u in upstreams)
            cap = max(router.min_load, math.ceil(1.25 * total / 4))
            assert max(u.in_flight for u in upstreams) <= cap
        loads = [u.in_flight for u in upstreams]
    assert max(loads) / (sum(loads) / 4) < 1.3
    # Cold runs all stay home; only hot runs spill, and over all three other replicas.
    assert all(chosen[k] == router.ranking(k)[0].name for k in cold)
    spilled = {chosen[k] for k in hot if chosen[k] != "r0"}
    assert spilled == {"r1", "r2", "r3"}
    # Without the bound, r0 would have held three quarters of the load.
    unbounded = Router([Upstream(f"r{i}") for i in range(4)], load_factor=1000.0)
    assert Counter(unbounded.pick(k).name for k in workload)["r0"] == 75


async def test_replica_load_is_bounded_end_to_end(replicas: LocalUpstream) -> None:
    for r in replicas.replicas:
        r.config.base_latency = 0.02  # calls overlap, so in-flight counts matter
    gw = Gateway(GatewayConfig.for_urls(replicas.urls, model="claude-test"))
    router = gw.pools["anthropic"].router
    hot: list[LLMRequest] = []
    cold: list[LLMRequest] = []
    for i in range(2000):
        request = LLMRequest(system=SYSTEM, tools=TOOLS,
                             messages=[Message(role="user", content=f"skewed task {i}")],
                             max_tokens=50)
        home = router.ranking(gw.plan(request).affinity_key)[0].name
        (hot if home == "anthropic-0" else cold).append(request)
        if len(hot) >= 30 and len(cold) >= 10:
            break
    # 30 of the 40 concurrent calls would all go to replica 0 without the bound.
    tasks = [gw.call(r, run_id=f"s{i}") for i, r in enumerate(hot[:30] + cold[:10])]
    await asyncio.gather(*tasks)
    peak = max(r.stats.max_in_flight for r in replicas.replicas)
    assert peak <= math.ceil(1.25 * 40 / 4)
    assert sum(r.stats.requests for r in replicas.replicas) == 40
    await gw.close()


def test_circuit_breaker_opens_probes_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, open_for=1.0, max_open=4.0),
                             clock)
    for _ in range(2):
        breaker.failure(hard=False)
    assert breaker.available(clock.now)
    breaker.failure(hard=False)
    assert not breaker.available(clock.now)
    clock.now += 1.0
    assert breaker.available(clock.now)  # half-open: one probe
    breaker.on_pick()
    assert not breaker.available(clock.now)  # only one
    breaker.failure(hard=False)  # the probe failed: open again, for twice as long
    clock.now += 1.5
    assert not breaker.available(clock.now)
    clock.now += 0.5
    assert breaker.available(clock.now)
    breaker.on_pick()
    breaker.success()
    assert breaker.available(clock.now) and breaker.failures == 0
    breaker.throttled(2.0)  # a 429: parked, not unhealthy
    assert not breaker.available(clock.now) and breaker.failures == 0
    clock.now += 2.0
    assert breaker.available(clock.now)
