"""Tracing for library code, through the OpenTelemetry API only: W3C trace-context
propagation through Kafka headers, and the span names and attributes every stage uses.

The SDK (tracer provider, exporters) is installed by the commands at the top, once per
process (radtriage/tracing_sdk.py `setup_tracing`): opentelemetry-python's rule, libraries
use the API and only the entry point picks the implementation. Without it every span here
is a no-op. Kafka clients disagree on the header shape (kafka-python and aiokafka use a
list of (str, bytes); Faust hands a mapping), so the helpers here accept both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from radtriage.settings import LANES, Settings

TRACEPARENT = "traceparent"
HeaderList = list[tuple[str, bytes]]

# Topics whose message key may go into a span (see `key_safe_topics`); empty until set up.
_key_safe_topics: frozenset[str] = frozenset()


def configure(settings: Settings) -> None:
    """What the helpers here need to know of the deployment (the topics whose keys may be
    span attributes); called by the process's tracing set-up (radtriage/tracing_sdk.py)."""
    global _key_safe_topics
    _key_safe_topics = key_safe_topics(settings)


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
            *(t.lane_topic(lane) for lane in LANES),
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
