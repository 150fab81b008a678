"""FHIR read and search of the results on `/fhir`, against a real Kafka and a real
`radtriage http` process: report records built by processors/fhir_report.py from
findings are published on the test's own `triage.results.fhir` topic, read back over
FHIR, found again after the process restarts (the view is rebuilt from the topic), and
a searchset Bundle is checked by the HAPI FHIR validator."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from kafka import KafkaProducer

from processors.fhir_report import build_result_bundle
from radtriage.kafka_admin import ensure_topics
from radtriage.kafka_clients import kafka_python_producer_kwargs
from radtriage.settings import Settings
from schemas.findings import Finding
from schemas.results import FhirResult, ResultHeaders, result_record
from tests.support.fhir_validator import validate
from tests.support.findings import finding, gallery
from tests.support.http import healthy, http_env, http_settings
from tests.support.kafka import PARTITIONS
from tests.support.net import free_port
from tests.support.process import start_radtriage, wait_ready
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

TOKEN = "fhir-search-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DICOM = "urn:dicom:uid"
HL7_MRN_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
# Offline HAPI cannot check LOINC/SNOMED codes, and R4 has no Device performer (as in
# tests/integration/test_fhir_report_validation.py): warnings, never errors.
TIMEOUT = (5, 30)


def _studies() -> list[Finding]:
    """Every report shape, each on a study of its own (the gallery's share one study)."""
    out = []
    for n, f in enumerate(gallery().values()):
        out.append(
            f.model_copy(
                update={
                    "study_uid": f"1.2.840.99.{n}",
                    "accession_number": f"ACC-{n}",
                    "patient_id": f"MRN-{n}" if f.patient_id else "",
                }
            )
        )
    return out


class Publisher:
    """Report records as the report stage writes them (the plain Bundle, metadata in headers),
    or, `legacy`, as the envelope records written before the upgrade."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topics.results_fhir
        self.producer = KafkaProducer(**kafka_python_producer_kwargs(settings.kafka))

    def publish(self, f: Finding, produced_at: datetime, *, legacy: bool = False) -> None:
        meta = ResultHeaders(
            study_uid=f.study_uid,
            accession_number=f.accession_number,
            finding=f.finding,
            request_id=f.request_id,
            produced_at=produced_at,
        )
        bundle = build_result_bundle(f)
        if legacy:
            value = FhirResult(**meta.model_dump(exclude={"schema_version", "content_type"}), bundle=bundle)
            record, headers = value.to_bytes(), []
        else:
            record, headers = result_record(bundle, meta)
        self.producer.send(self.topic, key=f.study_uid.encode(), value=record, headers=headers).get(10)

    def close(self) -> None:
        self.producer.close(10)


class Server:
    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings, self.port, self.log = settings, free_port(), tmp / "http.log"
        self.base = f"http://127.0.0.1:{self.port}"
        self.session = requests.Session()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = http_env(
            self.settings.home,
            self.settings.kafka.bootstrap_servers,
            self.port,
            RADTRIAGE_TELEMETRY__EXPORTER="none",
            RADTRIAGE_TOPICS__RESULTS_FHIR=self.settings.topics.results_fhir,
            RADTRIAGE_HTTP__AUTH__MODE="bearer",
            RADTRIAGE_HTTP__AUTH__TOKENS=f'["{TOKEN}"]',
            RADTRIAGE_FHIR_SEARCH__DEFAULT_COUNT="4",
        )
        self.proc = start_radtriage(["http"], env, self.log, new_session=False)
        wait_ready(self.proc, lambda: healthy(self.base), self.log, "radtriage http never became healthy")
        # 503 while the view loads the topic; then 200.
        wait_ready(
            self.proc,
            lambda: self.get("/fhir/DiagnosticReport", {"_count": "0"}).status_code == 200,
            self.log,
            "the results view never became ready",
        )

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0

    def get(self, path: str, params: Any = None, headers: dict[str, str] | None = None) -> requests.Response:
        return self.session.get(
            f"{self.base}{path}", params=params, headers={**AUTH, **(headers or {})}, timeout=TIMEOUT
        )

    def search(self, resource_type: str, params: Any) -> dict[str, Any]:
        r = self.get(f"/fhir/{resource_type}", params)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("application/fhir+json")
        body: dict[str, Any] = r.json()
        assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
        return body


@pytest.fixture
def server(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Server]:
    settings = http_settings(tmp_path / "home", kafka_bootstrap, ("results_fhir",))
    ensure_topics(kafka_bootstrap, {settings.topics.results_fhir: PARTITIONS})
    s = Server(settings, tmp_path)
    try:
        yield s
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _all_pages(server: Server, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every match, following the next links."""
    bundle = server.search(resource_type, params)
    resources = [e["resource"] for e in bundle.get("entry", [])]
    while (
        nxt := next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    ) is not None:
        r = server.session.get(nxt, headers=AUTH, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        bundle = r.json()
        resources += [e["resource"] for e in bundle.get("entry", [])]
    return resources


def test_reports_are_read_and_searched_and_found_again_after_a_restart(server: Server) -> None:
    studies = _studies()
    publisher = Publisher(server.settings)
    try:
        for n, f in enumerate(studies):
            # The last few as a topic written before the upgrade holds them: both are read.
            publisher.publish(f, T0 + timedelta(minutes=n), legacy=n >= len(studies) - 3)
        server.start()

        # Authorization as for the rest of /fhir.
        r = server.session.get(f"{server.base}/fhir/DiagnosticReport", timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"

        # Every report, paged 4 at a time (the server's default _count here).
        first = server.search("DiagnosticReport", {})
        assert first["total"] == len(studies)
        assert len(_ids(first)) == 4
        reports = _all_pages(server, "DiagnosticReport", {})
        assert len({r["id"] for r in reports}) == len(studies)
        by_acc = {next(i["value"] for i in r["identifier"] if i.get("type")): r for r in reports}

        # identifier: the study (with its system), the accession number (none).
        uid = server.search("DiagnosticReport", {"identifier": f"{DICOM}|urn:oid:1.2.840.99.3"})
        assert _ids(uid) == [by_acc["ACC-3"]["id"]]
        assert _ids(server.search("DiagnosticReport", {"identifier": "ACC-3"})) == [by_acc["ACC-3"]["id"]]
        # subject:identifier with the assigning authority; based-on:identifier (placer order number).
        subject = server.search("DiagnosticReport", {"subject:identifier": f"{HL7_MRN_SYSTEM}|MRN-0"})
        assert _ids(subject) == [by_acc["ACC-0"]["id"]]
        placed = [f for f in studies if f.order is not None and f.order.placer_order_number == "PL-1001"]
        based = server.search("DiagnosticReport", {"based-on:identifier": "PL-1001", "_count": "100"})
        assert based["total"] == len(placed)
        # status: the gallery has one amended report.
        amended = server.search("DiagnosticReport", {"status": "amended"})
        assert amended["total"] == sum(1 for f in studies if f.amends_request_id)
        # _lastUpdated with prefixes, ANDed.
        window = server.search(
            "DiagnosticReport",
            [("_lastUpdated", "ge2026-11-24T12:02:00Z"), ("_lastUpdated", "lt2026-11-24T12:04:00Z")],
        )
        assert _ids(window) == [by_acc["ACC-2"]["id"], by_acc["ACC-3"]["id"]]

        # Read: the resource with its version, references relative to this server.
        read = server.get(f"/fhir/DiagnosticReport/{by_acc['ACC-0']['id']}")
        assert read.status_code == 200 and read.headers["ETag"] == 'W/"1"'
        report = read.json()
        observation_ref = report["result"][0]["reference"]
        assert observation_ref.startswith("Observation/")
        observation = server.get(f"/fhir/{observation_ref}")
        assert observation.status_code == 200 and observation.json()["resourceType"] == "Observation"
        derived = server.search("Observation", {"derived-from:identifier": f"{DICOM}|urn:oid:1.2.840.99.0"})
        assert observation.json()["id"] in _ids(derived)
        # An Observation by its own identifier (urn:ietf:rfc:3986|urn:uuid:<id>).
        (own,) = observation.json()["identifier"]
        by_own = server.search("Observation", {"identifier": f"{own['system']}|{own['value']}"})
        assert _ids(by_own) == [observation.json()["id"]]

        # Refusals: unknown resource id, strict handling of an unknown parameter, a bad date.
        missing = server.get("/fhir/DiagnosticReport/no-such-report")
        assert missing.status_code == 404 and missing.json()["issue"][0]["code"] == "not-found"
        lenient = server.search("DiagnosticReport", {"patient": "x", "status": "preliminary"})
        assert (
            "patient" not in lenient["link"][0]["url"] and "status=preliminary" in lenient["link"][0]["url"]
        )
        strict = server.get("/fhir/DiagnosticReport", {"patient": "x"}, {"Prefer": "handling=strict"})
        assert strict.status_code == 400 and strict.json()["resourceType"] == "OperationOutcome"
        bad_date = server.get("/fhir/Observation", {"_lastUpdated": "yesterday"})
        assert bad_date.status_code == 400 and bad_date.json()["issue"][0]["code"] == "invalid"
        assert (
            server.session.post(
                f"{server.base}/fhir/DiagnosticReport", headers=AUTH, timeout=TIMEOUT
            ).status_code
            == 405
        )
        metrics_text = server.get("/metrics").text
        refusals = "radtriage_fhir_read_refusals_total"
        for line in (
            f'{refusals}{{reason="not_found",resource_type="DiagnosticReport"}} 1.0',
            f'{refusals}{{reason="unknown_parameter",resource_type="DiagnosticReport"}} 1.0',
            f'{refusals}{{reason="invalid_value",resource_type="Observation"}} 1.0',
            f'radtriage_fhir_view_resources{{resource_type="DiagnosticReport"}} {float(len(studies))}',
            "radtriage_fhir_view_ready 1.0",
        ):
            assert line in metrics_text, line

        # A report amended while the server runs replaces the one it holds (eventually).
        first_read = studies[0]
        again = first_read.model_copy(
            update={"amends_request_id": first_read.request_id, "probability": 0.99}
        )
        publisher.publish(again, T0 + timedelta(hours=1))
        wait_until(
            lambda: (
                server.get(f"/fhir/DiagnosticReport/{by_acc['ACC-0']['id']}").json()["status"] == "amended"
            ),
            "the amended report served",
            30,
        )
        now = server.get(f"/fhir/DiagnosticReport/{by_acc['ACC-0']['id']}")
        assert now.headers["ETag"] == 'W/"2"' and now.json()["meta"]["lastUpdated"] == "2026-11-24T13:00:00Z"
        assert server.search("DiagnosticReport", {"identifier": "ACC-0"})["total"] == 1

        # The searchset as an EHR's FHIR stack sees it: zero errors.
        bundle = server.search("DiagnosticReport", {"_count": "100"})
        observations = server.search("Observation", {"_count": "100"})
        messages = validate([bundle, observations])
        errors = [m for m in messages if m.severity in ("error", "fatal")]
        assert errors == [], "\n".join(f"{m.file} {m.location}: {m.message}" for m in errors)
        assert {m.file for m in messages} == {"000", "001"}  # it did look at both
        print("HAPI FHIR searchset", Counter(m.severity for m in messages))
        for m in sorted({(m.severity, m.message[:140]) for m in messages if m.severity == "warning"}):
            print("  ", *m)

        # Restarted: the view is rebuilt from the topic, the same answers (the amendment kept).
        server.stop()
        server.start()
        after = _all_pages(server, "DiagnosticReport", {})
        assert sorted(r["id"] for r in after) == sorted(r["id"] for r in reports)
        restarted = server.get(f"/fhir/DiagnosticReport/{by_acc['ACC-0']['id']}")
        assert restarted.json()["status"] == "amended" and restarted.headers["ETag"] == 'W/"2"'
        assert _ids(server.search("DiagnosticReport", {"identifier": "ACC-3"})) == [by_acc["ACC-3"]["id"]]
        server.stop()
    finally:
        publisher.close()


def test_a_finding_is_readable_soon_after_it_is_reported(server: Server) -> None:
    """Eventually consistent: a record published after the server started is found."""
    server.start()
    assert server.search("DiagnosticReport", {})["total"] == 0  # an empty topic: ready, nothing found
    f = finding(study_uid="1.2.840.99.77", accession_number="ACC-77")
    publisher = Publisher(server.settings)
    try:
        publisher.publish(f, T0)
    finally:
        publisher.close()
    wait_until(
        lambda: server.search("DiagnosticReport", {"identifier": "ACC-77"})["total"] == 1, "the report", 30
    )
    server.stop()
