"""OpenTelemetry set-up and W3C trace-context propagation through Kafka headers.

Every process calls `setup_tracing` once; the exporter is chosen by configuration
(`telemetry.exporter`: none, console, otlp, or jsonl — a local file that
`radtriage trace` reads). Kafka clients disagree on the header shape (kafka-python
and aiokafka use a list of (str, bytes); Faust hands a mapping), so the helpers
here accept both.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from radtriage.settings import Settings

TRACEPARENT = "traceparent"
HeaderList = list[tuple[str, bytes]]

_configured = False
# Topics whose message key may go into a span (see `key_safe_topics`); empty until set up.
_key_safe_topics: frozenset[str] = frozenset()


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a local JSON-lines file (one span per line), rotated by size.

    At ~90 KiB of spans per study an unrotated file fills a disk in weeks; past `max_bytes`
    the file becomes `<name>.1` (older ones shift up to `<name>.<backups>`, the oldest is
    dropped) and a new one is started. `radtriage trace` reads the backups too.
    """

    def __init__(self, path: Path, max_bytes: int = 0, backups: int = 3) -> None:
        self._path = path
        self._max_bytes, self._backups = max_bytes, backups
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json()), separators=(",", ":")) for s in spans]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        # Every process of `radtriage up` appends to the same file: one locked O_APPEND
        # write per batch, so lines of two processes never interleave mid-line.
        with self._lock:
            fd = self._open_locked()
            try:
                if self._max_bytes and 0 < os.fstat(fd).st_size and (
                    os.fstat(fd).st_size + len(data) > self._max_bytes
                ):
                    self._rotate()
                    os.close(fd)
                    fd = self._open_locked()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)  # closing releases the lock
        return SpanExportResult.SUCCESS

    def _open_locked(self) -> int:
        while True:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Another process may have rotated the file while we waited for its lock: then
            # this descriptor is the backup's, and the new file is the one to append to.
            try:
                if os.stat(self._path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _rotate(self) -> None:
        for n in range(self._backups - 1, 0, -1):
            older = rotated_path(self._path, n)
            if older.exists():
                os.replace(older, rotated_path(self._path, n + 1))
        if self._backups:
            os.replace(self._path, rotated_path(self._path, 1))
        else:
            self._path.unlink(missing_ok=True)

    def shutdown(self) -> None:
        return None


def rotated_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def trace_files(path: Path, backups: int) -> list[Path]:
    """The trace file and its existing backups, oldest first."""
    older = [rotated_path(path, n) for n in range(backups, 0, -1)]
    return [p for p in older if p.exists()] + [path]


def setup_tracing(settings: Settings, component: str) -> None:
    """Install the global tracer provider for this process (idempotent)."""
    global _configured, _key_safe_topics
    if _configured:
        return
    _configured = True
    _key_safe_topics = key_safe_topics(settings)
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
            exporter = _otlp_exporter(settings)
        case "jsonl":
            exporter = JsonLinesSpanExporter(
                settings.trace_file, settings.telemetry.jsonl_max_bytes, settings.telemetry.jsonl_backups
            )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)


def _otlp_exporter(settings: Settings) -> SpanExporter:
    endpoint = settings.telemetry.otlp_endpoint
    if settings.telemetry.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        # A plain-text collector address (http://) means no TLS; https:// or a bare host:port
        # is left to the exporter's own defaults (TLS unless told otherwise).
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def trace_carrier() -> dict[str, str]:
    """The current span's context as W3C headers (for gRPC metadata, HTTP headers)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


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


# -- Kafka spans, per the OpenTelemetry messaging semantic conventions ------------------------
# (semconv as in opentelemetry-semantic-conventions 0.66b2: "send <topic>" PRODUCER spans,
# messaging.operation.type send / process, messaging.kafka.offset, consumer.group.name).

MESSAGING_SYSTEM = "kafka"


def key_safe_topics(settings: Settings) -> frozenset[str]:
    """Topics keyed by StudyInstanceUID or accession number: their key may be a span attribute.

    Everything else is left out: the encounters and the join's by-patient topic are keyed
    by patient id (PHI), and a dead letter keeps its source message's key, whatever it was.
    """
    t, s = settings.topics, settings.streams
    return frozenset(
        {
            t.instances,
            t.studies,
            t.orders,
            s.studies_by_accession_topic,
            *(t.lane_topic(lane) for lane in ("stat", "urgent", "routine")),
            t.findings,
            t.results_fhir,
            *t.alert_topics(),
            t.audit,
        }
    )


def send_span_name(topic: str) -> str:
    return f"send {topic}"


def producer_attributes(
    topic: str, key: str, event: object | None = None, safe_topics: frozenset[str] | None = None
) -> dict[str, Any]:
    """A PRODUCER span's attributes; the key only on topics known not to be keyed by PHI."""
    attrs: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": topic,
    }
    if key and topic in (_key_safe_topics if safe_topics is None else safe_topics):
        attrs["messaging.kafka.message.key"] = key
    # The ids every event carries, so `radtriage trace` finds a study's (or its order's) trace.
    for name in ("study_uid", "accession_number"):
        value = getattr(event, name, "")
        if isinstance(value, str) and value:
            attrs[f"radtriage.{name}"] = value
    return attrs


def consumer_attributes(topic: str, partition: int | None, offset: int | None, group: str) -> dict[str, Any]:
    """A CONSUMER ("process") span's attributes for one Kafka record."""
    attrs: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": topic,
        "messaging.consumer.group.name": group,
    }
    if partition is not None:
        attrs["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attrs["messaging.kafka.offset"] = offset
    return attrs


def record_ack(span: Span | None, partition: int | None, offset: int | None) -> None:
    """What the broker's acknowledgement told us about where the record went."""
    if span is None:
        return
    if partition is not None:
        span.set_attribute("messaging.destination.partition.id", str(partition))
    if offset is not None and offset >= 0:
        span.set_attribute("messaging.kafka.offset", offset)


@contextmanager
def send_span(
    topic: str, key: str, headers: Mapping[str, str] | None, event: object | None = None
) -> Iterator[tuple[Span | None, dict[str, str]]]:
    """A PRODUCER span around one publish, and the headers to send with it.

    The span's parent is the trace context the caller put in `headers` (a connector may
    publish for a study other than the current span's), else the current context. Its
    own context replaces the traceparent in the headers, so the consumer's span is its
    child. Without any trace context (a timer's nudge) there is no span and the headers
    go out unchanged.
    """
    carrier = dict(headers or {})
    parent = context_from_headers(carrier) if TRACEPARENT in carrier else None
    current = trace.get_current_span().get_span_context()
    if parent is not None and trace.get_current_span(parent).get_span_context().span_id == current.span_id:
        parent = None  # the headers are the current span's: keep the in-process parent
    if not trace.get_current_span(parent).get_span_context().is_valid:
        yield None, carrier
        return
    tracer = trace.get_tracer("radtriage.kafka")
    with tracer.start_as_current_span(
        send_span_name(topic),
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes=producer_attributes(topic, key, event),
    ) as span:
        carrier.pop(TRACEPARENT, None)
        carrier.pop("tracestate", None)
        propagate.inject(carrier)
        try:
            yield span, carrier
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
