"""The Faust worker against a real Kafka: assembly, routing, dead letters, alert dedup across a kill -9."""

from __future__ import annotations

import signal
import time

import pytest
from kafka import KafkaProducer

from radtriage.settings import Settings
from tests.integration.harness import Worker, finding_bytes, pixelless_series, release
from tests.support.kafka import Tail

pytestmark = pytest.mark.integration


def test_one_alert_per_study_even_across_a_killed_worker(worker_env: tuple[dict[str, str], Settings]) -> None:
    env, settings = worker_env
    t = settings.topics
    worker = Worker(env, settings.home)
    worker.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.alert_topic("ich"), t.results_fhir, t.audit])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    uid = f"1.2.826.0.1.{time.time_ns()}"
    producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.91)).get(10)
    producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.93)).get(10)
    tail.until(
        lambda: len(tail.of(t.results_fhir, study_uid=uid)) == 2 and len(tail.of(t.audit, study_uid=uid)) == 2
    )
    assert len(tail.of(t.alert_topic("ich"), study_uid=uid)) == 1
    assert sorted(d["decision"] for d in tail.of(t.audit, study_uid=uid)) == [
        "alert_sent",
        "alert_suppressed_duplicate",
    ]

    worker.kill(signal.SIGKILL)
    worker.start()  # reads the alerts already sent back from the alert topic
    producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.97)).get(10)

    def third_reported() -> bool:
        # Findings whose offsets were not committed before the kill are processed again
        # (at-least-once), so count the audit events only once the new finding's report is out.
        return any(
            r["bundle"]["entry"][1]["resource"]["valueQuantity"]["value"] == 0.97
            for r in tail.of(t.results_fhir, study_uid=uid)
        )

    tail.until(lambda: third_reported() and len(tail.of(t.audit, study_uid=uid)) >= 3)
    tail.drain(2.0)
    assert len(tail.of(t.alert_topic("ich"), study_uid=uid)) == 1
    decisions = [d["decision"] for d in tail.of(t.audit, study_uid=uid)]
    assert decisions.count("alert_sent") == 1
    assert set(decisions[1:]) == {"alert_suppressed_duplicate"}
    worker.kill(signal.SIGTERM)


def test_assembly_routing_and_dead_letters(worker_env: tuple[dict[str, str], Settings]) -> None:
    env, settings = worker_env
    t = settings.topics
    worker = Worker(env, settings.home)
    worker.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.studies, t.requests_stat, t.audit, t.deadletter])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    head, chest = f"1.2.826.0.2.{time.time_ns()}", f"1.2.826.0.3.{time.time_ns()}"
    traceparent = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    for ev in pixelless_series(head):
        producer.send(t.instances, key=head.encode(), value=ev.to_bytes(), headers=traceparent)
    producer.send(t.instances, key=head.encode(), value=release(head))
    # No release marker: completes after the quiet period.
    for ev in pixelless_series(chest, 3, body_part="CHEST", description="CT CHEST"):
        producer.send(t.instances, key=chest.encode(), value=ev.to_bytes())
    producer.send(t.instances, key=b"poison", value=b"\x00not json at all")
    producer.send(t.studies, key=b"poison", value=b'{"schema_version": 7}')
    producer.flush()

    tail.until(
        lambda: (
            tail.of(t.audit, study_uid=chest)
            and tail.of(t.deadletter, study_uid=head)
            and len(tail.of(t.deadletter, key="poison")) == 2
        )
    )
    (study,) = tail.of(t.studies, study_uid=head)
    assert study["ready_reason"] == "transfer_complete" and len(study["series"][0]["instance_uris"]) == 10
    (chest_study,) = tail.of(t.studies, study_uid=chest)
    assert chest_study["ready_reason"] == "quiet_period"
    assert tail.of(t.audit, study_uid=chest)[0]["decision"] == "unrouted"
    (req,) = tail.of(t.requests_stat, study_uid=head)
    assert req["model_name"] == "ich_classifier"
    # The missing blobs cannot be loaded: a dead letter naming the stage, not a stuck lane.
    (dl,) = tail.of(t.deadletter, study_uid=head)
    assert dl["stage"] == "infer.stat.preprocess" and dl["source_topic"] == t.requests_stat
    stages = sorted(d["stage"] for d in tail.of(t.deadletter, key="poison"))
    assert stages == ["assemble", "route"]
    # The study's trace continues from the first instance's traceparent through routing.
    headers = next(h for topic, d, h in tail.seen if topic == t.studies and d.get("study_uid") == head)
    assert headers["traceparent"].split(b"-")[1] == b"0af7651916cd43dd8448eb211c80319c"
    worker.kill(signal.SIGTERM)


def test_no_second_alert_when_the_worker_dies_right_after_alerting(
    worker_env: tuple[dict[str, str], Settings],
) -> None:
    """The crash window of a dedup table written after the alert: the alert is in Kafka, the
    finding's offset is not committed, so the next worker reprocesses the finding. It must
    find the alert on the alert topic (streams/published_ledger.py) and not send it again."""
    env, settings = worker_env
    t = settings.topics
    crashing = Worker({**env, "RADTRIAGE_STREAMS__FAULT_INJECTION": "crash_after_alert"}, settings.home)
    crashing.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.alert_topic("ich"), t.audit])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    uid = f"1.2.826.0.4.{time.time_ns()}"
    producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.95)).get(10)
    tail.until(lambda: len(tail.of(t.alert_topic("ich"), study_uid=uid)) == 1)
    assert crashing.proc is not None
    assert crashing.proc.wait(60) == 70  # died in the window, before the audit event
    assert tail.of(t.audit, study_uid=uid) == []

    survivor = Worker(env, settings.home)
    survivor.start()
    tail.until(lambda: len(tail.of(t.audit, study_uid=uid)) == 1)
    tail.drain(2.0)
    assert len(tail.of(t.alert_topic("ich"), study_uid=uid)) == 1
    (audit,) = tail.of(t.audit, study_uid=uid)
    assert audit["decision"] == "alert_suppressed_duplicate"
    survivor.kill(signal.SIGTERM)
