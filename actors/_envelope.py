"""The envelope: ids, tenancy and W3C trace context carried in NATS headers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from actors._codec import MSGPACK

_PROPAGATOR = TraceContextTextMapPropagator()

H_ID = "Nerve-Id"
H_CORRELATION = "Nerve-Correlation-Id"
H_TENANT = "Nerve-Tenant"
H_RUN = "Nerve-Run-Id"
H_ERROR = "Nerve-Error"
H_CONTENT_TYPE = "Content-Type"


def new_id(prefix: str = "") -> str:
    """A time-ordered, unique id (48-bit ms timestamp + 80 random bits, Crockford base32)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    chars = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        chars.append(alphabet[rem])
    return prefix + "".join(reversed(chars))


@dataclass(slots=True)
class Envelope:
    """What travels beside a message body: who, for whom, in which trace."""

    msg_id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    tenant: str | None = None
    run_id: str | None = None
    content_type: str = MSGPACK
    traceparent: str | None = None
    tracestate: str | None = None

    def to_headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {H_ID: self.msg_id, H_CONTENT_TYPE: self.content_type}
        if self.correlation_id:
            headers[H_CORRELATION] = self.correlation_id
        if self.tenant:
            headers[H_TENANT] = self.tenant
        if self.run_id:
            headers[H_RUN] = self.run_id
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)  # the current span, when there is one
        traceparent = carrier.get("traceparent") or self.traceparent
        tracestate = carrier.get("tracestate") or self.tracestate
        if traceparent:
            headers["traceparent"] = traceparent
        if tracestate:
            headers["tracestate"] = tracestate
        if extra:
            headers.update(extra)
        return headers

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> Envelope:
        h = headers or {}
        return cls(
            msg_id=h.get(H_ID) or h.get("Nats-Msg-Id") or new_id(),
            correlation_id=h.get(H_CORRELATION),
            tenant=h.get(H_TENANT),
            run_id=h.get(H_RUN),
            content_type=h.get(H_CONTENT_TYPE, "") or "",
            traceparent=h.get("traceparent"),
            tracestate=h.get("tracestate"),
        )

    def trace_context(self) -> Any:
        """The OpenTelemetry context this message was sent in (for a child span)."""
        carrier = {k: v for k, v in (("traceparent", self.traceparent),
                                     ("tracestate", self.tracestate)) if v}
        return _PROPAGATOR.extract(carrier, context=otel_context.Context())
