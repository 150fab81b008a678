"""`triage.deadletter`: anything that could not be processed, with the reason and the original bytes."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from schemas.base import Event, utcnow


class DeadLetter(Event):
    source_topic: str
    stage: str
    error: str
    key: str = ""
    partition: int | None = None
    offset: int | None = None
    study_uid: str = ""
    # The undecodable or failed payload, as text (utf-8 with replacement), for replay and forensics.
    payload: str = ""
    # The failed record's Kafka headers (values as latin-1 text, so any bytes survive): a
    # replay sends them again, since some topics keep their metadata there (the results
    # topic's plain FHIR Bundle, schemas/results.py).
    headers: dict[str, str] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)
