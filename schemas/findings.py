"""`triage.findings`: what a model said about one series."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from schemas.base import Event, utcnow
from schemas.requests import FindingCode, Lane


class Finding(Event):
    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    series_uid: str
    finding: FindingCode
    probability: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)
    positive: bool
    model_name: str
    model_version: str
    lane: Lane
    rule_id: str
    received_at: datetime
    ready_at: datetime
    inferred_at: datetime = Field(default_factory=utcnow)
    inference_ms: float = Field(ge=0.0)
    # The request this answers (TriageRequest.request_id): the identity the findings and
    # reports ledgers deduplicate on (streams/published_ledger.py). Optional: older
    # findings have none.
    request_id: str = ""
