"""Notify operators: `triage.deadletter` + `triage.requests.<lane>` + `triage.findings` ->
the operators' channel (webhooks, e-mail) in digests, `triage.audit` (every try and outcome).

Registered only when `notify.operators` names someone (docs/ARCHITECTURE.md, Notification):
- every dead letter (any stage's) is an item, grouped by its cause;
- a request routed on a lane and without a finding (or dead letter) past the lane's
  `notify.operators.stuck_after_s` is a stuck study, grouped by lane (processors/notify/stuck.py);
- items are gathered per cause over `digest_s` and each cause's bucket is one message when
  the period ends (processors/notify/digest.py): a flood is a bounded number of messages.

A digest goes out as the alert notifications do (processors/notify/deliver.py): the
recipient's channels in order, each retried with backoff, every try on `triage.audit`
(stage "notify", decisions `ops_attempt`, `ops_delivered`, `ops_undeliverable`), with an
idempotency key (kind, cause, period, the partitions read) as the Idempotency-Key header or
Message-ID. An undeliverable digest is not dead-lettered (it would only feed itself): it is
on the audit trail, logged and counted; the dead letters it summarised stay on their topic.

What is gathered survives a worker kill and a rebalance: the worker taking the partitions
over reads them back from Kafka (streams/notify_ops_state.py), with the digests already
told (each delivered or undeliverable digest's record says what it covered), over
`ops_lookback_s`: the period in progress is told after the restart, once.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from faust.types import EventT

from processors.notify import channels, ops_message
from processors.notify.deliver import Try, deliver
from processors.notify.digest import Bucket, Digests, covered_of, covered_text, deadletter_item
from processors.notify.rota import operators_recipient
from processors.notify.stuck import StuckWatch, Watched, stuck_item
from radtriage import metrics
from radtriage.settings import LANES
from schemas.audit import AuditEvent
from schemas.base import EventDecodeError
from schemas.deadletter import DeadLetter
from schemas.findings import Finding
from schemas.oncall import Channel, Recipient
from schemas.requests import TriageRequest
from streams.app import publish
from streams.notify_ops_state import OpsReadBack
from streams.stages.context import PipelineContext
from streams.stages.notify_oncall import load_oncall
from streams.stages.notifying import Notifying, register_notifier

log = logging.getLogger(__name__)

ATTEMPT = "ops_attempt"
DELIVERED = "ops_delivered"
UNDELIVERABLE = "ops_undeliverable"


def source_topics(ctx: PipelineContext) -> list[str]:
    """What the stage reads under its settings: nothing when there is nothing to watch."""
    ops = ctx.settings.notify.operators
    topics = [ctx.topics.deadletter.get_topic_name()] if ops.deadletters else []
    watched = [lane for lane in LANES if lane in ops.stuck_after_s]
    if watched:
        topics += [ctx.topics.lanes[lane].get_topic_name() for lane in watched]
        topics.append(ctx.topics.findings.get_topic_name())
    return topics


def ops_lookback_s(ctx: PipelineContext) -> float:
    """How far back a takeover reads: the period in progress and the one before it (with
    its sends' retries), the longest stuck limit watched, and ten minutes for the restart."""
    ops = ctx.settings.notify.operators
    stuck = max((ops.stuck_after_s[lane] for lane in LANES if lane in ops.stuck_after_s), default=0.0)
    return 3 * ops.digest_s + stuck + 600.0


class OpsNotifier(Notifying):
    what = "notify-ops"

    def __init__(self, ctx: PipelineContext, recipient: Recipient) -> None:
        super().__init__(ctx)
        self.ops = self.n.operators
        self.recipient = recipient
        self.digests = Digests(self.ops.digest_s, self.ops.examples, self.ops.max_causes)
        self.watch = StuckWatch({str(k): v for k, v in self.ops.stuck_after_s.items()}, self.ops.max_watched)
        self.deadletter_topic = ctx.topics.deadletter.get_topic_name()
        self.findings_topic = ctx.topics.findings.get_topic_name()
        self.audit_topic = ctx.topics.audit.get_topic_name()
        # The partitions read: part of a digest's identity (each worker sends its own share).
        self.scope = ""
        self.owned: set[int] = set()
        # Per (topic, partition): the last offset gathered (the stream may read it again).
        self.high: dict[tuple[str, int], int] = {}
        self.readback = OpsReadBack(
            ctx.settings.kafka,
            source_topics(ctx),
            self.audit_topic,
            self.fold,
            lookback_s=ops_lookback_s(ctx),
        )

    def assigned(self, partitions: set[int]) -> None:
        self.scope = ",".join(map(str, sorted(partitions)))
        self.owned = set(partitions)
        self.readback.preload(partitions)

    def revoked(self) -> None:
        """Partitions may move: forget what was gathered; it is read back on assignment."""
        self.readback.forget_assignment()
        self.owned.clear()
        self.high.clear()
        self.digests.forget()
        self.watch.forget()

    async def handle(self, event: EventT[Any]) -> None:
        m = event.message
        await self.readback.ready(m.partition)
        self.fold(m.topic, m.partition, m.offset, event.value)

    def fold(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """One record read, by the stream or read back: into the digests or the watch."""
        if topic == self.audit_topic:
            if value is not None and (b'"ops_delivered"' in value or b'"ops_undeliverable"' in value):
                told = AuditEvent.from_bytes(value)
                kind = told.detail.get("kind")
                if told.stage == "notify" and kind in ("deadletter", "stuck"):
                    self.digests.mark_told(kind, covered_of(told.detail.get("covered")))  # type: ignore[arg-type]
            return
        if offset <= self.high.get((topic, partition), -1):
            return
        self._gather(topic, (topic, partition, offset), value)
        # Only once read: an unreadable record is left to the stream, which dead-letters it.
        self.high[(topic, partition)] = offset

    def _gather(self, topic: str, where: tuple[str, int, int], value: bytes | None) -> None:
        now = datetime.now(UTC)
        if topic == self.deadletter_topic:
            letter = DeadLetter.from_bytes(value)  # unreadable: dead-lettered by `each`
            if self.digests.add(deadletter_item(letter, now, where)) is not None:
                metrics.NOTIFY_OPS_ITEMS.labels("deadletter").inc()
            # A request dead-lettered is not stuck: it is in this digest already.
            try:
                req = TriageRequest.from_bytes(letter.payload.encode())
                self.watch.done(req.request_id, req.study_uid)
            except EventDecodeError:
                pass
        elif topic == self.findings_topic:
            finding = Finding.from_bytes(value)
            self.watch.done(finding.request_id, finding.study_uid)
        else:
            req = TriageRequest.from_bytes(value)
            self.watch.routed(
                Watched(
                    req.request_id,
                    req.study_uid,
                    req.accession_number,
                    req.lane,
                    req.finding,
                    req.routed_at,
                    *where,
                )
            )

    async def tick(self) -> None:
        for partition in sorted(self.owned):
            await self.readback.ready(partition)
        now = datetime.now(UTC)
        for w in self.watch.stuck(now):
            if self.digests.add(stuck_item(w, self.watch.after_s[w.lane], now)) is None:
                continue  # told before a kill or a rebalance
            metrics.NOTIFY_OPS_ITEMS.labels("stuck").inc()
            log.warning("notify-ops: %s stuck on %s since %s", w.request_id, w.lane, w.routed_at)
        for bucket in self.digests.due(now):
            self.run_beside(self.send(bucket))

    async def note(self, bucket: Bucket, decision: str, **detail: str | float | int | bool) -> None:
        study = bucket.examples[0].study_uid if bucket.examples else ""
        now = datetime.now(UTC)
        event = AuditEvent(
            study_uid=study,
            stage="notify",
            decision=decision,
            detail={
                "kind": bucket.kind,
                "cause": bucket.cause,
                "count": bucket.count,
                "period_start": bucket.starts.isoformat(),
                "at": now.isoformat(),
                **detail,
            },
            at=now,
        )
        await publish(self.ctx.topics.audit, study, event)

    async def send(self, bucket: Bucket) -> None:
        notice = ops_message.OpsNotice(
            bucket, bucket.key(self.scope), self.recipient.display, ops_message.page_url(self.n.public_url)
        )
        usable = tuple(
            c
            for c in self.recipient.channels
            if (c.webhook is not None and c.webhook in self.webhooks)
            or (c.email is not None and self.n.smtp.host)
        )

        async def attempt(channel: Channel) -> None:
            if channel.webhook is not None:
                target = self.webhooks[channel.webhook]
                body = json.dumps(ops_message.body(notice, target.format), separators=(",", ":")).encode()
                await channels.post_json(self.session(), target, body, notice.key, self.n.request_timeout_s)
            else:
                assert channel.email is not None
                await channels.send_mail(
                    self.relay(self.n.smtp), ops_message.email(notice, self.n.smtp.sender, channel.email)
                )

        last_error = "no usable channel (webhook not configured, or no SMTP host)"

        async def on_attempt(t: Try) -> None:
            nonlocal last_error
            if t.error:
                last_error = f"{t.channel}: {t.error}"
                log.warning(
                    "notify-ops: digest %s via %s failed (try %d): %s",
                    notice.key,
                    t.channel,
                    t.attempt,
                    t.error,
                )
            metrics.NOTIFY_ATTEMPTS.labels(
                "ops-" + t.channel.split(":", 1)[0], "failed" if t.error else "delivered"
            ).inc()
            await self.note(
                bucket, ATTEMPT, key=notice.key, channel=t.channel, attempt=t.attempt, error=t.error
            )

        took = await deliver(
            usable, attempt, on_attempt, attempts=self.n.attempts, backoff_s=self.n.backoff_s
        )
        if took is not None:
            await self.note(
                bucket, DELIVERED, key=notice.key, channel=took, covered=covered_text(bucket.covered)
            )
            metrics.NOTIFY_OPS_DIGESTS.labels(bucket.kind, "delivered").inc()
            log.info("notify-ops: %d %s (%s) told via %s", bucket.count, bucket.kind, bucket.cause, took)
            return
        await self.note(
            bucket,
            UNDELIVERABLE,
            key=notice.key,
            error=last_error[:500],
            covered=covered_text(bucket.covered),
        )
        metrics.NOTIFY_OPS_DIGESTS.labels(bucket.kind, "undeliverable").inc()
        log.error(
            "notify-ops: digest of %d %s (%s) undeliverable: %s",
            bucket.count,
            bucket.kind,
            bucket.cause,
            last_error,
        )


def register(ctx: PipelineContext) -> None:
    n = ctx.settings.notify
    recipient = operators_recipient(
        n.operators, load_oncall(n) if n.oncall_file else None, n.named_webhooks()
    )
    topics = source_topics(ctx) if recipient is not None else []
    if recipient is None or not topics:
        return  # nobody to tell, or nothing to watch: no agent, nothing read
    # Digests are due at the end of their period: look a few times a period.
    tick_s = min(n.tick_s * 2, n.operators.digest_s / 4)
    register_notifier(ctx, OpsNotifier(ctx, recipient), "notify-ops", topics, tick_s)
