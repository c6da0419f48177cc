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


# A provider named by the environment is installed lazily, by the first lookup.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def tracing_enabled() -> bool:
    """Whether this process records spans (a real tracer provider is installed).

    Hot paths ask before building spans: a non-recording span still costs its context,
    attributes and propagation on every message. (``get_tracer_provider()`` reads the
    environment on every call until a provider is set, so it is not asked each time.)
    """
    if getattr(trace, "_TRACER_PROVIDER", None) is not None:
        return True
    return _PROVIDER_FROM_ENV and not isinstance(trace.get_tracer_provider(),
                                                 trace.ProxyTracerProvider)


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
