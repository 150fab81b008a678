"""Build the FHIR R4 result of a finding: a DiagnosticReport and its Observation.

Built with fhir.resources' R4-family (R4B) models, so anything we publish has been
validated against the base specification on the way out. Resource ids are derived
from the study UID and finding, so a retried finding produces the same resources and
an EHR can update instead of duplicating.
"""

from __future__ import annotations

import base64
import html
import uuid
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from models import registry
from schemas.findings import BiradsAssessment, Finding, LungNodule, SliceRange

# Namespace for deterministic resource ids (uuid5).
_ID_NAMESPACE = uuid.UUID("5b0c4a57-65c4-4c1e-9b1f-1c9f3f0d7a11")
FINDING_SYSTEM = "https://radtriage.dev/fhir/CodeSystem/ai-finding"
# The patient id's system when the order did not say who assigned it (EhrSettings).
DEFAULT_PATIENT_ID_SYSTEM = "https://radtriage.dev/fhir/sid/patient-id"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def meaning(finding: Finding) -> tuple[str, tuple[str, str] | None]:
    """What the finding code means, for humans (the words of the report's sentences) and for
    coded consumers (SNOMED CT code and display, or None): from its model's spec."""
    spec = registry.for_finding(finding.finding)
    return spec.words, spec.snomed


# SNOMED CT's mammography assessment findings, one per BI-RADS category (the codes of
# the HL7 Lithuania breast IG's BI-RADS value set; 6111000179101 is from the US edition).
BIRADS_CATEGORIES: dict[int, tuple[str, str, str]] = {
    # category: (plain words, SNOMED CT code, SNOMED display)
    0: (
        "incomplete: needs additional imaging evaluation",
        "397138000",
        "Mammography assessment (Category 0) - Need additional imaging evaluation",
    ),
    1: ("negative", "397140005", "Mammography assessment (Category 1) - Negative"),
    2: ("benign", "397141009", "Mammography assessment (Category 2) - Benign finding"),
    3: (
        "probably benign",
        "397143007",
        "Mammography assessment (Category 3) - Probably benign finding, short interval follow-up",
    ),
    4: (
        "suspicious",
        "397144001",
        "Mammography assessment (Category 4) - Suspicious abnormality, biopsy should be considered",
    ),
    5: (
        "highly suggestive of malignancy",
        "397145000",
        "Mammography assessment (Category 5) - Highly suggestive of malignancy",
    ),
    6: (
        "known biopsy-proven malignancy",
        "6111000179101",
        "Mammography assessment (Category 6) - Known biopsy proven malignancy",
    ),
}
# No LOINC or SNOMED CT code names "BI-RADS assessment category" as a question (LOINC
# 36625-2 is a mammography study, not its assessment): radtriage's own codes plus text.
BIRADS_SYSTEM = "https://radtriage.dev/fhir/CodeSystem/ai-birads"


SNOMED = "http://snomed.info/sct"
RADLEX = "http://radlex.org"


def concept(text: str, *codings: tuple[str, str, str]) -> dict[str, Any]:
    """A CodeableConcept: its codings, each (system, code, display), and its text."""
    return {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings], "text": text}


# SNOMED CT 272741003 |Laterality (attribute)| with its qualifier values, and RadLex's
# terms for the same (as RadElement's "Side" element codes them).
LATERALITY_CODE: dict[str, Any] = concept(
    "Laterality", (SNOMED, "272741003", "Laterality"), (RADLEX, "RID5821", "laterality")
)
SIDES: dict[str, tuple[str, str]] = {
    # side: (SNOMED CT qualifier value, RadLex)
    "left": ("7771000", "RID5824"),
    "right": ("24028007", "RID5825"),
}


# No LOINC, SNOMED CT, RadLex or DICOM (DCM) code names "the slices a finding is on", so
# the slice range components carry radtriage's own codes plus plain text.
LOCALISATION_SYSTEM = "https://radtriage.dev/fhir/CodeSystem/ai-localisation"
UCUM = "http://unitsofmeasure.org"

# A nodule's own Observation: SNOMED CT 786838002 |Pulmonary nodule| and RadLex RID50149
# (as RadElement's pulmonary nodule set codes it); its size as SNOMED CT 81827009
# |Diameter| (DICOM CID 7470's linear measurement), in the lung it is in (SNOMED CT body
# structures). No standard code names a point's patient coordinates, so the centre
# components carry radtriage's own codes plus text, as the slice range does.
NODULE_CODE: dict[str, Any] = concept(
    "Lung nodule (AI candidate)",
    (SNOMED, "786838002", "Pulmonary nodule"),
    (RADLEX, "RID50149", "pulmonary nodule"),
)
DIAMETER_CODE: dict[str, Any] = concept(
    "Diameter (sphere of the nodule's volume)", (SNOMED, "81827009", "Diameter")
)
AXIS_MEANINGS = ("+ is the patient's left", "+ is posterior", "+ is towards the head")
LUNGS: dict[str, tuple[str, str]] = {
    "left": ("44029006", "Left lung structure"),
    "right": ("3341006", "Right lung structure"),
}


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
    words, _ = meaning(finding)
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
    if finding.birads is not None:
        head += f" {birads_text(finding.birads)}."
    if finding.nodules:
        head += f" {nodules_text(finding.nodules)}."
    head += f" {series_text(finding)}."
    if finding.amends_request_id:
        head += (
            " Amended: the study was read again on a series the routing rule prefers, which"
            " arrived after the first read; this replaces the earlier result."
        )
    return head + " Preliminary machine triage for prioritisation only; a radiologist must review the study."


def series_text(finding: Finding) -> str:
    """Which series the model read, the way a viewer lists it (number, then description)."""
    if finding.series_number is None and not finding.series_description:
        return "Read on series " + finding.series_uid
    number = f"series {finding.series_number}" if finding.series_number is not None else "the series"
    described = f' "{finding.series_description}"' if finding.series_description else ""
    return f"Read on {number}{described}"


def report_status(finding: Finding) -> str:
    """ "amended" when the finding replaces an earlier one of the same study and model (the
    same report id, a better series read), else "preliminary": never "final", no human
    has read it."""
    return "amended" if finding.amends_request_id else "preliminary"


IMAGING_CATEGORY: list[dict[str, Any]] = [
    {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "imaging",
                "display": "Imaging",
            }
        ]
    }
]


def _xhtml(*paragraphs: str) -> dict[str, str]:
    """A generated narrative (Resource.text): escaped paragraphs in an XHTML div, so
    systems that only render text show something and dom-6 is met."""
    body = "".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paragraphs)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def subject(finding: Finding, default_system: str) -> dict[str, Any] | None:
    """The patient by identifier: the order's assigning authority as its system (FHIR
    identifier.system, or PID-3.4's universal id), else the configured default."""
    if not finding.patient_id:
        return None
    order = finding.order
    identifier: dict[str, Any] = {
        "type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
        "system": (order.patient_id_system if order is not None else "") or default_system,
        "value": finding.patient_id,
    }
    if order is not None and order.patient_id_authority:
        identifier["assigner"] = {"display": order.patient_id_authority}
    return {"type": "Patient", "identifier": identifier}


def device_id(finding: Finding) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"device/{finding.model_name}/{finding.model_version}"))


def model_label(finding: Finding) -> str:
    return f"{finding.model_name} version {finding.model_version}"


def build_device(finding: Finding) -> dict[str, Any]:
    """The model that made the finding, as a Device (name and version): what the
    Observations name as their device (R4 allows no Device as a report's performer)."""
    return {
        "resourceType": "Device",
        "id": device_id(finding),
        "text": _xhtml(f"AI triage model {model_label(finding)} (radtriage, served by Triton)."),
        "status": "active",
        "deviceName": [{"name": finding.model_name, "type": "model-name"}],
        "type": {"text": "AI triage model (software)"},
        "version": [{"value": finding.model_version}],
    }


# RFC 3986 URIs as identifiers (FHIR R4 datatypes.html#Identifier).
URI_SYSTEM = "urn:ietf:rfc:3986"


def resource_identifier(resource_id: str) -> dict[str, str]:
    """A resource's radtriage identifier: its id (derived from the study, the finding and the
    resource's role, so the same for a re-run or an amended report) as a `urn:uuid:` URI.
    The one an EHR's server finds it by (processors/fhir_transaction.py), and what
    `/fhir/Observation?identifier=` matches."""
    return {"system": URI_SYSTEM, "value": f"urn:uuid:{resource_id}"}


def _observation_base(
    finding: Finding, observation_id: str, patient_id_system: str, narrative: str
) -> dict[str, Any]:
    """What every Observation of a finding says the same way: its identifier, status,
    category, time, the model (name and version) that made it, the study it is derived
    from, the patient."""
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "identifier": [resource_identifier(observation_id)],
        "status": report_status(finding),
        "category": IMAGING_CATEGORY,
        "effectiveDateTime": finding.inferred_at.isoformat(),
        "method": {"text": f"{finding.model_name} version {finding.model_version} (Triton)"},
        "device": {"reference": f"urn:uuid:{device_id(finding)}", "display": model_label(finding)},
        "derivedFrom": [{"type": "ImagingStudy", "identifier": _uid_identifier(finding.study_uid)}],
    }
    if (who := subject(finding, patient_id_system)) is not None:
        body["subject"] = who
    body["text"] = _xhtml(narrative, f"Status {body['status']}; {model_label(finding)}.")
    return body


def _probability(value: float) -> dict[str, Any]:
    return {"value": round(value, 4), "unit": "probability", "system": UCUM, "code": "1"}


def _mm(value: float) -> dict[str, Any]:
    return {"value": value, "unit": "mm", "system": UCUM, "code": "mm"}


def build_observation(
    finding: Finding, observation_id: str, patient_id_system: str = DEFAULT_PATIENT_ID_SYSTEM
) -> Observation:
    words, snomed = meaning(finding)
    coding: list[dict[str, str]] = [
        {"system": FINDING_SYSTEM, "code": finding.finding, "display": f"AI triage: {words}"}
    ]
    if snomed is not None:
        coding.append({"system": SNOMED, "code": snomed[0], "display": snomed[1]})
    said = "positive" if finding.positive else "negative"
    body = _observation_base(
        finding,
        observation_id,
        patient_id_system,
        f"Probability of {words} (AI triage): {finding.probability:.2f}, {said} at the alert "
        f"threshold {finding.threshold:.2f}. {series_text(finding)}.",
    )
    body |= {
        "code": {"coding": coding, "text": f"Probability of {words} (AI triage)"},
        "valueQuantity": _probability(finding.probability),
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
        "component": [
            {"code": {"text": "Alert threshold"}, "valueQuantity": _probability(finding.threshold)},
            {"code": {"text": "DICOM Series Instance UID"}, "valueString": finding.series_uid},
        ],
    }
    if finding.series_number is not None:
        body["component"].append(
            {"code": {"text": "DICOM Series Number"}, "valueInteger": finding.series_number}
        )
    if finding.series_description:
        body["component"].append(
            {"code": {"text": "DICOM Series Description"}, "valueString": finding.series_description}
        )
    body["component"] += laterality_components(finding)
    body["component"] += slice_range_components(finding)
    body["component"] += birads_components(finding)
    if finding.positive and finding.slice_range is not None:
        body["note"] = [{"text": f"AI localisation: {slice_range_text(finding.slice_range)}."}]
    if finding.nodules:
        body["hasMember"] = [{"reference": f"urn:uuid:{i}"} for i in nodule_observation_ids(finding)]
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
                "code": concept(
                    "Affected slices: DICOM Instance Numbers, first to last (AI localisation)",
                    (
                        LOCALISATION_SYSTEM,
                        "slice-range-instance-number",
                        "Affected slice range, DICOM Instance Number",
                    ),
                ),
                "valueRange": {"low": {"value": low}, "high": {"value": high}},
            }
        )
    out.append(
        {
            "code": concept(
                "Affected slices: position along the slice normal (patient z for axial), mm",
                (
                    LOCALISATION_SYSTEM,
                    "slice-range-position",
                    "Affected slice range, position along the slice normal",
                ),
            ),
            "valueRange": {
                "low": _mm(r.first_position_mm),
                "high": _mm(r.last_position_mm),
            },
        }
    )
    return out


def _side_concept(side: str) -> dict[str, Any]:
    snomed, radlex = SIDES[side]
    display = side.capitalize()
    return concept(display, (SNOMED, snomed, display), (RADLEX, radlex, display))


def laterality_components(finding: Finding) -> list[dict[str, Any]]:
    """The side of a sided finding as Observation components (R4 has no laterality element
    on Observation.bodySite): SNOMED CT 272741003 |Laterality| = Left/Right, and the
    model's probability of that side. Nothing for findings without a stated side."""
    if not _sided(finding):
        return []
    assert finding.laterality is not None and finding.laterality_probability is not None
    return [
        {"code": LATERALITY_CODE, "valueCodeableConcept": _side_concept(finding.laterality)},
        {
            "code": {"text": f"Probability of the {finding.laterality} side (AI triage)"},
            "valueQuantity": _probability(finding.laterality_probability),
        },
    ]


def nodules_text(nodules: tuple[LungNodule, ...]) -> str:
    """ "2 nodules: 14 mm in the right lung (probability 0.93); 7 mm in the left lung (0.41)"."""
    parts = [
        f"{n.diameter_mm:.0f} mm in the {n.lung} lung ({'probability ' if i == 0 else ''}{n.probability:.2f})"
        for i, n in enumerate(nodules)
    ]
    count = f"{len(nodules)} nodule" + ("s" if len(nodules) != 1 else "")
    return f"{count}: {'; '.join(parts)}"


def nodule_observation_ids(finding: Finding) -> list[str]:
    base = f"{finding.study_uid}/{finding.finding}/nodule"
    return [str(uuid.uuid5(_ID_NAMESPACE, f"{base}/{i}")) for i in range(len(finding.nodules or ()))]


def build_nodule_observations(
    finding: Finding, patient_id_system: str = DEFAULT_PATIENT_ID_SYSTEM
) -> list[Observation]:
    """One Observation per nodule (likeliest first): the nodule (coded), its diameter as
    the value, its lung as bodySite, its centre in DICOM patient coordinates and the
    model's probability as components. Members of the finding's Observation."""
    out: list[Observation] = []
    for rank, (n, observation_id) in enumerate(
        zip(finding.nodules or (), nodule_observation_ids(finding), strict=True), start=1
    ):
        snomed, display = LUNGS[n.lung]
        body = _observation_base(
            finding,
            observation_id,
            patient_id_system,
            f"AI nodule candidate {rank}: {n.diameter_mm:.1f} mm, {n.lung} lung, centre "
            + ", ".join(f"{c:.1f}" for c in n.centre_lps_mm)
            + f" mm (DICOM patient LPS), probability {n.probability:.2f}.",
        )
        centre = [
            {
                "code": concept(
                    f"Centre, DICOM patient {axis} in mm ({meaning})",
                    (LOCALISATION_SYSTEM, f"centre-{axis}", f"Centre, DICOM patient {axis} (LPS)"),
                ),
                "valueQuantity": _mm(value),
            }
            for axis, meaning, value in zip("xyz", AXIS_MEANINGS, n.centre_lps_mm, strict=True)
        ]
        body |= {
            "code": NODULE_CODE,
            "valueQuantity": _mm(n.diameter_mm),
            "bodySite": concept(display, (SNOMED, snomed, display)),
            "component": [
                {"code": DIAMETER_CODE, "valueQuantity": _mm(n.diameter_mm)},
                *centre,
                {
                    "code": {"text": "Probability of this nodule (AI triage)"},
                    "valueQuantity": _probability(n.probability),
                },
                {"code": {"text": "Rank among the study's nodules (1: likeliest)"}, "valueInteger": rank},
            ],
            "note": [{"text": f"AI nodule candidate {rank}: {n.diameter_mm:.1f} mm, {n.lung} lung."}],
        }
        out.append(Observation.model_validate(body))
    return out


def birads_text(b: BiradsAssessment) -> str:
    """The suggested category in words: "Suggested BI-RADS 4 (suspicious), left breast (...)"."""
    words = BIRADS_CATEGORIES[b.category][0]
    where = f", {b.side} breast" if b.side else ""
    views = f" on {', '.join(b.views)}" if b.views else ""
    breasts = ", ".join(
        f"{side} {cat}"
        for side, cat in (("right", b.right_category), ("left", b.left_category))
        if cat is not None
    )
    return (
        f"Suggested BI-RADS {b.category} ({words}){where}{views}, model probability "
        f"{b.probability:.2f} (per breast: {breasts})"
    )


def _birads_concept(category: int) -> dict[str, Any]:
    words, code, display = BIRADS_CATEGORIES[category]
    return concept(f"BI-RADS {category}: {words}", (SNOMED, code, display))


def birads_components(finding: Finding) -> list[dict[str, Any]]:
    """A mammography finding's suggested BI-RADS category as Observation components: the
    overall category (SNOMED CT mammography assessment), the model's probability of it,
    and each breast's category with its laterality. Nothing for other findings."""
    b = finding.birads
    if b is None:
        return []

    def code(key: str, display: str) -> dict[str, Any]:
        return concept(display, (BIRADS_SYSTEM, key, display))

    out: list[dict[str, Any]] = [
        {
            "code": code("birads-category", "BI-RADS assessment category (AI suggestion)"),
            "valueCodeableConcept": _birads_concept(b.category),
        },
        {
            "code": code("birads-category-probability", "Probability of the suggested BI-RADS category"),
            "valueQuantity": _probability(b.probability),
        },
    ]
    for side, category in (("right", b.right_category), ("left", b.left_category)):
        if category is None:
            continue
        out.append(
            {
                "code": code(f"birads-category-{side}", f"BI-RADS assessment category, {side} breast"),
                "valueCodeableConcept": _birads_concept(category),
            }
        )
    if b.side is not None:
        out.append({"code": LATERALITY_CODE, "valueCodeableConcept": _side_concept(b.side)})
    return out


RADIOLOGY_CATEGORY: list[dict[str, Any]] = [
    {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
        ]
    },
    # US Core's DiagnosticReport for Report and Note names radiology by this LOINC part.
    {"coding": [{"system": "http://loinc.org", "code": "LP29684-5", "display": "Radiology"}]},
]


def _typed(code: str, display: str, value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": code, "display": display}]}, "value": value}


def based_on(finding: Finding) -> list[dict[str, Any]]:
    """The order the report answers, by identifier (its ServiceRequest is the EHR's): the
    placer order number, else the filler's, else the accession number (HL7 v2-to-FHIR:
    OBR-2 -> basedOn ServiceRequest.identifier PLAC, OBR-3 -> the report's FILL)."""
    order = finding.order
    if order is not None and order.placer_order_number:
        ident = _typed("PLAC", "Placer Identifier", order.placer_order_number)
    elif order is not None and order.filler_order_number:
        ident = _typed("FILL", "Filler Identifier", order.filler_order_number)
    elif finding.accession_number:
        ident = _typed("ACSN", "Accession ID", finding.accession_number)
    else:
        return []
    return [{"type": "ServiceRequest", "identifier": ident}]


def report_title(finding: Finding) -> str:
    words, _ = meaning(finding)
    return f"AI triage for {words}"


def plain_text_report(finding: Finding) -> str:
    """The report as a document (presentedForm) for systems that only show documents."""
    order = finding.order
    lines = [
        f"{report_title(finding).upper()} ({report_status(finding).upper()})",
        f"Patient id: {finding.patient_id or 'not stated'}",
        f"Accession number: {finding.accession_number or 'not stated'}",
    ]
    if order is not None and order.placer_order_number:
        lines.append(f"Placer order number: {order.placer_order_number}")
    if order is not None and order.filler_order_number:
        lines.append(f"Filler order number: {order.filler_order_number}")
    lines += [
        f"Study Instance UID: {finding.study_uid}",
        f"Model: {model_label(finding)}",
        f"Read at: {finding.inferred_at.isoformat()}",
        "",
        conclusion_text(finding),
    ]
    return "\n".join(lines) + "\n"


def build_report(
    finding: Finding,
    report_id: str,
    observation_id: str,
    patient_id_system: str = DEFAULT_PATIENT_ID_SYSTEM,
) -> DiagnosticReport:
    _, snomed = meaning(finding)
    conclusion = conclusion_text(finding)
    status = report_status(finding)
    document = plain_text_report(finding)
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "text": _xhtml(f"{report_title(finding)} ({status}).", conclusion),
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{finding.study_uid}"},
        ],
        "basedOn": based_on(finding) or None,
        "status": status,
        "category": RADIOLOGY_CATEGORY,
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
            ],
            "text": report_title(finding),
        },
        "effectiveDateTime": finding.ready_at.isoformat(),
        "issued": finding.inferred_at.isoformat(),
        "imagingStudy": [{"type": "ImagingStudy", "identifier": _uid_identifier(finding.study_uid)}],
        "result": [
            {"reference": f"urn:uuid:{i}"} for i in (observation_id, *nodule_observation_ids(finding))
        ],
        "conclusion": conclusion,
        "presentedForm": [
            {
                "contentType": "text/plain",
                "language": "en",
                "data": base64.b64encode(document.encode("utf-8")).decode("ascii"),
                "title": report_title(finding),
                "creation": finding.inferred_at.isoformat(),
            }
        ],
    }
    if finding.accession_number:
        body["identifier"].append(_typed("ACSN", "Accession ID", finding.accession_number))
    if finding.order is not None and finding.order.filler_order_number:
        body["identifier"].append(_typed("FILL", "Filler Identifier", finding.order.filler_order_number))
    if (who := subject(finding, patient_id_system)) is not None:
        body["subject"] = who
    if finding.birads is not None:
        # A BI-RADS category is the conclusion whatever it is (1 and 2 are results too).
        body["conclusionCode"] = [_birads_concept(finding.birads.category)]
    elif finding.positive and snomed is not None:
        body["conclusionCode"] = [{"coding": [{"system": SNOMED, "code": snomed[0], "display": snomed[1]}]}]
    return DiagnosticReport.model_validate({k: v for k, v in body.items() if v is not None})


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}


def build_result_bundle(
    finding: Finding, patient_id_system: str = DEFAULT_PATIENT_ID_SYSTEM
) -> dict[str, Any]:
    """A `collection` Bundle: the DiagnosticReport first, then its Observation, then one
    Observation per nodule of a nodule finding, then the model as a Device (FHIR JSON).
    `patient_id_system`: the patient id's system when the order gave none."""
    report_id, observation_id = resource_ids(finding)
    observation = build_observation(finding, observation_id, patient_id_system)
    report = build_report(finding, report_id, observation_id, patient_id_system)
    resources = [
        r.model_dump(mode="json", exclude_none=True)
        for r in (report, observation, *build_nodule_observations(finding, patient_id_system))
    ]
    bundle = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{finding.study_uid}/{finding.finding}/bundle")),
            "type": "collection",
            "timestamp": finding.inferred_at.isoformat(),
            "entry": [*(_entry(r) for r in resources), _entry(build_device(finding))],
        }
    )
    out: dict[str, Any] = bundle.model_dump(mode="json", exclude_none=True)
    return out
