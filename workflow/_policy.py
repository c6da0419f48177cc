"""Retry policies for steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step is retried.

    ``timeout`` bounds one attempt (start to result); ``heartbeat_timeout`` bounds the
    silence of a worker running it (it heartbeats every third of that). Errors whose type is
    in ``non_retryable``, or that say ``retryable: False``, fail the step at once.
    """

    max_attempts: int = 3
    initial_interval: float = 0.5
    backoff: float = 2.0
    max_interval: float = 30.0
    timeout: float | None = 300.0
    heartbeat_timeout: float | None = None
    non_retryable: tuple[str, ...] = field(default_factory=tuple)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempts count from 1)."""
        return min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1))

    def should_retry(self, attempt: int, error: dict[str, Any]) -> bool:
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
