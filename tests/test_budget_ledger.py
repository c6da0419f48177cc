"""The ledger against a real nats-server: reserve -> settle -> release, limits, kill-switch."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from budget_actor import (
    BudgetActor,
    KillNotice,
    Ledger,
    Limits,
    ResetNotice,
    Usage,
    kill_notices,
)
from budget_actor._state import TenantState
from bus import Bus, ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, Names, connect, provision
from nerve import (
    BudgetExceeded,
    ConfigError,
    LedgerUnavailable,
    ReservationNotFound,
    TenantKilled,
    UnknownModel,
    UnknownTenant,
)
from tests.budget_helpers import MODEL, WORST_1K_1K_NANOS, FakeClock, reserve_settle


async def stored(bus: Bus, tenant: str) -> tuple[TenantState, int]:
    kv = await bus.kv(bus.names.budgets_bucket)
    entry = await kv.get(Names.budget_key(tenant))
    return TenantState.decode(tenant, entry.value), entry.revision


async def test_reserve_settle_release_roundtrip(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("acme", Limits(usd_per_day=1.0))
    res = await ledger.reserve("acme", run_id="run1", model=MODEL, input_tokens=1000,
                               max_output_tokens=1000)
    assert res.amount_nanos == WORST_1K_1K_NANOS and res.tokens == 2000 and res.guarded
    st, _ = await stored(bus, "acme")
    assert st.reserved_nanos == WORST_1K_1K_NANOS and len(st.open) == 1

    usage = Usage(input_tokens=200, cache_read_input_tokens=800, output_tokens=100)
    s = await ledger.settle(res.id, tenant="acme", model=MODEL, usage=usage)
    # 200 x $3 + 800 x $0.30 + 100 x $15 per MTok
    assert s.cost_nanos == 600_000 + 240_000 + 1_500_000
    assert s.status == "settled" and s.released_nanos == WORST_1K_1K_NANOS - s.cost_nanos
    st, _ = await stored(bus, "acme")
    assert st.reserved_nanos == 0 and st.windows["day"].nanos == s.cost_nanos
    assert st.windows["day"].tokens == 1100

    other = await ledger.reserve("acme", model=MODEL, input_tokens=10, max_output_tokens=10)
    assert await ledger.release(other.id, tenant="acme") is True
    assert await ledger.release(other.id, tenant="acme") is False  # idempotent
    st, _ = await stored(bus, "acme")
    assert st.reserved_nanos == 0 and st.windows["day"].nanos == s.cost_nanos


async def test_settle_is_idempotent_by_reservation_id(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("t", Limits(usd_per_day=1.0))
    res = await ledger.reserve("t", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    usage = Usage(input_tokens=1000, output_tokens=500)
    first = await ledger.settle(res.id, tenant="t", model=MODEL, usage=usage)
    # Settled again: by the same process, concurrently, and by another process's ledger.
    again = await asyncio.gather(
        *(ledger.settle(res.id, tenant="t", model=MODEL, usage=usage) for _ in range(5)),
        Ledger(bus).settle(res.id, tenant="t", model=MODEL, usage=usage))
    assert first.status == "settled"
    assert {s.status for s in again} == {"duplicate"}
    assert all(s.cost_nanos == first.cost_nanos for s in again)
    st, _ = await stored(bus, "t")
    assert st.windows["day"].nanos == first.cost_nanos and st.calls == 1


async def test_same_key_reserves_once(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("t", Limits(usd_per_day=1.0))
    a, b = await asyncio.gather(*(ledger.reserve("t", model=MODEL, input_tokens=10,
                                                 max_output_tokens=10, key="run1:3")
                                  for _ in range(2)))
    assert a.id == b.id and (a.reused or b.reused)
    st, _ = await stored(bus, "t")
    assert len(st.open) == 1


async def test_thousand_concurrent_reservations_admit_exactly_what_fits(bus: Bus) -> None:
    limit_usd = 0.5
    fits = int(limit_usd * 1e9) // WORST_1K_1K_NANOS  # 23
    ledger = Ledger(bus)
    await ledger.set_limits("cap", Limits(usd_per_day=limit_usd))
    results = await asyncio.gather(
        *(ledger.reserve("cap", model=MODEL, input_tokens=1000, max_output_tokens=1000)
          for _ in range(1000)), return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(admitted) == fits
    assert all(isinstance(r, BudgetExceeded) for r in refused)
    assert len({r.id for r in admitted}) == fits
    st, _ = await stored(bus, "cap")
    assert len(st.open) == fits and st.violations() == []


async def test_thousand_reservations_from_competing_processes_admit_exactly_what_fits(
        bus: Bus, nats_server: EmbeddedNats, prefix: str) -> None:
    # Four ledgers on four connections stand for four gateway processes: their batches
    # collide on the key's revision and must retry, never over-admit.
    limit_usd = 2.0
    fits = int(limit_usd * 1e9) // WORST_1K_1K_NANOS  # 95
    buses = [await connect(ConnectOptions(servers=[nats_server.url], prefix=prefix))
             for _ in range(4)]
    try:
        ledgers = [Ledger(b, max_batch=16) for b in buses]
        await ledgers[0].set_limits("cap", Limits(usd_per_day=limit_usd))
        results = await asyncio.gather(
            *(ledgers[i % 4].reserve("cap", model=MODEL, input_tokens=1000,
                                     max_output_tokens=1000) for i in range(1000)),
            return_exceptions=True)
        admitted = [r for r in results if not isinstance(r, BaseException)]
        assert {type(r) for r in results if isinstance(r, BaseException)} == {BudgetExceeded}
        assert len(admitted) == fits
        assert sum(led.stats["conflicts"] for led in ledgers) > 0  # they did compete
        st, _ = await stored(bus, "cap")
        assert len(st.open) == fits and st.violations() == []
    finally:
        for b in buses:
            await b.close()


async def test_settled_plus_reserved_never_exceeds_the_limit_under_churn(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("churn", Limits(usd_per_minute=0.2, usd_per_day=0.3))
    admitted = 0

    async def client(n: int) -> None:
        nonlocal admitted
        for i in range(15):
            try:
                res = await ledger.reserve("churn", model=MODEL, input_tokens=1000,
                                           max_output_tokens=1000)
            except BudgetExceeded:
                continue
            admitted += 1
            if (n + i) % 3 == 0:
                await ledger.release(res.id, tenant="churn")
            else:
                await ledger.settle(res.id, tenant="churn", model=MODEL,
                                    usage=Usage(input_tokens=1000, output_tokens=(n * i) % 900))

    await asyncio.gather(*(client(n) for n in range(8)))
    st, _ = await stored(bus, "churn")
    assert admitted > 0 and st.violations() == [] and st.reserved_nanos == 0
    assert st.windows["day"].nanos <= 300_000_000


async def test_unsettled_reservations_expire_by_sweeper_and_lazily(bus: Bus) -> None:
    clock = FakeClock()
    ledger = Ledger(bus, clock=clock)
    await ledger.set_limits("exp", Limits(usd_per_day=0.05, reservation_ttl=30))
    a = await ledger.reserve("exp", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    await ledger.reserve("exp", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    assert a.expires_at == clock.now + 30
    with pytest.raises(BudgetExceeded):  # 2 x $0.021 held; a third does not fit
        await ledger.reserve("exp", model=MODEL, input_tokens=1000, max_output_tokens=1000)

    # The sweeper releases them once they expire (and not before).
    actor = BudgetActor(clock=clock, breaker=False, sweep_interval=3600)
    await actor.start(bus)
    try:
        clock.advance(29)
        await actor.sweep_once()
        st, _ = await stored(bus, "exp")
        assert len(st.open) == 2
        clock.advance(2)
        await actor.sweep_once()
        st, _ = await stored(bus, "exp")
        assert st.open == {} and st.reserved_nanos == 0 and set(st.expired) == {1, 2}
    finally:
        await actor.stop()

    # Lazily: any ledger write notices expired reservations.
    c = await ledger.reserve("exp", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    clock.advance(31)
    d = await Ledger(bus, clock=clock).reserve("exp", model=MODEL, input_tokens=1000,
                                               max_output_tokens=1000)
    st, _ = await stored(bus, "exp")
    assert list(st.open) == [int(d.id.split("-")[1])] and c.id != d.id

    # A settle that arrives after expiry is still charged (the money was spent).
    late = await ledger.settle(a.id, tenant="exp", model=MODEL,
                               usage=Usage(input_tokens=100, output_tokens=10))
    assert late.status == "late" and late.cost_nanos == 450_000
    again = await ledger.settle(a.id, tenant="exp", model=MODEL,
                                usage=Usage(input_tokens=100, output_tokens=10))
    assert again.status == "duplicate"
    st, _ = await stored(bus, "exp")
    assert st.windows["day"].nanos == 450_000


async def test_windows_roll_over_and_never_roll_back(bus: Bus) -> None:
    clock = FakeClock(now=1_800_000_000.0 - 1_800_000_000.0 % 60 + 30)  # mid-minute
    ledger = Ledger(bus, clock=clock)
    await ledger.set_limits("w", Limits(usd_per_minute=0.03))
    await reserve_settle(ledger, "w", output_tokens=1000)  # $0.018
    with pytest.raises(BudgetExceeded) as exc:
        await ledger.reserve("w", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    assert exc.value.scope == "minute"
    clock.advance(31)  # the next calendar minute
    await ledger.reserve("w", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    # A writer whose clock lags a minute behind must not wipe the new minute's spend.
    laggard = Ledger(bus, clock=lambda: clock.now - 60)
    tiny = await laggard.reserve("w", model=MODEL, input_tokens=0, max_output_tokens=1)
    await laggard.settle(tiny.id, tenant="w", model=MODEL, usage=Usage(output_tokens=1))
    st, _ = await stored(bus, "w")
    assert st.windows["minute"].start == int(clock.now // 60) * 60
    assert st.windows["minute"].nanos == 15_000 and st.reserved_nanos == WORST_1K_1K_NANOS


async def test_kill_is_broadcast_refuses_and_survives_a_new_ledger_and_actor(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("k", Limits(usd_per_day=1.0))
    async with kill_notices(bus, "k", resets=True) as notices:
        notice = await ledger.kill("k", reason="runaway spend", by="ops", policy="pause")
        got = await notices.next(timeout=5)
        assert isinstance(got, KillNotice) and got.tenant == "k" and got.policy == "pause"
        assert got.reason == "runaway spend" and got.by == "ops" and notice.tenant == "k"

        # A fresh ledger (another process, or this one restarted) reads it from the KV.
        fresh = Ledger(bus)
        assert await fresh.is_killed("k")
        with pytest.raises(TenantKilled) as exc:
            await fresh.reserve("k", model=MODEL, input_tokens=1, max_output_tokens=1)
        assert exc.value.tenant == "k" and "runaway spend" in exc.value.message
        with pytest.raises(TenantKilled):
            await fresh.check_spawn("k")
        actor = BudgetActor(breaker=False, sweep_interval=3600)
        await actor.start(bus)
        try:
            report = await actor.report("k")
            assert report.state == "paused" and report.kill["by"] == "ops"
        finally:
            await actor.stop()

        assert await fresh.reset("k", by="ops")
        assert isinstance(await notices.next(timeout=5), ResetNotice)
        assert not await ledger.is_killed("k")
        await ledger.reserve("k", model=MODEL, input_tokens=1, max_output_tokens=1)
        await ledger.check_spawn("k")


async def test_kill_survives_a_nats_server_restart(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=store))
    await server.start()
    try:
        b = await connect(ConnectOptions(servers=[server.url]))
        await provision(b)
        await Ledger(b).kill("durable", reason="over budget", by="ops")
        await b.close()
    finally:
        await server.stop()
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=store))
    await server.start()
    try:
        b = await connect(ConnectOptions(servers=[server.url]))
        ledger = Ledger(b)
        assert await ledger.is_killed("durable")
        with pytest.raises(TenantKilled):
            await ledger.reserve("durable", model=MODEL, input_tokens=1, max_output_tokens=1)
        await b.close()
    finally:
        await server.stop()


async def test_exhaustion_turns_the_kill_switch_on_until_the_window_ends(bus: Bus) -> None:
    clock = FakeClock()
    ledger = Ledger(bus, clock=clock)
    await ledger.set_limits("ex", Limits(usd_per_hour=0.02, on_exhaustion="pause"))
    async with kill_notices(bus, "ex", resets=True) as notices:
        res = await ledger.reserve("ex", model=MODEL, input_tokens=1000, max_output_tokens=1000,
                                   cache_write="none")  # $0.018 at most: it fits
        await ledger.settle(res.id, tenant="ex", model=MODEL,
                            usage=Usage(input_tokens=1000, output_tokens=1000))  # 90% spent
        with pytest.raises(BudgetExceeded):
            await ledger.reserve("ex", model=MODEL, input_tokens=1000, max_output_tokens=1000)
        kill = await notices.next(timeout=5)
        assert isinstance(kill, KillNotice) and kill.source == "exhaustion"
        hour_end = (int(clock.now // 3600) + 1) * 3600
        assert kill.policy == "pause" and kill.until == hour_end
        with pytest.raises(TenantKilled):  # even a tiny call now
            await ledger.reserve("ex", model=MODEL, input_tokens=1, max_output_tokens=1)
        clock.now = hour_end + 1
        actor = BudgetActor(clock=clock, breaker=False, sweep_interval=3600)
        await actor.start(bus)
        try:
            await actor.sweep_once()  # lifts the kill and says so
        finally:
            await actor.stop()
        assert isinstance(await notices.next(timeout=5), ResetNotice)
        assert not await ledger.is_killed("ex")
        await ledger.reserve("ex", model=MODEL, input_tokens=1000, max_output_tokens=1000,
                             cache_write="none")


async def test_an_oversized_call_is_refused_without_killing(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("big", Limits(usd_per_day=0.01, on_exhaustion="kill"))
    with pytest.raises(BudgetExceeded) as exc:
        await ledger.reserve("big", model=MODEL, input_tokens=1000, max_output_tokens=1000)
    assert "alone exceeds" in exc.value.message
    assert not await ledger.is_killed("big")


async def test_spawn_limit_counts_runs_per_minute(bus: Bus) -> None:
    clock = FakeClock()
    ledger = Ledger(bus, clock=clock)
    await ledger.set_limits("sp", Limits(runs_per_minute=3))
    for _ in range(3):
        await ledger.check_spawn("sp")
    with pytest.raises(BudgetExceeded) as exc:
        await ledger.check_spawn("sp")
    assert exc.value.scope == "spawn"
    clock.advance(60)
    await ledger.check_spawn("sp")


async def test_per_run_limits_hold_across_reservations(bus: Bus) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("pr", Limits(usd_per_day=10.0, usd_per_run=0.05))
    a = await ledger.reserve("pr", run_id="r1", model=MODEL, input_tokens=1000,
                             max_output_tokens=1000)
    b = await ledger.reserve("pr", run_id="r1", model=MODEL, input_tokens=1000,
                             max_output_tokens=1000)
    with pytest.raises(BudgetExceeded) as exc:
        await ledger.reserve("pr", run_id="r1", model=MODEL, input_tokens=1000,
                             max_output_tokens=1000)
    assert exc.value.scope == "run"
    # Other runs have their own budget; the refused one left nothing held in the tenant.
    await ledger.reserve("pr", run_id="r2", model=MODEL, input_tokens=1000,
                         max_output_tokens=1000)
    st, _ = await stored(bus, "pr")
    assert len(st.open) == 3
    await ledger.settle(a.id, tenant="pr", model=MODEL,
                        usage=Usage(input_tokens=1000, output_tokens=1000))  # $0.018
    await ledger.release(b.id, tenant="pr")
    run = await ledger.run_state("pr", "r1")
    assert run is not None and run.nanos == 18_000_000 and run.open == {}
    # Run ledgers age out by themselves (a per-message TTL), so finished runs leave no keys.
    bucket = bus.names.budgets_bucket
    msg = await bus.js.get_last_msg(f"KV_{bucket}",
                                    f"$KV.{bucket}.{Names.budget_run_key('pr', 'r1')}")
    assert (msg.headers or {}).get("Nats-TTL") == "840h"
    await ledger.reserve("pr", run_id="r1", model=MODEL, input_tokens=1000,
                         max_output_tokens=1000)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("pr", run_id="r1", model=MODEL, input_tokens=1000,
                             max_output_tokens=1000)


@pytest.mark.parametrize("limits", [
    {"usd_per_day": -1},
    {"usd_per_day": float("nan")},
    {"usd_per_day": float("inf")},
    {"usd_per_minute": 1e12},
    {"tokens_per_day": -5},
    {"tokens_per_day": 10**20},
    {"runs_per_minute": -1},
    {"reservation_ttl": 0},
    {"breaker": {"window_s": 60}},
    {"usd_per_dya": 10},
    {"usd_per_day": "ten"},
    {"usd_per_day": True},
])
async def test_bad_limits_are_refused_and_change_nothing(bus: Bus, limits: dict) -> None:
    ledger = Ledger(bus)
    await ledger.set_limits("bad", Limits(usd_per_day=5.0))
    _, revision = await stored(bus, "bad")
    with pytest.raises(ConfigError) as exc:
        await ledger.update_limits("bad", limits)
    assert "invalid limits" in exc.value.message
    with pytest.raises(ConfigError):
        await ledger.set_limits("bad", limits)  # type: ignore[arg-type]
    st, after = await stored(bus, "bad")
    assert after == revision and st.limits == Limits(usd_per_day=5.0)


async def test_bad_input_gets_clear_errors_and_changes_nothing(bus: Bus) -> None:
    ledger = Ledger(bus, default_limits=None)
    for tenant in ("a.b", "*", "", "x" * 200, "acme>"):
        with pytest.raises(ConfigError):
            await ledger.reserve(tenant, model=MODEL, input_tokens=1, max_output_tokens=1)
    with pytest.raises(UnknownTenant) as exc:  # no ledger, no default limits
        await ledger.reserve("nobody", model=MODEL, input_tokens=1, max_output_tokens=1)
    assert "nerve budget set --tenant nobody" in exc.value.message
    with pytest.raises(UnknownTenant):
        await ledger.reset("nobody", by="ops")
    with pytest.raises(UnknownTenant):
        await ledger.state("nobody")
    assert await ledger.tenants() == []  # nothing was created

    await ledger.set_limits("t", Limits(usd_per_day=1.0))
    _, revision = await stored(bus, "t")
    with pytest.raises(UnknownModel) as exc:
        await ledger.reserve("t", model="gpt-17", input_tokens=1, max_output_tokens=1)
    assert "gpt-17" in exc.value.message
    for bad in (-1, 1.5, 10**9, True):
        with pytest.raises(ConfigError):
            await ledger.reserve("t", model=MODEL, input_tokens=bad, max_output_tokens=1)
    for res_id in ("nonsense", "abc-", "abc-x1"):
        with pytest.raises(ReservationNotFound):
            await ledger.settle(res_id, tenant="t", model=MODEL, usage=Usage())
    st, _ = await stored(bus, "t")
    with pytest.raises(ReservationNotFound):  # never issued by this ledger
        await ledger.settle(f"{st.epoch}-999", tenant="t", model=MODEL, usage=Usage())
    st, after = await stored(bus, "t")
    assert after == revision and st.next_seq == 1


async def test_unreachable_ledger_fails_closed_or_open(tmp_path: Path) -> None:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "nats"))
    await server.start()
    b = await connect(ConnectOptions(servers=[server.url], initial_attempts=1))
    try:
        await provision(b)
        closed = Ledger(b, timeout=0.5)
        opened = Ledger(b, timeout=0.5, fail_closed=False)
        await closed.set_limits("t", Limits(usd_per_day=1.0))
        await server.stop()
        with pytest.raises(LedgerUnavailable):
            await closed.reserve("t", model=MODEL, input_tokens=1, max_output_tokens=1)
        with pytest.raises(LedgerUnavailable):
            await closed.check_spawn("t")
        with pytest.raises(LedgerUnavailable):
            await closed.is_killed("t")
        res = await opened.reserve("t", model=MODEL, input_tokens=10, max_output_tokens=10)
        assert res.guarded is False
        s = await opened.settle(res.id, tenant="t", model=MODEL, usage=Usage(output_tokens=5))
        assert s.status == "unrecorded"
    finally:
        with contextlib.suppress(OSError):  # closing a connection that has no server
            await b.nc.close()
        await server.stop()


async def test_fail_open_settlement_is_charged_when_the_ledger_answers(bus: Bus) -> None:
    ledger = Ledger(bus, fail_closed=False)
    await ledger.set_limits("fo", Limits(usd_per_day=1.0))
    s = await ledger.settle("open-xyz", tenant="fo", model=MODEL,
                            usage=Usage(input_tokens=1000, output_tokens=100))
    assert s.status == "unreserved" and s.cost_nanos == 4_500_000
    st, _ = await stored(bus, "fo")
    assert st.windows["day"].nanos == 4_500_000 and st.overrun_nanos == 4_500_000
