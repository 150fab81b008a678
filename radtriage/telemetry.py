"""OpenTelemetry set-up and W3C trace-context propagation through Kafka headers.

Every process calls `setup_tracing` once; the exporter is chosen by configuration
(`telemetry.exporter`: none, console, otlp, or jsonl — a local file that
`radtriage trace` reads). Kafka clients disagree on the header shape (kafka-python
and aiokafka use a list of (str, bytes); Faust hands a mapping), so the helpers
here accept both.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from radtriage.settings import Settings

TRACEPARENT = "traceparent"
HeaderList = list[tuple[str, bytes]]

_configured = False


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a local JSON-lines file (one span per line)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json()), separators=(",", ":")) for s in spans]
        with self._lock, self._path.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def setup_tracing(settings: Settings, component: str) -> None:
    """Install the global tracer provider for this process (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create(
        {"service.name": settings.telemetry.service_name, "service.instance.id": component}
    )
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter | None
    match settings.telemetry.exporter:
        case "none":
            exporter = None
        case "console":
            exporter = ConsoleSpanExporter()
        case "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.telemetry.otlp_endpoint)
        case "jsonl":
            exporter = JsonLinesSpanExporter(settings.trace_file)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def headers_for_current_span() -> HeaderList:
    """Kafka headers carrying the current span's context (W3C traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode()) for k, v in carrier.items()]


def context_from_headers(headers: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> Context:
    """The trace context a Kafka message was produced in (empty context if none)."""
    carrier: dict[str, str] = {}
    if headers:
        items = headers.items() if isinstance(headers, Mapping) else headers
        for key, value in items:
            carrier[str(key)] = value.decode() if isinstance(value, bytes | bytearray) else str(value)
    return propagate.extract(carrier)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
