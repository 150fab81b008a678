"""Study assembly: collect instance events until a study is complete.

A study is ready when the sender releases its association (the connector's
`transfer_complete` marker), or when no instance arrived for the quiet period (the
sender aborted, or sends one instance per association). The state lives in a Faust
table keyed by StudyInstanceUID; these pure functions compute it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.instances import InstanceEvent
from schemas.studies import SeriesRef, StudyEvent


class SeriesState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: str
    body_part: str = ""
    series_description: str = ""
    # SOP Instance UID -> blob URI; a re-sent instance replaces itself instead of doubling.
    instances: dict[str, str] = Field(default_factory=dict)


class AssemblyState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    study_description: str = ""
    series: dict[str, SeriesState] = Field(default_factory=dict)
    received_at: datetime
    last_instance_at: datetime
    # W3C traceparent of the first instance: the study's trace continues from it.
    traceparent: str = ""


def add_instance(state: AssemblyState | None, event: InstanceEvent, traceparent: str) -> AssemblyState:
    """Fold one stored instance into the study's state (new state; inputs unchanged)."""
    if state is None:
        state = AssemblyState(
            study_uid=event.study_uid,
            received_at=event.received_at,
            last_instance_at=event.received_at,
            traceparent=traceparent,
        )
    else:
        state = state.model_copy(deep=True)
    state.accession_number = state.accession_number or event.accession_number
    state.patient_id = state.patient_id or event.patient_id
    state.study_description = state.study_description or event.study_description
    state.received_at = min(state.received_at, event.received_at)
    state.last_instance_at = max(state.last_instance_at, event.received_at)
    series = state.series.setdefault(
        event.series_uid,
        SeriesState(
            modality=event.modality,
            body_part=event.body_part,
            series_description=event.series_description,
        ),
    )
    series.instances[event.sop_instance_uid] = event.blob_uri
    return state


def is_quiet(state: AssemblyState, now: datetime, quiet_s: float) -> bool:
    return now - state.last_instance_at >= timedelta(seconds=quiet_s)


def complete_study(
    state: AssemblyState,
    reason: Literal["transfer_complete", "quiet_period"],
    now: datetime | None = None,
) -> StudyEvent:
    return StudyEvent(
        study_uid=state.study_uid,
        accession_number=state.accession_number,
        patient_id=state.patient_id,
        study_description=state.study_description,
        series=tuple(
            SeriesRef(
                series_uid=uid,
                modality=s.modality,
                body_part=s.body_part,
                series_description=s.series_description,
                # Sorted for a stable event; geometry order is the loader's job (by position).
                instance_uris=tuple(sorted(s.instances.values())),
            )
            for uid, s in sorted(state.series.items())
        ),
        received_at=state.received_at,
        ready_at=now or datetime.now(UTC),
        ready_reason=reason,
    )
