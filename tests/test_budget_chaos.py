"""Chaos: a gateway process SIGKILLed while it holds reservations."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from actors import encode, new_id
from budget_actor import BudgetActor, Ledger, Limits
from budget_actor._state import TenantState
from bus import Bus, EmbeddedNats, Names
from tests.budget_helpers import until

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(60)
async def test_reservations_of_a_sigkilled_gateway_expire_and_nothing_is_lost_or_doubled(
        bus: Bus, nats_server: EmbeddedNats, prefix: str) -> None:
    tenant = "crash"
    ledger = Ledger(bus)
    await ledger.set_limits(tenant, Limits(usd_per_day=0.2, reservation_ttl=1.0))
    subject = f"_budget_test.{prefix}.{new_id()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.budget_proc", nats_server.url, prefix, subject,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        # Four lanes: each settles one call, then reserves another and is stuck in it.
        lane = [["reserve", 1000, 1000], ["settle", 0, 1.0, 0.5],
                ["reserve", 1000, 1000], ["sleep", 3600]]
        await bus.nc.publish(subject, encode({"tenant": tenant, "lanes": [lane] * 4}))

        async def holding() -> bool:
            st = await ledger.state(tenant)
            return st.calls == 4 and len(st.open) == 4

        await until(holding, timeout=30)
        proc.send_signal(signal.SIGKILL)  # mid-call: four reservations held, never settled
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    before = await ledger.state(tenant)
    assert before.reserved_nanos > 0

    # Nobody else writes this ledger: only the sweeper can release what the dead process held.
    actor = BudgetActor(sweep_interval=0.1, breaker=False)
    await actor.start(bus)
    try:
        async def released() -> bool:
            return not (await ledger.state(tenant)).open

        await until(released, timeout=20)
    finally:
        await actor.stop()
    after = await ledger.state(tenant)
    assert after.reserved_nanos == 0 and len(after.expired) == 4
    assert after.lifetime_nanos == before.lifetime_nanos and after.calls == 4  # none lost
    kv = await bus.kv(bus.names.budgets_bucket)
    for entry in await kv.history(Names.budget_key(tenant)):
        if entry.value:
            assert TenantState.decode(tenant, entry.value).violations() == []
    # The budget is whole again: what was held can be reserved by someone else.
    await ledger.reserve(tenant, model="claude-haiku-4-5", input_tokens=1000,
                         max_output_tokens=1000)
