"""Build the FHIR R4 result of a finding: a DiagnosticReport and its Observation.

Built with fhir.resources' R4-family (R4B) models, so anything we publish has been
validated against the base specification on the way out. Resource ids are derived
from the study UID and finding, so a retried finding produces the same resources and
an EHR can update instead of duplicating.
"""

from __future__ import annotations

import uuid
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from schemas.findings import Finding, SliceRange

# Namespace for deterministic resource ids (uuid5).
_ID_NAMESPACE = uuid.UUID("5b0c4a57-65c4-4c1e-9b1f-1c9f3f0d7a11")
FINDING_SYSTEM = "https://radtriage.dev/fhir/CodeSystem/ai-finding"

# What each finding code means, for humans and for coded consumers (SNOMED CT disorder).
FINDINGS: dict[str, tuple[str, str, str]] = {
    # code: (plain words, SNOMED CT code, SNOMED display)
    "ICH": ("intracranial haemorrhage", "1386000", "Intracranial hemorrhage"),
    # The occlusion itself, not its consequence (432504007 |Cerebral infarction| is what a
    # CTA cannot show and what thrombectomy aims to prevent).
    "LVO": ("large-vessel occlusion", "20059004", "Occlusion of cerebral artery"),
    "NODULE": ("lung nodule", "786838002", "Pulmonary nodule"),
    "CXR_CRITICAL": ("critical chest radiograph finding", "36118008", "Pneumothorax"),
    "BIRADS": ("suspicious mammographic finding", "129748009", "Mass of breast"),
}


SNOMED = "http://snomed.info/sct"
RADLEX = "http://radlex.org"
# SNOMED CT 272741003 |Laterality (attribute)| with its qualifier values, and RadLex's
# terms for the same (as RadElement's "Side" element codes them).
LATERALITY_CODE: dict[str, Any] = {
    "coding": [
        {"system": SNOMED, "code": "272741003", "display": "Laterality"},
        {"system": RADLEX, "code": "RID5821", "display": "laterality"},
    ],
    "text": "Laterality",
}
SIDES: dict[str, tuple[str, str]] = {
    # side: (SNOMED CT qualifier value, RadLex)
    "left": ("7771000", "RID5824"),
    "right": ("24028007", "RID5825"),
}


# No LOINC, SNOMED CT, RadLex or DICOM (DCM) code names "the slices a finding is on", so
# the slice range components carry radtriage's own codes plus plain text.
LOCALISATION_SYSTEM = "https://radtriage.dev/fhir/CodeSystem/ai-localisation"
UCUM = "http://unitsofmeasure.org"


def _uid_identifier(study_uid: str) -> dict[str, str]:
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}


def resource_ids(finding: Finding) -> tuple[str, str]:
    base = f"{finding.study_uid}/{finding.finding}"
    return (
        str(uuid.uuid5(_ID_NAMESPACE, base + "/report")),
        str(uuid.uuid5(_ID_NAMESPACE, base + "/observation")),
    )


def _sided(finding: Finding) -> bool:
    return finding.laterality in SIDES and finding.laterality_probability is not None


def conclusion_text(finding: Finding) -> str:
    words = FINDINGS[finding.finding][0]
    model = f"{finding.model_name} v{finding.model_version}"
    if finding.positive and _sided(finding):
        head = (
            f"Suspected {words}, {finding.laterality} side (probability {finding.probability:.2f}): "
            f"at or above the alert threshold {finding.threshold:.2f}; the model puts it on the "
            f"{finding.laterality} with probability {finding.laterality_probability:.2f} ({model})."
        )
    elif finding.positive:
        head = (
            f"Suspected {words}: AI probability {finding.probability:.2f} "
            f"at or above the alert threshold {finding.threshold:.2f} ({model})."
        )
    else:
        head = (
            f"No {words} suspected: AI probability {finding.probability:.2f} "
            f"below the alert threshold {finding.threshold:.2f} ({model})."
        )
    if finding.positive and finding.slice_range is not None:
        head += f" {slice_range_text(finding.slice_range).capitalize()}."
    return head + " Preliminary machine triage for prioritisation only; a radiologist must review the study."


def build_observation(finding: Finding, observation_id: str) -> Observation:
    words, snomed, snomed_display = FINDINGS[finding.finding]
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": FINDING_SYSTEM, "code": finding.finding, "display": f"AI triage: {words}"},
                {"system": SNOMED, "code": snomed, "display": snomed_display},
            ],
            "text": f"Probability of {words} (AI triage)",
        },
        "effectiveDateTime": finding.inferred_at.isoformat(),
        "valueQuantity": {
            "value": round(finding.probability, 4),
            "unit": "probability",
            "system": UCUM,
            "code": "1",
        },
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if finding.positive else "NEG",
                        "display": "Positive" if finding.positive else "Negative",
                    }
                ]
            }
        ],
        "method": {"text": f"{finding.model_name} version {finding.model_version} (Triton)"},
        "device": {"display": f"{finding.model_name} version {finding.model_version}"},
        "derivedFrom": [{"type": "ImagingStudy", "identifier": _uid_identifier(finding.study_uid)}],
        "component": [
            {
                "code": {"text": "Alert threshold"},
                "valueQuantity": {
                    "value": finding.threshold,
                    "unit": "probability",
                    "system": UCUM,
                    "code": "1",
                },
            },
            {"code": {"text": "DICOM Series Instance UID"}, "valueString": finding.series_uid},
        ],
    }
    body["component"] += laterality_components(finding)
    body["component"] += slice_range_components(finding)
    if finding.positive and finding.slice_range is not None:
        body["note"] = [{"text": f"AI localisation: {slice_range_text(finding.slice_range)}."}]
    if finding.patient_id:
        body["subject"] = {"type": "Patient", "identifier": {"value": finding.patient_id}}
    return Observation.model_validate(body)


def slice_range_text(r: SliceRange) -> str:
    """The range in words, the way a radiologist scrolls to it: instance numbers first."""
    where = f"z {r.first_position_mm:.1f} to {r.last_position_mm:.1f} mm"
    count = f"{r.slices} slice{'s' if r.slices != 1 else ''}"
    if r.first_instance_number is None or r.last_instance_number is None:
        return f"most likely on the slices at {where} ({count})"
    if r.first_instance_number == r.last_instance_number:
        return f"most likely on image {r.first_instance_number} ({where}, {count})"
    return f"most likely on images {r.first_instance_number} to {r.last_instance_number} ({where}, {count})"


def slice_range_components(finding: Finding) -> list[dict[str, Any]]:
    """A positive finding's slice range (schemas.findings.SliceRange) as Observation
    components with a Range value each: the DICOM InstanceNumbers of its first and last
    slices, and their positions along the slice normal in mm (UCUM). A Range needs low <=
    high, so instance numbers counted down the series are given as min and max; which is
    the inferior end says the position range. Nothing when there is no range."""
    r = finding.slice_range
    if not finding.positive or r is None:
        return []
    out: list[dict[str, Any]] = []
    if r.first_instance_number is not None and r.last_instance_number is not None:
        low, high = sorted((r.first_instance_number, r.last_instance_number))
        out.append(
            {
                "code": {
                    "coding": [
                        {
                            "system": LOCALISATION_SYSTEM,
                            "code": "slice-range-instance-number",
                            "display": "Affected slice range, DICOM Instance Number",
                        }
                    ],
                    "text": "Affected slices: DICOM Instance Numbers, first to last (AI localisation)",
                },
                "valueRange": {"low": {"value": low}, "high": {"value": high}},
            }
        )
    out.append(
        {
            "code": {
                "coding": [
                    {
                        "system": LOCALISATION_SYSTEM,
                        "code": "slice-range-position",
                        "display": "Affected slice range, position along the slice normal",
                    }
                ],
                "text": "Affected slices: position along the slice normal (patient z for axial), mm",
            },
            "valueRange": {
                "low": {"value": r.first_position_mm, "unit": "mm", "system": UCUM, "code": "mm"},
                "high": {"value": r.last_position_mm, "unit": "mm", "system": UCUM, "code": "mm"},
            },
        }
    )
    return out


def laterality_components(finding: Finding) -> list[dict[str, Any]]:
    """The side of a sided finding as Observation components (R4 has no laterality element
    on Observation.bodySite): SNOMED CT 272741003 |Laterality| = Left/Right, and the
    model's probability of that side. Nothing for findings without a stated side."""
    if not _sided(finding):
        return []
    assert finding.laterality is not None and finding.laterality_probability is not None
    snomed, radlex = SIDES[finding.laterality]
    display = finding.laterality.capitalize()
    return [
        {
            "code": LATERALITY_CODE,
            "valueCodeableConcept": {
                "coding": [
                    {"system": SNOMED, "code": snomed, "display": display},
                    {"system": RADLEX, "code": radlex, "display": display},
                ],
                "text": display,
            },
        },
        {
            "code": {"text": f"Probability of the {finding.laterality} side (AI triage)"},
            "valueQuantity": {
                "value": round(finding.laterality_probability, 4),
                "unit": "probability",
                "system": UCUM,
                "code": "1",
            },
        },
    ]


def build_report(finding: Finding, report_id: str, observation_id: str) -> DiagnosticReport:
    words, snomed, snomed_display = FINDINGS[finding.finding]
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{finding.study_uid}"},
        ],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
            ],
            "text": f"AI triage for {words}",
        },
        "effectiveDateTime": finding.ready_at.isoformat(),
        "issued": finding.inferred_at.isoformat(),
        "imagingStudy": [{"type": "ImagingStudy", "identifier": _uid_identifier(finding.study_uid)}],
        "result": [{"reference": f"urn:uuid:{observation_id}"}],
        "conclusion": conclusion_text(finding),
    }
    if finding.accession_number:
        body["identifier"].append(
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": finding.accession_number,
            }
        )
    if finding.patient_id:
        body["subject"] = {"type": "Patient", "identifier": {"value": finding.patient_id}}
    if finding.positive:
        body["conclusionCode"] = [{"coding": [{"system": SNOMED, "code": snomed, "display": snomed_display}]}]
    return DiagnosticReport.model_validate(body)


def build_result_bundle(finding: Finding) -> dict[str, Any]:
    """A `collection` Bundle: the DiagnosticReport first, then its Observation (FHIR JSON)."""
    report_id, observation_id = resource_ids(finding)
    observation = build_observation(finding, observation_id)
    report = build_report(finding, report_id, observation_id)
    bundle = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{finding.study_uid}/{finding.finding}/bundle")),
            "type": "collection",
            "timestamp": finding.inferred_at.isoformat(),
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{report_id}",
                    "resource": report.model_dump(mode="json", exclude_none=True),
                },
                {
                    "fullUrl": f"urn:uuid:{observation_id}",
                    "resource": observation.model_dump(mode="json", exclude_none=True),
                },
            ],
        }
    )
    out: dict[str, Any] = bundle.model_dump(mode="json", exclude_none=True)
    return out
