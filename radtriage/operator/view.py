"""The operator page's picture of the pipeline: a pure fold of facts into a bounded view.

`fold(view, fact, limits)` returns a new `View` and never touches its input, so the
observer can hand the same view to every page while the next one is built, and the
unit tests drive it with schema objects alone. Facts are what the observer read from
Kafka (`Observed`, `Unreadable`), what the replay ledger says (`LedgerLoaded`), and
whether Kafka answers (`LogStatus`).

Order does not matter between topics: during the start-up lookback the page reads
every topic at once, so an acknowledgement may come before its alert, or a finding
before the request it finishes. Acknowledgements are kept apart from alerts and joined
when the snapshot is taken; finished request ids are remembered so a late request copy
does not reopen work that is done.

No patient id is ever copied into the view: rows keep study UID, accession, codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeVar

from radtriage.operator.decode import Observed, Unreadable
from radtriage.replay import Action, Coordinates, classify
from radtriage.settings import LANES
from schemas.alerts import Alert
from schemas.audit import ACK_DECISION, AuditEvent
from schemas.base import EventDecodeError
from schemas.deadletter import DeadLetter
from schemas.findings import Finding
from schemas.requests import TriageRequest
from schemas.results import ResultHeaders
from schemas.studies import StudyEvent
from streams.routing import request_id

# Distinct trace ids remembered per study (a re-sent study starts another trace).
MAX_TRACES_PER_STUDY = 4

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Limits:
    alerts: int = 200
    studies: int = 2000
    finished: int = 100
    deadletters: int = 200


@dataclass(frozen=True)
class AlertRow:
    alert_id: str
    study_uid: str
    accession_number: str
    finding: str
    probability: float
    threshold: float
    model_name: str
    model_version: str
    lane: str
    received_at: datetime
    alerted_at: datetime
    topic: str


@dataclass(frozen=True)
class Ack:
    by: str
    at: datetime


@dataclass(frozen=True)
class Told:
    """One notification a person received (streams/stages/notify.py `notify_delivered`)."""

    recipient: str
    channel: str
    step: int
    at: datetime


@dataclass(frozen=True)
class WorkItem:
    """A request routed to a lane and not finished yet."""

    request_id: str
    study_uid: str
    accession_number: str
    lane: str
    finding: str
    model_name: str
    rule_id: str
    routed_at: datetime
    upgraded_from: str | None = None


@dataclass(frozen=True)
class FinishedRow:
    request_id: str
    study_uid: str
    accession_number: str
    finding: str
    probability: float
    threshold: float
    positive: bool
    model_name: str
    model_version: str
    lane: str
    ready_at: datetime
    inferred_at: datetime


@dataclass(frozen=True)
class LetterRow:
    coords: Coordinates
    letter: DeadLetter  # the payload stays here for replay; it is never rendered
    traceparent: str = ""


@dataclass(frozen=True)
class StudyTrack:
    """When each stage of one study happened, from the events' own timestamps."""

    study_uid: str
    accession_number: str = ""
    received_at: datetime | None = None
    ready_at: datetime | None = None
    routed_at: datetime | None = None
    lane: str = ""
    inferred_at: datetime | None = None
    reported_at: datetime | None = None
    alerted_at: datetime | None = None
    dead_lettered_at: datetime | None = None
    dead_letter_stage: str = ""
    trace_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogStatus:
    available: bool
    detail: str = ""
    since: datetime | None = None


@dataclass(frozen=True)
class LedgerLoaded:
    """The replay ledger's letters (replay/replayed.jsonl), read at start and after a replay."""

    replayed: frozenset[Coordinates]


Fact = Observed | Unreadable | LedgerLoaded | LogStatus
Done = Literal["finding", "deadletter"]


@dataclass(frozen=True)
class View:
    alerts: Mapping[str, AlertRow] = field(default_factory=dict)
    acks: Mapping[str, Ack] = field(default_factory=dict)
    # By alert id: who the notify stage told, and until when the current step has to
    # acknowledge (None once the escalation stopped on an acknowledgement).
    notified: Mapping[str, tuple[Told, ...]] = field(default_factory=dict)
    due: Mapping[str, datetime | None] = field(default_factory=dict)
    open_work: Mapping[str, WorkItem] = field(default_factory=dict)
    done: Mapping[str, Done] = field(default_factory=dict)
    finished: tuple[FinishedRow, ...] = ()
    letters: Mapping[Coordinates, LetterRow] = field(default_factory=dict)
    # Dead letters replayed: seen replayed on Kafka (header) or recorded in the ledger.
    replays_seen: Mapping[Coordinates, Coordinates] = field(default_factory=dict)
    ledger: frozenset[Coordinates] = frozenset()
    studies: Mapping[str, StudyTrack] = field(default_factory=dict)
    unreadable: Mapping[str, int] = field(default_factory=dict)
    status: LogStatus = LogStatus(False, "connecting to the event log")
    # Bumped on every change: pages skip pushes that change nothing.
    version: int = 0


# -- helpers ----------------------------------------------------------------------------------


def _put(mapping: Mapping[K, V], key: K, value: V, limit: int) -> dict[K, V]:
    """A copy with key set (moved to the newest end) and the oldest entries dropped."""
    out = dict(mapping)
    out.pop(key, None)
    out[key] = value
    while len(out) > limit:
        del out[next(iter(out))]
    return out


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _track(
    view: View, study_uid: str, accession: str, trace_id: str, limits: Limits, **stages: object
) -> View:
    """Merge stage times into a study's track: earliest for starts, latest for ends."""
    old = view.studies.get(study_uid) or StudyTrack(study_uid)
    new = replace(old, accession_number=old.accession_number or accession)
    for name, value in stages.items():
        if value is None or value == "":
            continue
        if name in ("received_at", "ready_at", "routed_at", "dead_lettered_at"):
            new = replace(new, **{name: _earliest(getattr(new, name), value)})  # type: ignore[arg-type]
        elif name in ("inferred_at", "reported_at", "alerted_at"):
            new = replace(new, **{name: _latest(getattr(new, name), value)})  # type: ignore[arg-type]
        else:
            new = replace(new, **{name: value})  # type: ignore[arg-type]
    if trace_id and trace_id not in new.trace_ids:
        new = replace(new, trace_ids=(*new.trace_ids, trace_id)[-MAX_TRACES_PER_STUDY:])
    return replace(view, studies=_put(view.studies, study_uid, new, limits.studies))


class _OfStudy(Protocol):
    """An event that names its study itself (studies, requests, findings, alerts, results)."""

    @property
    def study_uid(self) -> str: ...

    @property
    def accession_number(self) -> str: ...


def _track_event(view: View, event: _OfStudy, trace_id: str, limits: Limits, **stages: object) -> View:
    """`_track` for the study an event names, with the event's own accession number."""
    return _track(view, event.study_uid, event.accession_number, trace_id, limits, **stages)


def _as_utc(text: object, fallback: datetime) -> datetime:
    if isinstance(text, str):
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return fallback
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return fallback


def request_key(req: TriageRequest) -> str:
    return req.request_id or request_id(req.study_uid, req.rule_id, req.ready_at)


def _lane_rank(lane: str) -> int:
    return LANES.index(lane) if lane in LANES else len(LANES)


# -- the fold ---------------------------------------------------------------------------------


def fold(view: View, fact: Fact, limits: Limits) -> View:
    """The view after `fact`; `view` itself is left as it was."""
    match fact:
        case LogStatus():
            if fact.available == view.status.available and fact.detail == view.status.detail:
                return view
            since = fact.since if fact.available != view.status.available else view.status.since
            new = replace(view, status=replace(fact, since=since))
        case LedgerLoaded():
            if fact.replayed == view.ledger:
                return view
            new = replace(view, ledger=fact.replayed)
        case Unreadable():
            counts = dict(view.unreadable)
            counts[fact.coords.topic] = counts.get(fact.coords.topic, 0) + 1
            new = replace(view, unreadable=counts)
        case Observed():
            new = _fold_event(view, fact, limits)
            if new is view:
                return view
    return replace(new, version=view.version + 1)


def _fold_event(view: View, obs: Observed, limits: Limits) -> View:
    event = obs.event
    match event:
        case Alert():
            return _alert(view, event, obs, limits)
        case AuditEvent():
            return _audit(view, event, limits)
        case TriageRequest():
            return _request(view, event, obs, limits)
        case Finding():
            return _finding(view, event, obs, limits)
        case ResultHeaders():
            return _track_event(view, event, obs.trace_id, limits, reported_at=event.produced_at)
        case DeadLetter():
            return _dead_letter(view, event, obs, limits)
        case StudyEvent():
            return _track_event(
                view, event, obs.trace_id, limits, received_at=event.received_at, ready_at=event.ready_at
            )
    return view


def _alert(view: View, alert: Alert, obs: Observed, limits: Limits) -> View:
    row = AlertRow(
        alert_id=alert.alert_id,
        study_uid=alert.study_uid,
        accession_number=alert.accession_number,
        finding=alert.finding,
        probability=alert.probability,
        threshold=alert.threshold,
        model_name=alert.model_name,
        model_version=alert.model_version,
        lane=alert.lane,
        received_at=alert.received_at,
        alerted_at=alert.alerted_at,
        topic=obs.coords.topic,
    )
    # One alert per study and finding is the stream's promise; should a copy come anyway
    # (a replayed finding), the first one stays the one the page shows and acknowledges.
    alerts = (
        view.alerts
        if alert.alert_id in view.alerts
        else _put(view.alerts, alert.alert_id, row, limits.alerts)
    )
    view = replace(view, alerts=alerts)
    trace_id = alert.trace_id or obs.trace_id
    return _track_event(
        view,
        alert,
        trace_id,
        limits,
        received_at=alert.received_at,
        ready_at=alert.ready_at,
        alerted_at=alert.alerted_at,
        lane=alert.lane,
    )


def ack_of(event: AuditEvent) -> tuple[str, Ack] | None:
    """An acknowledgement audit event's alert id and who/when; None if it is not one."""
    if event.stage != "alert" or event.decision != ACK_DECISION:
        return None
    alert_key, by = event.detail.get("alert_id"), event.detail.get("by")
    if not isinstance(alert_key, str) or not alert_key or not isinstance(by, str) or not by.strip():
        return None
    return alert_key, Ack(by.strip(), _as_utc(event.detail.get("at"), event.at))


def _notify(view: View, event: AuditEvent, limits: Limits) -> View:
    """The notify stage's record of an alert: deliveries, and when its current step is due."""
    alert_key = event.detail.get("alert_id")
    if not isinstance(alert_key, str) or not alert_key:
        return view
    d = event.detail
    if event.decision == "notify_delivered":
        told = Told(str(d.get("recipient", "")), str(d.get("channel", "")), int(d.get("step", 0)), event.at)
        before = view.notified.get(alert_key, ())
        if any(t.recipient == told.recipient and t.step == told.step for t in before):
            return view  # a copy re-sent after a kill: the first delivery is the one shown
        notified = _put(view.notified, alert_key, (*before, told), limits.alerts * 4)
        return replace(view, notified=notified)
    if event.decision in ("notify_opened", "notify_step"):
        due_text = d.get("due_at")
        due = _as_utc(due_text, event.at) if isinstance(due_text, str) and due_text else None
        current = view.due.get(alert_key)
        if due is not None and (alert_key not in view.due or (current is not None and due > current)):
            return replace(view, due=_put(view.due, alert_key, due, limits.alerts * 4))
        return view
    if event.decision == "notify_stopped" and d.get("reason") == "acknowledged":
        return replace(view, due=_put(view.due, alert_key, None, limits.alerts * 4))
    return view


def _audit(view: View, event: AuditEvent, limits: Limits) -> View:
    if event.stage == "notify":
        return _notify(view, event, limits)
    found = ack_of(event)
    if found is None:
        return view
    alert_key, ack = found
    existing = view.acks.get(alert_key)
    # The first acknowledgement is the one on record, whichever order they are read in.
    if existing is not None and existing.at <= ack.at:
        return view
    # Acks may be read before their alerts: bounded with a margin over the alerts' bound.
    return replace(view, acks=_put(view.acks, alert_key, ack, limits.alerts * 4))


def _request(view: View, req: TriageRequest, obs: Observed, limits: Limits) -> View:
    key = request_key(req)
    view = _track_event(
        view,
        req,
        obs.trace_id,
        limits,
        received_at=req.received_at,
        ready_at=req.ready_at,
        routed_at=req.routed_at,
    )
    if obs.replay_of is not None:
        view = replace(
            view, replays_seen=_put(view.replays_seen, obs.replay_of, obs.coords, limits.deadletters * 4)
        )
    done = view.done.get(key)
    # Finished for good, or dead-lettered and this is not the replay that retries it.
    if done == "finding" or (done == "deadletter" and obs.replay_of is None):
        return view
    done_map = dict(view.done)
    done_map.pop(key, None)
    current = view.open_work.get(key)
    if current is not None and _lane_rank(current.lane) <= _lane_rank(req.lane) and done is None:
        return replace(view, done=done_map)  # an upgrade only ever moves work to a faster lane
    item = WorkItem(
        request_id=key,
        study_uid=req.study_uid,
        accession_number=req.accession_number,
        lane=req.lane,
        finding=req.finding,
        model_name=req.model_name,
        rule_id=req.rule_id,
        # Waiting since it was first routed: an upgrade does not reset the clock.
        routed_at=min(req.routed_at, current.routed_at) if current else req.routed_at,
        upgraded_from=req.upgraded_from or (current.lane if current and current.lane != req.lane else None),
    )
    view = replace(view, open_work=_put(view.open_work, key, item, limits.studies), done=done_map)
    return _track(view, req.study_uid, "", "", limits, lane=_faster(view, req.study_uid, req.lane))


def _faster(view: View, study_uid: str, lane: str) -> str:
    known = view.studies.get(study_uid)
    if known and known.lane and _lane_rank(known.lane) < _lane_rank(lane):
        return known.lane
    return lane


def _close(view: View, key: str, how: Done, limits: Limits) -> View:
    open_work = dict(view.open_work)
    open_work.pop(key, None)
    if view.done.get(key) == "finding":
        return replace(view, open_work=open_work)
    return replace(view, open_work=open_work, done=_put(view.done, key, how, limits.studies * 2))


def _finding(view: View, finding: Finding, obs: Observed, limits: Limits) -> View:
    key = request_id(finding.study_uid, finding.rule_id, finding.ready_at)
    view = _close(view, key, "finding", limits)
    row = FinishedRow(
        request_id=key,
        study_uid=finding.study_uid,
        accession_number=finding.accession_number,
        finding=finding.finding,
        probability=finding.probability,
        threshold=finding.threshold,
        positive=finding.positive,
        model_name=finding.model_name,
        model_version=finding.model_version,
        lane=finding.lane,
        ready_at=finding.ready_at,
        inferred_at=finding.inferred_at,
    )
    if all(r.request_id != key for r in view.finished):  # a finding processed again (at-least-once)
        finished = sorted((*view.finished, row), key=lambda r: r.inferred_at, reverse=True)
        view = replace(view, finished=tuple(finished[: limits.finished]))
    return _track_event(
        view,
        finding,
        obs.trace_id,
        limits,
        received_at=finding.received_at,
        ready_at=finding.ready_at,
        inferred_at=finding.inferred_at,
    )


def _dead_letter(view: View, letter: DeadLetter, obs: Observed, limits: Limits) -> View:
    row = LetterRow(obs.coords, letter, obs.traceparent)
    view = replace(view, letters=_put(view.letters, obs.coords, row, limits.deadletters))
    study_uid = letter.study_uid
    if letter.stage.startswith("infer") and obs.coords not in view.replays_seen:
        # A lane's dead letter carries the request itself: that work is over (until replayed).
        try:
            req: TriageRequest | None = TriageRequest.from_bytes(letter.payload)
        except EventDecodeError:
            req = None
        if req is not None:
            view = _close(view, request_key(req), "deadletter", limits)
            study_uid = req.study_uid
    if not study_uid and letter.key in view.studies:
        study_uid = letter.key  # keyed by study UID; other keys (accessions, garbage) name no study
    if not study_uid:
        return view
    return _track(
        view, study_uid, "", obs.trace_id, limits, dead_lettered_at=letter.at, dead_letter_stage=letter.stage
    )


# -- the snapshot a page renders ------------------------------------------------------------


LetterState = Literal["replayable", "replayed", "not_replayable"]


@dataclass(frozen=True)
class LetterView:
    row: LetterRow
    state: LetterState
    reason: str = ""


@dataclass(frozen=True)
class Snapshot:
    now: datetime
    alerts: tuple[tuple[AlertRow, Ack | None], ...]
    lanes: Mapping[str, tuple[WorkItem, ...]]
    finished: tuple[FinishedRow, ...]
    letters: tuple[LetterView, ...]
    status: LogStatus
    unreadable: Mapping[str, int]
    version: int
    notified: Mapping[str, tuple[Told, ...]] = field(default_factory=dict)
    # Unacknowledged alerts whose current escalation step is past its timeout.
    overdue: frozenset[str] = frozenset()


def letter_state(view: View, row: LetterRow, consumed: frozenset[str]) -> tuple[LetterState, str]:
    """The replay rule of `radtriage replay` (radtriage/replay.py classify), per letter."""
    already = row.coords in view.ledger or row.coords in view.replays_seen
    action: Action
    action, reason = classify(row.letter, consumed, already)
    if action == "replay":
        return "replayable", ""
    if action == "already_replayed":
        return "replayed", ""
    return "not_replayable", reason


def snapshot(view: View, now: datetime, consumed: frozenset[str]) -> Snapshot:
    alerts = sorted(view.alerts.values(), key=lambda a: a.alerted_at, reverse=True)
    lanes: dict[str, tuple[WorkItem, ...]] = {
        lane: tuple(sorted((w for w in view.open_work.values() if w.lane == lane), key=lambda w: w.routed_at))
        for lane in LANES
    }
    letters = sorted(view.letters.values(), key=lambda r: (r.letter.at, r.coords), reverse=True)
    return Snapshot(
        now=now,
        alerts=tuple((a, view.acks.get(a.alert_id)) for a in alerts),
        lanes=lanes,
        finished=view.finished,
        letters=tuple(LetterView(r, *letter_state(view, r, consumed)) for r in letters),
        status=view.status,
        unreadable=dict(view.unreadable),
        version=view.version,
        notified={a.alert_id: view.notified[a.alert_id] for a in alerts if a.alert_id in view.notified},
        overdue=frozenset(
            a.alert_id
            for a in alerts
            if a.alert_id not in view.acks and (due := view.due.get(a.alert_id)) is not None and due < now
        ),
    )
