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
from schemas.studies import SeriesHeaders, SeriesRef, StudyEvent


class SeriesState(SeriesHeaders):
    """A series being assembled: its headers (from its first instance; `frames` summed
    over its distinct instances) and its instances so far."""

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
    # Set when the study was emitted. The state is kept (instances and all) for
    # `EMITTED_RETENTION_S`: an instance arriving after a quiet-period emission — a sender
    # stalled longer than the quiet period, e.g. by a Kafka leader failover — re-opens the
    # study, and the next completion emits all of it, not the late part alone (the
    # 3-broker fault test lost a study whose first slice went out alone that way).
    emitted_at: datetime | None = None
    # Every emission's ready time, by the event that completed it (`completion_key`). A
    # later emission is always readier than an earlier one: the infer stage drops a read
    # older than one it already took (streams/stages/infer.LatestReads), and event times
    # need not follow log order (a quiet-period nudge stamped after a release marker that
    # reached Kafka later; the fault test lost a study's full read to its partial one
    # that way). Replaying a completion finds its ready time here, so a worker that
    # takes over repeats the same request ids for the ledgers to recognise.
    emissions: dict[str, datetime] = Field(default_factory=dict)
    # Per association (or STOW request) id, how many of the study's instances it delivered
    # first. Its release marker says how many it stored (`instance_count`); fewer here means
    # the table lost instance events it had folded, and the assemble stage re-reads them
    # from the log before emitting (`shortfall`, streams/assembly_reread.py).
    delivered: dict[str, int] = Field(default_factory=dict)


# How many emissions' ready times a study keeps (a study re-opens a few times at most).
MAX_EMISSIONS = 32
# How long an emitted study's state is kept to catch late instances.
EMITTED_RETENTION_S = 3600.0


def add_instance(state: AssemblyState | None, event: InstanceEvent, traceparent: str) -> AssemblyState:
    """Fold one stored instance into the study's state (new state; inputs unchanged)."""
    if state is None:
        state = AssemblyState(
            study_uid=event.study_uid,
            received_at=event.received_at,
            last_instance_at=event.received_at,
            traceparent=traceparent,
        )
    elif state.emitted_at is not None and _already_has(state, event):
        return state  # the same instance again (a sender's retry): nothing new to emit
    else:
        # A late instance re-opens an emitted study (see AssemblyState.emitted_at).
        state = state.model_copy(deep=True, update={"emitted_at": None})
    state.accession_number = state.accession_number or event.accession_number
    state.patient_id = state.patient_id or event.patient_id
    state.study_description = state.study_description or event.study_description
    state.received_at = min(state.received_at, event.received_at)
    state.last_instance_at = max(state.last_instance_at, event.received_at)
    # The series' headers from its first instance (InstanceEvent names them alike); frames
    # are counted per distinct instance below.
    headers = event.model_dump(include=set(SeriesHeaders.model_fields)) | {"frames": 0}
    series = state.series.setdefault(event.series_uid, SeriesState(**headers))
    if event.sop_instance_uid not in series.instances:
        series.frames += event.frames
        if event.association_id:
            state.delivered[event.association_id] = state.delivered.get(event.association_id, 0) + 1
    series.instances[event.sop_instance_uid] = event.blob_uri
    return state


def shortfall(state: AssemblyState | None, marker: InstanceEvent) -> int:
    """How many of the instances a release marker announces the state does not account for.

    Counted per association, so a study sent one series per association (as scanners do)
    is checked association by association. An instance re-sent in a second association
    counts for the first, so a resend can report a shortfall the log then disproves;
    `missing_instances` is the exact check.
    """
    if marker.kind != "transfer_complete" or not marker.association_id:
        return 0
    have = state.delivered.get(marker.association_id, 0) if state is not None else 0
    return max(0, marker.instance_count - have)


def missing_instances(state: AssemblyState | None, events: list[InstanceEvent]) -> list[InstanceEvent]:
    """The instance events (read back from the log) whose instance the state does not hold,
    first copy of each."""
    seen: set[str] = set()
    missing: list[InstanceEvent] = []
    for event in events:
        if event.kind != "instance" or event.sop_instance_uid in seen:
            continue
        seen.add(event.sop_instance_uid)
        series = state.series.get(event.series_uid) if state is not None else None
        if series is None or event.sop_instance_uid not in series.instances:
            missing.append(event)
    return missing


def _already_has(state: AssemblyState, event: InstanceEvent) -> bool:
    series = state.series.get(event.series_uid)
    return series is not None and series.instances.get(event.sop_instance_uid) == event.blob_uri


def is_quiet(state: AssemblyState, at: datetime, quiet_s: float) -> bool:
    """No instance for `quiet_s` before `at`. The assemble stage asks it with the nudge's own
    time, not its processing time: a worker catching up on a backlog (after taking over a
    killed one's partitions) must not split a study whose instances came without a pause."""
    return state.emitted_at is None and at - state.last_instance_at >= timedelta(seconds=quiet_s)


def completion_key(event: InstanceEvent) -> str:
    """The identity of a completing event (a release marker or a nudge), for replays."""
    return f"{event.kind}/{event.association_id}/{event.received_at.isoformat()}"


def ready_time(state: AssemblyState, key: str, at: datetime) -> datetime:
    """The ready time of the emission `key` completes: its event time, unless an earlier
    emission was readier (see AssemblyState.emissions), and the same again on a replay."""
    if key in state.emissions:
        return state.emissions[key]
    latest = max(state.emissions.values(), default=None)
    return at if latest is None or at > latest else latest + timedelta(microseconds=1)


def mark_emitted(state: AssemblyState, at: datetime, key: str = "") -> AssemblyState:
    emissions = {**state.emissions, key or at.isoformat(): at}
    if len(emissions) > MAX_EMISSIONS:  # the oldest go: a replay reaches back moments, not hours
        emissions = dict(sorted(emissions.items(), key=lambda kv: kv[1])[-MAX_EMISSIONS:])
    return state.model_copy(deep=True, update={"emitted_at": at, "emissions": emissions})


def expired(state: AssemblyState, now: datetime, retention_s: float = EMITTED_RETENTION_S) -> bool:
    """An emitted study's state past its retention: nothing late is expected any more."""
    return state.emitted_at is not None and now - state.emitted_at >= timedelta(seconds=retention_s)


def complete_study(
    state: AssemblyState,
    reason: Literal["transfer_complete", "quiet_period"],
    now: datetime | None = None,
    key: str = "",
) -> StudyEvent:
    """The study as assembled so far, ready at `now` (see `ready_time` for `key`)."""
    at = now or datetime.now(UTC)
    return StudyEvent(
        study_uid=state.study_uid,
        accession_number=state.accession_number,
        patient_id=state.patient_id,
        study_description=state.study_description,
        series=tuple(
            SeriesRef(
                series_uid=uid,
                # Sorted for a stable event; geometry order is the loader's job (by position).
                instance_uris=tuple(sorted(s.instances.values())),
                **s.model_dump(exclude={"instances"}),
            )
            for uid, s in sorted(state.series.items())
        ),
        received_at=state.received_at,
        ready_at=ready_time(state, key, at) if key else at,
        ready_reason=reason,
    )
