"""`imaging.orders`: order-side facts about one imaging procedure, keyed by accession number.

Published by the HL7 v2 listener (ORM^O01, OMI^O23) and the FHIR intake
(ServiceRequest, and ImagingStudy, which links a StudyInstanceUID to its accession
and carries no priority). Several events for one accession are merged by the
order-study join in `streams/` (newer stated fields win; an unstated field, such as
`priority=None`, keeps what an earlier event said).

Only what routing needs travels: ids, codes, priority, indication, patient class.
Never names, birth dates, addresses or phone numbers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.base import Event, utcnow

# HL7 S→stat, A→asap, R→routine (P/C/T→urgent); FHIR request-priority as is.
Priority = Literal["stat", "asap", "urgent", "routine"]
PatientClass = Literal["emergency", "inpatient", "outpatient", "unknown"]
# HL7 ORC-1 NW/XO/SC → active, CA/OC/DC → cancelled, CM (or OBR-25 F) → completed;
# FHIR ServiceRequest.status active/draft → active, revoked/entered-in-error → cancelled.
OrderStatus = Literal["active", "cancelled", "completed"]

# Free-text indications are cut to this length: enough for "code stroke, LKW 14:05".
INDICATION_MAX = 256


class OrderEvent(Event):
    accession_number: str = Field(min_length=1, max_length=64)
    # Where it came from: "ORM^O01", "OMI^O23", "ServiceRequest", "ImagingStudy".
    message_type: str
    source: Literal["hl7", "fhir"]
    # MSH-10 message control id, or the FHIR resource's logical id: for tracing an event back.
    source_message_id: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    # The MRN is an id routing needs (it joins ADT location); never a name.
    patient_id: str = ""
    # Who assigned that id, so a result can name the patient unambiguously to an EHR:
    # the FHIR identifier.system (a URI), or from HL7 PID-3.4 (HD) its universal id as a
    # URI (ISO -> urn:oid:..., URI/UUID as such); "" when the sender does not say.
    patient_id_system: str = Field(default="", max_length=256)
    # PID-3.4.1, the assigning authority's namespace id (e.g. "HOSP"), echoed in the ORU.
    patient_id_authority: str = Field(default="", max_length=64)
    # Set when the sender names the study (FHIR ImagingStudy, or an HL7 ZDS/IPC study UID).
    study_uid: str = ""
    procedure_code: str = ""
    procedure_coding_system: str = ""
    procedure_text: str = ""
    # None: the event does not state a priority (ImagingStudy); it never downgrades one.
    priority: Priority | None = None
    # The raw priority as the sender wrote it ("S", "stat"), and which field it came from
    # ("ORC-7", "TQ1-9", "OBR-27", "ServiceRequest.priority"), for the audit trail.
    priority_raw: str = ""
    priority_field: str = ""
    indication: str = Field(default="", max_length=INDICATION_MAX)
    indication_codes: tuple[str, ...] = ()
    patient_class: PatientClass = "unknown"
    status: OrderStatus = "active"
    received_at: datetime = Field(default_factory=utcnow)
