from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from processors.fhir_report import build_result_bundle, resource_ids
from schemas.findings import Finding

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def finding(p: float, threshold: float = 0.5, **kw: str) -> Finding:
    return Finding(
        study_uid="1.2.840.99.1",
        accession_number=kw.get("accession", "ACC42"),
        patient_id=kw.get("patient_id", "MRN42"),
        series_uid="1.2.840.99.1.1",
        finding="ICH",
        probability=p,
        threshold=threshold,
        positive=p >= threshold,
        model_name="ich_classifier",
        model_version="1",
        lane="stat",
        rule_id="r",
        received_at=NOW,
        ready_at=NOW,
        inferred_at=NOW,
        inference_ms=12.0,
    )


def parse(bundle: dict) -> tuple[DiagnosticReport, Observation]:
    b = Bundle.model_validate(bundle)
    assert b.type == "collection"
    report = DiagnosticReport.model_validate(bundle["entry"][0]["resource"])
    obs = Observation.model_validate(bundle["entry"][1]["resource"])
    return report, obs


def test_positive_report_is_valid_r4_and_carries_the_finding() -> None:
    bundle = build_result_bundle(finding(0.93))
    report, obs = parse(bundle)
    assert report.status == "preliminary"
    assert report.category[0].coding[0].code == "RAD"
    assert report.code.coding[0].system == "http://loinc.org"
    assert report.imagingStudy[0].identifier.value == "urn:oid:1.2.840.99.1"
    assert report.subject.identifier.value == "MRN42"
    assert report.result[0].reference == bundle["entry"][1]["fullUrl"]
    assert "Suspected intracranial haemorrhage" in report.conclusion and "0.93" in report.conclusion
    assert report.conclusionCode[0].coding[0].system == "http://snomed.info/sct"
    assert float(obs.valueQuantity.value) == pytest.approx(0.93)
    assert obs.interpretation[0].coding[0].code == "POS"
    assert "ich_classifier version 1" in obs.method.text
    assert any(i.value == "ACC42" for i in report.identifier)


def test_negative_report_says_so_without_conclusion_code() -> None:
    report, obs = parse(build_result_bundle(finding(0.04)))
    assert report.conclusion.startswith("No intracranial haemorrhage suspected")
    assert report.conclusionCode is None
    assert obs.interpretation[0].coding[0].code == "NEG"


def test_ids_are_stable_so_a_retry_updates_instead_of_duplicating() -> None:
    assert build_result_bundle(finding(0.7)) == build_result_bundle(finding(0.7))
    assert resource_ids(finding(0.7)) == resource_ids(finding(0.2))


def test_no_patient_id_means_no_subject_rather_than_an_empty_reference() -> None:
    report, obs = parse(build_result_bundle(finding(0.7, patient_id="")))
    assert report.subject is None and obs.subject is None
