"""`radtriage replay` against a real Kafka: the real command, real dead-letter and source topics."""

from __future__ import annotations

import json

import pytest
from kafka import KafkaProducer

from radtriage.replay import REPLAY_HEADER, replay_record
from radtriage.settings import Settings
from schemas.deadletter import DeadLetter
from tests.support.kafka import Tail
from tests.support.process import run_replay

pytestmark = pytest.mark.integration

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _triton_gave_up(
    topic: str,
    lane: str,
    study_uid: str,
    payload: str,
    partition: int | None = None,
    offset: int | None = None,
) -> DeadLetter:
    """What a lane's agent dead-letters when Triton stays unreachable: the request as read."""
    return DeadLetter(
        source_topic=topic,
        stage=f"infer.{lane}.triton",
        error="gave up after 3 attempt(s): Triton unreachable",
        key=study_uid,
        study_uid=study_uid,
        payload=payload,
        partition=partition,
        offset=offset,
    )


def test_replay_republishes_chosen_letters_once_with_key_header_and_trace(
    worker_env: tuple[dict[str, str], Settings],
) -> None:
    env, settings = worker_env
    t = settings.topics
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    # What the stream's dead_letter() writes: the original text, key, topic and position.
    letters = {
        "stat": _triton_gave_up(
            t.requests_stat,
            "stat",
            "1.2.826.0.9.1",
            '{"study_uid": "1.2.826.0.9.1", "lane": "stat", "note": "é"}',
            partition=1,
            offset=4,
        ),
        "routine": _triton_gave_up(
            t.requests_routine,
            "routine",
            "1.2.826.0.9.2",
            '{"study_uid": "1.2.826.0.9.2", "lane": "routine"}',
        ),
        "route": DeadLetter(
            source_topic=t.studies,
            stage="route",
            error="StudyEvent: schema_version 7 not supported",
            key="1.2.826.0.9.3",
            payload='{"schema_version": 7, "study_uid": "1.2.826.0.9.3"}',
        ),
        "hl7": DeadLetter(
            source_topic="hl7.mllp",
            stage="hl7.refused",
            error="AR 200: unsupported message type",
            key="CTRL1",
            payload='{"quarantine": "file:///q/abc.hl7"}',
        ),
    }
    coords = {}
    for name, letter in letters.items():
        headers = [("traceparent", TRACEPARENT)] if name == "stat" else []
        meta = producer.send(
            t.deadletter, key=letter.key.encode(), value=letter.to_bytes(), headers=headers
        ).get(10)
        coords[name] = f"{t.deadletter}:{meta.partition}:{meta.offset}"
    tail = Tail(settings.kafka.bootstrap_servers, [t.requests_stat, t.requests_routine, t.studies])

    dry = run_replay(env, "--stage", "infer", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1.2.826.0.9.1" in dry.stdout and "1.2.826.0.9.2" in dry.stdout and "would replay" in dry.stdout
    tail.drain(2.0)
    assert tail.seen == []
    assert not replay_record(settings).exists() or replay_record(settings).read_text() == ""

    first = run_replay(env, "--stage", "infer")
    assert first.returncode == 0, first.stderr
    tail.until(lambda: len(tail.seen) == 2)
    by_topic = {topic: (value, headers) for topic, value, headers in tail.seen}
    for name, topic in (("stat", t.requests_stat), ("routine", t.requests_routine)):
        value, headers = by_topic[topic]
        assert value == json.loads(letters[name].payload)  # the original text, byte for byte
        assert headers[REPLAY_HEADER] == coords[name].encode()
    assert by_topic[t.requests_stat][1]["traceparent"] == TRACEPARENT  # the study's trace goes on
    raw = [r for recs in tail.consumer.poll(timeout_ms=0).values() for r in recs]
    assert raw == []  # nothing else arrived

    # Everything else, and the two already replayed: only the route letter goes.
    rest = run_replay(env)
    assert rest.returncode == 0, rest.stderr
    assert "already replayed" in rest.stdout and "hl7.mllp is not a Kafka topic" in rest.stdout
    tail.until(lambda: len(tail.seen) == 3)
    ((value, headers),) = [(v, h) for topic, v, h in tail.seen if topic == t.studies]
    assert value["schema_version"] == 7 and headers[REPLAY_HEADER] == coords["route"].encode()

    again = run_replay(env)
    assert again.returncode == 0, again.stderr
    assert "would replay" not in again.stdout and "→" not in again.stdout
    tail.drain(2.0)
    assert len(tail.seen) == 3
    recorded = [json.loads(line)["deadletter"] for line in replay_record(settings).read_text().splitlines()]
    assert sorted(recorded) == sorted([coords["stat"], coords["routine"], coords["route"]])
