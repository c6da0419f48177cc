"""Property: no interleaving of reserve / settle / release, from concurrent clients in this
process and from other OS processes, lets settled + reserved exceed a limit; and nothing is
charged twice or lost.

Hypothesis drives a synchronous test body so it can shrink a failing example; each example
runs on its own event loop against the session's real nats-server, beside two long-lived
worker processes that run their share of the example's program.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import encode, new_id, unpack
from budget_actor import Ledger, Limits
from budget_actor._state import TenantState
from bus import ConnectOptions, EmbeddedNats, Names, connect, provision
from tests.budget_proc import run_program

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS_CLIENTS = 3
OS_PROCESSES = 2

op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 4000), st.integers(1, 2000)),
    st.tuples(st.just("settle"), st.integers(0, 7), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 7)),
).map(list)
lane = st.lists(op, min_size=1, max_size=12)
program = st.lists(lane, min_size=1, max_size=3)
limits = st.builds(
    lambda minute, day, tokens: Limits(usd_per_minute=minute, usd_per_day=day,
                                       tokens_per_minute=tokens, on_exhaustion="refuse"),
    minute=st.sampled_from([0.005, 0.02, 0.05]),
    day=st.sampled_from([0.01, 0.1]),
    tokens=st.sampled_from([None, 8000, 30000]),
)
programs = st.lists(program, min_size=IN_PROCESS_CLIENTS + OS_PROCESSES,
                    max_size=IN_PROCESS_CLIENTS + OS_PROCESSES)


@contextlib.contextmanager
def worker_processes(url: str, prefix: str) -> Iterator[list[str]]:
    subjects = [f"_budget_test.{prefix}.{new_id()}" for _ in range(OS_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.budget_proc", url, prefix, s],
                              cwd=ROOT, stdout=subprocess.PIPE) for s in subjects]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == b"ready", line
        yield subjects
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()


async def _provision(url: str, prefix: str) -> None:
    b = await connect(ConnectOptions(servers=[url], prefix=prefix))
    try:
        await provision(b)
    finally:
        await b.close()


@pytest.mark.timeout(300)
def test_no_interleaving_lets_spend_exceed_a_limit(nats_server: EmbeddedNats,
                                                   prefix: str) -> None:
    url = nats_server.url
    asyncio.run(_provision(url, prefix))
    with worker_processes(url, prefix) as subjects:

        @settings(max_examples=20, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(limits=limits, programs=programs)
        def check(limits: Limits, programs: list[Any]) -> None:
            asyncio.run(run_example(url, prefix, subjects, limits, programs))

        check()


async def run_example(url: str, prefix: str, subjects: list[str], limits: Limits,
                      programs: list[Any]) -> None:
    buses = [await connect(ConnectOptions(servers=[url], prefix=prefix))
             for _ in range(IN_PROCESS_CLIENTS + 1)]
    audit_bus, clients = buses[0], buses[1:]
    try:
        ledgers = [Ledger(c, max_batch=4) for c in clients]
        tenant = new_id("p")
        await ledgers[0].set_limits(tenant, limits)
        kv = await audit_bus.kv(audit_bus.names.budgets_bucket)
        watcher = await kv.watch(Names.budget_key(tenant))
        seen: list[int] = []
        violations: list[str] = []

        async def audit() -> None:
            # Every revision ever stored, checked as it is written.
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                state = TenantState.decode(tenant, entry.value)
                seen.append(entry.revision)
                violations.extend(f"rev {entry.revision}: {v}" for v in state.violations())

        auditor = asyncio.create_task(audit())
        try:
            local = [run_program(led, tenant, programs[i]) for i, led in enumerate(ledgers)]
            remote = [audit_bus.nc.request(
                subject, encode({"tenant": tenant, "lanes": programs[len(ledgers) + i]}),
                timeout=60) for i, subject in enumerate(subjects)]
            results = await asyncio.gather(*local, *remote)
            last = await kv.get(Names.budget_key(tenant))
            async with asyncio.timeout(10):
                while not seen or seen[-1] < last.revision:
                    await asyncio.sleep(0.005)
        finally:
            auditor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await auditor
            await watcher.stop()
        outs = [r if isinstance(r, dict) else unpack(r.data) for r in results]
        final = TenantState.decode(tenant, last.value)
    finally:
        for b in buses:
            await b.close()

    assert violations == [], violations[:5]
    admitted = [a for o in outs for a in o["admitted"]]
    settled = [s for o in outs for s in o["settled"]]
    assert len({a[0] for a in admitted}) == len(admitted)  # every id handed out once
    assert all(s[2] == "settled" for s in settled)
    # Nothing lost, nothing charged twice: the ledger holds exactly the clients' charges.
    assert final.lifetime_nanos == sum(s[1] for s in settled)
    assert final.calls == len(settled)
    assert final.open == {} and final.reserved_nanos == 0  # every lane gave back the rest
    assert final.violations() == []
