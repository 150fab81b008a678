from __future__ import annotations

import base64
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from processors.fhir_report import build_result_bundle, resource_ids
from schemas.findings import Finding, LungNodule
from tests.support.findings import HL7_ORDER, plain_finding
from tests.support.findings import finding as shaped


def finding(p: float, threshold: float = 0.5, **kw: str) -> Finding:
    return plain_finding(
        "ICH",
        p,
        threshold,
        accession_number=kw.get("accession", "ACC42"),
        patient_id=kw.get("patient_id", "MRN42"),
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


# --- the ICH slice range ---------------------------------------------------------------------


def ranged(p: float, first: int | None = 14, last: int | None = 19) -> Finding:
    from schemas.findings import SliceRange

    r = SliceRange(
        first_instance_number=first,
        last_instance_number=last,
        first_position_mm=-12.5,
        last_position_mm=12.5,
        slices=6,
    )
    return finding(p).model_copy(update={"slice_range": r})


def _components(obs: Observation) -> dict[str, Any]:
    return {str(c.code.coding[0].code): c for c in obs.component or [] if c.code.coding}


def _conclusion(report: DiagnosticReport) -> str:
    assert report.conclusion is not None
    return str(report.conclusion)


def test_a_positive_finding_states_its_slice_range_in_the_observation_and_conclusion() -> None:
    from processors.fhir_report import LOCALISATION_SYSTEM

    report, obs = parse(build_result_bundle(ranged(0.93)))
    comps = _components(obs)
    numbers, position = comps["slice-range-instance-number"], comps["slice-range-position"]
    assert numbers.code.coding[0].system == LOCALISATION_SYSTEM
    assert (float(numbers.valueRange.low.value), float(numbers.valueRange.high.value)) == (14, 19)
    assert float(position.valueRange.low.value) == -12.5 and float(position.valueRange.high.value) == 12.5
    assert (
        position.valueRange.low.code == "mm" and position.valueRange.low.system == "http://unitsofmeasure.org"
    )
    assert "images 14 to 19" in _conclusion(report) and "z -12.5 to 12.5 mm" in _conclusion(report)
    assert obs.note and "images 14 to 19" in str(obs.note[0].text)
    # The other components are still there.
    texts = [c.code.text for c in obs.component or []]
    assert "Alert threshold" in texts and "DICOM Series Instance UID" in texts


def test_instance_numbers_counted_down_still_make_a_valid_range() -> None:
    report, obs = parse(build_result_bundle(ranged(0.93, first=19, last=14)))
    numbers = _components(obs)["slice-range-instance-number"]
    assert (float(numbers.valueRange.low.value), float(numbers.valueRange.high.value)) == (14, 19)
    assert "images 19 to 14" in _conclusion(report)  # first (lowest slice) to last, as numbered


def test_a_series_without_instance_numbers_gets_the_positions_only() -> None:
    report, obs = parse(build_result_bundle(ranged(0.93, first=None, last=None)))
    assert set(_components(obs)) == {"slice-range-position"}
    assert "slices at z -12.5 to 12.5 mm" in _conclusion(report)


def test_negative_findings_and_findings_without_a_range_state_none() -> None:
    for f in (ranged(0.1), finding(0.93)):
        report, obs = parse(build_result_bundle(f))
        assert not {"slice-range-instance-number", "slice-range-position"} & set(_components(obs))
        assert "images" not in _conclusion(report) and not obs.note


def nodule_finding(nodules: tuple[LungNodule, ...]) -> Finding:
    base = finding(0.9 if nodules else 0.02, threshold=0.1)
    return base.model_copy(
        update={"finding": "NODULE", "model_name": "nodule_detector", "lane": "routine", "nodules": nodules}
    )


NODULES = (
    LungNodule(centre_lps_mm=(-62.5, 10.0, -20.25), diameter_mm=14.2, probability=0.93, lung="right"),
    LungNodule(centre_lps_mm=(71.0, -5.5, 30.0), diameter_mm=7.4, probability=0.41, lung="left"),
)


def test_each_nodule_is_its_own_coded_observation_member_of_the_finding() -> None:
    bundle = build_result_bundle(nodule_finding(NODULES))
    Bundle.model_validate(bundle)
    report, obs = parse(bundle)
    # The report, its Observation, one per nodule, then the model (Device) last.
    members = [Observation.model_validate(e["resource"]) for e in bundle["entry"][2:-1]]
    assert len(members) == 2
    urls = [e["fullUrl"] for e in bundle["entry"][1:-1]]
    assert [r.reference for r in report.result] == urls
    assert [m.reference for m in obs.hasMember] == urls[1:]
    big, small = members
    assert {(c.system, c.code) for c in big.code.coding} == {
        ("http://snomed.info/sct", "786838002"),
        ("http://radlex.org", "RID50149"),
    }
    assert (float(big.valueQuantity.value), big.valueQuantity.code) == (14.2, "mm")
    assert big.bodySite.coding[0].code == "3341006" and small.bodySite.coding[0].code == "44029006"
    values = {
        c.code.text: c.valueQuantity.value if c.valueQuantity else c.valueInteger for c in big.component
    }
    assert _components(big)["81827009"].valueQuantity.unit == "mm"
    assert float(values["Diameter (sphere of the nodule's volume)"]) == 14.2
    centre = [float(v) for k, v in values.items() if k.startswith("Centre, DICOM patient")]
    assert centre == [-62.5, 10.0, -20.25]
    assert float(values["Probability of this nodule (AI triage)"]) == pytest.approx(0.93)
    assert values["Rank among the study's nodules (1: likeliest)"] == 1
    assert big.device.display == "nodule_detector version 1" and big.status == "preliminary"
    conclusion = _conclusion(report)
    assert "2 nodules: 14 mm in the right lung (probability 0.93); 7 mm in the left lung (0.41)" in conclusion
    # A retry rebuilds the same resources (ids from the study), so the EHR updates them.
    assert build_result_bundle(nodule_finding(NODULES))["entry"][2]["fullUrl"] == urls[1]


def test_a_negative_nodule_finding_has_no_members_and_a_positive_one_needs_its_nodules() -> None:
    bundle = build_result_bundle(nodule_finding(()))
    report, obs = parse(bundle)
    assert len(bundle["entry"]) == 3 and not obs.hasMember and len(report.result) == 1
    assert "No lung nodule suspected" in report.conclusion
    with pytest.raises(ValueError, match="contradict"):
        negative = {"positive": False, "probability": 0.05}
        Finding.model_validate(nodule_finding(NODULES).model_dump() | negative)
    with pytest.raises(ValueError, match="contradict"):
        Finding.model_validate(nodule_finding(()).model_dump() | {"positive": True})


# --- reports an EHR can file (issue 20) -------------------------------------------------------


def _report(f: Finding, system: str = "https://site.example/mrn") -> dict[str, Any]:
    return build_result_bundle(f, system)["entry"][0]["resource"]


def test_the_report_points_to_its_order_and_names_the_patient_with_a_system() -> None:
    report = _report(shaped())
    (ref,) = report["basedOn"]
    assert ref["type"] == "ServiceRequest"
    assert (ref["identifier"]["type"]["coding"][0]["code"], ref["identifier"]["value"]) == ("PLAC", "PL-1001")
    typed = {i["type"]["coding"][0]["code"]: i["value"] for i in report["identifier"] if "type" in i}
    assert typed == {"ACSN": "ACC42", "FILL": "FL-2002"}
    who = report["subject"]["identifier"]
    assert (who["system"], who["value"], who["assigner"]["display"]) == (
        HL7_ORDER.patient_id_system,
        "MRN42",
        "HOSP",
    )
    # No order: the accession identifies it, and the configured system names the patient.
    bare = _report(shaped(order=None))
    assert bare["basedOn"][0]["identifier"]["value"] == "ACC42"
    assert bare["subject"]["identifier"]["system"] == "https://site.example/mrn"
    assert "basedOn" not in _report(shaped(order=None, accession_number=""))


def test_the_report_is_categorised_narrated_and_presented_as_a_document() -> None:
    bundle = build_result_bundle(shaped())
    report = bundle["entry"][0]["resource"]
    codes = {(c["system"], c["code"]) for cat in report["category"] for c in cat["coding"]}
    assert codes == {
        ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD"),
        ("http://loinc.org", "LP29684-5"),
    }
    for entry in bundle["entry"]:
        div = entry["resource"]["text"]["div"]
        assert div.startswith('<div xmlns="http://www.w3.org/1999/xhtml"><p>')
    (form,) = report["presentedForm"]
    text = base64.b64decode(form["data"]).decode()
    assert form["contentType"] == "text/plain"
    assert "Placer order number: PL-1001" in text and report["conclusion"] in text
    device = bundle["entry"][-1]
    assert device["resource"]["resourceType"] == "Device"
    assert device["resource"]["deviceName"] == [{"name": "ich_classifier", "type": "model-name"}]
    assert device["resource"]["version"] == [{"value": "1"}]
    assert bundle["entry"][1]["resource"]["device"]["reference"] == device["fullUrl"]


def test_a_rerun_is_amended_and_narrative_is_escaped() -> None:
    amended = _report(shaped(amends_request_id="earlier"))
    assert amended["status"] == "amended" and "Amended" in amended["conclusion"]
    odd = build_result_bundle(shaped(series_description="<b>&"))["entry"][1]["resource"]["text"]["div"]
    assert "&lt;b&gt;&amp;" in odd and "<b>&" not in odd
