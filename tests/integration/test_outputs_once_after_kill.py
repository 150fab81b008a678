"""Exactly one finding and one report per request across a worker killed at the worst moment.

The worker is killed (fault injection, `os._exit`) right after Kafka acknowledged its
output and before its input offset was committed, so the next worker processes the same
input again; the published ledgers (streams/published_ledger.py) must find the output on
its topic and not publish it twice. Real Kafka, real Triton, real `radtriage worker`s.
"""

from __future__ import annotations

import signal
import time

import pytest
from kafka import KafkaProducer

from radtriage.settings import Settings
from tests.integration.harness import Studies, Worker, finding_bytes
from tests.support.kafka import Tail

pytestmark = pytest.mark.integration


def test_no_second_report_when_the_worker_dies_right_after_reporting(
    worker_env: tuple[dict[str, str], Settings],
) -> None:
    env, settings = worker_env
    t = settings.topics
    crashing = Worker({**env, "RADTRIAGE_STREAMS__FAULT_INJECTION": "crash_after_report"}, settings.home)
    crashing.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.results_fhir])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    uid = f"1.2.826.0.5.{time.time_ns()}"
    first, sentinel = f"{uid}/first", f"{uid}/sentinel"
    # Negative findings: this test is about reports, not alerts.
    producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.05, request_id=first)).get(10)
    tail.until(lambda: len(tail.of(t.results_fhir, request_id=first)) == 1)
    assert crashing.proc is not None
    assert crashing.proc.wait(60) == 70  # died after the report, before committing the finding

    survivor = Worker(env, settings.home)
    survivor.start()
    # Same key, so same partition, behind the replayed finding: once its report is out, the
    # replayed one has been decided.
    producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.05, request_id=sentinel)).get(10)
    tail.until(lambda: len(tail.of(t.results_fhir, request_id=sentinel)) == 1)
    tail.drain(2.0)
    assert len(tail.of(t.results_fhir, request_id=first)) == 1
    assert len(tail.of(t.results_fhir, request_id=sentinel)) == 1
    survivor.kill(signal.SIGTERM)


def test_no_second_finding_when_the_worker_dies_right_after_inferring(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str
) -> None:
    env, settings = worker_env
    t = settings.topics
    env = {**env, "RADTRIAGE_TRITON__GRPC_URL": triton_grpc_url, "RADTRIAGE_TRITON__TIMEOUT_S": "20"}
    crashing = Worker({**env, "RADTRIAGE_STREAMS__FAULT_INJECTION": "crash_after_finding"}, settings.home)
    crashing.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.findings, t.results_fhir, t.alert_topic("ich"), t.audit])
    studies = Studies(settings, settings.home)
    uid = studies.send("stat", bleed=True)
    tail.until(lambda: len(tail.of(t.findings, study_uid=uid)) == 1, timeout=180)
    assert crashing.proc is not None
    assert crashing.proc.wait(60) == 70  # died after the finding, before committing the request

    survivor = Worker(env, settings.home)
    survivor.start()

    def decided() -> bool:
        skipped = [a for a in tail.of(t.audit, study_uid=uid) if a["decision"] == "skipped_already_done"]
        return bool(skipped) and len(tail.of(t.results_fhir, study_uid=uid)) >= 1

    tail.until(decided, timeout=180)
    tail.until(lambda: len(tail.of(t.alert_topic("ich"), study_uid=uid)) >= 1)
    tail.drain(3.0)
    (finding,) = tail.of(t.findings, study_uid=uid)
    assert finding["positive"] and finding["request_id"]
    assert len(tail.of(t.results_fhir, study_uid=uid)) == 1
    assert len(tail.of(t.alert_topic("ich"), study_uid=uid)) == 1
    survivor.kill(signal.SIGTERM)
