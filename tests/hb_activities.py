"""An activity whose first attempt kills the worker process running it (heartbeat test)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from workflow import ActivityContext, RetryPolicy, RunContext, activity, workflow


@activity
def dies_once(actx: ActivityContext, marker: str) -> str:
    if actx.attempt == 1 and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)  # the worker's host dies mid-step
    return f"attempt {actx.attempt}"


@workflow(name="hb")
async def hb(ctx: RunContext, inp: dict) -> str:
    return await ctx.activity(dies_once, inp["marker"], retry=RetryPolicy(
        max_attempts=3, heartbeat_timeout=1.0, timeout=120, initial_interval=0.05))
