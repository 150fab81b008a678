"""`triage.alerts.ich` / `triage.alerts.stroke`: one critical finding for the emergency team."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from schemas.base import Event, utcnow
from schemas.findings import SliceRange
from schemas.orders import PatientClass
from schemas.requests import FindingCode, Lane, Laterality


def alert_id(study_uid: str, finding: str) -> str:
    """The identity of an alert: one per study and finding, whatever is retried."""
    return f"{study_uid}/{finding}"


class Alert(Event):
    alert_id: str
    study_uid: str
    accession_number: str = ""
    finding: FindingCode
    probability: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)
    model_name: str
    model_version: str
    lane: Lane
    # First instance received, and study complete: the two starts of the latency clock.
    received_at: datetime
    ready_at: datetime
    alerted_at: datetime = Field(default_factory=utcnow)
    trace_id: str = ""
    # The side, for findings that have one (LVO): where the stroke team looks first.
    laterality: Laterality | None = None
    laterality_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    # The slices the finding is on, for models that localise (ICH): which images the
    # radiologist opens first. Optional like the side: older alerts and other findings have none.
    slice_range: SliceRange | None = None
    # Where the patient is (emergency, inpatient, outpatient), when the join knew it: the
    # notify stage's on-call rules match it as the patient location.
    patient_class: PatientClass = "unknown"
