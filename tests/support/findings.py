"""Findings of every shape a report is built from (each model, positive and negative,
with and without its order, amended), for the tests that check what leaves radtriage:
the FHIR reports against the HAPI validator, the HL7 ORU against hl7apy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.alerts import Alert, alert_id
from schemas.findings import BiradsAssessment, Finding, LungNodule, SliceRange
from schemas.requests import OrderRef

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

# An order from HL7 (PID-3 with its assigning authority's OID) and one from FHIR.
HL7_ORDER = OrderRef(
    placer_order_number="PL-1001",
    filler_order_number="FL-2002",
    patient_id_system="urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
    patient_id_authority="HOSP",
)
FHIR_ORDER = OrderRef(filler_order_number="FL-77", patient_id_system="https://hospital.example/mrn")
MODELS = {
    "ICH": "ich_classifier",
    "LVO": "lvo_detector",
    "BIRADS": "mammo_birads",
    "NODULE": "nodule_detector",
    "CXR_CRITICAL": "cxr_triage",
}


def finding(code: str = "ICH", p: float = 0.93, **update: Any) -> Finding:
    base = Finding(
        study_uid="1.2.840.99.1",
        accession_number="ACC42",
        patient_id="MRN42",
        series_uid="1.2.840.99.1.1",
        series_number=3,
        series_description="Head 5mm",
        finding=code,
        probability=p,
        threshold=0.5,
        positive=p >= 0.5,
        model_name=MODELS[code],
        model_version="1",
        lane="stat",
        rule_id="r",
        received_at=NOW,
        ready_at=NOW,
        inferred_at=NOW,
        inference_ms=12.0,
        request_id="1.2.840.99.1/r/20261124T120000.000000Z",
        order=HL7_ORDER,
    )
    return Finding.model_validate(base.model_dump() | update)


def plain_finding(code: str, p: float, threshold: float = 0.5, **update: Any) -> Finding:
    """A finding without an order, the series' number and description or a request id
    (the optional fields all absent), positive when `p` reaches `threshold`."""
    return finding(
        code,
        p,
        threshold=threshold,
        positive=p >= threshold,
        order=None,
        series_number=None,
        series_description="",
        request_id="",
        **update,
    )


ICH_RULE = "ct-head-noncontrast-ich"


def ich_result(study_uid: str, series_uid: str, at: datetime | None = None, **fields: Any) -> Finding:
    """A positive ICH finding on a series of the caller's own study (one it wrote, whose
    SR, key image and KOS are built from that series' headers), read at `at` (default:
    now); `fields` replace any of its values."""
    now = at or datetime.now(UTC)
    base: dict[str, Any] = {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "finding": "ICH",
        "probability": 0.9,
        "threshold": 0.5,
        "positive": True,
        "model_name": "ich_classifier",
        "model_version": "1",
        "lane": "stat",
        "rule_id": ICH_RULE,
        "received_at": now,
        "ready_at": now,
        "inferred_at": now,
        "inference_ms": 1.0,
        "request_id": f"{study_uid}/{ICH_RULE}",
    }
    return Finding(**(base | fields))


# What an alert repeats of its finding, as escalate copies it (streams/stages/escalate.py,
# alert_of): every Alert field the Finding has, by name.
_ALERT_FROM_FINDING = (Alert.model_fields.keys() & Finding.model_fields.keys()) - {"schema_version"}


def ich_alert(study_uid: str, at: datetime | None = None, **fields: Any) -> Alert:
    """The alert escalate raises on `ich_result(study_uid, <study_uid>.1, at)`: the same
    read, keyed by (study, ICH); `fields` replace any of its values (`alerted_at` is now
    unless given)."""
    read = ich_result(study_uid, f"{study_uid}.1", at)
    repeated = {name: getattr(read, name) for name in _ALERT_FROM_FINDING}
    return Alert(**(repeated | {"alert_id": alert_id(study_uid, "ICH")} | fields))


def gallery() -> dict[str, Finding]:
    """One finding per shape of report, by name."""
    nodules = (
        LungNodule(centre_lps_mm=(-62.5, 10.0, -20.25), diameter_mm=14.2, probability=0.93, lung="right"),
        LungNodule(centre_lps_mm=(71.0, -5.5, 30.0), diameter_mm=7.4, probability=0.41, lung="left"),
    )
    slices = SliceRange(
        first_instance_number=14,
        last_instance_number=19,
        first_position_mm=-30.0,
        last_position_mm=-5.0,
        slices=6,
    )
    return {
        "ich-positive-hl7-order": finding("ICH", 0.93, slice_range=slices.model_dump()),
        "ich-negative-no-order": finding("ICH", 0.04, order=None),
        "ich-no-patient-id": finding("ICH", 0.7, patient_id="", order=None, accession_number=""),
        "ich-amended": finding("ICH", 0.81, amends_request_id="1.2.840.99.1/r/20261124T115500.000000Z"),
        "lvo-left-fhir-order": finding(
            "LVO", 0.88, laterality="left", laterality_probability=0.9, order=FHIR_ORDER
        ),
        "birads-4": finding(
            "BIRADS",
            0.7,
            birads=BiradsAssessment(
                category=4,
                probability=0.6,
                side="left",
                left_category=4,
                right_category=1,
                views=("LCC", "LMLO"),
            ).model_dump(),
        ),
        "nodules": finding("NODULE", 0.93, nodules=[n.model_dump() for n in nodules]),
        "nodule-negative": finding("NODULE", 0.02, nodules=[]),
        "cxr-positive": finding("CXR_CRITICAL", 0.66, order=OrderRef(placer_order_number="PL-9")),
    }
