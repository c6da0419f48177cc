"""OpenTelemetry spans for runs and steps, with the GenAI semantic conventions.

Every span of a run shares one trace, whose id is derived from the run id: a run that
outlives its orchestrator (takeovers, restarts, weeks) stays one trace, and any process can
find it from the run id alone. Each step is a span from dispatch to result, named and
attributed per the conventions (``execute_tool <name>`` with ``gen_ai.operation.name``,
``gen_ai.tool.name``, ``gen_ai.conversation.id`` = run id, ``gen_ai.agent.name``); the work
item carries its W3C ``traceparent``, so the worker's span (and the gateway's ``chat``
span) are its children.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from persistence import RunStarted
from workflow._instance import Command

tracer = trace.get_tracer("nerve.workflow")

_TOOL_KINDS = {"tool", "sandbox"}


def run_span_context(run_id: str) -> SpanContext:
    """The run's (virtual) root span: deterministic ids, so every owner agrees on them."""
    digest = hashlib.sha256(f"nerve-run:{run_id}".encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return SpanContext(trace_id, span_id, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


@functools.lru_cache(maxsize=4096)
def run_traceparent(run_id: str) -> str:
    """The W3C ``traceparent`` of the run's root span."""
    ctx = run_span_context(run_id)
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def start_step_span(started: RunStarted, cmd: Command, attempt: int) -> trace.Span:
    """A span for one attempt of one step (ended by the owner when the attempt settles)."""
    parent = trace.set_span_in_context(NonRecordingSpan(run_span_context(started.run_id)))
    attrs: dict[str, Any] = {
        "gen_ai.conversation.id": started.run_id,
        "gen_ai.agent.name": started.workflow,
        "nerve.run.id": started.run_id,
        "nerve.tenant": started.tenant,
        "nerve.step.index": cmd.index,
        "nerve.step.kind": cmd.kind,
        "nerve.step.attempt": attempt,
    }
    if cmd.kind in _TOOL_KINDS:
        tool = cmd.name if cmd.kind == "tool" else f"sandbox.{cmd.name}"
        attrs |= {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                  "gen_ai.tool.type": "function",
                  "gen_ai.tool.call.id": f"{started.run_id}:{cmd.index}"}
        name = f"execute_tool {tool}"
    elif cmd.kind == "llm":
        name = f"step llm {cmd.name}"  # the gateway's child span is the GenAI `chat` span
    else:
        name = f"step {cmd.kind} {cmd.name}"
    kind = SpanKind.INTERNAL if cmd.kind in ("timer", "signal") else SpanKind.PRODUCER
    return tracer.start_span(name, context=parent, kind=kind, attributes=attrs)


def end_step_span(span: trace.Span | None, error: dict[str, Any] | None = None) -> None:
    if span is None:
        return
    if error:
        span.set_attribute("error.type", str(error.get("type", "error")))
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error.get("message", ""))))
    span.end()
