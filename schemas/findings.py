"""`triage.findings`: what a model said about one series."""

from __future__ import annotations

from datetime import datetime
from typing import Self

from pydantic import Field, model_validator

from schemas.base import Event, utcnow
from schemas.requests import FindingCode, Lane, Laterality


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
    # Optional (schema_version unchanged: a reader of these fields' absence gets None, as
    # for the other optional fields added since v1). Models with a side output (the LVO
    # detector) state the side of a positive finding and how sure they are of it.
    laterality: Laterality | None = None
    # P(the stated side is the affected one); set exactly when laterality is left/right.
    laterality_probability: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _side_and_its_probability_together(self) -> Self:
        sided = self.laterality in ("left", "right")
        if sided != (self.laterality_probability is not None):
            raise ValueError(
                "laterality_probability is given exactly when laterality is left or right "
                f"(laterality={self.laterality!r}, laterality_probability={self.laterality_probability!r})"
            )
        return self
