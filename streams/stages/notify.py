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

Here: the state, the stream and the escalation's actions. Telling one recipient is
streams/stages/notify_tell.py, who is on call streams/stages/notify_oncall.py, the pure
folding and records streams/notify_state.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from faust.types import EventT

from processors.notify.rota import PlannedStep, recipients_for
from radtriage import metrics
from radtriage.telemetry import headers_for_current_span
from schemas.alerts import Alert
from schemas.audit import AuditEvent
from schemas.base import EventDecodeError
from schemas.oncall import Oncall
from streams import notify_state as ns
from streams.app import publish
from streams.published_ledger import PublishedLedger
from streams.stages.context import PipelineContext
from streams.stages.notify_oncall import load_oncall, subject
from streams.stages.notify_tell import Telling
from streams.stages.notifying import register_notifier

log = logging.getLogger(__name__)

# How an alert came into the stage, on its `notify_opened` record for the operators.
Via = Literal["hand_over", "stream", "takeover"]


class Notifier(Telling):
    what = "notify"

    def __init__(self, ctx: PipelineContext, oncall: Oncall) -> None:
        super().__init__(ctx)
        self.oncall = oncall
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
        self.opening: dict[str, tuple[str, AuditEvent, Any, asyncio.Future[int | None]]] = {}

    # -- state -------------------------------------------------------------------------------

    def _fold_bytes(self, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> str | None:
        """The takeover read: audit records and alerts of one partition into the state."""
        try:
            self.state.apply(AuditEvent.from_bytes(value))
        except EventDecodeError:  # an alert; neither: EventDecodeError, skipped by the reader
            self.state.add_alert(Alert.from_bytes(value))
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

    async def note(self, alert: Alert, decision: str, **detail: str | float | int | bool) -> None:
        """One notify record on `triage.audit`, acknowledged, then folded into the state."""
        event = ns.record(alert, decision, **detail)
        await publish(self.ctx.topics.audit, alert.study_uid, event, headers_for_current_span())
        self.state.apply(event)

    async def admit(self, alert: Alert, via: Via) -> None:
        """A new alert: open its escalation, unless it is too old to page anyone for."""
        age = ns.age_s(alert, datetime.now(UTC))
        if age > self.n.max_alert_age_s:
            log.warning(
                "notify: %s is %.0f s old (notify.max_alert_age_s %.0f): not notified",
                alert.alert_id,
                age,
                self.n.max_alert_age_s,
            )
            metrics.NOTIFY_STOPPED.labels("too_old").inc()
            await self.note(alert, ns.SKIPPED, reason="too_old", age_s=round(age, 1))
            self.ctx.alert_first.release(alert.alert_id)
            return
        self.open(alert, via)
        # Let step 1's sends start now: the stream goes on without suspending while its
        # buffer holds records (the audit topic's, in bursts), and the tasks just made
        # would wait for it to run dry (~20 ms more to the webhook in the full stack).
        await asyncio.sleep(0)

    def open(self, alert: Alert, via: Via) -> None:
        """Open the escalation and start telling step 1 while its record is written: the
        stream does not wait for the record's ack either, so a burst of alerts is not one
        acks=all round trip apart each on the way to the first person. The record is sent
        in order (before the step's own records, same key); one that failed is sent again
        by the timer (`resend_opens`). A kill after the alert's offset was committed and
        before the record reached Kafka is found on takeover: the alert is read back with
        no escalation (`NotifyState.unopened`) and opened then; step 1 goes out again under
        the same idempotency keys. `via`: how the alert came in (`hand_over`, `stream`,
        `takeover`), on the record for the operators."""
        event = ns.record(alert, ns.OPENED, via=via)
        chain = recipients_for(subject(alert), self.oncall, event.at)
        self.chains[alert.alert_id] = chain  # what `plan` would compute again from the same time
        if chain and chain[0].timeout_s is not None:
            # For the operator page: when this step is overdue without an acknowledgement.
            due = ns.due_at(event.at, chain[0].timeout_s)
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

    def hand_over(self, alert: Alert, partition: int) -> None:
        """This worker's escalate stage is writing `alert` to a partition this stage owns:
        open its escalation now, not after the record's round trip through Kafka into this
        stream (streams/alert_first.py). The stream's read of the same record then finds it
        open. An alert too old to notify is left to the stream, which records why; a
        partition lost meanwhile, to its next owner. Told before Kafka acknowledged the
        alert: a kill before it did leaves the finding's offset uncommitted, the alert is
        written again on replay and its steps told again under the same idempotency keys,
        as after any kill between a send and its record."""
        self.run_beside(self._take(alert, partition))

    async def _take(self, alert: Alert, partition: int) -> None:
        await self.ready(partition)
        if partition not in self.owned or ns.age_s(alert, datetime.now(UTC)) > self.n.max_alert_age_s:
            return
        if self.settled(alert.alert_id):
            return
        self.state.add_alert(alert)
        self.open(alert, "hand_over")

    def settled(self, alert_id: str) -> bool:
        """Opened already, or skipped: whichever way it came in again, nothing to open."""
        return alert_id in self.state.escalations or alert_id in self.state.skipped

    # -- the stream --------------------------------------------------------------------------

    async def handle(self, event: EventT[Any]) -> None:
        topic, partition = event.message.topic, event.message.partition
        await self.ready(partition)
        if topic == self.audit_topic:
            if not ns.relevant_audit(event.value):
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
        if not self.settled(alert.alert_id):
            await self.admit(alert, "stream")
            return
        esc = self.state.escalations.get(alert.alert_id)
        if esc is None:  # skipped
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
                    due = {"due_at": ns.due_at(datetime.now(UTC), timeout)} if timeout is not None else {}
                    await self.note(alert, ns.STEP, step=action.step, **due)
                    log.info("notify: %s unacknowledged, step %d", alert_id, action.step + 1)
                else:
                    await asyncio.gather(*(self.tell(alert, action.step, r) for r in action.recipients))
        finally:
            self.busy.discard(alert_id)
            # Told (or nothing to tell now): the finding's report, ORU and SR may go on.
            self.ctx.alert_first.release(alert_id)

    async def tick(self) -> None:
        """The escalation timer: every owned escalation that has something due."""
        for partition in sorted(self.owned):
            await self.ready(partition)
        self.state.prune(datetime.now(UTC), self.n.lookback_s)
        self.resend_opens()
        for alert in self.state.unopened():
            await self.admit(alert, "takeover")
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
    notifier = Notifier(ctx, oncall)
    ctx.alert_first.enable(
        ctx.settings.notify.alert_first_s,
        lambda partition: partition in notifier.owned,
        notifier.hand_over if ctx.settings.notify.hand_over else None,
    )
    register_notifier(ctx, notifier, "notify", topics, ctx.settings.notify.tick_s)
