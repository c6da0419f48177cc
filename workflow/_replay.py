"""Replaying stored histories against the current code: the determinism check for CI.

``replay_history`` is pure (no bus, no workers): it runs the workflow code over the recorded
events exactly as an orchestrator taking the run over would, and reports whether the code
still issues the steps the history recorded. ``nerve replay <run_id>`` and
``assert_replays`` (for pytest) are built on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus import Bus
from nerve import NondeterminismError, RunNotFound
from persistence import EVENT_ADAPTER, Event, RunContinued, RunHistory, RunStarted
from workflow._context import RunContext
from workflow._definition import WorkflowRegistry, workflows
from workflow._instance import InstanceState, WorkflowInstance


@dataclass(slots=True)
class ReplayReport:
    """The outcome of replaying one history."""

    run_id: str
    workflow: str
    recorded_version: str
    code_version: str
    events: int
    state: str
    deterministic: bool
    error: str | None = None
    diff: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> str:
        """The report as text a person reads (the diff, when it is not deterministic)."""
        head = (f"run {self.run_id} ({self.workflow} recorded v{self.recorded_version}, "
                f"code v{self.code_version}): {self.events} events replayed in "
                f"{self.seconds * 1000:.1f} ms")
        if self.deterministic:
            return f"{head}: deterministic (replay state: {self.state})"
        raised = self.diff.get("error")
        if raised:
            # Not a divergence: the code replayed the history and then raised (a bug).
            return "\n".join([f"{head}: the workflow code raised", f"  {self.error}",
                              "  " + raised.get("traceback", "").rstrip().replace("\n", "\n  ")])
        lines = [f"{head}: NOT deterministic", f"  {self.error}"]
        if self.diff:
            lines.append(f"  at step {self.diff.get('index')}:")
            lines.append(f"    expected (history): {_side(self.diff.get('expected'))}")
            lines.append(f"    got (code):         {_side(self.diff.get('got'))}")
        return "\n".join(lines)


def _side(side: dict[str, Any] | None) -> str:
    if not side:
        return "nothing"
    head = f"{side.get('kind')} {side.get('name')!r}"
    if "args" in side:
        return f"{head} args {json.dumps(side['args'], default=str)[:200]}"
    digest = side.get("args_digest") or ""
    return head + (f" args {digest[:12]}" if digest else "")


def replay_history(events: list[Event], registry: WorkflowRegistry | None = None,
                   names: Any = None) -> ReplayReport:
    """Replay ``events`` against the registered code; never raises for nondeterminism."""
    from bus import Names

    registry = registry or workflows
    if not events or not isinstance(events[0], RunStarted):
        raise RunNotFound("a history must start with run_started")
    started = events[0]
    definition = registry.get(started.workflow, started.version)
    names = names or Names()
    t0 = time.perf_counter()
    # Each segment (continue-as-new) replays on its own, from its own start.
    cuts = [0] + [i for i, e in enumerate(events) if isinstance(e, RunContinued)]
    err = None
    for n, start in enumerate(cuts):
        end = cuts[n + 1] + 1 if n + 1 < len(cuts) else len(events)
        segment = events[start:end]
        head = segment[0] if isinstance(segment[0], RunContinued) else None
        instance = WorkflowInstance(definition.fn, started,
                                    lambda inst: RunContext(inst, names), recorded=segment,
                                    segment=head, fail_on=definition.fail_on)
        for event in segment:
            instance.apply(event, recorded=True)
            instance.take_commands()
            if instance.state is InstanceState.BLOCKED:
                break
        if instance.error is not None:
            err = instance.error
            break
    seconds = time.perf_counter() - t0
    return ReplayReport(
        run_id=started.run_id, workflow=started.workflow, recorded_version=started.version,
        code_version=definition.version, events=len(events), state=instance.state.value,
        deterministic=err is None, error=err.message if err else None,
        diff=err.fields.get("diff", {}) if err else {}, seconds=seconds)


async def replay_run(bus: Bus, run_id: str, registry: WorkflowRegistry | None = None,
                     ) -> ReplayReport:
    """Fetch a run's history from the bus and replay it."""
    events = await RunHistory(bus, run_id).read()
    if not events:
        raise RunNotFound(f"no run {run_id}", run_id=run_id)
    return replay_history(events, registry, bus.names)


def save_history(events: list[Event], path: str | Path) -> None:
    """Write a history as JSON (one event per line) for golden-history tests."""
    Path(path).write_text("".join(json.dumps(e.model_dump(mode="json")) + "\n" for e in events))


def load_history(path: str | Path) -> list[Event]:
    """Read a history written by :func:`save_history` (or ``nerve show --json``'s events,
    one per line)."""
    return [EVENT_ADAPTER.validate_json(line) for line in Path(path).read_text().splitlines()
            if line.strip()]


def assert_replays(history: list[Event] | str | Path, registry: WorkflowRegistry | None = None,
                   ) -> ReplayReport:
    """For pytest: fail with the readable diff if the code no longer replays ``history`` (a
    list of events, or the path of a file :func:`save_history` wrote)."""
    events = load_history(history) if isinstance(history, str | Path) else history
    report = replay_history(events, registry)
    if not report.deterministic:
        raise NondeterminismError(report.describe(), run_id=report.run_id, diff=report.diff)
    return report
