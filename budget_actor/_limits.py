"""A tenant's limits and policies: what may be spent, how fast, and what a trip does.

Windows are calendar windows in UTC (this minute, this hour, this day, this month): spend
counts from the window's start and drops to zero when the next one begins, as a bill does.
Reservations in flight count against every window. Finer-grained protection against a
runaway inside a window is the breaker's job (:class:`BreakerPolicy`, sliding windows of at
most ten seconds).

Every field is validated: negative, non-finite or absurd values raise
:class:`~nerve.ConfigError` naming the field, and nothing is changed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nerve import ConfigError

# Anything above these is a typo, not a budget.
MAX_USD = 10_000_000.0
MAX_TOKENS = 10**13
MAX_RUNS_PER_MINUTE = 1_000_000
MAX_IN_FLIGHT = 5000

WINDOWS = ("minute", "hour", "day", "month")
Policy = Literal["kill", "pause"]


def _usd(description: str) -> Any:
    return Field(default=None, ge=0, le=MAX_USD, allow_inf_nan=False, description=description)


def _tokens(description: str) -> Any:
    return Field(default=None, ge=0, le=MAX_TOKENS, description=description)


class BreakerPolicy(BaseModel):
    """When the runaway breaker trips. ``None`` turns a detector off.

    Burn rates are measured over a sliding window of ``window_s`` seconds (at most 10) from
    settled costs. No-progress is the same step identity (kind, name, arguments digest)
    repeated ``repeat_*`` times within the run's last ``repeat_horizon`` steps.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(default=10.0, gt=0, le=10.0, allow_inf_nan=False)
    tenant_usd_per_window: float | None = _usd("tenant spend in one window that trips")
    run_usd_per_window: float | None = _usd("one run's spend in one window that trips")
    tenant_calls_per_window: int | None = Field(default=None, ge=1, le=10**7)
    run_calls_per_window: int | None = Field(default=None, ge=1, le=10**7)
    repeat_tool_calls: int | None = Field(default=5, ge=2, le=10_000)
    repeat_llm_calls: int | None = Field(default=3, ge=2, le=10_000)
    repeat_horizon: int = Field(default=50, ge=2, le=10_000)
    ignore_tools: tuple[str, ...] = Field(default=(), max_length=256)


class Limits(BaseModel):
    """A tenant's limits (``None`` = no limit) and policies.

    * ``usd_per_*`` / ``tokens_per_*``: per calendar window (UTC); tokens count input
      (cached or not) plus output.
    * ``usd_per_run`` / ``tokens_per_run``: over a run's whole life.
    * ``runs_per_minute``: runs started per minute (``Ledger.check_spawn``).
    * ``on_trip``: what a breaker trip does to the run (``kill`` cancels it, ``pause`` holds
      it for a human); a tenant-wide trip kills the tenant with that policy.
    * ``on_exhaustion``: when a window is exhausted (a call is refused and 90% or more of
      the window is settled spend), ``refuse`` just refuses; ``kill``/``pause`` also turn
      the kill-switch on until the window ends, and broadcast it.
    * ``reservation_ttl``: seconds after which an unsettled reservation is released.
    * ``max_in_flight``: open reservations at once (bounds the ledger's size).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_minute: float | None = _usd("USD per calendar minute")
    usd_per_hour: float | None = _usd("USD per calendar hour")
    usd_per_day: float | None = _usd("USD per calendar day (UTC)")
    usd_per_month: float | None = _usd("USD per calendar month (UTC)")
    tokens_per_minute: int | None = _tokens("tokens per calendar minute")
    tokens_per_hour: int | None = _tokens("tokens per calendar hour")
    tokens_per_day: int | None = _tokens("tokens per calendar day")
    tokens_per_month: int | None = _tokens("tokens per calendar month")
    usd_per_run: float | None = _usd("USD over one run's life")
    tokens_per_run: int | None = _tokens("tokens over one run's life")
    runs_per_minute: int | None = Field(default=None, ge=0, le=MAX_RUNS_PER_MINUTE)
    on_trip: Policy = "kill"
    on_exhaustion: Literal["refuse", "kill", "pause"] = "pause"
    reservation_ttl: float = Field(default=600.0, ge=1.0, le=7 * 86400.0, allow_inf_nan=False)
    max_in_flight: int = Field(default=2000, ge=1, le=MAX_IN_FLIGHT)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)

    @field_validator("usd_per_minute", "usd_per_hour", "usd_per_day", "usd_per_month",
                     "usd_per_run", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a limit is a number, not a boolean")
        return value

    @property
    def has_run_limits(self) -> bool:
        return self.usd_per_run is not None or self.tokens_per_run is not None

    def usd_limit(self, window: str) -> float | None:
        return getattr(self, f"usd_per_{window}")

    def token_limit(self, window: str) -> int | None:
        return getattr(self, f"tokens_per_{window}")

    def compact(self) -> dict[str, Any]:
        """Only what differs from the defaults (what the ledger stores)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @classmethod
    def parse(cls, data: Any) -> Limits:
        """Validate ``data`` into limits, or raise :class:`~nerve.ConfigError` listing why."""
        if isinstance(data, Limits):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid limits: {_errors(exc)}", errors=exc.error_count()) from None

    def merged(self, changes: dict[str, Any]) -> Limits:
        """These limits with ``changes`` applied (``None`` clears a limit); validated."""
        data = self.model_dump(mode="json")
        changes = dict(changes)
        breaker = changes.pop("breaker", None) if "breaker" in changes else None
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise ConfigError(f"invalid limits: unknown field(s) {sorted(unknown)}",
                              fields=sorted(unknown))
        data.update(changes)
        if breaker is not None:
            if not isinstance(breaker, dict):
                raise ConfigError("invalid limits: breaker must be an object")
            data["breaker"] = {**data["breaker"], **breaker}
        return type(self).parse(data)


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
        + (f" (got {e['input']!r})" if not isinstance(e.get("input"), dict) else "")
        for e in exc.errors()[:8])


#: Limits of a tenant that has no ledger yet, unless the ledger is given others.
DEFAULT_LIMITS = Limits(usd_per_minute=5.0, usd_per_day=100.0, runs_per_minute=120)
