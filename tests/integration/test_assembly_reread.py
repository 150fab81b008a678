"""A release marker counting more instances than the assembly holds: the missing ones are read
back from the log (streams/assembly_reread.py), against the session's real Kafka broker.

The loss itself is what the 3-broker fault test met once in several runs (a worker SIGKILLed
mid-transfer, its partition's assembly restored one instance short while the instance's
offset was committed); here it is made on purpose: an instance event the consumer group has
already committed past, so the worker never folds it in.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from connectors.publisher import EventPublisher
from radtriage import metrics
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import KafkaSettings, Settings, StreamSettings
from schemas.base import utcnow
from schemas.instances import InstanceEvent
from streams import assembly
from streams.assembly_reread import LogRange, fill_from_log
from tests.integration.harness import Worker
from tests.support.kafka import Tail
from tests.support.net import free_port

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.77001"
OTHER = "1.2.826.0.1.3680043.8.498.77002"


def instance(study: str, n: int, association: str) -> InstanceEvent:
    return InstanceEvent(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=f"{study}.1.{n}",
        modality="CT",
        body_part="HEAD",
        series_description="CT HEAD WO CONTRAST",
        blob_uri=f"file:///nowhere/{study}/{n}.dcm",
        association_id=association,
    )


def marker(study: str, count: int, association: str, started_at: object) -> InstanceEvent:
    return InstanceEvent(
        kind="transfer_complete",
        study_uid=study,
        instance_count=count,
        association_id=association,
        association_started_at=started_at,  # type: ignore[arg-type]
    )


def count(outcome: str) -> float:
    return metrics.ASSEMBLY_REREADS.labels(outcome)._value.get()


def test_the_instances_a_state_lacks_are_read_back_up_to_the_marker(kafka_bootstrap: str) -> None:
    topic = f"reread-{free_port()}"
    ensure_topics(kafka_bootstrap, {topic: 1})
    publisher = EventPublisher(kafka_bootstrap, timeout_s=30, client_id="test-reread")
    started = utcnow()
    sent: list[InstanceEvent] = []
    # Another study and a second association of the same study on the same partition,
    # interleaved: neither may be folded in.
    for n in range(1, 7):
        for event in (
            instance(STUDY, n, "assoc-a"),
            instance(OTHER, n, "assoc-x"),
            instance(STUDY, 100 + n, "assoc-b"),
        ):
            publisher.publish(topic, event.study_uid, event)
            sent.append(event)
    done = marker(STUDY, 6, "assoc-a", started)
    at = publisher.publish(topic, STUDY, done)
    publisher.publish(topic, STUDY, instance(STUDY, 7, "assoc-a"))  # after the marker: not its own
    publisher.close()

    state = None
    for event in sent:
        if (
            event.study_uid == STUDY
            and event.association_id == "assoc-a"
            and not event.sop_instance_uid.endswith(".3")
        ):
            state = assembly.add_instance(state, event, "")
    assert assembly.shortfall(state, done) == 1
    where = LogRange(topic, at.partition, started - timedelta(seconds=5), at.offset)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)

    before = count("restored")
    filled = asyncio.run(fill_from_log(kafka, StreamSettings(), where, done, state))
    assert filled is not None
    assert sorted(filled.series[f"{STUDY}.1"].instances) == sorted(f"{STUDY}.1.{n}" for n in range(1, 7))
    assert filled.series[f"{STUDY}.1"].instances[f"{STUDY}.1.3"] == f"file:///nowhere/{STUDY}/3.dcm"
    assert assembly.shortfall(filled, done) == 0
    assert count("restored") == before + 1

    # The whole state lost: rebuilt from the log alone.
    rebuilt = asyncio.run(fill_from_log(kafka, StreamSettings(), where, done, None))
    assert rebuilt is not None and len(rebuilt.series[f"{STUDY}.1"].instances) == 6

    # A read cut short by its record limit finds nothing past it and says so.
    before = count("not_in_log")
    limited = StreamSettings(assembly_reread_max_records=2)
    assert asyncio.run(fill_from_log(kafka, limited, where, done, state)) == state
    assert count("not_in_log") == before + 1


def test_a_log_that_cannot_be_read_leaves_the_state_as_it_was() -> None:
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    done = marker(STUDY, 2, "assoc-a", utcnow())
    state = assembly.add_instance(None, instance(STUDY, 1, "assoc-a"), "")
    before = count("failed")
    quick = StreamSettings(assembly_reread_timeout_s=3)
    assert asyncio.run(fill_from_log(kafka, quick, LogRange("nowhere", 0, utcnow(), 5), done, state)) == state
    assert count("failed") == before + 1


def test_a_worker_emits_the_instances_its_group_had_committed_past(
    worker_env: tuple[dict[str, str], Settings], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """STUDY's marker comes right after its instances; OTHER's only after the quiet period
    (2 s here) emitted it short: the marker's read-back re-opens it and it goes out whole."""
    env, settings = worker_env
    topic = settings.topics.instances
    publisher = EventPublisher(kafka_bootstrap, timeout_s=30, client_id="test-reread-worker")
    started = utcnow()
    # Instance 3 of each is in the log, and the group's committed offsets are past it: what a
    # worker whose consumer skipped those records would see.
    for study in (STUDY, OTHER):
        publisher.publish(topic, study, instance(study, 3, "assoc-a"))
    committer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=settings.streams.app_id, enable_auto_commit=False
    )
    parts = [TopicPartition(topic, p) for p in sorted(committer.partitions_for_topic(topic) or ())]
    ends = committer.end_offsets(parts)
    committer.commit({tp: OffsetAndMetadata(ends[tp], "") for tp in parts})
    committer.close()

    tail = Tail(kafka_bootstrap, [settings.topics.studies])
    worker = Worker(env, tmp_path)
    worker.start()
    for study in (STUDY, OTHER):
        for n in (1, 2, 4, 5, 6):
            publisher.publish(topic, study, instance(study, n, "assoc-a"))
    publisher.publish(topic, STUDY, marker(STUDY, 6, "assoc-a", started))

    def uris(study: str) -> list[int]:
        return [
            len(s["series"][0]["instance_uris"]) for s in tail.of(settings.topics.studies, study_uid=study)
        ]

    tail.until(lambda: uris(STUDY) and uris(OTHER), timeout=90)
    assert uris(STUDY) == [6]
    (whole,) = tail.of(settings.topics.studies, study_uid=STUDY)
    assert whole["ready_reason"] == "transfer_complete"
    assert f"file:///nowhere/{STUDY}/3.dcm" in whole["series"][0]["instance_uris"]
    assert uris(OTHER) == [5]  # the quiet period's emission, short

    publisher.publish(topic, OTHER, marker(OTHER, 6, "assoc-a", started))
    publisher.close()
    tail.until(lambda: len(uris(OTHER)) == 2, timeout=60)
    assert uris(OTHER) == [5, 6]
    assert tail.of(settings.topics.studies, study_uid=OTHER)[1]["ready_reason"] == "transfer_complete"
    assert worker.log_file.read_text().count("read back and folded in") == 2
