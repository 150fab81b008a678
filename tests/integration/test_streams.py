"""The Faust worker against a real Kafka: assembly, routing, dead letters, alert dedup across a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from radtriage.kafka_admin import ensure_topics
from radtriage.settings import REPO_ROOT, Settings
from schemas.findings import Finding
from schemas.instances import InstanceEvent
from tests.conftest import free_port

pytestmark = pytest.mark.integration


_workers: list[Worker] = []


class Worker:
    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.env, self.home = env, home
        self.proc: subprocess.Popen[bytes] | None = None
        _workers.append(self)

    def start(self) -> None:
        ready = self.home / "run" / "worker.ready"
        ready.unlink(missing_ok=True)
        log = (self.home / "worker.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radtriage.cli", "worker"],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert self.proc.poll() is None, (self.home / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        self.proc.wait(30)


@pytest.fixture
def worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    # A fresh app id and fresh topics per test: its own consumer group, tables and
    # traffic, not the history other tests left on the session's broker.
    suffix = f"{tmp_path.name[-12:]}-{free_port()}"
    settings = Settings(home=tmp_path)
    settings.kafka.bootstrap_servers = kafka_bootstrap
    env = dict(os.environ)
    for field in type(settings.topics).model_fields:
        name = f"{getattr(settings.topics, field)}.{suffix}"
        setattr(settings.topics, field, name)
        env[f"RADTRIAGE_TOPICS__{field.upper()}"] = name
    env.update(
        {
            "RADTRIAGE_HOME": str(tmp_path),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "RADTRIAGE_STREAMS__APP_ID": f"radtriage-test-{suffix}",
            "RADTRIAGE_STREAMS__ASSEMBLY_QUIET_S": "2",
            # No Triton here: requests that reach a lane fail fast and are dead-lettered.
            "RADTRIAGE_TRITON__GRPC_URL": f"127.0.0.1:{free_port()}",
            "RADTRIAGE_TRITON__TIMEOUT_S": "1",
            "RADTRIAGE_TELEMETRY__EXPORTER": "none",
        }
    )
    env.pop("RADTRIAGE_SETTINGS_JSON", None)
    ensure_topics(kafka_bootstrap, dict.fromkeys(settings.topics.all(), settings.kafka.partitions))
    yield env, settings
    # A failed assertion must not leave a worker running behind the test session.
    for worker in _workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill(signal.SIGKILL)
    _workers.clear()


class Tail:
    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        parts = [TopicPartition(t, p) for t in topics for p in sorted(self.c.partitions_for_topic(t) or {0})]
        self.c.assign(parts)
        self.c.seek_to_end(*parts)
        for tp in parts:
            self.c.position(tp)
        self.seen: list[tuple[str, dict[str, Any], dict[str, bytes]]] = []

    def until(self, predicate: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            for recs in self.c.poll(timeout_ms=200).values():
                self.seen += [(r.topic, json.loads(r.value), dict(r.headers or [])) for r in recs]
        assert predicate(), [
            (t, d.get("study_uid"), d.get("decision") or d.get("stage")) for t, d, _ in self.seen
        ]

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for recs in self.c.poll(timeout_ms=200).values():
                self.seen += [(r.topic, json.loads(r.value), dict(r.headers or [])) for r in recs]

    def of(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        return [d for t, d, _ in self.seen if t == topic and all(d.get(k) == v for k, v in match.items())]


def _finding(uid: str, p: float) -> bytes:
    now = datetime.now(UTC)
    return Finding(
        study_uid=uid,
        accession_number="ACC",
        patient_id="MRN",
        series_uid=uid + ".1",
        finding="ICH",
        probability=p,
        threshold=0.5,
        positive=p >= 0.5,
        model_name="ich_classifier",
        model_version="1",
        lane="stat",
        rule_id="ct-head-noncontrast-ich",
        received_at=now,
        ready_at=now,
        inference_ms=5.0,
    ).to_bytes()


def test_one_alert_per_study_even_across_a_killed_worker(worker_env: tuple[dict[str, str], Settings]) -> None:
    env, settings = worker_env
    t = settings.topics
    worker = Worker(env, settings.home)
    worker.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.alerts_ich, t.results_fhir, t.audit])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    uid = f"1.2.826.0.1.{time.time_ns()}"
    producer.send(t.findings, key=uid.encode(), value=_finding(uid, 0.91)).get(10)
    producer.send(t.findings, key=uid.encode(), value=_finding(uid, 0.93)).get(10)
    tail.until(
        lambda: len(tail.of(t.results_fhir, study_uid=uid)) == 2 and len(tail.of(t.audit, study_uid=uid)) == 2
    )
    assert len(tail.of(t.alerts_ich, study_uid=uid)) == 1
    assert sorted(d["decision"] for d in tail.of(t.audit, study_uid=uid)) == [
        "alert_sent",
        "alert_suppressed_duplicate",
    ]

    worker.kill(signal.SIGKILL)
    worker.start()  # recovers the alerts-sent table from its changelog
    producer.send(t.findings, key=uid.encode(), value=_finding(uid, 0.97)).get(10)
    tail.until(lambda: len(tail.of(t.audit, study_uid=uid)) == 3)
    tail.drain(1.0)
    assert len(tail.of(t.alerts_ich, study_uid=uid)) == 1
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
    for i in range(10):
        ev = InstanceEvent(
            study_uid=head,
            series_uid=head + ".1",
            sop_instance_uid=f"{head}.1.{i}",
            modality="CT",
            body_part="HEAD",
            series_description="CT HEAD WO CONTRAST",
            blob_uri=f"file:///nowhere/{i}.dcm",
        )
        producer.send(t.instances, key=head.encode(), value=ev.to_bytes(), headers=traceparent)
    producer.send(
        t.instances,
        key=head.encode(),
        value=InstanceEvent(kind="transfer_complete", study_uid=head, instance_count=10).to_bytes(),
    )
    for i in range(3):  # no release marker: completes after the quiet period
        ev = InstanceEvent(
            study_uid=chest,
            series_uid=chest + ".1",
            sop_instance_uid=f"{chest}.1.{i}",
            modality="CT",
            body_part="CHEST",
            series_description="CT CHEST",
            blob_uri=f"file:///nowhere/{i}.dcm",
        )
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
