"""What flows into a run and out of it, besides the history itself.

* :class:`TaskRequest`: a task submitted on ``nerve.tasks.<tenant>`` (JSON from the ``nats``
  CLI, or msgpack).
* :data:`InboxMessage`: what arrives on ``nerve.runs.<run_id>.inbox``: step results,
  signals, cancellation, pause/resume. The run's owner turns each into history events.
* :class:`StreamEvent`: live output on ``nerve.stream.<run_id>`` (tokens, tool calls,
  status, approvals, the final answer); its stream sequence is the SSE event id.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from actors import StepResult


class ForkSpec(BaseModel):
    """Start the run as a fork of ``run_id``: its first ``at`` history events, then live."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,128}$")
    at: int = Field(ge=1)


class TaskRequest(BaseModel):
    """A task to start a run with. Only ``task`` (or ``input``, or ``fork``) is required."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(default=None, max_length=200_000)
    input: dict[str, Any] | None = None
    workflow: str = Field(default="agent", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    version: str | None = Field(default=None, max_length=64)
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]{1,128}$")
    labels: dict[str, str] = Field(default_factory=dict)
    tools: list[str] | None = None
    model: str | None = None
    max_turns: int | None = Field(default=None, ge=1, le=10_000)
    fork: ForkSpec | None = None


class SignalMessage(BaseModel):
    """A signal for a waiting workflow (a human approval, say)."""

    type: Literal["signal"] = "signal"
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-:]{1,128}$")
    payload: Any = None
    sender: str | None = None
    signal_id: str
    approves: str | None = None  # digest of the exact tool call an approval is for
    at: float = Field(default_factory=time.time)


class CancelMessage(BaseModel):
    type: Literal["cancel"] = "cancel"
    reason: str = ""
    by: str | None = None
    at: float = Field(default_factory=time.time)


class PauseMessage(BaseModel):
    type: Literal["pause"] = "pause"
    reason: str = ""
    by: str | None = None
    at: float = Field(default_factory=time.time)


class SandboxNotice(BaseModel):
    """A sandbox host's report that the run's sandbox was lost or restored."""

    type: Literal["sandbox_notice"] = "sandbox_notice"
    event: Literal["lost", "restored"]
    sandbox_id: str
    host: str | None = None
    reason: str = ""
    from_snapshot: str | None = None
    step_index: int | None = None
    notice_id: str
    at: float = Field(default_factory=time.time)


class ResumeMessage(BaseModel):
    type: Literal["resume"] = "resume"
    by: str | None = None
    at: float = Field(default_factory=time.time)


InboxMessage = Annotated[
    StepResult | SignalMessage | CancelMessage | PauseMessage | ResumeMessage | SandboxNotice,
    Field(discriminator="type"),
]
INBOX_ADAPTER: TypeAdapter[InboxMessage] = TypeAdapter(InboxMessage)

StreamEventType = Literal["token", "tool_call_started", "tool_call_finished", "status",
                          "approval_requested", "final", "error", "progress"]


class StreamEvent(BaseModel):
    """One live event of a run. ``data`` depends on ``type``:

    * ``token``: ``{"text", "index" (step), "offset" (chars already sent for that step)}``
    * ``tool_call_started`` / ``tool_call_finished``: ``{"index", "name", "args"|"result"}``
    * ``status``: ``{"status": "running"|"waiting"|"completed"|...}``
    * ``approval_requested``: ``{"index", "name", "tool", "args", "digest", "deadline"}``
    * ``final``: ``{"result"}``; ``error``: ``{"error"}``; ``progress``: anything
    """

    type: StreamEventType
    run_id: str
    data: dict[str, Any] = Field(default_factory=dict)
    at: float = Field(default_factory=time.time)
