"""What a record on each topic the operator page reads means: its schema, and where it sits.

Every record becomes either an `Observed` event (a schema object plus its coordinates
and trace) or an `Unreadable` one (garbage bytes, another schema, an unknown version):
the page counts those and moves on, as the stream does with its dead letters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from radtriage.replay import REPLAY_HEADER, Coordinates
from radtriage.settings import Topics
from schemas.alerts import Alert
from schemas.audit import AuditEvent
from schemas.base import Event, EventDecodeError
from schemas.deadletter import DeadLetter
from schemas.findings import Finding
from schemas.requests import TriageRequest
from schemas.results import ResultHeaders, read_result_meta
from schemas.studies import StudyEvent

Kind = Literal["alert", "finding", "result", "request", "audit", "deadletter", "study"]
Headers = Sequence[tuple[str, bytes]]

# The results topic's records are a plain FHIR Bundle with radtriage's metadata in headers
# (schemas/results.py `read_result_meta`); the page needs only the metadata.
SCHEMAS: dict[Kind, type[Event]] = {
    "alert": Alert,
    "finding": Finding,
    "request": TriageRequest,
    "audit": AuditEvent,
    "deadletter": DeadLetter,
    "study": StudyEvent,
}

PageEvent = Alert | Finding | ResultHeaders | TriageRequest | AuditEvent | DeadLetter | StudyEvent


def topic_kinds(topics: Topics) -> dict[str, Kind]:
    """The topics the page reads, and what each carries."""
    return {
        **dict.fromkeys(topics.alert_topics(), "alert"),
        topics.findings: "finding",
        topics.results_fhir: "result",
        topics.requests_stat: "request",
        topics.requests_urgent: "request",
        topics.requests_routine: "request",
        topics.audit: "audit",
        topics.deadletter: "deadletter",
        topics.studies: "study",
    }


@dataclass(frozen=True)
class Record:
    """A Kafka record as the observer read it, before anything is trusted."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: Headers = ()


@dataclass(frozen=True)
class Observed:
    event: PageEvent
    coords: Coordinates
    # The W3C trace the message was produced in ("" if none): links a study to its spans.
    trace_id: str = ""
    # Set when the message is a replay of a dead letter (radtriage replay / the page's button).
    replay_of: Coordinates | None = None
    # The raw header, for a replay to continue the same trace.
    traceparent: str = ""


@dataclass(frozen=True)
class Unreadable:
    coords: Coordinates
    reason: str


def _header(headers: Headers, name: str) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def trace_id_of(headers: Headers) -> str:
    """The trace id of a `traceparent` header (version-traceid-spanid-flags), or ""."""
    raw = _header(headers, "traceparent")
    parts = raw.decode("ascii", errors="replace").split("-") if raw else []
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return ""


def parse_coordinates(text: str) -> Coordinates | None:
    """`topic:partition:offset` (topic names may not hold ':' but be lenient: split right)."""
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic or not partition.isdigit() or not rest.isdigit():
        return None
    return Coordinates(topic, int(partition), int(rest))


def decode(record: Record, kinds: dict[str, Kind]) -> Observed | Unreadable:
    coords = Coordinates(record.topic, record.partition, record.offset)
    kind = kinds.get(record.topic)
    if kind is None:
        return Unreadable(coords, "not a topic the operator page reads")
    try:
        event: PageEvent = (
            read_result_meta(record.value, record.headers)
            if kind == "result"
            else SCHEMAS[kind].from_bytes(record.value)  # type: ignore[assignment]
        )
    except EventDecodeError as exc:
        return Unreadable(coords, str(exc))
    except (UnicodeDecodeError, ValueError) as exc:  # not even text
        return Unreadable(coords, f"{type(exc).__name__}")
    replay = _header(record.headers, REPLAY_HEADER)
    replay_of = parse_coordinates(replay.decode("utf-8", errors="replace")) if replay else None
    traceparent = _header(record.headers, "traceparent")
    return Observed(
        event,
        coords,
        trace_id_of(record.headers),
        replay_of,
        traceparent.decode("ascii", errors="replace") if traceparent else "",
    )
