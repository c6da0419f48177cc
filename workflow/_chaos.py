"""Fault injection for chaos tests: SIGKILL this process at a named point of a run.

Off unless ``NERVE_CRASH_AT`` is set, e.g. ``scheduled:3`` (after the record scheduling step
3 is durable, before it is dispatched), ``dispatched:3`` (after step 3's work item is
published, before its result), ``result:3`` (after step 3's result arrived, before it is
recorded). Several points may be given, comma-separated.
"""

from __future__ import annotations

import os
import signal

_POINTS: frozenset[tuple[str, int]] = frozenset(
    (point, int(index))
    for point, _, index in (p.strip().partition(":")
                            for p in os.environ.get("NERVE_CRASH_AT", "").split(","))
    if point and index.isdigit()
)


def crash_point(point: str, index: int) -> None:
    """Die here, as a power cut would, if the test asked for this point."""
    if (point, index) in _POINTS:
        os.kill(os.getpid(), signal.SIGKILL)
