"""Metrics recorded by a real Faust worker, scraped over HTTP both ways they are served.

The worker and a `radtriage http` process share one prometheus_client multiprocess
directory, as under `radtriage up`: the HTTP process's /metrics is the aggregate. The
worker also serves its own registry on `metrics.port` (a pod per process). Both must
say what Kafka says happened: as many ready→alert observations as alerts produced, as
many ready→report observations as reports, one dead letter per stage that failed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from radtriage import metrics
from radtriage.settings import Settings
from tests.integration.harness import Worker, finding_bytes, pixelless_series, release
from tests.integration.test_metrics_http import Samples, names, scrape, value
from tests.support.kafka import Tail
from tests.support.net import free_port
from tests.support.process import start_radtriage, wait_listening
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def _histogram_count(samples: Samples, name: str, **labels: str) -> float:
    return value(samples, f"{name}_count", **labels)


def _start_http(env: dict[str, str], home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**env, "RADTRIAGE_HTTP__PORT": str(port), "RADTRIAGE_HTTP__BIND_ADDRESS": "127.0.0.1"}
    proc = start_radtriage(["http"], env, home / "http.log")
    wait_listening(proc, port, home / "http.log")
    return proc


def test_worker_metrics_match_what_kafka_carried(worker_env: tuple[dict[str, str], Settings]) -> None:
    env, settings = worker_env
    metrics_dir = settings.home / "metrics"
    metrics.reset_multiproc_dir(metrics_dir)
    worker_port, http_port = free_port(), free_port()
    env = {
        **env,
        metrics.MULTIPROC_ENV: str(metrics_dir),
        "RADTRIAGE_METRICS__PORT": str(worker_port),
        "RADTRIAGE_METRICS__BIND_ADDRESS": "127.0.0.1",
        "RADTRIAGE_METRICS__SCRAPE_CACHE_S": "0",
    }
    worker = Worker(env, settings.home)
    worker.start()
    http = _start_http(env, settings.home, http_port)
    try:
        _drive_and_check(settings, worker, f"http://127.0.0.1:{worker_port}/metrics", http_port)
    finally:
        http.send_signal(signal.SIGTERM)
        http.wait(30)


def _drive_and_check(settings: Settings, worker: Worker, worker_url: str, http_port: int) -> None:
    t = settings.topics
    group = settings.streams.app_id
    aggregate_url = f"http://127.0.0.1:{http_port}/metrics"
    tail = Tail(
        settings.kafka.bootstrap_servers, [t.alert_topic("ich"), t.results_fhir, t.deadletter, t.studies]
    )
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    stamp = time.time_ns()
    ready_at = datetime.now(UTC)
    positives = [f"1.2.826.0.5.{stamp}.{i}" for i in range(3)]
    negatives = [f"1.2.826.0.6.{stamp}.{i}" for i in range(2)]
    for uid in positives:
        payload = finding_bytes(uid, 0.9, ready_at, received_before_s=1)
        producer.send(t.findings, key=uid.encode(), value=payload)
    for uid in negatives:
        payload = finding_bytes(uid, 0.1, ready_at, received_before_s=1)
        producer.send(t.findings, key=uid.encode(), value=payload)
    # A head CT routed to the stat lane whose pixels are not there: preprocess dead-letters it.
    head = f"1.2.826.0.7.{stamp}"
    for ev in pixelless_series(head):
        producer.send(t.instances, key=head.encode(), value=ev.to_bytes())
    producer.send(t.instances, key=head.encode(), value=release(head))
    producer.send(t.instances, key=b"poison", value=b"\x00not json")
    producer.flush()

    tail.until(
        lambda: (
            len([a for a in tail.of(t.alert_topic("ich")) if a["study_uid"] in positives]) == 3
            and len([r for r in tail.of(t.results_fhir) if r["study_uid"] in positives + negatives]) == 5
            and tail.of(t.deadletter, study_uid=head)
            and tail.of(t.deadletter, key="poison")
        )
    )
    tail.drain(1.0)
    alerts = [a for a in tail.of(t.alert_topic("ich")) if a["study_uid"] in positives]
    reports = [r for r in tail.of(t.results_fhir) if r["study_uid"] in positives + negatives]
    letters = {d["stage"] for d in tail.of(t.deadletter)}
    assert len(alerts) == 3 and len(reports) == 5 and letters == {"assemble", "infer.stat.preprocess"}

    labels = {"lane": "stat", "model": "ich_classifier"}
    own = scrape(worker_url)
    aggregate = scrape(aggregate_url)
    for samples in (own, aggregate):
        assert _histogram_count(samples, "radtriage_ready_to_alert_seconds", **labels, finding="ICH") == len(
            alerts
        )
        assert _histogram_count(samples, "radtriage_received_to_alert_seconds", **labels) == len(alerts)
        assert value(samples, "radtriage_alerts_total", finding="ICH", lane="stat") == len(alerts)
        assert _histogram_count(samples, "radtriage_ready_to_report_seconds", **labels) == len(reports)
        assert value(samples, "radtriage_reports_total", finding="ICH") == len(reports)
        assert value(samples, "radtriage_studies_assembled_total", ready_reason="transfer_complete") == 1
        assert value(samples, "radtriage_requests_routed_total", lane="stat", action="routed") == 1
        assert _histogram_count(samples, "radtriage_ready_to_routed_seconds", **labels) == 1
        assert value(samples, "radtriage_dead_letters_total", stage="assemble") == 1
        assert value(samples, "radtriage_dead_letters_total", stage="infer.stat.preprocess") == 1
        assert value(samples, "radtriage_dead_letters_total") == 2
        assert value(samples, "radtriage_requests_in_flight", lane="stat") == 0
        # The alerts' clocks started at the findings' ready_at, which is the study's:
        # the sum is at least the findings' age when they were alerted on.
        assert value(samples, "radtriage_ready_to_alert_seconds_sum") > 0
    # Only the HTTP process reads the lag; it is there for the worker's group, per lane.
    assert value(aggregate, "radtriage_consumer_lag_up", group=group) == 1
    assert {ls for n, ls in aggregate if n == "radtriage_consumer_lag"} == {
        frozenset({("group", group), ("lane", lane), ("topic", t.lane_topic(lane))})
        for lane in ("stat", "urgent", "routine")
    }
    assert "radtriage_consumer_lag" not in names(own)

    # The stat request was consumed: once Faust commits, its lag is 0 (committed = next offset).
    wait_until(
        lambda: value(scrape(aggregate_url), "radtriage_consumer_lag", group=group, lane="stat") == 0,
        "the worker's commit show as zero lag",
        30,
        interval=0.5,
    )

    # A stopped worker's live gauges leave the aggregate with it; its counters stay.
    in_flight = [dict(ls)["lane"] for n, ls in scrape(aggregate_url) if n == "radtriage_requests_in_flight"]
    assert sorted(in_flight) == ["routine", "stat", "urgent"]
    worker.kill(signal.SIGTERM)
    after = scrape(aggregate_url)
    assert not [ls for n, ls in after if n == "radtriage_requests_in_flight"]
    assert value(after, "radtriage_alerts_total", finding="ICH") == len(alerts)
