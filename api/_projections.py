"""The read model's projections as pure folds: history records in, changed rows out.

Four projections, each a table (or two) in the read model and each with its own stream
position:

* ``runs``: one row per run, its status as :func:`workflow.summarize` would say it, its
  cost, tokens and counts;
* ``steps``: one row per step of a run (scheduled, completed, failed, retrying, ...);
* ``approvals``: every wait for a human approval (a signal wait bound to a tool call's
  digest), pending or decided, with the tool and arguments it is about;
* ``spend``: per tenant, the LLM cost and tokens its runs' histories record.

**Cost per run** comes from the history itself: an ``llm`` step's result is the gateway's
``LLMResponse`` and carries ``cost_usd`` (priced by the gateway when it settles with the
budget) and ``usage``. Reading it from the history, not from ``nerve.events.cost``, keeps
the read model a function of ``NERVE_RUNS`` alone, so a rebuild from the stream gives the
same numbers.

Nothing here reads a clock: every time comes from an event's ``at``, so applying the same
records gives the same rows, whenever and however often they are applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from persistence import (
    CancelRequested,
    Event,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunPaused,
    RunResumed,
    RunStarted,
    SignalReceived,
    SignalTimedOut,
    StepCompleted,
    StepFailed,
    StepScheduled,
    TimerFired,
    WaitAbandoned,
    args_digest,
)

PROJECTIONS = ("runs", "steps", "approvals", "spend")
TASK_EXCERPT = 500


@dataclass(slots=True)
class RunRow:
    """One run as the ``runs`` projection keeps it."""

    run_id: str
    tenant: str
    workflow: str
    version: str
    created_at: float
    updated_at: float
    phase: str = "running"  # running | paused | blocked | completed | failed | cancelled
    task: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    forked_from: dict[str, Any] | None = None
    ended_at: float | None = None
    steps: int = 0
    events: int = 0
    llm_calls: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    waits: dict[str, str] = field(default_factory=dict)  # open signal waits: index -> name
    blocked: dict[str, Any] | None = None
    cancel_requested: bool = False
    segments: int = 1  # continue-as-new starts another
    last_seq: int = 0

    @property
    def status(self) -> str:
        """What :func:`workflow.summarize` says: ``waiting`` is running with an open wait."""
        if self.phase == "running" and self.waits:
            return "waiting"
        return self.phase

    @property
    def waiting_for(self) -> list[str]:
        return sorted(set(self.waits.values()))


@dataclass(slots=True)
class StepRow:
    run_id: str
    idx: int
    kind: str
    name: str
    status: str  # scheduled | retrying | completed | failed | timed_out | abandoned
    attempt: int = 1
    scheduled_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    cost_usd: float | None = None
    error: str | None = None


@dataclass(slots=True)
class ApprovalRow:
    run_id: str
    idx: int
    name: str
    digest: str | None
    requested_at: float
    status: str = "pending"  # pending | approved | rejected | timed_out | expired
    tool: str | None = None
    args: Any = None
    deadline: float | None = None
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class ToolUseRow:
    """A tool call a model asked for: what an approval with its digest is about."""

    run_id: str
    digest: str
    tool: str
    args: Any
    llm_index: int


@dataclass(slots=True)
class SpendRow:
    tenant: str
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    llm_calls: int = 0
    runs: int = 0


@dataclass(slots=True)
class Record:
    """One message of a run's history: its stream sequence, the run, its events."""

    seq: int
    run_id: str
    events: list[Event]


@dataclass(slots=True)
class Batch:
    """The rows a batch of records touches, loaded before and written after the fold.

    The loader fills the dicts with what the database holds for the keys the records name
    (:meth:`keys`); :func:`fold` changes them in place and notes what it changed.
    """

    runs: dict[str, RunRow] = field(default_factory=dict)
    steps: dict[tuple[str, int], StepRow] = field(default_factory=dict)
    approvals: dict[tuple[str, int], ApprovalRow] = field(default_factory=dict)
    tool_uses: dict[tuple[str, str], ToolUseRow] = field(default_factory=dict)
    spend: dict[str, SpendRow] = field(default_factory=dict)
    changed_runs: set[str] = field(default_factory=set)
    changed_steps: set[tuple[str, int]] = field(default_factory=set)
    changed_approvals: set[tuple[str, int]] = field(default_factory=set)
    changed_tool_uses: set[tuple[str, str]] = field(default_factory=set)
    changed_spend: set[str] = field(default_factory=set)
    approvals_by_run: dict[str, set[tuple[str, int]]] = field(default_factory=dict)

    def add_approval(self, row: ApprovalRow) -> None:
        key = (row.run_id, row.idx)
        self.approvals[key] = row
        self.approvals_by_run.setdefault(row.run_id, set()).add(key)


@dataclass(slots=True)
class Keys:
    """What a batch of records may touch, so the loader can fetch it in a few queries."""

    runs: set[str] = field(default_factory=set)
    steps: set[tuple[str, int]] = field(default_factory=set)
    approvals: set[tuple[str, int]] = field(default_factory=set)
    tool_uses: set[tuple[str, str]] = field(default_factory=set)
    ending_runs: set[str] = field(default_factory=set)  # their pending approvals expire
    tenants: set[str] = field(default_factory=set)


def keys_of(records: list[Record]) -> Keys:
    k = Keys()
    for rec in records:
        k.runs.add(rec.run_id)
        for ev in rec.events:
            index = _step_index(ev)
            if index is not None:
                k.steps.add((rec.run_id, index))
                k.approvals.add((rec.run_id, index))
            if isinstance(ev, StepScheduled) and isinstance(ev.args, dict) and \
                    ev.args.get("approves"):
                k.tool_uses.add((rec.run_id, str(ev.args["approves"])))
            if isinstance(ev, RunStarted):
                k.tenants.add(ev.tenant)
            if ev.type in ("run_completed", "run_failed", "run_cancelled", "run_continued"):
                k.ending_runs.add(rec.run_id)
    return k


def _step_index(ev: Event) -> int | None:
    if isinstance(ev, StepScheduled | StepCompleted | StepFailed | TimerFired | SignalTimedOut
                  | WaitAbandoned):
        return ev.index
    if isinstance(ev, SignalReceived):
        return ev.delivered_to
    return None


def fold(batch: Batch, rec: Record, positions: dict[str, int]) -> None:
    """Apply one history record to every projection whose position is behind it."""
    live = {p for p in PROJECTIONS if positions.get(p, 0) < rec.seq}
    if not live:
        return
    run = batch.runs.get(rec.run_id)
    if "runs" in live and run is not None and rec.seq <= run.last_seq:
        live.discard("runs")  # this run's row has seen this record already
    for ev in rec.events:
        if isinstance(ev, RunStarted):
            if run is None:
                run = _new_run(ev)
                batch.runs[rec.run_id] = run
                if "runs" in live:
                    batch.changed_runs.add(rec.run_id)
                if "spend" in live:
                    _spend(batch, ev.tenant).runs += 1
                    batch.changed_spend.add(ev.tenant)
            elif "runs" in live:
                run.events += 1
            continue
        if run is None:
            continue  # a record of a run whose start this stream no longer holds
        if "runs" in live:
            _fold_run(run, ev)
        if "steps" in live:
            _fold_step(batch, rec.run_id, ev)
        if "approvals" in live:
            _fold_approval(batch, rec.run_id, ev)
        if "spend" in live and isinstance(ev, StepCompleted) and ev.kind == "llm":
            cost, usage = _llm_cost(ev.result)
            s = _spend(batch, run.tenant)
            s.llm_calls += 1
            s.cost_usd = round(s.cost_usd + cost, 9)
            s.input_tokens += usage[0]
            s.output_tokens += usage[1]
            s.cache_read_tokens += usage[2]
            s.cache_write_tokens += usage[3]
            batch.changed_spend.add(run.tenant)
    if "runs" in live and run is not None:
        run.last_seq = rec.seq
        if rec.events:
            run.updated_at = max(run.updated_at, rec.events[-1].at)
        batch.changed_runs.add(rec.run_id)


def _new_run(ev: RunStarted) -> RunRow:
    task = None
    if isinstance(ev.input, dict) and isinstance(ev.input.get("task"), str):
        task = ev.input["task"][:TASK_EXCERPT]
    return RunRow(run_id=ev.run_id, tenant=ev.tenant, workflow=ev.workflow, version=ev.version,
                  created_at=ev.at, updated_at=ev.at, task=task, labels=dict(ev.labels),
                  parent_run_id=ev.parent_run_id, forked_from=ev.forked_from, events=1)


def _spend(batch: Batch, tenant: str) -> SpendRow:
    row = batch.spend.get(tenant)
    if row is None:
        row = batch.spend[tenant] = SpendRow(tenant)
    return row


def _llm_cost(result: Any) -> tuple[float, tuple[int, int, int, int]]:
    """``LLMResponse.cost_usd`` and its usage, read defensively (results are plain data)."""
    if not isinstance(result, dict):
        return 0.0, (0, 0, 0, 0)
    cost = result.get("cost_usd")
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}

    def n(key: str) -> int:
        value = usage.get(key)
        return int(value) if isinstance(value, int | float) else 0

    return (float(cost) if isinstance(cost, int | float) else 0.0,
            (n("input_tokens"), n("output_tokens"), n("cache_read_input_tokens"),
             n("cache_creation_input_tokens")))


def _fold_run(run: RunRow, ev: Event) -> None:
    """The same fold as :func:`workflow.summarize`, one event at a time."""
    run.events += 1
    if isinstance(ev, StepScheduled):
        run.steps += 1
        if ev.kind == "signal":
            run.waits[str(ev.index)] = ev.name
    elif isinstance(ev, SignalReceived):
        if ev.delivered_to is not None:
            run.waits.pop(str(ev.delivered_to), None)
    elif isinstance(ev, SignalTimedOut | StepCompleted | WaitAbandoned) or (
            isinstance(ev, StepFailed) and ev.final):
        run.waits.pop(str(ev.index), None)
        if isinstance(ev, StepCompleted) and ev.kind == "llm":
            cost, (inp, out, cread, cwrite) = _llm_cost(ev.result)
            run.llm_calls += 1
            run.cost_usd = round(run.cost_usd + cost, 9)
            run.input_tokens += inp
            run.output_tokens += out
            run.cache_read_tokens += cread
            run.cache_write_tokens += cwrite
    elif isinstance(ev, RunContinued):
        run.segments += 1
        run.waits.clear()  # the new segment waits for nothing yet
    elif isinstance(ev, CancelRequested):
        run.cancel_requested = True
    elif isinstance(ev, RunPaused):
        run.phase = "paused"
    elif isinstance(ev, RunResumed):
        run.phase, run.blocked = "running", None
    elif isinstance(ev, RunBlocked):
        run.phase, run.blocked = "blocked", {"reason": ev.reason, "diff": ev.diff}
    elif isinstance(ev, RunCompleted):
        run.phase, run.result, run.ended_at = "completed", ev.result, ev.at
    elif isinstance(ev, RunFailed):
        run.phase, run.error, run.ended_at = "failed", ev.error, ev.at
    elif isinstance(ev, RunCancelled):
        run.phase, run.ended_at = "cancelled", ev.at
    if isinstance(ev, RunCompleted | RunFailed | RunCancelled):
        # An ended run waits for nothing (whatever its code left open) and is not blocked.
        run.waits.clear()
        run.blocked = None


def _fold_step(batch: Batch, run_id: str, ev: Event) -> None:
    index = _step_index(ev)
    if index is None:
        return
    key = (run_id, index)
    row = batch.steps.get(key)
    if isinstance(ev, StepScheduled):
        if row is None:
            row = StepRow(run_id, index, ev.kind, ev.name, "scheduled", attempt=ev.attempt,
                          scheduled_at=ev.at)
            batch.steps[key] = row
        else:
            row.status, row.attempt = "scheduled", ev.attempt
    elif row is None:
        kind = getattr(ev, "kind", "signal" if isinstance(
            ev, SignalReceived | SignalTimedOut | WaitAbandoned) else "timer")
        name = getattr(ev, "name", "")
        row = StepRow(run_id, index, kind, name, "scheduled")
        batch.steps[key] = row
    if isinstance(ev, StepCompleted):
        row.status, row.attempt, row.ended_at = "completed", ev.attempt, ev.at
        row.duration_ms = ev.duration_ms
        if ev.kind == "llm":
            row.cost_usd = _llm_cost(ev.result)[0]
    elif isinstance(ev, StepFailed):
        if ev.final:
            row.status, row.attempt, row.ended_at = "failed", ev.attempt, ev.at
            row.error = str(ev.error.get("message", ev.error.get("type", "")))[:2000]
        else:
            row.status, row.attempt = "retrying", ev.attempt + 1
            row.error = str(ev.error.get("message", ""))[:2000]
    elif isinstance(ev, TimerFired | SignalReceived):
        row.status, row.ended_at = "completed", ev.at
    elif isinstance(ev, SignalTimedOut):
        row.status, row.ended_at = "timed_out", ev.at
    elif isinstance(ev, WaitAbandoned):
        row.status, row.ended_at = "abandoned", ev.at
    batch.changed_steps.add(key)


def _fold_approval(batch: Batch, run_id: str, ev: Event) -> None:
    if isinstance(ev, StepCompleted) and ev.kind == "llm" and isinstance(ev.result, dict):
        for block in ev.result.get("content") or []:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                tool_input = block.get("input") if isinstance(block.get("input"), dict) else {}
                digest = args_digest({"tool": block.get("name"), "input": tool_input})
                batch.tool_uses[(run_id, digest)] = ToolUseRow(
                    run_id, digest, str(block.get("name")), tool_input, ev.index)
                batch.changed_tool_uses.add((run_id, digest))
        return
    if isinstance(ev, StepScheduled) and ev.kind == "signal":
        args = ev.args if isinstance(ev.args, dict) else {}
        digest = args.get("approves")
        if not digest and ev.name != "approval":
            return  # a plain signal wait, not an approval
        use = batch.tool_uses.get((run_id, str(digest))) if digest else None
        batch.add_approval(ApprovalRow(
            run_id, ev.index, ev.name, str(digest) if digest else None, ev.at,
            tool=use.tool if use else None, args=use.args if use else None,
            deadline=ev.deadline))
        batch.changed_approvals.add((run_id, ev.index))
        return
    if isinstance(ev, SignalReceived | SignalTimedOut | WaitAbandoned):
        index = ev.delivered_to if isinstance(ev, SignalReceived) else ev.index
        row = batch.approvals.get((run_id, index)) if index is not None else None
        if row is None or row.status != "pending":
            return
        if isinstance(ev, SignalTimedOut):
            row.status = "timed_out"
        elif isinstance(ev, WaitAbandoned):
            row.status = "expired"  # the code stopped waiting: no decision counts any more
        else:
            payload = ev.payload if isinstance(ev.payload, dict) else {}
            row.status = "approved" if payload.get("approved") is True else "rejected"
            row.decided_by = ev.sender
            reason = payload.get("reason")
            row.reason = str(reason)[:2000] if reason is not None else None
        row.decided_at = ev.at
        batch.changed_approvals.add((run_id, row.idx))
        return
    if ev.type in ("run_completed", "run_failed", "run_cancelled", "run_continued"):
        for key in sorted(batch.approvals_by_run.get(run_id, ())):
            row = batch.approvals[key]
            if row.status == "pending":
                row.status, row.decided_at = "expired", ev.at
                batch.changed_approvals.add(key)


__all__ = [
    "PROJECTIONS",
    "ApprovalRow",
    "Batch",
    "Keys",
    "Record",
    "RunRow",
    "SpendRow",
    "StepRow",
    "ToolUseRow",
    "fold",
    "keys_of",
]
