"""FHIR ServiceRequest / ImagingStudy → `OrderEvent` (pure).

Only what routing needs leaves this module: ids, codes, priority, indication. A
subject's display name, a patient's birth date, free-text notes — nothing else of the
resource is read. A resource radtriage cannot key (no accession number) is refused
with 422, the FHIR status for "server business rules".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from connectors.fhir.outcome import FhirError, Issue
from connectors.fhir.parsing import validate_resource
from radtriage.blobstore import valid_uid
from schemas.orders import INDICATION_MAX, OrderEvent, OrderStatus, Priority

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DICOM_UID_SYSTEM = "urn:dicom:uid"
# Identifiers are keys downstream (HL7 CX / DICOM LO sizes): refused when longer, never cut.
ID_MAX = 64
# Codes and systems are refused when absurdly long; free text is cut. Together they keep
# an event far below Kafka's 1 MiB record limit whatever the resource holds.
CODE_MAX = 256
TEXT_MAX = 256
MAX_REASON_CODES = 32

_SERVICE_REQUEST_STATUS: dict[str, OrderStatus] = {
    "draft": "active",
    "active": "active",
    # Still an order that may be performed: it keeps whatever priority it had.
    "on-hold": "active",
    "unknown": "active",
    "revoked": "cancelled",
    "entered-in-error": "cancelled",
    "completed": "completed",
}

# An ImagingStudy's status describes the images, not the order; only an order message
# changes the order's status downstream (streams/priority.merge_order), so this is
# informational.
_IMAGING_STUDY_STATUS: dict[str, OrderStatus] = {
    "registered": "active",
    "available": "active",
    "unknown": "active",
    "cancelled": "cancelled",
    "entered-in-error": "cancelled",
}

# Patient/123, https://ehr/fhir/Patient/123, Patient/123/_history/2
_PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def _typed_identifier_values(identifiers: Iterable[Any] | None, type_code: str) -> list[str]:
    """Values of identifiers whose type has coding `type_code` in HL7 v2 table 0203."""
    values = []
    for ident in identifiers or ():
        codings = (ident.type.coding or []) if ident.type is not None else []
        if any(c.system == V2_0203 and c.code == type_code for c in codings):
            values.append((ident.value or "").strip())
    return values


def _accession(values: Sequence[str], where: str) -> str:
    present = [v for v in values if v]
    if not present:
        raise FhirError(
            422,
            [
                Issue(
                    "business-rule",
                    f"{where}: no accession number — an identifier with type.coding "
                    f"{{system: '{V2_0203}', code: 'ACSN'}} and a value is required",
                    (where,),
                )
            ],
        )
    if len(set(present)) > 1:
        raise FhirError(
            422,
            [Issue("business-rule", f"{where}: several different ACSN identifiers", (where,))],
        )
    return _bounded(present[0], ID_MAX, where)


def _bounded(value: str, limit: int, where: str) -> str:
    if len(value) > limit:
        raise FhirError(422, [Issue("too-long", f"{where}: longer than {limit} characters", (where,))])
    return value


def patient_id(subject: Any, where: str = "subject") -> str:
    """The patient's id from a Reference: its identifier's value, else the id in
    `reference`. Never its display (a name)."""
    if subject is None:
        return ""
    if subject.identifier is not None and (subject.identifier.value or "").strip():
        return _bounded(str(subject.identifier.value).strip(), ID_MAX, f"{where}.identifier.value")
    match = _PATIENT_REFERENCE.search(subject.reference or "")
    return match.group(1) if match else ""


def patient_id_system(subject: Any, where: str = "subject") -> str:
    """The system (assigning authority) of the subject's identifier, when it has one."""
    if subject is None or subject.identifier is None or not (subject.identifier.value or "").strip():
        return ""
    return _bounded(str(subject.identifier.system or ""), 256, f"{where}.identifier.system")


def _first_coding(concept: Any, where: str) -> tuple[str, str, str]:
    """(code, system, text) of a CodeableConcept: its first coding with a code."""
    if concept is None:
        return "", "", ""
    coding = next((c for c in concept.coding or [] if c.code), None)
    code = _bounded(str(coding.code), CODE_MAX, f"{where}.coding.code") if coding else ""
    system = _bounded(str(coding.system or ""), CODE_MAX, f"{where}.coding.system") if coding else ""
    text = concept.text or (coding.display if coding and coding.display else "") or ""
    return code, system, " ".join(text.split())[:TEXT_MAX]


def _token(coding: Any) -> str:
    # FHIR token syntax: system|code, or the bare code when the system is unknown.
    return f"{coding.system}|{coding.code}" if coding.system else str(coding.code)


def indication(reasons: Sequence[Any] | None) -> tuple[str, tuple[str, ...]]:
    """The reasons as one line of text (cut to INDICATION_MAX) and their coded forms."""
    texts: list[str] = []
    codes: list[str] = []
    for concept in reasons or ():
        text = concept.text or next((c.display for c in concept.coding or [] if c.display), "")
        text = " ".join(text[: INDICATION_MAX * 4].split())
        if text and text not in texts:
            texts.append(text)
        for coding in concept.coding or []:
            token = _token(coding) if coding.code else ""
            # Codes beyond these bounds are dropped, not refused: the text still says it.
            if token and len(token) <= 2 * CODE_MAX and token not in codes and len(codes) < MAX_REASON_CODES:
                codes.append(token)
    return "; ".join(texts)[:INDICATION_MAX], tuple(codes)


def order_from_service_request(sr: Any, *, resource_id: str, where: str = "ServiceRequest") -> OrderEvent:
    """The OrderEvent for a validated R4B ServiceRequest (422 FhirError without accession)."""
    accession = _accession(_typed_identifier_values(sr.identifier, "ACSN"), f"{where}.identifier")
    code, system, text = _first_coding(sr.code, f"{where}.code")
    reason_text, reason_codes = indication(sr.reasonCode)
    placer = _typed_identifier_values(sr.identifier, "PLAC")
    filler = _typed_identifier_values(sr.identifier, "FILL")
    priority: Priority | None = sr.priority  # validated against request-priority in parsing
    return OrderEvent(
        accession_number=accession,
        message_type="ServiceRequest",
        source="fhir",
        source_message_id=resource_id,
        placer_order_number=_bounded(next((p for p in placer if p), ""), ID_MAX, f"{where}.identifier"),
        filler_order_number=_bounded(next((f for f in filler if f), ""), ID_MAX, f"{where}.identifier"),
        patient_id=patient_id(sr.subject, f"{where}.subject"),
        patient_id_system=patient_id_system(sr.subject, f"{where}.subject"),
        procedure_code=code,
        procedure_coding_system=system,
        procedure_text=text,
        # Absent priority: not stated (None), so an earlier STAT is never downgraded by omission.
        priority=priority,
        priority_raw=sr.priority or "",
        priority_field="ServiceRequest.priority" if sr.priority else "",
        indication=reason_text,
        indication_codes=reason_codes,
        status=_SERVICE_REQUEST_STATUS.get(sr.status or "", "active"),
    )


def study_uid(study: Any, where: str = "ImagingStudy") -> str:
    """The StudyInstanceUID: identifier system urn:dicom:uid, value urn:oid:<uid>."""
    for ident in study.identifier or ():
        if ident.system == DICOM_UID_SYSTEM and ident.value:
            uid = ident.value.removeprefix("urn:oid:")
            if not valid_uid(uid):
                raise FhirError(
                    422,
                    [
                        Issue(
                            "value",
                            f"{where}.identifier: {DICOM_UID_SYSTEM} value must be urn:oid:<DICOM UID>",
                            (f"{where}.identifier",),
                        )
                    ],
                )
            return uid
    raise FhirError(
        422,
        [
            Issue(
                "business-rule",
                f"{where}.identifier: no StudyInstanceUID — an identifier with system "
                f"'{DICOM_UID_SYSTEM}' and value 'urn:oid:<uid>' is required",
                (f"{where}.identifier",),
            )
        ],
    )


def order_from_imaging_study(study: Any, *, resource_id: str, where: str = "ImagingStudy") -> OrderEvent:
    """The OrderEvent linking a validated R4B ImagingStudy's study UID to its accession."""
    accessions = _typed_identifier_values(study.identifier, "ACSN")
    if not any(accessions):
        based_on = [ref.identifier for ref in study.basedOn or () if ref.identifier is not None]
        accessions = _typed_identifier_values(based_on, "ACSN")
    accession = _accession(accessions, f"{where}.identifier")
    uid = study_uid(study, where)
    procedure = study.procedureCode[0] if study.procedureCode else None
    code, system, text = _first_coding(procedure, f"{where}.procedureCode[0]")
    reason_text, reason_codes = indication(study.reasonCode)
    return OrderEvent(
        accession_number=accession,
        message_type="ImagingStudy",
        source="fhir",
        source_message_id=resource_id,
        patient_id=patient_id(study.subject, f"{where}.subject"),
        patient_id_system=patient_id_system(study.subject, f"{where}.subject"),
        study_uid=uid,
        procedure_code=code,
        procedure_coding_system=system,
        procedure_text=text,
        priority=None,  # an ImagingStudy states no priority
        indication=reason_text,
        indication_codes=reason_codes,
        status=_IMAGING_STUDY_STATUS.get(study.status or "", "active"),
    )


def order_event(resource_type: str, resource: Any, *, resource_id: str, where: str = "") -> OrderEvent:
    """The OrderEvent for a validated resource of a supported type, or a 422 FhirError."""
    mappers = {"ServiceRequest": order_from_service_request, "ImagingStudy": order_from_imaging_study}
    try:
        return mappers[resource_type](resource, resource_id=resource_id, where=where or resource_type)
    except ValidationError as exc:
        # A bound of OrderEvent this module does not check itself: still the sender's data.
        first = exc.errors(include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise FhirError(
            422,
            [Issue("business-rule", f"{where or resource_type}: cannot be routed ({field}: {first['msg']})")],
        ) from None


def accept(data: Any, resource_type: str, *, resource_id: str, where: str = "") -> OrderEvent:
    """Validate JSON `data` as a `resource_type` and map it: the event, or a 400/422 FhirError."""
    resource = validate_resource(data, resource_type, prefix=where)
    return order_event(resource_type, resource, resource_id=resource_id, where=where)
