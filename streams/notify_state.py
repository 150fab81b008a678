"""Escalation state of the notify stage, folded from `triage.audit` (pure).

The record of who was told what is the audit topic itself, as the alert ledger's record
of what was alerted is the alert topic (streams/published_ledger.py): the stage puts each
step it starts, each try and each delivery on `triage.audit` (acks=all) and folds the same
event into this state; a worker taking over a partition folds that partition of the audit
topic (and of the alert topics, for the alerts themselves) before acting on it. Audit and
alert topics are keyed by study UID with one partition count, so an alert, its
notifications and its acknowledgements share a partition.

Folding is idempotent (sets and maxima), so reading an event twice — once from the
worker's own write, once from the stream or the read-back — changes nothing.

Decisions (stage "notify", detail always has `alert_id`):
- notify_opened: the chain starts (step 0) at `at`;
- notify_step: step `step` starts at `at` (the previous one timed out);
- notify_attempt: one try of `channel` for `recipient` at `step` (`error` "" = it worked);
- notify_delivered / notify_undeliverable: `key` (alert+recipient+step) is done;
- notify_stopped: `reason` acknowledged | exhausted | no_recipients: nothing more is sent;
- notify_skipped: `reason` too_old: the alert was older than notify.max_alert_age_s when read.
Acknowledgements are stage "alert", decision ACK_DECISION (the operator page's record).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from processors.notify.rota import PlannedStep
from processors.notify.signing import idempotency_key
from schemas.alerts import Alert
from schemas.audit import ACK_DECISION, AuditEvent

OPENED = "notify_opened"
STEP = "notify_step"
ATTEMPT = "notify_attempt"
DELIVERED = "notify_delivered"
UNDELIVERABLE = "notify_undeliverable"
STOPPED = "notify_stopped"
# An alert read too late to page anyone for (notify.max_alert_age_s): no escalation opens.
SKIPPED = "notify_skipped"


def _at(event: AuditEvent) -> datetime:
    text = event.detail.get("at")
    if isinstance(text, str):
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    return event.at


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


@dataclass
class Escalation:
    alert_id: str
    study_uid: str
    accession_number: str
    opened_at: datetime
    step: int = 0
    step_at: datetime | None = None
    # Idempotency keys delivered or given up on: never sent again.
    done: set[str] = field(default_factory=set)
    undeliverable: set[str] = field(default_factory=set)
    acked_by: str = ""
    acked_at: datetime | None = None
    stopped: str = ""

    @property
    def started(self) -> datetime:
        return self.step_at or self.opened_at


@dataclass
class NotifyState:
    escalations: dict[str, Escalation] = field(default_factory=dict)
    alerts: dict[str, Alert] = field(default_factory=dict)
    # Acknowledgements read before their alert's escalation opened (the ack may be read first).
    early_acks: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    # Alerts read too late to page anyone for (SKIPPED), by when.
    skipped: dict[str, datetime] = field(default_factory=dict)

    def add_alert(self, alert: Alert) -> None:
        self.alerts.setdefault(alert.alert_id, alert)

    def apply(self, event: AuditEvent) -> None:
        alert_id = event.detail.get("alert_id")
        if not isinstance(alert_id, str) or not alert_id:
            return
        if event.stage == "alert" and event.decision == ACK_DECISION:
            by = event.detail.get("by")
            who = by if isinstance(by, str) and by.strip() else "unknown"
            self._ack(alert_id, who, _at(event))
            return
        if event.stage != "notify":
            return
        at = _at(event)
        if event.decision == SKIPPED:
            self.skipped.setdefault(alert_id, at)
            return
        if event.decision == OPENED:
            esc = self.escalations.get(alert_id)
            if esc is None:
                esc = Escalation(alert_id, event.study_uid, event.accession_number, at)
                self.escalations[alert_id] = esc
                early = self.early_acks.pop(alert_id, None)
                if early is not None:
                    self._ack(alert_id, *early)
            elif at < esc.opened_at:
                esc.opened_at = at  # two opens (a race on takeover): the first one counts
            return
        esc = self.escalations.get(alert_id)
        if esc is None:
            return
        key = event.detail.get("key")
        if event.decision == STEP:
            step = _int(event.detail.get("step"))
            if step > esc.step:
                esc.step, esc.step_at = step, at
        elif event.decision in (DELIVERED, UNDELIVERABLE) and isinstance(key, str):
            esc.done.add(key)
            if event.decision == UNDELIVERABLE:
                esc.undeliverable.add(key)
            else:
                esc.undeliverable.discard(key)
        elif event.decision == STOPPED and not esc.stopped:
            reason = event.detail.get("reason")
            esc.stopped = reason if isinstance(reason, str) and reason else "stopped"

    def _ack(self, alert_id: str, by: str, at: datetime) -> None:
        esc = self.escalations.get(alert_id)
        if esc is None:
            self.early_acks.setdefault(alert_id, (by, at))
            return
        # The first acknowledgement is the one on record.
        if esc.acked_at is None or at < esc.acked_at:
            esc.acked_by, esc.acked_at = by, at

    def prune(self, now: datetime, keep_s: float) -> None:
        """Forget escalations opened longer ago than `keep_s` (bounded memory)."""
        horizon = now - timedelta(seconds=keep_s)
        for alert_id in [a for a, e in self.escalations.items() if e.opened_at < horizon]:
            del self.escalations[alert_id]
            self.alerts.pop(alert_id, None)
        for alert_id in [a for a, al in self.alerts.items() if al.alerted_at < horizon]:
            del self.alerts[alert_id]
        for alert_id in [a for a, (_, at) in self.early_acks.items() if at < horizon]:
            del self.early_acks[alert_id]
        for alert_id in [a for a, at in self.skipped.items() if at < horizon]:
            del self.skipped[alert_id]

    def unopened(self) -> list[Alert]:
        """Alerts read with neither an escalation nor a skip: on a partition's takeover, those
        whose open record never reached Kafka (the worker died after the alert's offset was
        committed, before the record's ack) and those the stream has not delivered yet."""
        return [
            a
            for a in self.alerts.values()
            if a.alert_id not in self.escalations and a.alert_id not in self.skipped
        ]


@dataclass(frozen=True)
class Send:
    """Tell these recipients of this step (none of them has it yet)."""

    alert_id: str
    step: PlannedStep
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class Escalate:
    alert_id: str
    step: int


@dataclass(frozen=True)
class Stop:
    alert_id: str
    reason: str


Action = Send | Escalate | Stop
Plan = Callable[[Escalation], tuple[PlannedStep, ...] | None]


def pending(esc: Escalation, step: PlannedStep) -> tuple[str, ...]:
    return tuple(r for r in step.recipients if idempotency_key(esc.alert_id, r, step.index) not in esc.done)


def next_action(esc: Escalation, chain: tuple[PlannedStep, ...], now: datetime) -> Action | None:
    """What one escalation needs now: stop (acknowledged, chain over), tell the current
    step's recipients who do not have it yet, move to the next step, or nothing."""
    if esc.stopped:
        return None
    if esc.acked_at is not None:
        return Stop(esc.alert_id, "acknowledged")
    if not chain:
        return Stop(esc.alert_id, "no_recipients")
    current = chain[min(esc.step, len(chain) - 1)]
    waiting = pending(esc, current)
    if waiting:
        return Send(esc.alert_id, current, waiting)
    if current.timeout_s is None:
        return Stop(esc.alert_id, "exhausted")
    if now >= esc.started + timedelta(seconds=current.timeout_s):
        if esc.step + 1 < len(chain):
            return Escalate(esc.alert_id, esc.step + 1)
        return Stop(esc.alert_id, "exhausted")
    return None


def due(state: NotifyState, plan: Plan, now: datetime) -> Iterator[Action]:
    """The next action of every escalation that has one (those whose chain can be planned)."""
    for esc in list(state.escalations.values()):
        if esc.stopped:
            continue
        chain = plan(esc)
        if chain is None:
            continue  # its alert has not been read yet
        action = next_action(esc, chain, now)
        if action is not None:
            yield action


# What the stream needs of `triage.audit`: acknowledgements, and notify records (its own,
# already folded when written; another worker's around a rebalance). Every other stage's
# records are most of the topic: skipped by a substring test instead of a JSON decode.
_ACK = ACK_DECISION.encode()
_NOTIFY = b"notify_"


def relevant_audit(value: bytes | None) -> bool:
    return value is not None and (_ACK in value or _NOTIFY in value)


def age_s(alert: Alert, now: datetime) -> float:
    """How old the alert is: too old (notify.max_alert_age_s) when first read, nobody is paged."""
    return (now - alert.alerted_at).total_seconds()


def due_at(start: datetime, timeout_s: float) -> str:
    """When a step started at `start` is overdue (for the operator page)."""
    return (start + timedelta(seconds=timeout_s)).isoformat()


def record(alert: Alert, decision: str, **detail: str | float | int | bool) -> AuditEvent:
    """The notify record of `decision` about `alert`, stamped now (folded by `NotifyState.apply`)."""
    now = datetime.now(UTC)
    return AuditEvent(
        study_uid=alert.study_uid,
        accession_number=alert.accession_number,
        stage="notify",
        decision=decision,
        detail={"alert_id": alert.alert_id, "at": now.isoformat(), "finding": alert.finding, **detail},
        at=now,
    )
