"""`imaging.encounters`: where a patient is now (emergency / inpatient / outpatient), keyed by patient id.

Published by the HL7 v2 listener for ADT^A01 (admit), A04 (register) and A08
(update) from PV1-2 patient class. The order-study join uses it for studies whose
order has not arrived: an emergency-department head CT without an order is stat.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.base import Event, utcnow
from schemas.orders import PatientClass


class EncounterEvent(Event):
    patient_id: str = Field(min_length=1, max_length=64)
    patient_class: PatientClass
    # "ADT^A01", "ADT^A04", "ADT^A08"
    message_type: str
    source: Literal["hl7", "fhir"] = "hl7"
    source_message_id: str = ""
    # PV1-19 visit number: an id, useful to tell two encounters of one patient apart.
    visit_number: str = ""
    received_at: datetime = Field(default_factory=utcnow)
