"""`radtriage replay`'s pure half: which dead letters are chosen, in what order, and why not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from radtriage.replay import (
    Coordinates,
    Criteria,
    StoredLetter,
    consumed_topics,
    parse_record,
    parse_since,
    plan,
    record_line,
    stage_matches,
)
from radtriage.settings import Settings
from schemas.deadletter import DeadLetter
from streams.app import DEADLETTER_PAYLOAD_LIMIT

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SETTINGS = Settings()
CONSUMED = consumed_topics(SETTINGS)


def _stored(
    offset: int,
    *,
    stage: str = "infer.routine.triton",
    source: str = "triage.requests.routine",
    study: str = "1.2.3",
    minutes: int = 0,
    payload: str = '{"study_uid": "1.2.3"}',
) -> StoredLetter:
    letter = DeadLetter(
        source_topic=source,
        stage=stage,
        error="gave up after 3 attempt(s): Triton unreachable",
        key=study,
        partition=0,
        offset=offset,
        study_uid=study,
        payload=payload,
        at=T0 + timedelta(minutes=minutes),
    )
    return StoredLetter(Coordinates("triage.deadletter", 0, offset), letter)


def _actions(
    letters: list[StoredLetter], criteria: Criteria, replayed: set[Coordinates] | None = None
) -> list:
    return [
        (d.stored.coords.offset, d.action)
        for d in plan(letters, criteria, CONSUMED, replayed or set(), SETTINGS)
    ]


@pytest.mark.parametrize(
    ("stage", "prefix", "expected"),
    [
        ("infer.stat.triton", "", True),
        ("infer.stat.triton", "infer", True),
        ("infer.stat.triton", "infer.stat", True),
        ("infer.stat.triton", "infer.stat.", True),
        ("infer.stat.triton", "infer.stat.triton", True),
        ("infer.stat.triton", "infer.st", False),
        ("infer.stat.triton", "infer.routine", False),
        ("infer.stat", "infer.stat.triton", False),
        ("report", "rep", False),
    ],
)
def test_stage_prefix_is_by_dotted_segment(stage: str, prefix: str, expected: bool) -> None:
    assert stage_matches(stage, prefix) is expected


def test_consumed_topics_are_what_the_stream_reads_and_nothing_else() -> None:
    t = SETTINGS.topics
    assert {t.requests_stat, t.requests_urgent, t.requests_routine, t.instances, t.studies} <= CONSUMED
    assert {t.orders, t.encounters, t.findings} <= CONSUMED
    assert set(SETTINGS.streams.internal_topics()) <= CONSUMED
    assert not {t.deadletter, t.audit, t.alert_topic("ich"), t.results_fhir, "hl7.mllp"} & CONSUMED


def test_filters_by_stage_time_and_study() -> None:
    letters = [
        _stored(0, minutes=0),
        _stored(1, stage="infer.stat.triton", source="triage.requests.stat", minutes=1),
        _stored(2, stage="route", source="imaging.studies", minutes=2, study="9.9"),
        _stored(3, stage="infer.routine.preprocess", minutes=3, study="9.9"),
    ]
    assert _actions(letters, Criteria(stage_prefix="infer.stat.triton")) == [(1, "replay")]
    assert [o for o, _ in _actions(letters, Criteria(stage_prefix="infer"))] == [1, 0, 3]
    # Lane work before other stages' letters (see the ordering test).
    assert [o for o, _ in _actions(letters, Criteria(since=T0 + timedelta(minutes=2)))] == [3, 2]
    assert [o for o, _ in _actions(letters, Criteria(study_uid="9.9"))] == [3, 2]
    assert _actions(letters, Criteria(stage_prefix="infer", study_uid="9.9")) == [(3, "replay")]


def test_stat_lane_first_then_dead_letter_order_and_limit_counts_only_replays() -> None:
    letters = [
        _stored(0, minutes=0),
        _stored(1, stage="hl7.refused", source="hl7.mllp", minutes=1),
        _stored(2, stage="infer.urgent.triton", source="triage.requests.urgent", minutes=2),
        _stored(3, stage="infer.stat.triton", source="triage.requests.stat", minutes=3),
        _stored(4, stage="infer.stat.triton", source="triage.requests.stat", minutes=4),
    ]
    assert _actions(letters, Criteria()) == [
        (3, "replay"),
        (4, "replay"),
        (2, "replay"),
        (0, "replay"),
        (1, "not_a_topic"),
    ]
    # The limit takes the most urgent work; skipped letters are still listed.
    assert _actions(letters, Criteria(limit=2)) == [(3, "replay"), (4, "replay"), (1, "not_a_topic")]


def test_never_twice_and_never_what_cannot_be_restored() -> None:
    letters = [
        _stored(0),
        _stored(1),
        _stored(2, source="hl7.mllp", stage="hl7"),
        _stored(3, source="triage.audit", stage="audit"),
        _stored(4, payload="x" * DEADLETTER_PAYLOAD_LIMIT),
        _stored(5, payload='{"bad": "\ufffd"}'),
    ]
    replayed = {Coordinates("triage.deadletter", 0, 1)}
    # Another dead-letter topic's offset 0 is another letter.
    replayed.add(Coordinates("other.deadletter", 0, 0))
    assert _actions(letters, Criteria(), replayed) == [
        (0, "replay"),
        (1, "already_replayed"),
        (4, "truncated"),
        (5, "not_utf8"),
        (2, "not_a_topic"),
        (3, "not_a_topic"),
    ]
    (hl7,) = [
        d for d in plan(letters, Criteria(), CONSUMED, replayed, SETTINGS) if d.stored.coords.offset == 2
    ]
    assert "hl7.mllp is not a Kafka topic" in hl7.reason


def test_record_lines_round_trip_and_torn_lines_are_ignored() -> None:
    coords = Coordinates("triage.deadletter.x-1", 2, 41)
    line = record_line(coords, _stored(41).letter, Coordinates("triage.requests.routine", 2, 7))
    assert parse_record(line) == coords
    assert parse_record(line[: len(line) // 2]) is None
    assert parse_record('{"deadletter": "no-coordinates"}') is None


def test_since_without_a_zone_is_utc() -> None:
    assert parse_since("2026-01-01T12:00:00") == T0
    assert parse_since("2026-01-01T13:00:00+01:00") == T0
    assert parse_since("2026-01-01T12:00:00Z") == T0
    with pytest.raises(ValueError):
        parse_since("yesterday")
