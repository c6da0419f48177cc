"""Workflows and activities the workflow benchmark runs (imported by worker processes)."""

from __future__ import annotations

from typing import Any

from workflow import ActivityContext, RunContext, activity, workflow


@activity
async def noop(actx: ActivityContext, i: int) -> int:
    return i


@workflow(name="bench_steps")
async def bench_steps(ctx: RunContext, inp: dict[str, Any]) -> int:
    total = 0
    for i in range(inp["steps"]):
        total += await ctx.activity(noop, i)
    return total


@workflow(name="bench_local_steps")
async def bench_local_steps(ctx: RunContext, inp: dict[str, Any]) -> int:
    total = 0
    for i in range(inp["steps"]):
        total += await ctx.activity(noop, i, local=True)
    return total
