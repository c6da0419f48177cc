"""Workflows and activities used by the chaos tests (imported by orchestrator processes).

``count`` records each execution in a file under ``$NERVE_TEST_EFFECTS`` (one line per
execution: the idempotency key), deliberately *not* idempotent: the test counts lines to
prove the runtime executed every step exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from workflow import ActivityContext, RunContext, activity, workflow


@activity
def count(actx: ActivityContext, n: int) -> int:
    path = Path(os.environ["NERVE_TEST_EFFECTS"])
    with path.open("a") as f:
        f.write(f"{actx.key} {actx.attempt}\n")
        f.flush()
        os.fsync(f.fileno())
    return n * n


@workflow(name="chaos")
async def chaos(ctx: RunContext, inp: dict[str, Any]) -> dict[str, Any]:
    total = 0
    for i in range(inp["steps"]):
        total += await ctx.activity(count, i)
        if i == inp.get("sleep_at"):
            await ctx.sleep(inp.get("sleep", 0.5))
    return {"total": total, "token": ctx.uuid()[:8]}
