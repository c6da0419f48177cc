"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended.

    It cancels again until the task is done: on Python 3.11 a cancellation that lands while
    an ``asyncio.wait_for`` inside the task completes can be lost (gh-86296; nats-py's
    ``next_msg`` uses ``wait_for``). ``asyncio.wait`` never raises the task's own
    CancelledError, so only a cancellation of the caller propagates from here.
    """
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)


__all__ = ["stop_task"]
