"""`GET /metrics` of the HTTP server against a real Kafka, scraped with a real HTTP client.

FHIR counters move by exactly the requests sent; the consumer-lag gauge equals real
offsets (requests produced with no consumer, then committed by the group); a Kafka that
accepts connections but never answers leaves the lag absent and flagged, and /metrics
still answers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from connectors.http.server import HttpHandle, start_http
from connectors.publisher import EventPublisher
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from schemas.requests import TriageRequest
from tests.support.http import http_settings
from tests.support.net import free_port
from tests.support.settings import unique_suffix

pytestmark = pytest.mark.integration

PARTITIONS = 3
TIMEOUT = (5, 30)
FHIR_JSON = {"Content-Type": "application/fhir+json"}
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


@dataclass
class Server:
    settings: Settings
    handle: HttpHandle

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.handle.port}/metrics"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.handle.port}"


def _settings(home: Path, bootstrap: str) -> Settings:
    suffix = unique_suffix()
    topics = ("orders", "instances", "requests_stat", "requests_urgent", "requests_routine")
    settings = http_settings(home, bootstrap, topics, suffix=suffix)
    settings.streams.app_id = f"radtriage-metrics-{suffix}"
    # Nothing listens here: model readiness is 0, quickly.
    settings.triton.grpc_url = f"127.0.0.1:{free_port()}"
    settings.metrics.probe_timeout_s = 2.0
    return settings


@pytest.fixture
def server(kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Server]:
    settings = _settings(tmp_path / "home", kafka_bootstrap)
    settings.metrics.scrape_cache_s = 0.0  # every scrape reads Kafka: offsets change within the test
    lanes = [settings.topics.lane_topic(lane) for lane in ("stat", "urgent", "routine")]
    ensure_topics(kafka_bootstrap, dict.fromkeys([settings.topics.orders, *lanes], PARTITIONS))
    publisher = EventPublisher(kafka_bootstrap, timeout_s=10.0, client_id="test-metrics")
    handle = asyncio.run_coroutine_threadsafe(start_http(settings, publisher), loop).result(30)
    try:
        yield Server(settings, handle)
    finally:
        asyncio.run_coroutine_threadsafe(handle.stop(), loop).result(60)
        publisher.close()


def service_request(accession: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": "stat",
        "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "30799-1"}]},
        "subject": {"reference": "Patient/MRN42"},
    }


def test_fhir_counters_move_by_exactly_the_requests_sent(server: Server) -> None:
    before = scrape(server.metrics_url)
    with requests.Session() as http:
        ok = [
            http.post(
                f"{server.base}/fhir/ServiceRequest",
                json=service_request(f"ACC-{i}"),
                headers=FHIR_JSON,
                timeout=TIMEOUT,
            )
            for i in range(3)
        ]
        malformed = http.post(
            f"{server.base}/fhir/ServiceRequest",
            data=b'{"resourceType": "Servi',
            headers=FHIR_JSON,
            timeout=TIMEOUT,
        )
        unknown = http.post(f"{server.base}/fhir/MRN123456", data=b"{}", headers=FHIR_JSON, timeout=TIMEOUT)
    assert [r.status_code for r in ok] == [201, 201, 201]
    assert malformed.status_code == 400 and unknown.status_code == 404
    after = scrape(server.metrics_url)

    def delta(**labels: str) -> float:
        return value(after, "radtriage_fhir_requests_total", **labels) - value(
            before, "radtriage_fhir_requests_total", **labels
        )

    assert delta(resource_type="ServiceRequest", code="201") == 3
    assert delta(resource_type="ServiceRequest", code="400") == 1
    # A made-up resource type is counted, but never as a label value of its own.
    assert delta(resource_type="other", code="404") == 1
    assert delta() == 5
    assert not any("MRN" in v for _n, labels in after for _k, v in labels)
    # The scrapes themselves are not FHIR requests.
    assert value(after, "radtriage_fhir_requests_total", resource_type="metadata") == value(
        before, "radtriage_fhir_requests_total", resource_type="metadata"
    )


def _request(uid: str) -> bytes:
    now = datetime.now(UTC)
    return TriageRequest(
        study_uid=uid,
        series_uid=uid + ".1",
        instance_uris=("file:///nowhere/1.dcm",),
        lane="stat",
        rule_id="ct-head-noncontrast-ich",
        model_name="ich_classifier",
        finding="ICH",
        threshold=0.05,
        received_at=now,
        ready_at=now,
    ).to_bytes()


def test_lag_gauge_equals_real_offsets(server: Server, kafka_bootstrap: str) -> None:
    t = server.settings.topics
    group = server.settings.streams.app_id
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(7):
        uid = f"1.2.826.0.9.{i}"
        producer.send(t.requests_stat, key=uid.encode(), value=_request(uid))
    for i in range(2):
        uid = f"1.2.826.0.8.{i}"
        producer.send(t.requests_routine, key=uid.encode(), value=_request(uid))
    producer.flush()
    producer.close()

    samples = scrape(server.metrics_url)
    assert value(samples, "radtriage_consumer_lag_up", group=group) == 1
    # No consumer has committed anything: every message is lag.
    assert value(samples, "radtriage_consumer_lag", group=group, lane="stat", topic=t.requests_stat) == 7
    assert value(samples, "radtriage_consumer_lag", group=group, lane="routine") == 2
    assert (
        "radtriage_consumer_lag",
        frozenset({("group", group), ("lane", "urgent"), ("topic", t.requests_urgent)}),
    ) in samples
    assert value(samples, "radtriage_consumer_lag", group=group, lane="urgent") == 0

    # The group consumes the stat lane and commits: its lag is gone, routine's stays.
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    parts = [TopicPartition(t.requests_stat, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen = 0
    for _ in range(50):
        seen += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        if seen == 7:
            break
    assert seen == 7
    consumer.commit()
    consumer.close()
    samples = scrape(server.metrics_url)
    assert value(samples, "radtriage_consumer_lag", group=group, lane="stat") == 0
    assert value(samples, "radtriage_consumer_lag", group=group, lane="routine") == 2
    # No Triton behind the settings: the model the rules name is reported down.
    assert value(samples, "radtriage_model_ready", model="ich_classifier") == 0


def test_a_silent_kafka_leaves_lag_absent_and_metrics_answering(
    kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    # A "broker" that accepts TCP connections and never says a word: the worst case for
    # a client without timeouts.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)
    settings = _settings(tmp_path / "home", f"127.0.0.1:{black_hole.getsockname()[1]}")
    settings.metrics.probe_timeout_s = 1.0
    publisher = EventPublisher(kafka_bootstrap, timeout_s=10.0, client_id="test-metrics")
    handle = asyncio.run_coroutine_threadsafe(start_http(settings, publisher), loop).result(30)
    try:
        url = f"http://127.0.0.1:{handle.port}/metrics"
        for _ in range(3):
            samples = scrape(url)
            assert value(samples, "radtriage_consumer_lag_up", group=settings.streams.app_id) == 0
            assert "radtriage_consumer_lag" not in names(samples)
            assert "radtriage_model_ready" in names(samples)
            # The rest of the process's registry is served as usual.
            assert "python_info" in names(samples)
    finally:
        asyncio.run_coroutine_threadsafe(handle.stop(), loop).result(60)
        publisher.close()
        black_hole.close()
