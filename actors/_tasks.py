"""Stopping tasks reliably."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float | None = None,
                          every: float = 0.2) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait until they end; return those still running at ``timeout``.

    Cancels again, every ``every`` seconds, while a task runs: on Python 3.11 a cancellation
    that lands while an ``asyncio.wait_for`` inside the task completes can be lost
    (gh-86296; nats-py's ``fetch`` and ``next_msg`` use ``wait_for``). ``asyncio.wait``
    never raises a task's own CancelledError: only a cancellation of the caller propagates.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        wait = every if deadline is None else min(every, deadline - loop.time())
        if wait <= 0:
            break
        _done, pending = await asyncio.wait(pending, timeout=wait)
    return pending


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended (see :func:`cancel_and_wait`)."""
    if task is not None:
        await cancel_and_wait([task])
