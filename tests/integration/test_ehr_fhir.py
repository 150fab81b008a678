"""Results into the EHR over FHIR (issue 20), against a REAL FHIR server: the HAPI FHIR JPA
server (8.8.0, from Maven Central, tests/support/fhir_server.py), through a real worker and
Kafka. A bleed finding with its HL7 order becomes a report (the report stage) that the
`ehr-fhir` stage stores on the server as a transaction; it is read back by its identifier
and by accession and checked; sent again (a replay) it is still one report; amended, the
server's report is updated; a report the server refuses (4xx) is dead-lettered with the
OperationOutcome's text; with the server down, a report is retried and stored once when
it is back within the deadline, and one past the deadline is dead-lettered and stored by
`radtriage replay --stage ehr-fhir`.

One server per module (it takes ~20-60 s to start): the tests tell their reports apart by
study UID."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaProducer

from processors.fhir_report import URI_SYSTEM, build_result_bundle, resource_ids
from radtriage.settings import Settings
from schemas.findings import Finding
from schemas.requests import OrderRef
from schemas.results import FhirResult, ResultHeaders, result_record
from tests.integration.harness import Worker
from tests.support.fhir_server import HapiFhirServer
from tests.support.findings import ich_result
from tests.support.kafka import Tail
from tests.support.process import run_replay

pytestmark = pytest.mark.integration

AUTHORITY = "urn:oid:1.2.840.114350.1.13.99"


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HapiFhirServer]:
    with HapiFhirServer(tmp_path_factory.mktemp("hapi-fhir")) as server:
        yield server


def _env(env: dict[str, str], server: HapiFhirServer, deadline_s: float) -> dict[str, str]:
    fhir = {
        "base_url": server.base_url,
        "timeout_s": 20,
        "retry_deadline_s": deadline_s,
        "retry_initial_s": 0.5,
        "retry_max_s": 3,
    }
    return {**env, "RADTRIAGE_EHR__FHIR": json.dumps(fhir)}


def _bleed(stamp: int, suffix: str, **fields: Any) -> Finding:
    """A positive ICH finding with its HL7 order (placer, filler, PID-3 with its authority)."""
    study = f"1.2.826.0.40.{stamp}.{suffix}"
    base: dict[str, Any] = {
        "accession_number": f"ACC{stamp}{suffix}",
        "patient_id": f"MRN{stamp}{suffix}",
        "order": OrderRef(
            placer_order_number=f"PL{stamp}{suffix}",
            filler_order_number=f"FL{stamp}{suffix}",
            patient_id_system=AUTHORITY,
            patient_id_authority="GENHOSP",
        ),
    }
    return ich_result(study, study + ".2", **(base | fields))


def _key(finding: Finding) -> str:
    report_id, _ = resource_ids(finding)
    return f"{URI_SYSTEM}|urn:uuid:{report_id}"


def _reports_of(server: HapiFhirServer, study: str) -> list[dict[str, Any]]:
    return server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{study}")


def _decisions(tail: Tail, settings: Settings, study: str) -> list[str]:
    return [a["decision"] for a in tail.of(settings.topics.audit, study_uid=study) if a["stage"] == "ehr"]


Headers = list[tuple[str, bytes]]


def _send(
    producer: KafkaProducer, topic: str, key: str, value: bytes, headers: Headers | None = None
) -> None:
    producer.send(topic, key=key.encode(), value=value, headers=headers or []).get(10)


def test_a_bleed_report_is_stored_once_updated_when_amended_and_a_refusal_is_dead_lettered(
    worker_env: tuple[dict[str, str], Settings], ehr: HapiFhirServer
) -> None:
    env, settings = worker_env
    t = settings.topics
    stamp = time.time_ns()
    bleed = _bleed(stamp, "1")
    study = bleed.study_uid
    worker = Worker(_env(env, ehr, deadline_s=60), settings.home)
    worker.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.results_fhir, t.audit, t.deadletter])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    # 1. The finding -> the report stage -> the ehr-fhir stage -> the server.
    _send(producer, t.findings, study, bleed.to_bytes())
    tail.until(lambda: _decisions(tail, settings, study), timeout=120)
    assert _decisions(tail, settings, study) == ["fhir_stored"]
    (stored,) = [a for a in tail.of(t.audit, study_uid=study) if a["stage"] == "ehr"]
    assert stored["detail"]["report_identifier"] == _key(bleed)
    assert stored["detail"]["report_location"].startswith("DiagnosticReport/")

    (report,) = ehr.search("DiagnosticReport", identifier=_key(bleed))
    (by_accession,) = ehr.search("DiagnosticReport", identifier=bleed.accession_number)
    assert by_accession["id"] == report["id"] == stored["detail"]["report_location"].split("/")[1]
    (result,) = tail.of(t.results_fhir, study_uid=study)
    (record,) = [r for r in tail.records if r.topic == t.results_fhir and r.value["study_uid"] == study]
    # On the topic: the plain Bundle, radtriage's metadata in headers.
    assert json.loads(record.raw) == result["bundle"] and result["bundle"]["resourceType"] == "Bundle"
    assert record.headers["content-type"] == b"application/fhir+json; fhirVersion=4.0"
    assert record.headers["radtriage-request-id"] == bleed.request_id.encode()
    ours = result["bundle"]["entry"][0]["resource"]
    assert report["status"] == "preliminary"
    assert report["conclusion"] == ours["conclusion"] and "haemorrhage" in report["conclusion"]
    assert report["basedOn"][0]["identifier"]["value"] == f"PL{stamp}1"
    assert report["subject"]["identifier"]["system"] == AUTHORITY
    assert report["subject"]["identifier"]["value"] == bleed.patient_id
    # Its Observation came with it, the reference resolved to the server's own id.
    (reference,) = report["result"]
    observation = ehr.read(reference["reference"])
    assert observation["resourceType"] == "Observation" and observation["status"] == "preliminary"

    # The Observation carries radtriage's identifier on the topic already: the one the
    # server's conditional update found it by.
    ours_observation = result["bundle"]["entry"][1]["resource"]
    our_id = {"system": URI_SYSTEM, "value": f"urn:uuid:{ours_observation['id']}"}
    assert ours_observation["identifier"] == [our_id] and our_id in observation["identifier"]

    # 2. The same report again (as a replay or a worker killed before its commit sends it),
    # then as a record of the old envelope (written before the upgrade): still one report,
    # one Observation.
    _send(producer, t.results_fhir, study, record.raw, list(record.headers.items()))
    old = FhirResult.model_validate({k: v for k, v in result.items() if k != "schema_version"})
    _send(producer, t.results_fhir, study, old.to_bytes())
    tail.until(lambda: len(_decisions(tail, settings, study)) == 3, timeout=60)
    assert _decisions(tail, settings, study) == ["fhir_stored"] * 3
    assert [r["id"] for r in _reports_of(ehr, study)] == [report["id"]]
    assert len(ehr.search("Observation", identifier=observation["identifier"][0]["value"])) == 1
    assert len(ehr.search("Observation", identifier=f"{URI_SYSTEM}|urn:uuid:{ours_observation['id']}")) == 1

    # 3. Amended (a better series read of the same study and model): the server's report
    # is updated, not doubled.
    amended = bleed.model_copy(
        update={"request_id": bleed.request_id + "/amended", "amends_request_id": bleed.request_id}
    )
    _send(producer, t.findings, study, amended.to_bytes())
    tail.until(lambda: len(_decisions(tail, settings, study)) == 4, timeout=60)
    assert _decisions(tail, settings, study)[-1] == "fhir_stored"
    (updated,) = _reports_of(ehr, study)
    assert updated["id"] == report["id"] and updated["status"] == "amended"
    assert int(updated["meta"]["versionId"]) > int(report["meta"]["versionId"])

    # 4. A report the server refuses (an invalid status): dead-lettered with its
    # OperationOutcome, nothing stored.
    bad = _bleed(stamp, "2")
    broken = build_result_bundle(bad)
    broken["entry"][0]["resource"]["status"] = "bogus"
    refused, headers = result_record(broken, ResultHeaders(study_uid=bad.study_uid, finding="ICH"))
    _send(producer, t.results_fhir, bad.study_uid, refused, headers)
    tail.until(lambda: _decisions(tail, settings, bad.study_uid), timeout=60)
    assert _decisions(tail, settings, bad.study_uid) == ["fhir_refused"]
    (letter,) = tail.of(t.deadletter, study_uid=bad.study_uid)
    assert letter["stage"] == "ehr-fhir" and letter["source_topic"] == t.results_fhir
    assert "HTTP 400" in letter["error"] and "Unknown DiagnosticReportStatus code 'bogus'" in letter["error"]
    assert _reports_of(ehr, bad.study_uid) == []
    worker.kill(signal.SIGTERM)


def test_with_the_server_down_a_report_waits_for_it_and_one_past_the_deadline_is_replayed(
    worker_env: tuple[dict[str, str], Settings], ehr: HapiFhirServer
) -> None:
    env, settings = worker_env
    t = settings.topics
    stamp = time.time_ns()
    late, waiting = _bleed(stamp, "1"), _bleed(stamp, "2")
    env = _env(env, ehr, deadline_s=60)
    worker = Worker(env, settings.home)
    worker.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.audit, t.deadletter])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    ehr.stop()
    try:
        # Down past the deadline: undelivered, dead-lettered.
        _send(producer, t.findings, late.study_uid, late.to_bytes())
        tail.until(lambda: _decisions(tail, settings, late.study_uid), timeout=120)
        assert _decisions(tail, settings, late.study_uid) == ["fhir_undelivered"]
        (letter,) = tail.of(t.deadletter, study_uid=late.study_uid)
        assert letter["stage"] == "ehr-fhir" and "cannot reach" in letter["error"]
        # The record's metadata is in its headers: the letter keeps them for the replay.
        assert letter["headers"]["radtriage-study-uid"] == late.study_uid
        # Down, then back within the deadline: retried until stored.
        _send(producer, t.findings, waiting.study_uid, waiting.to_bytes())
        # Not a timing assertion: room for a few refused attempts before the server is back
        # (`attempts > 1` below checks they happened).
        time.sleep(5)
    finally:
        ehr.start()
    tail.until(lambda: _decisions(tail, settings, waiting.study_uid), timeout=120)
    assert _decisions(tail, settings, waiting.study_uid) == ["fhir_stored"]
    (stored,) = [a for a in tail.of(t.audit, study_uid=waiting.study_uid) if a["stage"] == "ehr"]
    assert stored["detail"]["attempts"] > 1
    assert len(_reports_of(ehr, waiting.study_uid)) == 1

    # The dead-lettered one, replayed by the operator: stored once.
    assert _reports_of(ehr, late.study_uid) == []
    replay = run_replay(env, "--stage", "ehr-fhir")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    tail.until(lambda: len(_decisions(tail, settings, late.study_uid)) == 2, timeout=60)
    assert _decisions(tail, settings, late.study_uid) == ["fhir_undelivered", "fhir_stored"]
    (report,) = _reports_of(ehr, late.study_uid)
    assert report["identifier"][0]["value"] == _key(late).split("|", 1)[1]
    worker.kill(signal.SIGTERM)
