"""`imaging.studies`: a study whose instances have all arrived, ready for routing."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import Event, utcnow


class SeriesRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    series_uid: str
    modality: str
    body_part: str = ""
    series_description: str = ""
    instance_uris: tuple[str, ...]


class StudyEvent(Event):
    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    study_description: str = ""
    series: tuple[SeriesRef, ...]
    # First instance received: the start of the end-to-end latency clock.
    received_at: datetime
    ready_at: datetime = Field(default_factory=utcnow)
    ready_reason: Literal["transfer_complete", "quiet_period"]
