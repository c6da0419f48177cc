"""The workflows whose recorded histories are committed next to this file.

Each ``*.jsonl`` here is a real history recorded by ``python -m tests.golden.record`` against
these definitions. Tests replay them against the code: a change that breaks determinism
fails CI with a readable diff instead of blocking runs in production.
"""

from __future__ import annotations

from typing import Any

from workflow import ActivityContext, ActivityRegistry, RunContext, WorkflowRegistry

registry = WorkflowRegistry()
activities = ActivityRegistry()


@activities.register
async def double(actx: ActivityContext, x: int) -> int:
    return 2 * x


@registry.register(name="approval", version="1")
async def approval(ctx: RunContext, inp: dict[str, Any]) -> dict[str, Any]:
    first = await ctx.activity(double, inp["x"])
    stamp = ctx.now()
    decision = await ctx.wait_signal("approve", timeout=300, default={"ok": False})
    if not (decision.value or {}).get("ok"):
        return {"approved": False, "first": first}
    second, third = await ctx.activity(double, first), await ctx.activity(double, first + 1)
    await ctx.sleep(0.05)
    return {"approved": True, "first": first, "second": second, "third": third,
            "by": decision.sender, "stamped": stamp > 0}
