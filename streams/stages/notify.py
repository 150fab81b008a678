"""Notify: `triage.alerts.<channel>` + `triage.audit` -> the people on call (webhooks, e-mail),
`triage.audit` (every step, try and outcome), `triage.deadletter` (undeliverable).

An alert opens an escalation: its chain is the on-call file applied to the alert at the
moment it opened (processors/notify/rota.py); step 1 is told at once, and a timer moves an
unacknowledged alert to the next step when the step's timeout passes, then to the fallback.
An acknowledgement on `triage.audit` (the operator page's button, or a notification's link
through the HTTP intake) stops it. With nothing configured (`notify.webhooks`,
`notify.oncall_file`) no agent is registered: nothing is read, nothing is sent.

State survives a SIGKILL and a rebalance because it is the audit topic itself
(streams/notify_state.py): what the stage does is written there (acks=all) and folded in
as it is written, and a worker taking over a partition first folds that partition of the
audit and alert topics, over `notify.lookback_s`, reusing the published ledgers' reader
(streams/published_ledger.py). A notification is sent again only when it has no
`notify_delivered` record: a kill in the milliseconds between a peer accepting it and
Kafka acknowledging that record sends it once more, with the same Idempotency-Key header
(webhooks) or Message-ID (e-mail), by which the receiver recognises the copy.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from faust.types import EventT

from processors.notify import channels, message
from processors.notify.deliver import Try, deliver
from processors.notify.rota import PlannedStep, Subject, recipients_for, usable_channels, webhooks_only
from processors.notify.signing import AckClaim, idempotency_key, make_ack_token
from radtriage import metrics
from radtriage.settings import NotifySettings
from radtriage.telemetry import headers_for_current_span
from schemas.alerts import Alert
from schemas.audit import ACK_DECISION, AuditEvent
from schemas.base import EventDecodeError
from schemas.deadletter import DeadLetter
from schemas.oncall import Channel, Oncall, OncallError
from streams import notify_state as ns
from streams.app import publish
from streams.published_ledger import PublishedLedger
from streams.stages.context import PipelineContext
from streams.stages.notifying import Notifying, register_notifier

log = logging.getLogger(__name__)


def subject(alert: Alert) -> Subject:
    """What the on-call rules match: the finding, and the patient class as the location
    (no site is carried on alerts yet)."""
    return Subject(alert.finding, location="" if alert.patient_class == "unknown" else alert.patient_class)


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


def _due(start: datetime, timeout_s: float) -> str:
    return (start + timedelta(seconds=timeout_s)).isoformat()


def load_oncall(n: NotifySettings) -> Oncall | None:
    """The on-call picture: the file, else the webhooks alone, else None (nothing configured).
    A broken file or a webhook it names that is not configured stops the worker's start
    (OncallError naming the file and line; radtriage/worker.py checks it first)."""
    webhooks = n.named_webhooks()
    if n.oncall_file is None:
        return webhooks_only(webhooks)
    oncall = Oncall.load(n.oncall_file)
    missing = sorted(oncall.webhook_names() - set(webhooks))
    if missing:
        raise OncallError(f"{n.oncall_file}: webhook(s) {missing} are not in notify.webhooks")
    if not n.smtp.host and any(c.email for r in oncall.recipients.values() for c in r.channels):
        log.warning("notify: the on-call file names e-mail addresses but notify.smtp.host is empty")
    return oncall


class Notifier(Notifying):
    what = "notify"

    def __init__(self, ctx: PipelineContext, oncall: Oncall) -> None:
        super().__init__()
        self.ctx = ctx
        self.n = ctx.settings.notify
        self.oncall = oncall
        self.webhooks = self.n.named_webhooks()
        self.state = ns.NotifyState()
        self.alert_topics = tuple(t.get_topic_name() for t in ctx.topics.alerts.values())
        self.audit_topic = ctx.topics.audit.get_topic_name()
        self.retry_topic = ctx.settings.streams.notify_retry_topic
        # Reads a partition of the alert and audit topics into the state on takeover.
        self.record = PublishedLedger(
            "notify",
            ctx.settings.kafka,
            [*self.alert_topics, self.audit_topic],
            self._fold_bytes,
            lookback_s=self.n.lookback_s,
        )
        self.owned: set[int] = set()
        self.chains: dict[str, tuple[PlannedStep, ...]] = {}
        # Escalations being worked on now (one worker at a time per alert).
        self.busy: set[str] = set()
        # Open records sent and not yet known to be in Kafka: (study UID, record, headers, send).
        self.opening: dict[str, tuple[str, AuditEvent, Any, asyncio.Future[None]]] = {}

    # -- state -------------------------------------------------------------------------------

    def _fold_bytes(self, value: bytes | None) -> str | None:
        """The takeover read: audit records and alerts of one partition into the state."""
        try:
            self.state.apply(AuditEvent.from_bytes(value))
            return None
        except EventDecodeError:
            pass
        alert = Alert.from_bytes(value)  # neither: EventDecodeError, skipped by the reader
        self.state.add_alert(alert)
        return None

    def assigned(self, partitions: set[int]) -> None:
        self.owned = set(partitions)
        self.record.preload(sorted(partitions))

    def revoked(self) -> None:
        """Partitions may move: forget everything, and read again what is assigned next.
        Work in flight stops too: the partition's next owner finds what it left undone (a
        send cut short may reach its peer; the owner's copy then carries the same key)."""
        for task in list(self.tasks):
            task.cancel()
        self.busy.clear()
        self.opening.clear()  # the next owner finds an open that did not make it (unopened)
        self.record.forget_assignment()
        self.owned.clear()
        self.state = ns.NotifyState()
        self.chains.clear()

    async def ready(self, partition: int) -> None:
        await self.record.already_sent("", partition)

    def plan(self, esc: ns.Escalation) -> tuple[PlannedStep, ...] | None:
        chain = self.chains.get(esc.alert_id)
        if chain is None:
            alert = self.state.alerts.get(esc.alert_id)
            if alert is None:
                return None
            chain = recipients_for(subject(alert), self.oncall, esc.opened_at)
            self.chains[esc.alert_id] = chain
        return chain

    # -- records -----------------------------------------------------------------------------

    @staticmethod
    def _record(alert: Alert, decision: str, **detail: str | float | int | bool) -> AuditEvent:
        now = datetime.now(UTC)
        return AuditEvent(
            study_uid=alert.study_uid,
            accession_number=alert.accession_number,
            stage="notify",
            decision=decision,
            detail={"alert_id": alert.alert_id, "at": now.isoformat(), "finding": alert.finding, **detail},
            at=now,
        )

    async def note(self, alert: Alert, decision: str, **detail: str | float | int | bool) -> None:
        """One notify record on `triage.audit`, acknowledged, then folded into the state."""
        event = self._record(alert, decision, **detail)
        await publish(self.ctx.topics.audit, alert.study_uid, event, headers_for_current_span())
        self.state.apply(event)

    async def admit(self, alert: Alert) -> None:
        """A new alert: open its escalation, unless it is too old to page anyone for."""
        age = age_s(alert, datetime.now(UTC))
        if age > self.n.max_alert_age_s:
            log.warning(
                "notify: %s is %.0f s old (notify.max_alert_age_s %.0f): not notified",
                alert.alert_id,
                age,
                self.n.max_alert_age_s,
            )
            metrics.NOTIFY_STOPPED.labels("too_old").inc()
            await self.note(alert, ns.SKIPPED, reason="too_old", age_s=round(age, 1))
            return
        self.open(alert)
        # Let step 1's sends start now: the stream goes on without suspending while its
        # buffer holds records (the audit topic's, in bursts), and the tasks just made
        # would wait for it to run dry (~20 ms more to the webhook in the full stack).
        await asyncio.sleep(0)

    def open(self, alert: Alert) -> None:
        """Open the escalation and start telling step 1 while its record is written: the
        stream does not wait for the record's ack either, so a burst of alerts is not one
        acks=all round trip apart each on the way to the first person. The record is sent
        in order (before the step's own records, same key); one that failed is sent again
        by the timer (`resend_opens`). A kill after the alert's offset was committed and
        before the record reached Kafka is found on takeover: the alert is read back with
        no escalation (`NotifyState.unopened`) and opened then; step 1 goes out again under
        the same idempotency keys."""
        event = self._record(alert, ns.OPENED)
        chain = recipients_for(subject(alert), self.oncall, event.at)
        self.chains[alert.alert_id] = chain  # what `plan` would compute again from the same time
        if chain and chain[0].timeout_s is not None:
            # For the operator page: when this step is overdue without an acknowledgement.
            due = _due(event.at, chain[0].timeout_s)
            event = event.model_copy(update={"detail": {**event.detail, "steps": len(chain), "due_at": due}})
        self.state.apply(event)
        # Sent first: its record is queued before any record of the step's own work.
        self._send_open(alert.alert_id, alert.study_uid, event, headers_for_current_span())
        self.spawn(alert.alert_id)

    def _send_open(self, alert_id: str, study_uid: str, event: AuditEvent, headers: Any) -> None:
        sent = asyncio.ensure_future(publish(self.ctx.topics.audit, study_uid, event, headers))
        self.opening[alert_id] = (study_uid, event, headers, sent)

    def resend_opens(self) -> None:
        """Open records whose send failed go again; acknowledged ones are forgotten."""
        for alert_id, (study_uid, event, headers, sent) in list(self.opening.items()):
            if not sent.done():
                continue
            del self.opening[alert_id]
            error = None if sent.cancelled() else sent.exception()
            if sent.cancelled() or error is not None:
                log.warning("notify: the open record of %s was not written (%s): again", alert_id, error)
                self._send_open(alert_id, study_uid, event, headers)

    # -- the stream --------------------------------------------------------------------------

    async def handle(self, event: EventT[Any]) -> None:
        topic, partition = event.message.topic, event.message.partition
        await self.ready(partition)
        if topic == self.audit_topic:
            if not relevant_audit(event.value):
                return
            try:
                record = AuditEvent.from_bytes(event.value)
            except EventDecodeError as exc:
                # Not ours to dead-letter: the audit topic's readers are the record keepers.
                log.warning("notify: unreadable audit record at %s[%d]: %s", topic, partition, exc)
                metrics.NOTIFY_UNREADABLE.labels("audit").inc()
                return
            self.state.apply(record)
            alert_id = record.detail.get("alert_id")
            if record.stage == "alert" and isinstance(alert_id, str) and alert_id in self.state.escalations:
                self.spawn(alert_id)  # an acknowledgement: stop now, not at the next tick
            return
        alert = Alert.from_bytes(event.value)  # unreadable: dead-lettered by `each`
        self.state.add_alert(alert)
        esc = self.state.escalations.get(alert.alert_id)
        if esc is None:
            if alert.alert_id not in self.state.skipped:
                await self.admit(alert)
            return
        if topic == self.retry_topic:
            # A dead letter replayed: try the undeliverable recipients of the current step
            # again (a step already past is not told again: its time is over).
            log.info("notify: %s replayed: trying its undeliverable recipients again", alert.alert_id)
            esc.done -= esc.undeliverable
            esc.undeliverable.clear()
        self.spawn(alert.alert_id)

    # -- acting ------------------------------------------------------------------------------

    async def work(self, alert_id: str) -> None:
        """Do what the escalation needs until it needs nothing more now."""
        if alert_id in self.busy:
            return
        self.busy.add(alert_id)
        try:
            while True:
                esc = self.state.escalations.get(alert_id)
                alert = self.state.alerts.get(alert_id)
                if esc is None or alert is None:
                    return
                chain = self.plan(esc)
                if chain is None:
                    return
                action = ns.next_action(esc, chain, datetime.now(UTC))
                if action is None:
                    return
                if isinstance(action, ns.Stop):
                    detail: dict[str, str | float | int | bool] = {"reason": action.reason}
                    if action.reason == "acknowledged":
                        detail["by"] = esc.acked_by
                    await self.note(alert, ns.STOPPED, **detail)
                    metrics.NOTIFY_STOPPED.labels(action.reason).inc()
                    log.info("notify: %s stopped (%s)", alert_id, action.reason)
                elif isinstance(action, ns.Escalate):
                    timeout = chain[action.step].timeout_s
                    due = {"due_at": _due(datetime.now(UTC), timeout)} if timeout is not None else {}
                    await self.note(alert, ns.STEP, step=action.step, **due)
                    log.info("notify: %s unacknowledged, step %d", alert_id, action.step + 1)
                else:
                    await asyncio.gather(*(self.tell(alert, action.step, r) for r in action.recipients))
        finally:
            self.busy.discard(alert_id)

    async def tick(self) -> None:
        """The escalation timer: every owned escalation that has something due."""
        for partition in sorted(self.owned):
            await self.ready(partition)
        self.state.prune(datetime.now(UTC), self.n.lookback_s)
        self.resend_opens()
        for alert in self.state.unopened():
            await self.admit(alert)
        for alert_id in [a for a in self.chains if a not in self.state.alerts]:
            del self.chains[alert_id]
        for action in list(ns.due(self.state, self.plan, datetime.now(UTC))):
            if action.alert_id in self.busy:
                continue
            self.spawn(action.alert_id)

    def spawn(self, alert_id: str) -> None:
        """Work on one escalation in a task of its own: a channel down (retries, backoff)
        holds up neither the partition's stream (other alerts, acknowledgements) nor
        another alert. Nothing is lost by not awaiting it: once the escalation's open
        record is in Kafka, whatever it still needs is found again by the timer, here or
        on the worker that takes the partition over."""
        if alert_id in self.busy:
            return
        self.run_beside(self.work(alert_id))

    def notice(self, alert: Alert, step: PlannedStep, recipient: str) -> message.Notice:
        key = idempotency_key(alert.alert_id, recipient, step.index)
        secret = self.n.ack_secret.get_secret_value()
        ack = ""
        if secret:
            expires = int(datetime.now(UTC).timestamp() + self.n.ack_ttl_s)
            claim = AckClaim(
                alert.alert_id,
                alert.study_uid,
                alert.accession_number,
                alert.finding,
                recipient,
                step.index,
                expires,
            )
            ack = message.ack_url(self.n.public_url, make_ack_token(secret, claim))
        display = self.oncall.recipients[recipient].display or recipient
        return message.Notice(
            alert=alert,
            step=step.index,
            recipient=recipient,
            recipient_display=display,
            key=key,
            study_url=message.study_url(self.n.public_url, alert.study_uid),
            ack_url=ack,
            fallback=step.fallback,
            location="" if alert.patient_class == "unknown" else alert.patient_class,
            omit=frozenset(self.n.omit),
        )

    async def tell(self, alert: Alert, step: PlannedStep, recipient: str) -> None:
        notice = self.notice(alert, step, recipient)
        where: dict[str, str | float | int | bool] = {
            "step": step.index,
            "recipient": recipient,
            "key": notice.key,
        }
        usable = usable_channels(
            self.oncall.recipients[recipient], alert.finding, self.webhooks, bool(self.n.smtp.host)
        )
        last_error = "no usable channel (webhook not configured or not for this finding, or no SMTP host)"

        async def send(channel: Channel) -> None:
            if channel.webhook is not None:
                await channels.post_webhook(
                    self.session(), self.webhooks[channel.webhook], notice, self.n.request_timeout_s
                )
            else:
                assert channel.email is not None
                await channels.send_email(self.relay(self.n.smtp), notice, channel.email)

        async def on_attempt(t: Try) -> None:
            nonlocal last_error
            if not t.error:
                # Fault tests: the peer has it, the record of it is not written yet.
                self.ctx.crash_if("crash_after_notify", notice.key)
            if t.error:
                last_error = f"{t.channel}: {t.error}"
                log.warning(
                    "notify: %s to %s via %s failed (try %d): %s",
                    alert.alert_id,
                    recipient,
                    t.channel,
                    t.attempt,
                    t.error,
                )
            kind = t.channel.split(":", 1)[0]
            metrics.NOTIFY_ATTEMPTS.labels(kind, "failed" if t.error else "delivered").inc()
            await self.note(alert, ns.ATTEMPT, channel=t.channel, attempt=t.attempt, error=t.error, **where)

        took = await deliver(usable, send, on_attempt, attempts=self.n.attempts, backoff_s=self.n.backoff_s)
        if took is not None:
            await self.note(alert, ns.DELIVERED, channel=took, **where)
            log.info("notify: %s step %d told %s via %s", alert.alert_id, step.index + 1, recipient, took)
            return
        await self.note(alert, ns.UNDELIVERABLE, error=last_error[:500], **where)
        metrics.NOTIFY_UNDELIVERABLE.inc()
        letter = DeadLetter(
            source_topic=self.retry_topic,
            stage="notify",
            error=f"undeliverable to {recipient} (step {step.index + 1}): {last_error}"[:1000],
            key=alert.study_uid,
            study_uid=alert.study_uid,
            # The alert itself: replayed (onto the retry topic), it makes the stage try again.
            payload=alert.to_bytes().decode(),
        )
        await publish(self.ctx.topics.deadletter, alert.study_uid, letter, headers_for_current_span())
        metrics.count_dead_letter("notify")


def register(ctx: PipelineContext) -> None:
    oncall = load_oncall(ctx.settings.notify)
    if oncall is None:
        # No agent at all: a consumer that only reads would still fetch every audit record
        # and alert, and hold partitions of them, for nothing (`radtriage status` says OFF).
        log.info(
            "notify: nothing configured (notify.webhooks, notify.oncall_file): no alert is sent to anyone"
        )
        return
    retry = ctx.settings.streams.notify_retry_topic
    topics = [t.get_topic_name() for t in ctx.topics.alerts.values()] + [
        ctx.topics.audit.get_topic_name(),
        retry,
    ]
    # Alerts, the audit trail and replayed dead letters: co-partitioned by study UID, so one
    # worker sees an alert, its notifications and its acknowledgements.
    register_notifier(ctx, Notifier(ctx, oncall), "notify", topics, ctx.settings.notify.tick_s)
