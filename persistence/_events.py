"""The run history's events: one pydantic union, discriminated by ``type``.

Every event carries ``v`` (its schema version) and ``at`` (wall-clock seconds when it was
recorded, for people; replay never reads it as workflow time except through markers).
Step events carry the step's identity ``(index, kind, name, args_digest)`` so a replay can
check that the code issues the same steps in the same order.

Adding a field with a default is backwards compatible; anything else bumps ``v`` and the
decoder must keep reading the old shape.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

StepKind = Literal["llm", "tool", "sandbox", "activity", "timer", "signal", "marker", "child"]


def args_digest(value: Any) -> str:
    """A stable digest of step arguments: sha256 of canonical msgpack (sorted map keys)."""
    return hashlib.sha256(_canonical(value)).hexdigest()[:24]


def _canonical(value: Any) -> bytes:
    def norm(v: Any) -> Any:
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="json")
        if isinstance(v, dict):
            return [[str(k), norm(v[k])] for k in sorted(v, key=str)]
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return v
    return msgpack.packb(norm(value), use_bin_type=True)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = SCHEMA_VERSION
    at: float = Field(default_factory=time.time)


class RunStarted(_Event):
    type: Literal["run_started"] = "run_started"
    run_id: str
    tenant: str
    workflow: str
    version: str
    input: Any = None
    task_id: str | None = None
    parent_run_id: str | None = None
    forked_from: dict[str, Any] | None = None  # {"run_id": ..., "index": ...}
    labels: dict[str, str] = Field(default_factory=dict)


class OwnerChanged(_Event):
    """A new orchestrator took the run (after a lease expired); it fences out the old one."""

    type: Literal["owner_changed"] = "owner_changed"
    owner: str
    epoch: int
    previous: str | None = None
    reason: str = ""


class StepScheduled(_Event):
    type: Literal["step_scheduled"] = "step_scheduled"
    index: int
    kind: StepKind
    name: str
    args_digest: str
    args: Any = None
    attempt: int = 1
    deadline: float | None = None  # timers and signal waits: when it resolves by itself
    meta: dict[str, Any] = Field(default_factory=dict)


class StepCompleted(_Event):
    type: Literal["step_completed"] = "step_completed"
    index: int
    kind: StepKind
    name: str
    args_digest: str
    result: Any = None
    attempt: int = 1
    source_seq: int | None = None  # the inbox message this came from
    duration_ms: float | None = None


class StepFailed(_Event):
    """A step attempt failed. ``final`` failures resolve the step with an error."""

    type: Literal["step_failed"] = "step_failed"
    index: int
    kind: StepKind
    name: str
    args_digest: str
    error: dict[str, Any]
    attempt: int = 1
    final: bool = True
    retry_at: float | None = None
    source_seq: int | None = None


class MarkerRecorded(_Event):
    """A recorded value (``now``, ``random``, ``uuid``) or a ``patched`` marker."""

    type: Literal["marker"] = "marker"
    index: int
    kind: Literal["now", "random", "uuid", "patched", "version"]
    name: str = ""
    value: Any = None


class TimerFired(_Event):
    type: Literal["timer_fired"] = "timer_fired"
    index: int


class SignalReceived(_Event):
    """A signal arrived. ``delivered_to`` is the wait it resolved; ``None`` means buffered."""

    type: Literal["signal_received"] = "signal_received"
    name: str
    payload: Any = None
    sender: str | None = None
    signal_id: str | None = None
    delivered_to: int | None = None
    source_seq: int | None = None


class SignalRejected(_Event):
    """A signal that changed nothing: late (its wait timed out), or not for this wait."""

    type: Literal["signal_rejected"] = "signal_rejected"
    name: str
    reason: str
    payload: Any = None
    sender: str | None = None
    signal_id: str | None = None
    source_seq: int | None = None


class SignalTimedOut(_Event):
    type: Literal["signal_timed_out"] = "signal_timed_out"
    index: int
    name: str
    default: Any = None


class WaitAbandoned(_Event):
    """The code stopped waiting for a signal (an ``asyncio.wait_for`` or ``asyncio.timeout``
    around ``ctx.wait_signal`` gave up): a later signal goes to the next wait, not this one."""

    type: Literal["wait_abandoned"] = "wait_abandoned"
    index: int
    name: str


class CancelRequested(_Event):
    type: Literal["cancel_requested"] = "cancel_requested"
    reason: str = ""
    by: str | None = None
    source_seq: int | None = None


class RunCompleted(_Event):
    type: Literal["run_completed"] = "run_completed"
    result: Any = None


class RunFailed(_Event):
    type: Literal["run_failed"] = "run_failed"
    error: dict[str, Any]


class RunCancelled(_Event):
    type: Literal["run_cancelled"] = "run_cancelled"
    reason: str = ""
    by: str | None = None


class RunContinued(_Event):
    """Continue-as-new: the workflow starts over with ``input``, in the same run.

    Replay starts at the latest ``RunContinued``: a run that lives for weeks replays only its
    current segment. Step indices keep counting from ``next_index``, so idempotency keys
    (``<run_id>:<index>``) stay unique for the whole run.
    """

    type: Literal["run_continued"] = "run_continued"
    workflow: str
    version: str
    input: Any = None
    next_index: int
    segment: int
    # Filled in by the owner as it records the end of a segment: the signals received and
    # not yet delivered, how far the run's inbox had been read, and the ids of the signals
    # the ending segment saw. A takeover replays the latest segment alone and starts from
    # these.
    buffered_signals: list[dict[str, Any]] = Field(default_factory=list)
    inbox_seq: int = 0
    seen_signals: list[str] = Field(default_factory=list)


class RunBlocked(_Event):
    """The run stopped: replay diverged from its history, or its code raised (a bug). It waits
    for fixed code; ``diff`` holds the divergence or the exception (``diff["error"]``)."""

    type: Literal["run_blocked"] = "run_blocked"
    reason: str
    diff: dict[str, Any] = Field(default_factory=dict)


class RunPaused(_Event):
    type: Literal["run_paused"] = "run_paused"
    reason: str
    by: str | None = None


class RunResumed(_Event):
    type: Literal["run_resumed"] = "run_resumed"
    by: str | None = None


class SandboxLost(_Event):
    type: Literal["sandbox_lost"] = "sandbox_lost"
    sandbox_id: str
    host: str | None = None
    reason: str = ""
    notice_id: str | None = None


class SandboxRestored(_Event):
    type: Literal["sandbox_restored"] = "sandbox_restored"
    sandbox_id: str
    from_snapshot: str | None
    step_index: int | None
    host: str | None = None
    notice_id: str | None = None


Event = Annotated[
    RunStarted | OwnerChanged | StepScheduled | StepCompleted | StepFailed | MarkerRecorded
    | TimerFired | SignalReceived | SignalRejected | SignalTimedOut | WaitAbandoned
    | CancelRequested
    | RunCompleted | RunFailed | RunCancelled | RunContinued | RunBlocked | RunPaused
    | RunResumed
    | SandboxLost | SandboxRestored,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENTS_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

TERMINAL_TYPES = frozenset({"run_completed", "run_failed", "run_cancelled"})
