"""Workflows and activities used by the chaos tests (imported by orchestrator processes).

``count`` records each execution in a file under ``$NERVE_TEST_EFFECTS`` (one line per
execution: the idempotency key), deliberately *not* idempotent: the test counts lines to
prove the runtime executed every step exactly once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from workflow import ActivityContext, RunContext, activity, workflow


@activity
def count(actx: ActivityContext, n: int, work: float = 0.0) -> int:
    time.sleep(work)  # a step that takes a while (this runs in a worker thread)
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
        total += await ctx.activity(count, i, inp.get("work", 0.0))
        if i == inp.get("sleep_at"):
            await ctx.sleep(inp.get("sleep", 0.5))
    return {"total": total, "token": ctx.uuid()[:8]}


@workflow(name="chaos_segments")
async def chaos_segments(ctx: RunContext, inp: dict[str, Any]) -> dict[str, Any]:
    """Counts to ``steps`` in segments of ``per_segment`` steps (continue-as-new)."""
    done, total = inp.get("done", 0), inp.get("total", 0)
    for i in range(done, min(done + inp["per_segment"], inp["steps"])):
        total += await ctx.activity(count, i, inp.get("work", 0.0))
    done = min(done + inp["per_segment"], inp["steps"])
    if done < inp["steps"]:
        ctx.continue_as_new({**inp, "done": done, "total": total})
    return {"total": total, "segments": done // inp["per_segment"]}
