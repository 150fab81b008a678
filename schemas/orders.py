"""`imaging.orders`: the latest state of an imaging order, keyed by accession number."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.base import Event, utcnow

Priority = Literal["stat", "asap", "urgent", "routine"]
PatientClass = Literal["emergency", "inpatient", "outpatient", "unknown"]


class OrderEvent(Event):
    accession_number: str
    placer_order_number: str = ""
    filler_order_number: str = ""
    patient_id: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    priority: Priority = "routine"
    indication: str = ""
    patient_class: PatientClass = "unknown"
    source: Literal["hl7", "fhir"] = "hl7"
    received_at: datetime = Field(default_factory=utcnow)
