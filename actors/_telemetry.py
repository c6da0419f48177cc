"""Where spans go. Off unless configured, so nothing is paid for tracing nobody reads.

* ``NERVE_TRACE_FILE=/path/spans.jsonl``: one JSON span per line (the OTLP-like JSON of the
  OpenTelemetry SDK), batched, written by a background thread.
* ``OTEL_EXPORTER_OTLP_ENDPOINT``: an OTLP exporter, if ``opentelemetry-exporter-otlp`` is
  installed (it is not a dependency of nerve).
"""

from __future__ import annotations

import logging
import os
from typing import IO

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger("nerve.telemetry")


def configure_tracing(service_name: str) -> TracerProvider | None:
    """Install a tracer provider for this process if the environment asks for one."""
    path = os.environ.get("NERVE_TRACE_FILE")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not path and not endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if path:
        out: IO[str] = open(path, "a", buffering=1)
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n")))
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp "
                        "is not installed; `pip install opentelemetry-exporter-otlp`")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
