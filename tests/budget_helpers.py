"""Shared bits of the budget tests: a controllable clock and small helpers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from budget_actor import Ledger, Usage

MODEL = "claude-sonnet-4-5"
# 1,000 input tokens at the 1-hour cache-write rate ($6/MTok) + 1,000 output ($15/MTok).
WORST_1K_1K_NANOS = 21_000_000


@dataclass
class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    now: float = 1_800_000_000.0  # a fixed instant, well inside a calendar day

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def reserve_settle(ledger: Ledger, tenant: str, *, run_id: str | None = None,
                         input_tokens: int = 1000, output_tokens: int = 100) -> Any:
    res = await ledger.reserve(tenant, run_id=run_id, model=MODEL, input_tokens=input_tokens,
                               max_output_tokens=1000)
    return await ledger.settle(res.id, tenant=tenant, model=MODEL,
                               usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens))


async def until(predicate: Any, timeout: float = 10.0, every: float = 0.01) -> None:
    """Wait for ``predicate()`` (sync or async) to be true, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(every)
