"""The sandbox side of forking a run: ``nerve fork <run> --at N``.

A run is forked at history index ``N`` into a new run whose sandbox starts from the
workspace as it was after the last sandbox step with index ``<= N``. The run side
(the workflow engine) builds the new run's history; this module finds the snapshot and
says what the new run's sandbox steps must carry:

    plan = await plan_fork(bus, source_sandbox_id=run_id, at=N, new_sandbox_id=new_run_id)
    # every sandbox WorkItem of the new run then carries
    #   meta = {"sandbox": plan.meta}   (from_snapshot = plan.snapshot)
    # and goes to nerve.work.sandbox.<new_sandbox_id>; placement does the rest.

``start_fork`` also writes the new sandbox's assignment at once (so it is restored before
the new run's first step arrives) when the caller wants it warm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bus import Bus, check_token
from nerve import SandboxError
from sandbox_actor._records import Assignments, SandboxAssignment
from sandbox_actor._snapshots import WorkspaceStore
from sandbox_actor._types import SandboxSpec


@dataclass(frozen=True, slots=True)
class ForkPlan:
    """Where a fork starts: the snapshot, the step it follows, and the spec to send."""

    source_sandbox_id: str
    new_sandbox_id: str
    snapshot: str | None  # None: the source had no sandbox step <= N (start empty)
    step_index: int | None
    meta: dict[str, Any]


async def plan_fork(bus: Bus, *, source_sandbox_id: str, at: int, new_sandbox_id: str,
                    store: WorkspaceStore | None = None) -> ForkPlan:
    """Find the snapshot of ``source_sandbox_id`` for step index ``<= at``."""
    check_token("sandbox id", new_sandbox_id)
    store = store or WorkspaceStore(bus)
    ref = await store.at_step(source_sandbox_id, at)
    spec = SandboxSpec()
    found = await Assignments(bus).get(source_sandbox_id)
    if found is not None:
        spec = found[0].spec
    meta = spec.model_copy(update={"sandbox_id": new_sandbox_id, "run_id": None,
                                   "from_snapshot": ref.name if ref else None}
                           ).model_dump(mode="json", exclude={"sandbox_id", "run_id"})
    return ForkPlan(source_sandbox_id, new_sandbox_id, ref.name if ref else None,
                    ref.step_index if ref else None, meta)


async def start_fork(bus: Bus, plan: ForkPlan, *, run_id: str, tenant: str = "default"
                     ) -> SandboxAssignment:
    """Create the fork's assignment now (unplaced: the placement actor picks a host)."""
    spec = SandboxSpec.model_validate(plan.meta).model_copy(
        update={"sandbox_id": plan.new_sandbox_id, "run_id": run_id, "tenant": tenant})
    record = SandboxAssignment(sandbox_id=plan.new_sandbox_id, run_id=run_id, tenant=tenant,
                               inbox=bus.names.inbox(run_id), spec=spec, host=None,
                               generation=0, state="idle")
    if await Assignments(bus).put(record, None) is None:
        raise SandboxError(f"sandbox {plan.new_sandbox_id} already exists; pick a new id",
                           sandbox_id=plan.new_sandbox_id)
    return record
