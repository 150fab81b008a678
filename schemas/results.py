"""`triage.results.fhir`: the FHIR R4 result for a study, as a `collection` Bundle.

The Bundle holds the DiagnosticReport and the Observations it references, so an
EHR consumer gets one self-contained, R4-valid document per finding.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from schemas.base import Event, utcnow
from schemas.requests import FindingCode


class FhirResult(Event):
    study_uid: str
    accession_number: str = ""
    finding: FindingCode
    bundle: dict[str, Any]
    produced_at: datetime = Field(default_factory=utcnow)
    # The finding's request id: one result per finding, whatever is replayed.
    request_id: str = ""
