"""Leases: exclusive, expiring, compare-and-set."""

from __future__ import annotations

import asyncio

import pytest

from bus import Bus
from nerve import ConfigError, LeaseLostError
from supervisor import Lease, lease_entries, watch_leases


async def test_concurrent_contenders_never_both_win(bus: Bus) -> None:
    for round_ in range(25):
        contenders = [Lease(bus, f"run.race{round_}", holder=f"h{i}", ttl=5) for i in range(6)]
        won = await asyncio.gather(*(c.acquire() for c in contenders))
        assert sum(won) == 1, f"round {round_}: {won}"


async def test_two_contenders_exactly_one_wins_and_the_other_takes_over(bus: Bus) -> None:
    contenders = [Lease(bus, "run.r1", holder=f"h{i}", ttl=1.0) for i in range(8)]
    won = await asyncio.gather(*(c.acquire() for c in contenders))
    assert sum(won) == 1
    winner = contenders[won.index(True)]
    loser = contenders[(won.index(True) + 1) % len(contenders)]
    # While the winner renews, nobody else gets in.
    winner.keep_alive()
    await asyncio.sleep(1.6)
    assert not await loser.acquire()
    # The winner dies: it stops renewing without releasing.
    await winner.stop_keep_alive()
    await loser.wait_acquire(poll=0.05, timeout=10)
    record, _ = await loser.current()
    assert record.holder == loser.holder
    with pytest.raises(LeaseLostError):
        await winner.renew()


async def test_a_lease_lost_and_taken_back_is_renewed_again(bus: Bus) -> None:
    """An orchestrator stalled past its TTL (SIGSTOP, a long GC) loses its host lease,
    takes it back in on_lost and keeps it: renewals must start over, or the lease lapses
    again one TTL later and peers take its runs while it still drives them."""
    lease = Lease(bus, "host.stalled", holder="o1", ttl=1.0)
    assert await lease.acquire()
    regained = asyncio.Event()

    async def on_lost(exc: LeaseLostError) -> None:
        await lease.wait_acquire(poll=0.05, timeout=10)
        lease.keep_alive(on_lost)
        regained.set()

    lease.keep_alive(on_lost)
    kv = await bus.kv(bus.names.leases_bucket)
    await kv.delete(lease.key)  # what an expiry looks like to renew()
    await asyncio.wait_for(regained.wait(), 10)
    await asyncio.sleep(3.5)  # past three TTLs
    current = await Lease(bus, "host.stalled", holder="o2", ttl=1.0).current()
    assert current is not None and current[0].holder == "o1"
    await lease.stop_keep_alive()


async def test_release_frees_it_at_once(bus: Bus) -> None:
    a = Lease(bus, "host.a", holder="a", ttl=30)
    b = Lease(bus, "host.a", holder="b", ttl=30)
    assert await a.acquire()
    assert not await b.acquire()
    await a.release()
    assert await b.acquire()


async def test_same_holder_reacquires_its_own_lease(bus: Bus) -> None:
    a = Lease(bus, "host.same", holder="a", ttl=30)
    assert await a.acquire()
    again = Lease(bus, "host.same", holder="a", ttl=30)
    assert await again.acquire()
    with pytest.raises(LeaseLostError):
        await a.renew()  # the old handle's revision is stale now


async def test_watch_sees_a_lease_expire(bus: Bus) -> None:
    lease = Lease(bus, "host.w", holder="w", ttl=1.0)
    changes = []

    async def follow() -> None:
        async for change in watch_leases(bus, "host.*"):
            changes.append(change)
            if change.record is None:
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    assert await lease.acquire()
    await asyncio.wait_for(watcher, 10)
    assert changes[0].record.holder == "w"
    assert changes[-1].record is None and changes[-1].key == "host.w"


async def test_ttl_below_the_server_minimum_is_refused(bus: Bus) -> None:
    with pytest.raises(ConfigError, match="minimum"):
        Lease(bus, "host.x", holder="x", ttl=0.5)


async def test_a_snapshot_of_live_leases_never_misses_one(bus: Bus) -> None:
    """Every live key comes back, every time, released and expired ones never: the orchestrator
    decides which runs are orphaned from this snapshot, so a missed host would have a live
    owner's runs claimed from under it."""
    held = [Lease(bus, f"host.snap{i}", holder=f"h{i}", ttl=30) for i in range(40)]
    assert all(await asyncio.gather(*(lease.acquire() for lease in held)))
    await held[0].release()
    short = Lease(bus, "host.brief", holder="brief", ttl=1)
    assert await short.acquire()
    await asyncio.sleep(1.5)  # its TTL runs out: the server leaves an expiry marker
    want = {f"host.snap{i}" for i in range(1, 40)}
    # Many at once, so deliveries and API replies interleave on the connection.
    for found in await asyncio.gather(*(lease_entries(bus, "host.*") for _ in range(40))):
        assert set(found) == want
        assert found["host.snap7"][1] == held[7].revision
    assert await lease_entries(bus, "nothing.*") == {}
