"""What every model provider implements, and the one place wire errors become typed errors.

A provider sends one :class:`~gateway_actor._planner.PlannedCall` to one upstream and
returns an :class:`~gateway_actor.LLMResponse`; while it streams it hands text deltas to the
sink and keeps :class:`Attempt` up to date (so a call cut mid-way still knows what it
consumed). It never retries: retries, fallbacks and backoff belong to the gateway, which
sees every upstream of the pool.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from budget_actor import Usage
from gateway_actor._planner import PlannedCall
from gateway_actor._protocol import LLMResponse
from gateway_actor._router import Upstream
from nerve import InvalidLLMRequest, NerveError, UpstreamError

TextSink = Callable[[str], None]


@dataclass(slots=True)
class Attempt:
    """One try of one call on one upstream, as far as it got."""

    upstream: str
    number: int
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    usage: Usage | None = None  # the latest usage the upstream reported
    text_chars: int = 0
    output_chars: int = 0  # text and tool input received, for a cut stream's estimate

    def saw_text(self, n: int) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.text_chars += n
        self.output_chars += n


class Provider(Protocol):
    """A model API client: Anthropic's SDK, OpenAI-compatible HTTP, or the scripted model."""

    kind: str

    async def call(self, plan: PlannedCall, upstream: Upstream, *, stream: bool,
                   sink: TextSink | None, attempt: Attempt) -> LLMResponse: ...

    async def close(self) -> None: ...


# Error types of Anthropic's API (``error.type``) and what they mean for a retry.
_RETRYABLE_TYPES = {"overloaded_error": "overloaded", "rate_limit_error": "rate_limited",
                    "api_error": "server_error", "timeout_error": "server_error"}
_INVALID_TYPES = {"invalid_request_error", "not_found_error", "request_too_large"}
_DENIED_TYPES = {"authentication_error", "permission_error", "billing_error"}


def classify(status: int, *, upstream: str, message: str, error_type: str | None = None,
             retry_after: float | None = None) -> NerveError:
    """The typed error for an upstream's answer ``status`` (200 for an error in a stream).

    * 400, 404, 413, 422 (or an ``invalid_request_error``): :class:`InvalidLLMRequest`; the
      request can never succeed, it is not retried.
    * 401, 403: :class:`UpstreamError`, not retryable (a key or permission to fix).
    * 429 and 529 (``rate_limit_error``, ``overloaded_error``), 408, 409, 5xx:
      :class:`UpstreamError`, retryable, with ``retry_after`` when the upstream gave one.
    """
    what = f"upstream {upstream} answered {status}"
    if error_type:
        what += f" ({error_type})"
    text = f"{what}: {message}" if message else what
    fields = {"status": status, "upstream": upstream, "error_type": error_type or ""}
    if error_type in _INVALID_TYPES or status in (400, 404, 413, 422):
        return InvalidLLMRequest(f"the model provider rejected the request: {text}", **fields)
    if error_type in _DENIED_TYPES or status in (401, 402, 403):
        return UpstreamError(f"{text}; check the API key and its permissions for this model",
                             retryable=False, kind="denied", **fields)
    kind = _RETRYABLE_TYPES.get(error_type or "")
    if kind is None:
        if status == 429:
            kind = "rate_limited"
        elif status == 529:
            kind = "overloaded"
        elif status in (408, 409) or status >= 500:
            kind = "server_error"
    if kind is not None:
        return UpstreamError(text, retryable=True, kind=kind, retry_after=retry_after, **fields)
    return UpstreamError(text, retryable=False, kind="unexpected", **fields)


def connection_error(upstream: str, exc: BaseException, *, started: bool) -> UpstreamError:
    """A transport failure: before the answer began (``hard``: the upstream is unreachable)
    or in the middle of a stream (``stream_cut``)."""
    kind = "stream_cut" if started else "unreachable"
    return UpstreamError(f"upstream {upstream}: {'stream cut' if started else 'unreachable'} "
                         f"({type(exc).__name__}: {exc})", retryable=True, kind=kind,
                         status=0, upstream=upstream, error_type="", retry_after=None)


def retry_after_of(headers: object) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    ms = get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())
