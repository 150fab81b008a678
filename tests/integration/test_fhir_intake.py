"""The FHIR intake against a real Kafka, driven by a real HTTP client (requests).

Each test publishes to its own `imaging.orders` topic, so "exactly these events" can
be asserted over the whole topic. The robustness test throws thousands of malformed
payloads (hypothesis) at the running server with valid orders interleaved.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from connectors.publisher import EventPublisher
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from tests.support.http import (
    Intake,
    healthy,
    http_settings,
    running_intake,
    start_http_process,
    start_intake,
    stop_intake,
)
from tests.support.kafka import PARTITIONS, Record, read_topic
from tests.support.net import free_port
from tests.support.process import wait_ready

pytestmark = pytest.mark.integration

SECRET_NAME = "Secret^Patient"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOCATION = re.compile(r"^http://[^/]+/fhir/(ServiceRequest|ImagingStudy)/([0-9a-f-]{36})/_history/1$")
TIMEOUT = (5, 60)


# -- a server in a background event loop ----------------------------------------------


def _settings(home: Path, bootstrap: str) -> Settings:
    settings = http_settings(home, bootstrap, ("orders", "instances"))
    # Small enough that the robustness test's huge strings cross it.
    settings.http.max_fhir_bytes = 256 << 10
    return settings


def _start(
    settings: Settings, loop: asyncio.AbstractEventLoop, publisher: EventPublisher | None = None
) -> Intake:
    return start_intake(settings, loop, publisher, topic_field="orders")


@pytest.fixture
def intake(kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Intake]:
    with running_intake(_settings(tmp_path / "home", kafka_bootstrap), loop, topic_field="orders") as server:
        yield server


# -- resources --------------------------------------------------------------------------


def acsn(value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": value}


def service_request(accession: str, priority: str | None = "stat", **extra: Any) -> dict[str, Any]:
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [acsn(accession)],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "30799-1", "display": "CT Head WO contrast"}],
            "text": "CT head without contrast",
        },
        "reasonCode": [{"text": "code stroke, LKW 14:05"}],
        "subject": {"reference": "Patient/MRN-77", "display": SECRET_NAME},
        "requester": {"display": "Dr. Secret^Doctor"},
        "note": [{"text": f"{SECRET_NAME} is claustrophobic"}],
        **extra,
    }
    if priority is not None:
        sr["priority"] = priority
    return sr


def imaging_study(accession: str, study_uid: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "basedOn": [{"identifier": acsn(accession)}],
        "subject": {"identifier": {"value": "MRN-88"}, "display": SECRET_NAME},
        "procedureCode": [{"coding": [{"system": "http://loinc.org", "code": "30799-1"}]}],
    }


def post(
    session: requests.Session, url: str, body: Any, headers: dict[str, str] | None = None
) -> requests.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return session.post(url, data=data, headers=headers or FHIR_JSON, timeout=TIMEOUT)


def outcome(response: requests.Response) -> OperationOutcome:
    assert response.headers["Content-Type"].startswith("application/fhir+json"), response.headers
    return OperationOutcome.model_validate(response.json())


def _no_names(records: list[Record]) -> None:
    for r in records:
        assert b"Secret" not in r.raw, r.value


# -- tests --------------------------------------------------------------------------------


def test_created_resources_are_published_once_after_ack(intake: Intake) -> None:
    s = requests.Session()
    priorities = ["stat", "asap", "urgent", "routine", None]
    locations: dict[str, str] = {}
    for i, priority in enumerate(priorities):
        r = post(s, f"{intake.base}/fhir/ServiceRequest", service_request(f"ACC-{i}", priority))
        assert r.status_code == 201, r.text
        match = LOCATION.match(r.headers["Location"])
        assert match and match.group(1) == "ServiceRequest", r.headers["Location"]
        assert r.json()["id"] == match.group(2) and r.json()["meta"]["versionId"] == "1"
        assert r.headers["ETag"] == 'W/"1"'
        locations[f"ACC-{i}"] = match.group(2)
    study_uid = "1.2.826.0.1.3680043.8.498.1234"
    r = post(
        s,
        f"{intake.base}/fhir/ImagingStudy",
        imaging_study("ACC-0", study_uid),
        {**FHIR_JSON, "Prefer": "return=minimal"},
    )
    assert r.status_code == 201 and r.content == b"", r.text
    study_location = LOCATION.match(r.headers["Location"])
    assert study_location and study_location.group(1) == "ImagingStudy"

    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, len(priorities) + 1)
    assert len(records) == len(priorities) + 1
    orders = {r.value["source_message_id"]: r for r in records}
    for i, priority in enumerate(priorities):
        rec = orders[locations[f"ACC-{i}"]]
        assert rec.key.decode() == f"ACC-{i}" == rec.value["accession_number"]
        assert rec.value["priority"] == priority
        assert rec.value["priority_field"] == ("ServiceRequest.priority" if priority else "")
        assert rec.value["message_type"] == "ServiceRequest" and rec.value["source"] == "fhir"
        assert rec.value["patient_id"] == "MRN-77"
        assert rec.value["procedure_code"] == "30799-1"
        assert rec.value["indication"] == "code stroke, LKW 14:05"
        assert rec.headers["traceparent"].startswith(b"00-")
    study = orders[study_location.group(2)]
    assert (study.key.decode(), study.value["study_uid"], study.value["priority"]) == (
        "ACC-0",
        study_uid,
        None,
    )
    assert study.value["patient_id"] == "MRN-88"
    _no_names(records)


def test_each_request_is_a_server_span_and_the_event_carries_its_trace(intake: Intake) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # the session's (tests/conftest.py)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        r = post(requests.Session(), f"{intake.base}/fhir/ServiceRequest", service_request("SPAN-1"))
        assert r.status_code == 201
        bad = post(requests.Session(), f"{intake.base}/fhir/ServiceRequest", b"{")
        assert bad.status_code == 400
        (record,) = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 1)
        servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    finally:
        exporter.shutdown()
    assert [dict(s.attributes or {}) for s in servers] == [
        {
            "http.request.method": "POST",
            "http.route": "/fhir/{type}",
            "url.path": "/fhir/ServiceRequest",
            "http.response.status_code": status,
        }
        for status in (201, 400)
    ]
    assert servers[0].name == "POST /fhir/{type}"
    _, trace_id, _, _ = record.headers["traceparent"].decode().split("-")
    assert servers[0].context is not None and format(servers[0].context.trace_id, "032x") == trace_id
    for span in exporter.get_finished_spans():
        assert "Secret" not in json.dumps(dict(span.attributes or {}))


def test_bad_requests_get_operation_outcomes_and_publish_nothing(intake: Intake) -> None:
    s = requests.Session()
    url = f"{intake.base}/fhir/ServiceRequest"
    no_accession = service_request("X")
    no_accession["identifier"] = [{"value": "no-type"}]
    cases: list[tuple[str, Any, dict[str, str] | None, int, str]] = [
        ("invalid JSON", b'{"resourceType": "ServiceRequest",', None, 400, "invalid JSON"),
        ("wrong type", {**service_request("A"), "status": 7}, None, 400, "ServiceRequest.status"),
        ("bad priority", service_request("A", "whenever"), None, 400, "ServiceRequest.priority"),
        (
            "wrong resourceType",
            {**service_request("A"), "resourceType": "Patient"},
            None,
            400,
            "resourceType",
        ),
        (
            "missing subject",
            {k: v for k, v in service_request("A").items() if k != "subject"},
            None,
            400,
            "ServiceRequest.subject",
        ),
        ("no accession", no_accession, None, 422, "ACSN"),
        ("xml", "<ServiceRequest/>", {"Content-Type": "application/fhir+xml"}, 415, "Content-Type"),
        ("too large", {**service_request("A"), "x": "y" * (300 << 10)}, None, 413, "larger than"),
    ]
    for name, body, headers, status, says in cases:
        r = post(s, url, body, headers)
        assert r.status_code == status, (name, r.status_code, r.text[:500])
        oo = outcome(r)
        text = json.dumps(r.json())
        assert says in text, (name, text)
        assert oo.issue[0].severity == "error"
    # Unknown type, unsupported method, unknown instance paths.
    r = post(s, f"{intake.base}/fhir/Patient", {"resourceType": "Patient"})
    assert r.status_code == 404 and outcome(r).issue[0].code == "not-supported"
    r = s.get(url, timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and outcome(r)
    r = s.delete(f"{url}/123", timeout=TIMEOUT)
    assert r.status_code == 405 and outcome(r)
    r = post(s, f"{intake.base}/fhir", service_request("A"))
    assert r.status_code == 400 and "Bundle" in r.text and outcome(r)
    assert read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 1, timeout_s=2, settle_s=0) == []


def test_metadata_is_a_valid_r4_capability_statement(intake: Intake) -> None:
    r = requests.get(f"{intake.base}/fhir/metadata", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/fhir+json")
    cs = CapabilityStatement.model_validate(r.json())
    assert cs.fhirVersion == "4.0.1" and cs.format == ["application/fhir+json", "json"]
    (rest,) = cs.rest
    # Orders in; results read and searched (the view of triage.results.fhir, on by default).
    assert {(res.type, tuple(i.code for i in res.interaction)) for res in rest.resource} == {
        ("ServiceRequest", ("create",)),
        ("ImagingStudy", ("create",)),
        ("DiagnosticReport", ("read", "search-type")),
        ("Observation", ("read", "search-type")),
    }
    assert sorted(i.code for i in rest.interaction) == ["batch", "transaction"]


def _bundle(kind: str, *entries: tuple[str, Any, str]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": res,
                "request": {"method": method, "url": url},
            }
            for method, res, url in entries
        ],
    }


def test_transaction_is_validated_whole_before_anything_is_published(intake: Intake) -> None:
    s = requests.Session()
    bad = service_request("T-2")
    del bad["identifier"]
    refused = _bundle(
        "transaction",
        ("POST", service_request("T-1"), "ServiceRequest"),
        ("POST", bad, "ServiceRequest"),
    )
    r = post(s, f"{intake.base}/fhir", refused)
    assert r.status_code == 422, r.text
    (issue,) = outcome(r).issue
    assert issue.expression == ["Bundle.entry[1].resource.identifier"]

    accepted = _bundle(
        "transaction",
        ("POST", service_request("T-1", "stat"), "ServiceRequest"),
        ("POST", imaging_study("T-1", "1.2.3.4.5"), "ImagingStudy"),
    )
    r = post(s, f"{intake.base}/fhir", accepted)
    assert r.status_code == 200, r.text
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "transaction-response"
    assert [e.response.status for e in bundle.entry] == ["201 Created", "201 Created"]
    ids = [LOCATION.match(e.response.location).group(2) for e in bundle.entry]  # type: ignore[union-attr]

    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 2)
    assert sorted(r.value["source_message_id"] for r in records) == sorted(ids)
    assert {r.key.decode() for r in records} == {"T-1"}
    _no_names(records)


def test_batch_answers_each_entry_on_its_own(intake: Intake) -> None:
    s = requests.Session()
    no_accession = service_request("B-2")
    del no_accession["identifier"]
    batch = _bundle(
        "batch",
        ("POST", service_request("B-1", "urgent"), "ServiceRequest"),
        ("POST", no_accession, "ServiceRequest"),
        ("POST", {"resourceType": "Patient"}, "Patient"),
        ("PUT", service_request("B-4"), "ServiceRequest"),
        ("POST", {**service_request("B-5"), "priority": 3}, "ServiceRequest"),
        ("POST", imaging_study("B-1", "1.2.3.4.6"), "ImagingStudy"),
    )
    r = post(s, f"{intake.base}/fhir", batch)
    assert r.status_code == 200, r.text
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "batch-response"
    statuses = [e.response.status for e in bundle.entry]  # type: ignore[union-attr]
    assert statuses == [
        "201 Created",
        "422 Unprocessable Entity",
        "404 Not Found",
        "405 Method Not Allowed",
        "400 Bad Request",
        "201 Created",
    ]
    failed_outcome = r.json()["entry"][4]["response"]["outcome"]
    assert failed_outcome["issue"][0]["expression"] == ["Bundle.entry[4].resource.priority"]
    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 2)
    assert sorted(r.value["message_type"] for r in records) == ["ImagingStudy", "ServiceRequest"]
    assert [r.value["priority"] for r in records if r.value["message_type"] == "ServiceRequest"] == ["urgent"]


def test_kafka_down_means_503_never_201_and_health_says_so(
    kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    settings = _settings(tmp_path / "home", f"127.0.0.1:{free_port()}")
    publisher = EventPublisher(settings.kafka.bootstrap_servers, timeout_s=1.5, client_id="test-down")
    server = _start(settings, loop, publisher)
    try:
        started = time.monotonic()
        r = post(requests.Session(), f"{server.base}/fhir/ServiceRequest", service_request("D-1"))
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 1.5 + 3
        assert r.headers["Retry-After"] == "5"
        assert outcome(r).issue[0].code == "transient"
        batch = post(
            requests.Session(),
            f"{server.base}/fhir",
            _bundle("batch", ("POST", service_request("D-2"), "ServiceRequest")),
        )
        assert batch.status_code == 200 and batch.json()["entry"][0]["response"]["status"].startswith("503")
        health = requests.get(f"{server.base}/healthz", timeout=TIMEOUT)
        assert health.status_code == 503 and health.json()["checks"]["kafka"]["status"] == "failing"
    finally:
        stop_intake(server)
        publisher.close()


def test_health_is_ok_with_kafka_up(intake: Intake) -> None:
    r = requests.get(f"{intake.base}/healthz", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["checks"]["kafka"]["status"] == "ok"


# -- robustness -------------------------------------------------------------------------

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SR_FIELDS = sorted(service_request("X"))


@st.composite
def mutated_service_request(draw: st.DrawFn) -> dict[str, Any]:
    sr = service_request(f"M-{draw(st.integers(0, 10**6))}", draw(st.sampled_from(["stat", "routine", None])))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(SR_FIELDS))
        action = draw(st.sampled_from(["delete", "retype", "huge", "deep", "nested-retype"]))
        if action == "delete":
            sr.pop(field, None)
        elif action == "retype":
            sr[field] = draw(JSON_VALUE)
        elif action == "huge":
            sr[field] = "x" * draw(st.sampled_from([70, 5000, 100_000, 400_000]))
        elif action == "deep":
            depth = draw(st.sampled_from([30, 70, 500]))
            value: Any = "leaf"
            for _ in range(depth):
                value = [value]
            sr[field] = value
        else:
            sr["identifier"] = [{"type": draw(JSON_VALUE), "value": draw(JSON_VALUE)}]
    if draw(st.booleans()) and draw(st.booleans()):
        sr["resourceType"] = draw(st.sampled_from(["Patient", "Observation", "", "servicerequest", 5, None]))
    return sr


@st.composite
def malformed_bundle(draw: st.DrawFn) -> dict[str, Any]:
    entries = []
    for _ in range(draw(st.integers(0, 4))):
        entry: dict[str, Any] = {
            "resource": draw(st.one_of(mutated_service_request(), JSON_VALUE)),
            "request": draw(
                st.one_of(
                    st.fixed_dictionaries(
                        {
                            "method": st.sampled_from(["POST", "GET", "PUT", "post", 1]),
                            "url": st.sampled_from(
                                ["ServiceRequest", "ImagingStudy", "Patient", "", "a b", 3]
                            ),
                        }
                    ),
                    JSON_VALUE,
                )
            ),
        }
        entries.append(entry)
    return {
        "resourceType": "Bundle",
        "type": draw(st.sampled_from(["transaction", "batch", "collection", None, 7])),
        "entry": entries if draw(st.integers(0, 9)) else draw(JSON_VALUE),
    }


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def malformed_request(draw: st.DrawFn) -> tuple[str, bytes | str, str]:
    """(path, body, content type)."""
    kind = draw(
        st.sampled_from(
            ["bytes", "truncated", "json", "deep", "mutated", "mutated", "mutated", "bundle", "bundle"]
        )
    )
    path = "/fhir/ServiceRequest"
    if kind == "bytes":
        body: bytes | str = draw(st.binary(max_size=512))
    elif kind == "truncated":
        text = json.dumps(service_request("T"))
        body = text[: draw(st.integers(0, len(text) - 1))]
    elif kind == "json":
        body = _as_text(draw(JSON_VALUE))
    elif kind == "deep":
        # Deeper than any client-side json.dumps could write: built as text.
        depth = draw(st.sampled_from([65, 1000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        body = (
            '{"resourceType": "ServiceRequest", "extension": ' + opener * depth + "1" + closer * depth + "}"
        )
    elif kind == "mutated":
        body = json.dumps(draw(mutated_service_request()))
    else:
        path = "/fhir"
        body = json.dumps(draw(malformed_bundle()))
    if draw(st.integers(0, 19)) == 0:
        path = draw(
            st.sampled_from(["/fhir/ImagingStudy", "/fhir/Patient", "/fhir", "/fhir/ServiceRequest/1"])
        )
    content_type = (
        "application/fhir+json"
        if draw(st.integers(0, 19))
        else draw(st.sampled_from(["application/json", "text/plain", "application/fhir+xml", ""]))
    )
    return path, body, content_type


def _created_ids(response: requests.Response) -> list[str]:
    """The ids of everything a 2xx response says was created (a resource or Bundle entries)."""
    if response.status_code == 201:
        match = LOCATION.match(response.headers["Location"])
        assert match, response.headers
        return [match.group(2)]
    body = response.json()
    assert body["resourceType"] == "Bundle" and body["type"] in ("batch-response", "transaction-response")
    ids = []
    for entry in body.get("entry", []):
        if entry["response"]["status"] == "201 Created":
            match = LOCATION.match(entry["response"]["location"])
            assert match, entry
            ids.append(match.group(2))
        else:
            assert entry["response"]["status"][0] == "4", entry
            OperationOutcome.model_validate(entry["response"]["outcome"])
    return ids


def test_malformed_payloads_never_break_the_server_and_valid_orders_arrive_once(intake: Intake) -> None:
    session = requests.Session()
    created: list[str] = []
    counts: Counter[str] = Counter()

    @settings(
        max_examples=3000,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(malformed_request(), st.integers(0, 4))
    def throw(request: tuple[str, bytes | str, str], interleave: int) -> None:
        path, body, content_type = request
        headers = {"Content-Type": content_type} if content_type else {}
        r = session.post(f"{intake.base}{path}", data=body, headers=headers, timeout=TIMEOUT)
        counts["malformed"] += 1
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            counts[f"{r.status_code}"] += 1
            oo = outcome(r)
            assert oo.issue and all(i.severity and i.code for i in oo.issue)
        else:
            # A mutation can leave a valid resource (an optional field deleted): it is created.
            counts["accidentally valid"] += 1
            created.extend(_created_ids(r))
        if interleave == 0:
            valid = post(
                session, f"{intake.base}/fhir/ServiceRequest", service_request(f"V-{counts['valid']}")
            )
            counts["valid"] += 1
            assert valid.status_code == 201, valid.text
            created.extend(_created_ids(valid))

    started = time.monotonic()
    throw()
    elapsed = time.monotonic() - started
    print(f"\nFHIR robustness: {dict(counts)} in {elapsed:.1f} s")
    assert counts["malformed"] >= 3000 and counts["valid"] >= 300

    # Still serving, and healthy.
    assert requests.get(f"{intake.base}/healthz", timeout=TIMEOUT).status_code == 200
    last = post(session, f"{intake.base}/fhir/ServiceRequest", service_request("LAST"))
    assert last.status_code == 201
    created.extend(_created_ids(last))

    # Everything answered 201 is on the topic exactly once, and nothing else is.
    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, len(created), timeout_s=60)
    on_topic = Counter(r.value["source_message_id"] for r in records)
    assert len(created) == len(set(created))
    missing = set(created) - set(on_topic)
    assert not missing, f"{len(missing)} acknowledged orders lost"
    assert all(n == 1 for n in on_topic.values()) and set(on_topic) == set(created)
    _no_names(records)


# -- the `radtriage http` process ------------------------------------------------------


def test_radtriage_http_serves_and_stops_cleanly_on_sigterm(kafka_bootstrap: str, tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(tmp_path / "home", kafka_bootstrap)
    ensure_topics(kafka_bootstrap, {settings.topics.orders: PARTITIONS})
    proc = start_http_process(settings, port, tmp_path / "http.log", "orders")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, lambda: healthy(base), tmp_path / "http.log", "radtriage http never became healthy")
        r = post(requests.Session(), f"{base}/fhir/ServiceRequest", service_request("P-1"))
        assert r.status_code == 201, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = (tmp_path / "http.log").read_text()
    assert "HTTP intake stopped" in text
    # The access log names route templates and statuses, never bodies or names.
    assert "POST /fhir/{type} 201" in text and "Secret" not in text
    records = read_topic(kafka_bootstrap, settings.topics.orders, 1)
    assert [r.key.decode() for r in records] == ["P-1"]
