"""Budget benchmark: reservation throughput, kill-to-stopped latency, runaway overshoot.

    python bench/budget.py [--quick] [--json]

1. **Reservations/s** with 1, 8 and 64 concurrent clients, each looping reserve -> settle on
   one tenant (the worst case: one ledger key). Measured for group commit (the default), for
   one compare-and-set per operation (the baseline it is compared with), and for 64 clients
   spread over 4 OS processes (cross-process CAS contention). The raw ceiling of the key,
   sequential CAS writes with nothing else, is measured too.
2. **Kill-to-stopped** p50/p99: from calling ``Ledger.kill`` until every one of 8
   subscribers (separate connections, as gateways and orchestrators) holds the notice and a
   gateway's ledger refuses the tenant's next reservation.
3. **Overshoot** in a simulated runaway: 16 agents loop reserve -> call -> settle as fast as
   they can (a) into a hard daily limit, with honest and with 30%-low input estimates, and
   (b) into the runaway breaker with the budget actor running; overshoot is compared with
   what was reserved in flight.

Runs on its own embedded nats-server (fsync on every write, as deployed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import run  # noqa: E402
from bench._common import embedded_bus, parse_args, pct, report  # noqa: E402
from budget_actor import (  # noqa: E402
    BreakerPolicy,
    BudgetActor,
    Ledger,
    Limits,
    Usage,
    kill_notices,
)
from budget_actor._state import TenantState  # noqa: E402
from bus import Bus, ConnectOptions, Names, connect  # noqa: E402
from nerve import BudgetExceeded, LedgerUnavailable, TenantKilled  # noqa: E402

MODEL = "claude-sonnet-4-5"
BIG = Limits(usd_per_day=1_000_000.0, max_in_flight=5000)


async def _cycle_loop(ledger: Ledger, tenant: str, stop: float, counts: list[int]) -> None:
    """reserve -> settle until ``stop``; counts[0] cycles done, counts[1] operations that
    gave up (still losing the compare-and-set race after the ledger's timeout)."""
    usage = Usage(input_tokens=800, output_tokens=200)
    while time.perf_counter() < stop:
        try:
            res = await ledger.reserve(tenant, model=MODEL, input_tokens=1000,
                                       max_output_tokens=1000)
        except LedgerUnavailable:
            counts[1] += 1
            continue
        while True:
            try:
                await ledger.settle(res.id, tenant=tenant, model=MODEL, usage=usage)
                break
            except LedgerUnavailable:
                counts[1] += 1
        counts[0] += 1


async def throughput(bus: Bus, clients: int, seconds: float, coalesce: bool) -> dict[str, Any]:
    tenant = f"tp{clients}{'c' if coalesce else 'n'}{random.randrange(10**6)}"
    ledger = Ledger(bus, coalesce=coalesce)
    await ledger.set_limits(tenant, BIG)
    counts = [0, 0]
    start = time.perf_counter()
    await asyncio.gather(*(_cycle_loop(ledger, tenant, start + seconds, counts)
                           for _ in range(clients)))
    elapsed = time.perf_counter() - start
    st = await ledger.state(tenant)
    assert st.violations() == [] and st.calls == counts[0]
    return {"clients": clients, "reservations_per_s": counts[0] / elapsed,
            "ops_per_write": ledger.stats["ops"] / max(1, ledger.stats["writes"]),
            "conflicts": ledger.stats["conflicts"], "gave_up": counts[1]}


async def raw_cas(bus: Bus, seconds: float) -> float:
    """Sequential compare-and-set writes of a ledger-sized value: the key's ceiling."""
    kv = await bus.kv(bus.names.budgets_bucket)
    value = TenantState.new("raw", BIG, time.time()).encode()
    rev = await kv.put("raw.cas", value)
    n = 0
    stop = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < stop:
        rev = await kv.update("raw.cas", value, last=rev)
        n += 1
    return n / (time.perf_counter() - start)


async def _worker(url: str, prefix: str, tenant: str, clients: int, seconds: float,
                  start_at: float) -> None:
    bus = await connect(ConnectOptions(servers=[url], prefix=prefix))
    ledger = Ledger(bus)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    counts = [0, 0]
    stop = time.perf_counter() + seconds
    await asyncio.gather(*(_cycle_loop(ledger, tenant, stop, counts) for _ in range(clients)))
    print(json.dumps({"count": counts[0], "conflicts": ledger.stats["conflicts"],
                      "gave_up": counts[1]}), flush=True)
    await bus.close()


async def multiprocess(bus: Bus, url: str, procs: int, clients: int,
                       seconds: float) -> dict[str, Any]:
    tenant = f"mp{random.randrange(10**6)}"
    await Ledger(bus).set_limits(tenant, BIG)
    start_at = time.time() + 3.0  # after every worker has imported and connected
    workers = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", url, bus.names.prefix, tenant,
        str(clients // procs), str(seconds), str(start_at), stdout=subprocess.PIPE)
        for _ in range(procs)]
    outs = [json.loads((await w.communicate())[0].decode().strip().splitlines()[-1])
            for w in workers]
    st = await Ledger(bus).state(tenant)
    assert st.violations() == []
    total = sum(o["count"] for o in outs)
    assert st.calls == total
    return {"clients": clients, "processes": procs, "reservations_per_s": total / seconds,
            "conflicts": sum(o["conflicts"] for o in outs),
            "gave_up": sum(o["gave_up"] for o in outs)}


async def kill_latency(bus: Bus, url: str, rounds: int, subscribers: int = 8) -> dict[str, Any]:
    tenant = "victim"
    admin = Ledger(bus)
    await admin.set_limits(tenant, BIG)
    subs_buses = [await connect(ConnectOptions(servers=[url], prefix=bus.names.prefix))
                  for _ in range(subscribers + 1)]
    gateway = Ledger(subs_buses[-1])
    followers = [await kill_notices(b, tenant).open() for b in subs_buses[:-1]]
    samples = []
    try:
        for _ in range(rounds):
            # The gateway has a warm cache, as in steady state: its next write would go
            # to the revision it knows, and must find the kill instead.
            res = await gateway.reserve(tenant, model=MODEL, input_tokens=10,
                                        max_output_tokens=10)
            await gateway.release(res.id, tenant=tenant)
            heard = [asyncio.ensure_future(f.next(timeout=10)) for f in followers]
            t0 = time.perf_counter()
            await admin.kill(tenant, reason="bench", by="bench")
            try:
                await gateway.reserve(tenant, model=MODEL, input_tokens=10,
                                      max_output_tokens=10)
                raise AssertionError("a killed tenant reserved")
            except TenantKilled:
                refused = time.perf_counter()
            await asyncio.gather(*heard)
            samples.append(max(refused, time.perf_counter()) - t0)
            await admin.reset(tenant, by="bench")
    finally:
        for f in followers:
            await f.close()
        for b in subs_buses:
            await b.close()
    return {"rounds": rounds, "subscribers": subscribers, "p50_ms": pct(samples, 50) * 1000,
            "p99_ms": pct(samples, 99) * 1000, "max_ms": max(samples) * 1000}


async def _agent(ledger: Ledger, tenant: str, run_id: str, estimate_factor: float,
                 stop: asyncio.Event) -> None:
    rng = random.Random(run_id)
    while not stop.is_set():
        real_input = rng.randrange(500, 4000)
        try:
            res = await ledger.reserve(tenant, run_id=run_id, model=MODEL,
                                       input_tokens=int(real_input * estimate_factor),
                                       max_output_tokens=800, cache_write="none")
        except (BudgetExceeded, TenantKilled):
            return
        await asyncio.sleep(rng.uniform(0.002, 0.01))  # the model thinks
        usage = Usage(input_tokens=real_input, output_tokens=rng.randrange(50, 800))
        await ledger.settle(res.id, tenant=tenant, model=MODEL, usage=usage)


async def runaway_limit(bus: Bus, estimate_factor: float, agents: int = 16) -> dict[str, Any]:
    tenant = f"rl{random.randrange(10**6)}"
    ledger = Ledger(bus)
    limit = 0.5
    await ledger.set_limits(tenant, Limits(usd_per_day=limit, on_exhaustion="refuse"))
    max_in_flight = [0]

    async def watch() -> None:  # the most ever reserved at once, from the ledger itself
        kv = await bus.kv(bus.names.budgets_bucket)
        w = await kv.watch(Names.budget_key(tenant))
        async for e in w:
            if e is not None and e.value:
                st = TenantState.decode(tenant, e.value)
                max_in_flight[0] = max(max_in_flight[0], st.reserved_nanos)

    watcher = asyncio.create_task(watch())
    stop = asyncio.Event()
    await asyncio.gather(*(_agent(ledger, tenant, f"run{i}", estimate_factor, stop)
                           for i in range(agents)))
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    st = await ledger.state(tenant)
    spent = st.lifetime_nanos / 1e9
    return {"estimate_factor": estimate_factor, "limit_usd": limit, "spent_usd": spent,
            "overshoot_usd": max(0.0, spent - limit), "calls": st.calls,
            "max_in_flight_usd": max_in_flight[0] / 1e9, "overrun_usd": st.overrun_nanos / 1e9}


async def runaway_breaker(bus: Bus, agents: int = 16) -> dict[str, Any]:
    tenant = f"rb{random.randrange(10**6)}"
    ledger = Ledger(bus)
    threshold = 0.2
    await ledger.set_limits(tenant, Limits(usd_per_day=100.0, breaker=BreakerPolicy(
        tenant_usd_per_window=threshold)))
    actor = BudgetActor(sweep_interval=3600)
    await actor.start(bus)
    at_kill: dict[str, Any] = {}
    try:
        notices = await kill_notices(bus, tenant).open()

        async def on_kill() -> None:
            await notices.next(timeout=60)
            # One revision, read atomically: what was spent and what was still in flight
            # once the kill was in the ledger. Nothing new can be reserved after it.
            st = await ledger.state(tenant)
            at_kill.update(spent=st.lifetime_nanos, reserved=st.reserved_nanos)

        killer = asyncio.create_task(on_kill())
        stop = asyncio.Event()
        t0 = time.perf_counter()
        await asyncio.gather(*(_agent(ledger, tenant, f"run{i}", 1.0, stop)
                               for i in range(agents)))
        elapsed = time.perf_counter() - t0
        await killer
        await notices.close()
    finally:
        await actor.stop()
    st = await ledger.state(tenant)
    trip = actor.trips[0]
    after = st.lifetime_nanos - at_kill["spent"]
    return {"threshold_usd_per_10s": threshold, "burn_at_trip_usd":
            trip.evidence["usd_in_window"], "spent_usd": st.lifetime_nanos / 1e9,
            "spent_after_kill_usd": after / 1e9,
            "in_flight_at_kill_usd": at_kill["reserved"] / 1e9,
            "within_in_flight": after <= at_kill["reserved"], "seconds": elapsed}


async def main(quick: bool) -> dict[str, Any]:
    seconds = 2.0 if quick else 6.0
    results: dict[str, Any] = {}
    async with embedded_bus(prefix="bench") as (server, bus):
        raw = await raw_cas(bus, seconds)
        results["raw_cas_writes_per_s"] = round(raw)
        print(f"raw CAS writes on one key (sequential, the baseline): {raw:,.0f}/s")
        for clients in (1, 8, 64):
            grouped = await throughput(bus, clients, seconds, True)
            single = await throughput(bus, clients, seconds, False)
            g, o = grouped["reservations_per_s"], single["reservations_per_s"]
            results[f"reservations_per_s_{clients}_clients"] = round(g)
            results[f"reservations_per_s_{clients}_clients_one_cas_per_op"] = round(o)
            results[f"ops_per_write_{clients}_clients"] = round(grouped["ops_per_write"], 1)
            print(f"reserve+settle, {clients:>2} clients: group commit {g:>7,.0f}/s "
                  f"({grouped['ops_per_write']:.1f} ops/write, {2 * g / raw:.2f}x the raw "
                  f"CAS rate), one CAS per op {o:>6,.0f}/s ({single['conflicts']} conflicts, "
                  f"{single['gave_up']} gave up): x{g / max(o, 1):.1f}")
        async with embedded_bus(sync_always=False, prefix="lazy") as (_, lazy):
            lazy_raw = await raw_cas(lazy, seconds)
            lazy_one = await throughput(lazy, 1, seconds, True)
        results["raw_cas_writes_per_s_lazy_fsync"] = round(lazy_raw)
        results["reservations_per_s_1_clients_lazy_fsync"] = round(
            lazy_one["reservations_per_s"])
        print(f"1 client on a server with lazy fsync (nerve up --lazy-sync): "
              f"{lazy_one['reservations_per_s']:,.0f}/s (raw CAS {lazy_raw:,.0f}/s): one "
              "sequential client is bound by the durable write of each operation")
        mp = await multiprocess(bus, server.url, 4, 64, seconds)
        results["reservations_per_s_64_clients_4_processes"] = round(mp["reservations_per_s"])
        results["cas_conflicts_64_clients_4_processes"] = mp["conflicts"]
        results["gave_up_64_clients_4_processes"] = mp["gave_up"]
        print(f"reserve+settle, 64 clients in 4 processes: {mp['reservations_per_s']:,.0f}/s "
              f"({mp['conflicts']} CAS conflicts, {mp['gave_up']} gave up)")
        kl = await kill_latency(bus, server.url, 30 if quick else 100)
        results["kill_to_stopped_p50_ms"] = round(kl["p50_ms"], 2)
        results["kill_to_stopped_p99_ms"] = round(kl["p99_ms"], 2)
        print(f"kill-to-stopped ({kl['subscribers']} subscribers + a gateway's refusal, "
              f"{kl['rounds']} rounds): p50 {kl['p50_ms']:.2f} ms, p99 {kl['p99_ms']:.2f} ms")
        for factor in (1.0, 0.7):
            r = await runaway_limit(bus, factor)
            tag = f"estimates_x{factor}"
            results[f"runaway_limit_{tag}_overshoot_usd"] = round(r["overshoot_usd"], 6)
            results[f"runaway_limit_{tag}_spent_usd"] = round(r["spent_usd"], 6)
            results[f"runaway_limit_{tag}_max_in_flight_usd"] = round(r["max_in_flight_usd"], 6)
            print(f"runaway into a ${r['limit_usd']} limit, input estimates x{factor}: spent "
                  f"${r['spent_usd']:.4f} in {r['calls']} calls, overshoot "
                  f"${r['overshoot_usd']:.4f} (most in flight at once "
                  f"${r['max_in_flight_usd']:.4f}, overrun of reservations "
                  f"${r['overrun_usd']:.4f})")
        rb = await runaway_breaker(bus)
        results["runaway_breaker_spent_after_kill_usd"] = round(rb["spent_after_kill_usd"], 6)
        results["runaway_breaker_in_flight_at_kill_usd"] = round(rb["in_flight_at_kill_usd"], 6)
        results["runaway_breaker_within_in_flight"] = rb["within_in_flight"]
        print(f"runaway into the breaker (${rb['threshold_usd_per_10s']} per 10 s): tripped at "
              f"${rb['burn_at_trip_usd']:.4f}; spent after the kill "
              f"${rb['spent_after_kill_usd']:.4f} <= in flight at the kill "
              f"${rb['in_flight_at_kill_usd']:.4f}: {rb['within_in_flight']}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, prefix, tenant, clients, seconds, start_at = sys.argv[2:8]
        run(_worker(url, prefix, tenant, int(clients), float(seconds), float(start_at)))
        sys.exit(0)
    args = parse_args(__doc__.splitlines()[0])
    figures = run(main(args.quick))  # uvloop, as every nerve process runs
    report("budget", figures, args.json)
