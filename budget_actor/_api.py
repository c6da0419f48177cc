"""The budget actor's request/reply API on ``nerve.budget.api``, and its reports.

Requests are one discriminated union (``type``), msgpack or JSON::

    nats req nerve.budget.api '{"type":"show","tenant":"acme"}'
    nats req nerve.budget.api '{"type":"set","tenant":"acme","limits":{"usd_per_day":10}}'
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from budget_actor._limits import WINDOWS, Limits
from budget_actor._prices import NANOS_PER_USD
from budget_actor._state import TenantState, window_end

_TENANT = r"^[A-Za-z0-9_\-]{1,128}$"


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShowRequest(_Req):
    type: Literal["show"] = "show"
    tenant: str | None = Field(default=None, pattern=_TENANT)


class SetLimitsRequest(_Req):
    """Change limits: ``limits`` holds the fields to change (``null`` clears one);
    ``replace`` replaces them all (missing fields take their defaults)."""

    type: Literal["set"] = "set"
    tenant: str = Field(pattern=_TENANT)
    limits: dict[str, Any]
    replace: bool = False
    by: str = Field(default="api", max_length=200)


class KillRequest(_Req):
    type: Literal["kill"] = "kill"
    tenant: str = Field(pattern=_TENANT)
    reason: str = Field(default="killed by an operator", max_length=2000)
    by: str = Field(default="api", min_length=1, max_length=200)
    policy: Literal["kill", "pause"] = "kill"


class ResetRequest(_Req):
    type: Literal["reset"] = "reset"
    tenant: str = Field(pattern=_TENANT)
    by: str = Field(default="api", max_length=200)
    reason: str = Field(default="", max_length=2000)


class ResumeRunRequest(_Req):
    type: Literal["resume_run"] = "resume_run"
    tenant: str = Field(pattern=_TENANT)
    run_id: str = Field(pattern=_TENANT)
    by: str = Field(default="api", max_length=200)


BudgetRequest = Annotated[
    ShowRequest | SetLimitsRequest | KillRequest | ResetRequest | ResumeRunRequest,
    Field(discriminator="type"),
]
REQUEST_ADAPTER: TypeAdapter[BudgetRequest] = TypeAdapter(BudgetRequest)


class WindowReport(BaseModel):
    window: str
    start: float
    resets_at: float
    spent_usd: float
    spent_tokens: int
    limit_usd: float | None = None
    limit_tokens: int | None = None
    remaining_usd: float | None = None


class BudgetReport(BaseModel):
    """A tenant's budget at a glance: what ``nerve budget show`` prints."""

    tenant: str
    state: Literal["ok", "killed", "paused", "exhausted"]
    limits: Limits
    windows: list[WindowReport]
    reserved_usd: float
    reserved_tokens: int
    in_flight: int
    runs_started_this_minute: int
    kill: dict[str, Any] | None = None
    halted_runs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    lifetime_usd: float
    lifetime_tokens: int
    calls: int
    overrun_usd: float
    burn: dict[str, Any] | None = None
    updated_at: float

    @classmethod
    def of(cls, st: TenantState, now: float, burn: dict[str, Any] | None = None,
           ) -> BudgetReport:
        windows = []
        exhausted = False
        for kind in WINDOWS:
            w = st.windows[kind]
            current = w.start <= now < window_end(kind, w.start)
            spent, tokens = (w.nanos, w.tokens) if current else (0, 0)
            limit = st.usd_limits.get(kind)
            if limit is not None and spent >= limit:
                exhausted = True
            windows.append(WindowReport(
                window=kind, start=w.start, resets_at=window_end(kind, w.start),
                spent_usd=spent / NANOS_PER_USD, spent_tokens=tokens,
                limit_usd=st.limits.usd_limit(kind), limit_tokens=st.limits.token_limit(kind),
                remaining_usd=None if limit is None else
                max(0, limit - spent - st.reserved_nanos) / NANOS_PER_USD))
        killed = st.is_killed(now)
        state: Any = ("paused" if st.kill and st.kill.policy == "pause" else "killed") \
            if killed else ("exhausted" if exhausted else "ok")
        minute = int(now // 60) * 60
        return cls(
            tenant=st.tenant, state=state, limits=st.limits, windows=windows,
            reserved_usd=st.reserved_nanos / NANOS_PER_USD, reserved_tokens=st.reserved_tokens,
            in_flight=len(st.open),
            runs_started_this_minute=st.spawn_count if st.spawn_start == minute else 0,
            kill=None if not killed or st.kill is None else {
                "reason": st.kill.reason, "by": st.kill.by, "at": st.kill.at,
                "policy": st.kill.policy, "until": st.kill.until, "source": st.kill.source},
            halted_runs={run: {"at": h.at, "policy": h.policy, "reason": h.reason,
                               "trip_id": h.trip_id} for run, h in st.halted.items()},
            lifetime_usd=st.lifetime_nanos / NANOS_PER_USD, lifetime_tokens=st.lifetime_tokens,
            calls=st.calls, overrun_usd=st.overrun_nanos / NANOS_PER_USD, burn=burn,
            updated_at=st.updated_at)

    def render(self) -> str:
        """Human-readable, for the terminal."""
        def ts(t: float) -> str:
            return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")

        lines = [f"tenant {self.tenant}: {self.state.upper()}"]
        if self.kill:
            until = f" until {ts(self.kill['until'])}" if self.kill.get("until") else ""
            lines.append(f"  kill-switch: {self.kill['policy']}{until}, {self.kill['reason']} "
                         f"(by {self.kill['by']}, {self.kill['source']}, at {ts(self.kill['at'])})")
        lines.append(f"  {'window':<7} {'spent':>14} {'limit':>14} {'remaining':>14} "
                     f"{'tokens':>12} {'token limit':>12}  resets")
        for w in self.windows:
            lim = "-" if w.limit_usd is None else f"${w.limit_usd:,.4f}"
            rem = "-" if w.remaining_usd is None else f"${w.remaining_usd:,.4f}"
            tl = "-" if w.limit_tokens is None else f"{w.limit_tokens:,}"
            lines.append(f"  {w.window:<7} {'$' + format(w.spent_usd, ',.4f'):>14} {lim:>14} "
                         f"{rem:>14} {w.spent_tokens:>12,} {tl:>12}  {ts(w.resets_at)}")
        lines.append(f"  in flight: {self.in_flight} reservations, ${self.reserved_usd:,.4f}, "
                     f"{self.reserved_tokens:,} tokens")
        per_run = [f"{k}={v}" for k, v in (("usd_per_run", self.limits.usd_per_run),
                                           ("tokens_per_run", self.limits.tokens_per_run),
                                           ("runs_per_minute", self.limits.runs_per_minute))
                   if v is not None]
        lines.append(f"  runs started this minute: {self.runs_started_this_minute}"
                     + (f"; {', '.join(per_run)}" if per_run else ""))
        if self.burn is not None:
            lines.append(f"  burn: ${self.burn.get('usd_in_window', 0):,.4f} and "
                         f"{self.burn.get('calls_in_window', 0)} calls in the last "
                         f"{self.burn.get('window_s')}s")
        b = self.limits.breaker

        def off(value: Any, unit: str = "") -> str:
            return "off" if value is None else f"{unit}{value:g}"

        lines.append(f"  breaker: per {b.window_s:g}s tenant {off(b.tenant_usd_per_window, '$')} "
                     f"/ run {off(b.run_usd_per_window, '$')}; same tool call "
                     f"{off(b.repeat_tool_calls)}x, same LLM request {off(b.repeat_llm_calls)}x "
                     f"in {b.repeat_horizon} steps; on trip: {self.limits.on_trip}; on "
                     f"exhaustion: {self.limits.on_exhaustion}")
        for run, h in self.halted_runs.items():
            lines.append(f"  halted run {run}: {h['policy']} ({h['reason']})")
        lines.append(f"  lifetime: ${self.lifetime_usd:,.4f}, {self.lifetime_tokens:,} tokens, "
                     f"{self.calls} calls, overrun ${self.overrun_usd:,.4f}")
        return "\n".join(lines)
