"""What the page's two buttons do: acknowledge an alert, replay a dead letter.

Parsing and the audit event are pure; `replay_letter` is the one side effect here and
follows `radtriage replay`'s rule exactly (radtriage/replay.py): under the replay
ledger's exclusive lock, a letter already recorded in `replay/replayed.jsonl` is never
replayed again, and a replay is recorded (fsync'ed) right after Kafka acknowledged it —
so the button and the command line share one at-most-once ledger.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kafka import KafkaProducer

from radtriage.kafka_clients import kafka_python_producer_kwargs
from radtriage.operator.view import AlertRow, LetterRow
from radtriage.replay import (
    Coordinates,
    append_record,
    classify,
    consumed_topics,
    locked_record,
    read_record,
    record_line,
    replay_headers,
    replay_record,
    send_replay,
)
from radtriage.settings import Settings
from schemas.audit import ACK_DECISION, AuditEvent

MAX_NAME = 64
MAX_ID = 512


class ActionError(Exception):
    """A refused action, answered as JSON with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class AckRequest:
    alert_id: str
    by: str


def _object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ActionError(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise ActionError(400, "body must be a JSON object")
    return data


def clean_name(value: object) -> str:
    """Who acknowledged: a short printable name or initials (staff, never a patient)."""
    if not isinstance(value, str):
        raise ActionError(400, "'by' must be a string: your name or initials")
    name = " ".join(value.split())
    if not name:
        raise ActionError(400, "'by' is empty: say who acknowledges")
    if len(name) > MAX_NAME:
        raise ActionError(400, f"'by' is longer than {MAX_NAME} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ActionError(400, "'by' holds control characters")
    return name


def parse_ack(body: bytes) -> AckRequest:
    data = _object(body)
    alert_id = data.get("alert_id")
    if not isinstance(alert_id, str) or not alert_id or len(alert_id) > MAX_ID:
        raise ActionError(400, "'alert_id' must be a non-empty string")
    return AckRequest(alert_id, clean_name(data.get("by")))


def ack_event(alert: AlertRow, by: str, at: datetime) -> AuditEvent:
    """The record of an acknowledgement on `triage.audit` (the page rebuilds acks from it)."""
    return AuditEvent(
        study_uid=alert.study_uid,
        accession_number=alert.accession_number,
        stage="alert",
        decision=ACK_DECISION,
        detail={"alert_id": alert.alert_id, "by": by, "at": at.isoformat(), "finding": alert.finding},
        at=at,
    )


def parse_replay(body: bytes) -> Coordinates:
    data = _object(body)
    topic, partition, offset = data.get("topic"), data.get("partition"), data.get("offset")
    if not isinstance(topic, str) or not topic or len(topic) > 249:
        raise ActionError(400, "'topic' must be the dead-letter topic's name")
    # bool is an int in Python: refuse true/false as numbers.
    for name, value in (("partition", partition), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ActionError(400, f"'{name}' must be a non-negative integer")
    return Coordinates(topic, partition, offset)  # type: ignore[arg-type]


def replay_letter(settings: Settings, row: LetterRow) -> tuple[Coordinates, frozenset[Coordinates]]:
    """Republish one dead letter's original message at most once (blocking).

    Returns where it landed and the ledger's letters afterwards; raises ActionError 409
    when the letter was replayed already or cannot be, 503 when Kafka did not acknowledge.
    """
    letter = row.letter
    with locked_record(replay_record(settings)) as record:
        replayed = read_record(record)
        action, reason = classify(letter, consumed_topics(settings), row.coords in replayed)
        if action == "already_replayed":
            raise ActionError(409, "already replayed (recorded in replay/replayed.jsonl)")
        if action != "replay":
            raise ActionError(409, f"cannot be replayed: {reason}")
        timeout_ms = int(settings.kafka.produce_timeout_s * 1000)
        headers = replay_headers(letter, row.coords, row.traceparent.encode() if row.traceparent else None)
        try:
            producer = KafkaProducer(
                # acks=all + idempotence: replayed only once every in-sync replica has it.
                **kafka_python_producer_kwargs(settings.kafka),
                client_id="radtriage-operator-replay",
                linger_ms=1,
                request_timeout_ms=timeout_ms,
                delivery_timeout_ms=timeout_ms + 1,
                max_block_ms=timeout_ms,
                bootstrap_timeout_ms=timeout_ms,
            )
        except Exception as exc:  # NoBrokersAvailable and friends
            raise ActionError(503, f"event log unavailable, nothing replayed: {type(exc).__name__}") from exc
        try:
            landed = send_replay(producer, letter, headers, settings.kafka.produce_timeout_s)
        except Exception as exc:  # every KafkaError: not acknowledged, so not recorded
            raise ActionError(503, f"Kafka did not acknowledge the replay: {type(exc).__name__}") from exc
        finally:
            producer.close(timeout=settings.kafka.produce_timeout_s)
        append_record(record, record_line(row.coords, letter, landed))
        return landed, frozenset(read_record(record))
