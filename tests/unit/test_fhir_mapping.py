"""FHIR parsing, resource → OrderEvent mapping and Bundle planning (pure functions)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from connectors.fhir.bundle import Accepted, plan_bundle, response_bundle
from connectors.fhir.mapping import V2_0203, accept
from connectors.fhir.outcome import FhirError
from connectors.fhir.parsing import MAX_DEPTH, json_depth_exceeds, parse_json, validate_resource

NAME = "Secret^Patient"


def acsn(value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": value}


def sr(**overrides: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": "stat",
        "identifier": [
            acsn("ACC-1"),
            {"type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}, "value": "P-9"},
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "30799-1", "display": "CT head"}]},
        "reasonCode": [
            {"text": "code stroke", "coding": [{"system": "http://snomed.info/sct", "code": "230690007"}]},
            {"coding": [{"code": "R29.818", "display": "facial droop"}]},
        ],
        "subject": {"reference": "Patient/p-1", "display": NAME},
        "note": [{"text": NAME}],
    }
    resource.update(overrides)
    return resource


def refused(fn: Any, *args: Any, **kwargs: Any) -> FhirError:
    with pytest.raises(FhirError) as info:
        fn(*args, **kwargs)
    return info.value


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "empty"),
        (b"\xff\xfe{", "not UTF-8"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": 1', "invalid JSON"),
        (b"[" * 100_000, "nested deeper"),
        (b"1" * 5000, "invalid JSON"),  # beyond Python's int-string limit
    ],
)
def test_unparsable_bodies_are_400_structure(body: bytes, says: str) -> None:
    err = refused(parse_json, body)
    assert err.status == 400 and err.issues[0].code == "structure" and says in err.issues[0].diagnostics


def test_depth_check_is_iterative_and_exact() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH):
        value = [value]
    assert not json_depth_exceeds(value)
    assert json_depth_exceeds([value])
    deep: Any = 1
    for _ in range(100_000):
        deep = {"a": deep}
    assert json_depth_exceeds(deep)  # no RecursionError


def test_validation_names_each_invalid_element() -> None:
    err = refused(validate_resource, sr(status=5, identifier={"value": "x"}), "ServiceRequest")
    assert err.status == 400
    expressions = {e for issue in err.issues for e in issue.expression}
    assert {"ServiceRequest.status", "ServiceRequest.identifier"} <= expressions
    err = refused(validate_resource, sr(resourceType="Patient"), "ServiceRequest")
    assert err.issues[0].expression == ("ServiceRequest.resourceType",)
    err = refused(validate_resource, sr(priority="soon"), "ServiceRequest")
    assert err.issues[0].code == "code-invalid" and "asap, routine, stat, urgent" in err.issues[0].diagnostics
    missing = sr()
    del missing["intent"]
    err = refused(validate_resource, missing, "ServiceRequest")
    assert err.issues[0].code == "required" and err.issues[0].expression == ("ServiceRequest.intent",)
    err = refused(validate_resource, [1, 2], "ServiceRequest", prefix="Bundle.entry[3].resource")
    assert "Bundle.entry[3].resource" in err.issues[0].diagnostics


# -- mapping --------------------------------------------------------------------------------


def test_service_request_maps_ids_codes_priority_and_indication_only() -> None:
    event = accept(sr(), "ServiceRequest", resource_id="r-1")
    assert (event.accession_number, event.placer_order_number, event.patient_id) == ("ACC-1", "P-9", "p-1")
    assert (event.priority, event.priority_raw, event.priority_field) == (
        "stat",
        "stat",
        "ServiceRequest.priority",
    )
    assert (event.procedure_code, event.procedure_coding_system, event.procedure_text) == (
        "30799-1",
        "http://loinc.org",
        "CT head",
    )
    assert event.indication == "code stroke; facial droop"
    assert event.indication_codes == ("http://snomed.info/sct|230690007", "R29.818")
    assert (event.source, event.message_type, event.source_message_id) == ("fhir", "ServiceRequest", "r-1")
    assert "Secret" not in event.model_dump_json()


@pytest.mark.parametrize(
    ("status", "mapped"),
    [
        ("active", "active"),
        ("draft", "active"),
        ("revoked", "cancelled"),
        ("entered-in-error", "cancelled"),
        ("completed", "completed"),
    ],
)
def test_service_request_status(status: str, mapped: str) -> None:
    assert accept(sr(status=status), "ServiceRequest", resource_id="r").status == mapped


def test_absent_priority_is_unstated_not_routine() -> None:
    resource = sr()
    del resource["priority"]
    event = accept(resource, "ServiceRequest", resource_id="r")
    assert event.priority is None and event.priority_field == ""


def test_subject_identifier_wins_over_reference_and_display_is_never_used() -> None:
    subject = {
        "reference": "https://ehr/fhir/Patient/ref-id/_history/3",
        "identifier": {"value": "MRN-5"},
        "display": NAME,
    }
    assert accept(sr(subject=subject), "ServiceRequest", resource_id="r").patient_id == "MRN-5"
    del subject["identifier"]
    assert accept(sr(subject=subject), "ServiceRequest", resource_id="r").patient_id == "ref-id"
    assert accept(sr(subject={"display": NAME}), "ServiceRequest", resource_id="r").patient_id == ""


def test_accession_rules_are_422() -> None:
    for identifiers in (
        [],
        [{"value": "untyped"}],
        [{"type": {"coding": [{"system": "http://other", "code": "ACSN"}]}, "value": "x"}],
        [{"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}}],
        [acsn("A"), acsn("B")],
        [acsn("A" * 65)],
    ):
        err = refused(accept, sr(identifier=identifiers), "ServiceRequest", resource_id="r")
        assert err.status == 422 and err.issues[0].expression == ("ServiceRequest.identifier",), identifiers
    # An empty value is not even valid FHIR: 400.
    assert refused(accept, sr(identifier=[acsn("")]), "ServiceRequest", resource_id="r").status == 400


def test_huge_free_text_is_cut_and_huge_codes_refused() -> None:
    event = accept(sr(reasonCode=[{"text": "x" * 100_000}]), "ServiceRequest", resource_id="r")
    assert len(event.indication) == 256
    err = refused(accept, sr(code={"coding": [{"code": "c" * 300}]}), "ServiceRequest", resource_id="r")
    assert err.status == 422 and err.issues[0].code == "too-long"


def study(**overrides: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.1"}],
        "basedOn": [{"identifier": acsn("ACC-7")}],
        "subject": {"reference": "Patient/p-7", "display": NAME},
        "procedureCode": [{"coding": [{"system": "http://loinc.org", "code": "30799-1"}]}],
        "reasonCode": [{"text": "trauma activation"}],
    }
    resource.update(overrides)
    return resource


def test_imaging_study_links_study_uid_to_accession_without_priority() -> None:
    event = accept(study(), "ImagingStudy", resource_id="s-1")
    assert (event.accession_number, event.study_uid, event.patient_id) == ("ACC-7", "1.2.840.1", "p-7")
    assert event.priority is None and event.message_type == "ImagingStudy"
    assert event.indication == "trauma activation" and event.procedure_code == "30799-1"
    # The accession may also be an identifier of the study itself.
    direct = study(identifier=[*study()["identifier"], acsn("ACC-8")], basedOn=[])
    assert accept(direct, "ImagingStudy", resource_id="s").accession_number == "ACC-8"


def test_imaging_study_needs_a_valid_study_uid() -> None:
    err = refused(accept, study(identifier=[]), "ImagingStudy", resource_id="s")
    assert err.status == 422 and "urn:dicom:uid" in err.issues[0].diagnostics
    bad = study(identifier=[{"system": "urn:dicom:uid", "value": "urn:oid:1.02.x"}])
    assert refused(accept, bad, "ImagingStudy", resource_id="s").status == 422


# -- bundles --------------------------------------------------------------------------------


def entry(resource: Any, url: str = "ServiceRequest", method: str = "POST") -> dict[str, Any]:
    return {"resource": resource, "request": {"method": method, "url": url}}


def ids() -> Any:
    counter = iter(range(1000))
    return lambda: f"id-{next(counter)}"


def test_transaction_plan_refuses_whole_bundle_naming_entries() -> None:
    bad = sr()
    del bad["identifier"]
    plan = plan_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [entry(sr()), entry(bad), entry(study(), "ImagingStudy")],
        },
        ids(),
    )
    refusal = plan.refusal()
    assert refusal is not None and refusal.status == 422
    assert [i.expression for i in refusal.issues] == [("Bundle.entry[1].resource.identifier",)]
    # Mixed statuses: 400 for the Bundle.
    plan = plan_bundle(
        {"resourceType": "Bundle", "type": "transaction", "entry": [entry(bad), entry({}, "Patient")]}, ids()
    )
    refusal = plan.refusal()
    assert refusal is not None and refusal.status == 400 and len(refusal.issues) == 2


def test_batch_plan_answers_each_entry() -> None:
    plan = plan_bundle(
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                entry(sr()),
                entry(sr(), method="PUT"),
                entry({"resourceType": "Patient"}, "Patient"),
                entry(sr(), "Service Request"),
                {"resource": sr()},
                entry(study(), "ServiceRequest"),
            ],
        },
        ids(),
    )
    results = plan.entries
    assert isinstance(results[0], Accepted) and results[0].resource_id == "id-0"
    assert [r.status for r in results[1:] if isinstance(r, FhirError)] == [405, 404, 400, 400, 400]
    response = response_bundle("batch", results, base_url="http://h", now=datetime(2025, 1, 1, tzinfo=UTC))
    bundle = Bundle.model_validate(response)
    assert bundle.type == "batch-response"
    assert bundle.entry[0].response.location == "http://h/fhir/ServiceRequest/id-0/_history/1"  # type: ignore[index,union-attr]
    assert [e.response.status[:3] for e in bundle.entry] == ["201", "405", "404", "400", "400", "400"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "data",
    [
        sr(),
        {"resourceType": "Bundle", "type": "collection"},
        {"resourceType": "Bundle", "type": "batch", "entry": {"a": 1}},
        {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": 5, "url": "x"}}]},
        {"resourceType": "Bundle", "type": "batch", "entry": [], "timestamp": "yesterday"},
    ],
)
def test_broken_envelopes_are_400(data: Any) -> None:
    err = refused(plan_bundle, data, ids())
    assert err.status == 400
    json.dumps([i.to_json() for i in err.issues])  # serialisable


def test_the_subject_identifiers_system_is_kept_as_the_assigning_authority() -> None:
    subject = {"identifier": {"system": "https://h.example/mrn", "value": "MRN-5"}}
    event = accept(sr(subject=subject), "ServiceRequest", resource_id="r")
    assert (event.patient_id, event.patient_id_system) == ("MRN-5", "https://h.example/mrn")
    by_reference = accept(sr(subject={"reference": "Patient/p-1"}), "ServiceRequest", resource_id="r")
    assert by_reference.patient_id_system == ""
