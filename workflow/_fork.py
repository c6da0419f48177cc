"""Forking a run: a new run that starts from the first N events of another one.

The fork's history begins with its own ``RunStarted`` (``forked_from`` says where from) and
a copy of the parent's events 1..N-1; its workflow replays that prefix, deterministically,
and goes live from there. Steps open at the fork point run again in the fork (under the
fork's own idempotency keys). Its sandbox starts from the parent sandbox's snapshot at the
last step boundary inside the prefix (``forked_from["step_index"]``), so the two runs diverge
without seeing each other's writes.
"""

from __future__ import annotations

from bus import Bus
from nerve import TaskRejected
from persistence import (
    TERMINAL_TYPES,
    Event,
    ForkSpec,
    RunHistory,
    RunStarted,
    StepCompleted,
)

# Events about the parent's ownership or its end do not belong in the fork.
_NOT_COPIED = TERMINAL_TYPES | {"owner_changed", "run_blocked"}


async def fork_history(bus: Bus, spec: ForkSpec, tenant: str, run_id: str,
                       task_id: str | None = None) -> list[Event]:
    """The first record of a fork of ``spec.run_id`` at history index ``spec.at``."""
    parent_events = await RunHistory(bus, spec.run_id).read()
    if not parent_events or not isinstance(parent_events[0], RunStarted):
        raise TaskRejected(f"cannot fork {spec.run_id}: there is no such run", run_id=spec.run_id)
    parent = parent_events[0]
    if parent.tenant != tenant:
        # Same message as a missing run: a tenant learns nothing about others' runs.
        raise TaskRejected(f"cannot fork {spec.run_id}: there is no such run", run_id=spec.run_id)
    if spec.at > len(parent_events):
        raise TaskRejected(f"cannot fork {spec.run_id} at {spec.at}: its history has "
                           f"{len(parent_events)} events (fork at 1..{len(parent_events)})",
                           run_id=spec.run_id)
    prefix = [e for e in parent_events[1:spec.at] if e.type not in _NOT_COPIED]
    completed = [e.index for e in prefix if isinstance(e, StepCompleted) and e.kind == "sandbox"]
    parent_sandbox = str((parent.forked_from or {}).get("sandbox_id") or parent.run_id)
    started = RunStarted(
        run_id=run_id, tenant=tenant, workflow=parent.workflow, version=parent.version,
        input=parent.input, task_id=task_id, parent_run_id=spec.run_id, labels=parent.labels,
        forked_from={"run_id": spec.run_id, "index": spec.at, "sandbox_id": run_id,
                     "parent_sandbox_id": parent_sandbox,
                     "step_index": max(completed) if completed else None})
    return [started, *prefix]
