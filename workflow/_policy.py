"""Retry policies for steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nerve import ConfigError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step is retried.

    ``timeout`` bounds one attempt (start to result); ``heartbeat_timeout`` bounds the
    silence of a worker running it (it heartbeats every third of that), or, once an activity
    calls ``actx.heartbeat()``, the time between its calls. Errors whose type is
    in ``non_retryable``, or that say ``retryable: False``, fail the step at once.
    """

    max_attempts: int = 3
    initial_interval: float = 0.5
    backoff: float = 2.0
    max_interval: float = 30.0
    timeout: float | None = 300.0
    heartbeat_timeout: float | None = None
    non_retryable: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append(f"max_attempts is {self.max_attempts}: at least 1 (1 = no retries)")
        if self.initial_interval < 0 or self.max_interval < 0:
            problems.append("initial_interval and max_interval are seconds, 0 or more")
        if self.backoff < 1:
            problems.append(f"backoff is {self.backoff}: 1 or more (1 = a fixed interval)")
        for name in ("timeout", "heartbeat_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} is {value}: seconds above 0, or None for none")
        if problems:
            raise ConfigError("invalid RetryPolicy: " + "; ".join(problems))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempts count from 1)."""
        return min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1))

    def should_retry(self, attempt: int, error: dict[str, Any]) -> bool:
        """Whether attempt ``attempt`` failing with ``error`` (its wire form) gets another."""
        if attempt >= self.max_attempts:
            return False
        if error.get("type") in self.non_retryable:
            return False
        return bool(error.get("retryable", True))


DEFAULT_POLICIES: dict[str, RetryPolicy] = {
    "llm": RetryPolicy(max_attempts=5, initial_interval=1.0, timeout=900.0),
    "tool": RetryPolicy(max_attempts=3, timeout=300.0),
    "sandbox": RetryPolicy(max_attempts=3, timeout=1800.0),
    "activity": RetryPolicy(max_attempts=3, timeout=300.0),
}
