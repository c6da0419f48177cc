"""The HTTP API's request and response bodies (pydantic; also the OpenAPI schemas)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from workflow import ApprovalPayload  # the agent's contract; listed here for the OpenAPI

_ID = r"^[A-Za-z0-9_\-]{1,128}$"
RunStatus = Literal["running", "waiting", "paused", "blocked", "completed", "failed",
                    "cancelled"]
RUN_STATUSES = ("running", "waiting", "paused", "blocked", "completed", "failed", "cancelled")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmitRun(_Body):
    """Start a run. ``task`` (text) or ``input`` (an object for the workflow) is required."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["task"], "properties": {"task": {"type": "string"}}},
        {"required": ["input"], "properties": {"input": {"type": "object"}}},
    ]})

    task: str | None = Field(default=None, max_length=200_000,
                             description="what the agent should do")
    input: dict[str, Any] | None = Field(default=None, description="the workflow's input")
    workflow: str = Field(default="agent", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    version: str | None = Field(default=None, max_length=64)
    run_id: str | None = Field(default=None, pattern=_ID,
                               description="your own id (idempotent: the same id twice "
                                           "starts one run)")
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    tools: list[str] | None = Field(default=None, max_length=256)
    model: str | None = Field(default=None, max_length=128)
    max_turns: int | None = Field(default=None, ge=1, le=10_000)
    tenant: str | None = Field(default=None, pattern=_ID,
                               description="only for admin keys; a tenant key's tenant is "
                                           "implied")
    wait: StrictBool = Field(default=True, description="wait (briefly) until the run has "
                                                       "started or was rejected")


class SignalBody(_Body):
    """A signal for a run. An ``approval`` carries ``{"approved": bool, "reason"?}`` and
    the ``approves`` digest of the tool call it decides (from ``approval_requested``)."""

    payload: Any = None
    approves: str | None = Field(default=None, pattern=r"^[0-9a-f]{8,64}$")
    signal_id: str | None = Field(default=None, pattern=_ID,
                                  description="idempotency: the same id twice counts once")


class CancelBody(_Body):
    reason: str = Field(default="", max_length=2000)


class ForkBody(_Body):
    """Fork a run at a history index (1 = only its start; the fork replays the rest)."""

    at: int = Field(ge=1, description="how many of the parent's history events to keep")
    run_id: str | None = Field(default=None, pattern=_ID)
    wait: StrictBool = True


class BudgetUpdate(_Body):
    """Change a tenant's limits (admin only). ``limits``: the fields to change (``null``
    clears one); with ``replace`` the limits are replaced whole."""

    limits: dict[str, Any]
    replace: StrictBool = False


class KillBody(_Body):
    """Turn a tenant's kill-switch on (or, admin only, off with ``reset``)."""

    reason: str = Field(default="killed from the API", max_length=2000)
    policy: Literal["kill", "pause"] = "kill"
    reset: StrictBool = False


class ErrorDetail(BaseModel):
    code: str
    message: str
    retry_after_ms: int | None = None
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Tokens(BaseModel):
    input: int
    output: int
    cache_read: int
    cache_write: int


class Run(BaseModel):
    """A run as the read model (or its history, folded the same way) shows it."""

    run_id: str
    tenant: str
    workflow: str
    version: str
    status: RunStatus
    task: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    parent_run_id: str | None = None
    forked_from: dict[str, Any] | None = None
    created_at: float
    updated_at: float
    ended_at: float | None = None
    steps: int
    events: int
    llm_calls: int
    cost_usd: float
    tokens: Tokens
    result: Any = None
    error: dict[str, Any] | None = None
    waiting_for: list[str] = Field(default_factory=list)
    blocked: dict[str, Any] | None = None
    cancel_requested: bool = False
    segments: int = Field(default=1, description="continue-as-new segments")
    history_seq: int = Field(description="stream sequence of the last history record seen")


class Approval(BaseModel):
    run_id: str
    idx: int
    name: str
    digest: str | None = None
    requested_at: float
    status: Literal["pending", "approved", "rejected", "timed_out", "expired"]
    tool: str | None = None
    args: Any = None
    deadline: float | None = None
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None
    tenant: str | None = None


class Step(BaseModel):
    run_id: str
    idx: int
    kind: str
    name: str
    status: str
    attempt: int
    scheduled_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    cost_usd: float | None = None
    error: str | None = None


class RunDetail(BaseModel):
    run: Run
    approvals: list[Approval]
    steps: list[Step] | None = None


class RunList(BaseModel):
    runs: list[Run]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the "
                                                              "next page; absent on the last")


class Submitted(BaseModel):
    run_id: str
    status: str
    run: Run | None = None
    links: dict[str, str]


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    seq: int
    type: str
    at: float


class History(BaseModel):
    run_id: str
    events: list[HistoryEvent]
    total: int


class SignalSent(BaseModel):
    signal_id: str
    run_id: str
    name: str


class Accepted(BaseModel):
    run_id: str
    status: str


class ApprovalList(BaseModel):
    approvals: list[Approval]


class Spend(BaseModel):
    tenant: str
    cost_usd: float
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    llm_calls: int
    runs: int


class BudgetView(BaseModel):
    tenant: str
    budget: dict[str, Any] | None = Field(description="the budget actor's report (limits, "
                                                      "spend per window, kill-switch)")
    spend: Spend = Field(description="spend recorded in the tenant's run histories")
    counts: dict[str, int] = Field(default_factory=dict, description="runs by status")


class KillResult(BaseModel):
    tenant: str
    killed: bool
    changed: bool = True
    notice: dict[str, Any] | None = None


class WhoAmI(BaseModel):
    tenant: str | None
    admin: bool
    key_id: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    nats: bool
    readmodel: dict[str, Any]


class Reindexed(BaseModel):
    position: int
    runs: int
    seconds: float


__all__ = [
    "RUN_STATUSES",
    "Accepted",
    "Approval",
    "ApprovalList",
    "ApprovalPayload",
    "BudgetUpdate",
    "BudgetView",
    "CancelBody",
    "ErrorBody",
    "ForkBody",
    "Health",
    "History",
    "KillBody",
    "KillResult",
    "Reindexed",
    "Run",
    "RunDetail",
    "RunList",
    "SignalBody",
    "SignalSent",
    "Spend",
    "SubmitRun",
    "Submitted",
    "WhoAmI",
]
