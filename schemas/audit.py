"""`triage.audit`: every decision taken about a study, for the record."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.base import Event, utcnow

# "export": a result object sent (or not) to a PACS (streams/stages/pacs_export.py).
AuditStage = Literal["route", "infer", "report", "alert", "notify", "ehr", "export"]

# An alert acknowledged by a person (the operator page's button or a notification's link):
# detail {alert_id, by, at, finding}; the notify stage stops escalating it.
ACK_DECISION = "alert_acknowledged"


class AuditEvent(Event):
    study_uid: str
    accession_number: str = ""
    stage: AuditStage
    # e.g. "routed", "unrouted", "positive", "negative", "alert_sent", "alert_suppressed_duplicate"
    decision: str
    detail: dict[str, str | float | int | bool] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)
