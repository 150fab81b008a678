"""Telling one recipient of one escalation step: the notice (links, signed acknowledgement
token, what the hospital omits), the recipient's usable channels tried in order with
retries (processors/notify/deliver.py), each try and the outcome on `triage.audit`, and a
dead letter carrying the alert when nobody could be reached (replayed onto
`streams.notify_retry_topic`, it makes the notify stage try again)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from processors.notify import channels, message
from processors.notify.deliver import Try, deliver
from processors.notify.rota import PlannedStep, usable_channels
from processors.notify.signing import AckClaim, idempotency_key, make_ack_token
from radtriage import metrics
from radtriage.settings import NotifySettings
from radtriage.telemetry import headers_for_current_span
from schemas.alerts import Alert
from schemas.deadletter import DeadLetter
from schemas.oncall import Channel, Oncall
from streams import notify_state as ns
from streams.app import publish
from streams.stages.notifying import Notifying

log = logging.getLogger(__name__)


def notice(
    n: NotifySettings, oncall: Oncall, alert: Alert, step: PlannedStep, recipient: str
) -> message.Notice:
    """What `recipient` is told at `step` (pure but for the clock of the ack token's expiry)."""
    key = idempotency_key(alert.alert_id, recipient, step.index)
    secret = n.ack_secret.get_secret_value()
    ack = ""
    if secret:
        expires = int(datetime.now(UTC).timestamp() + n.ack_ttl_s)
        claim = AckClaim(
            alert.alert_id,
            alert.study_uid,
            alert.accession_number,
            alert.finding,
            recipient,
            step.index,
            expires,
        )
        ack = message.ack_url(n.public_url, make_ack_token(secret, claim))
    display = oncall.recipients[recipient].display or recipient
    return message.Notice(
        alert=alert,
        step=step.index,
        recipient=recipient,
        recipient_display=display,
        key=key,
        study_url=message.study_url(n.public_url, alert.study_uid),
        ack_url=ack,
        fallback=step.fallback,
        location="" if alert.patient_class == "unknown" else alert.patient_class,
        omit=frozenset(n.omit),
    )


class Telling(Notifying):
    """The notify stage's sending half (streams/stages/notify.py `Notifier` is the rest)."""

    oncall: Oncall
    retry_topic: str

    async def note(self, alert: Alert, decision: str, **detail: str | float | int | bool) -> None:
        raise NotImplementedError

    async def tell(self, alert: Alert, step: PlannedStep, recipient: str) -> None:
        told = notice(self.n, self.oncall, alert, step, recipient)
        where: dict[str, str | float | int | bool] = {
            "step": step.index,
            "recipient": recipient,
            "key": told.key,
        }
        usable = usable_channels(
            self.oncall.recipients[recipient], alert.finding, self.webhooks, bool(self.n.smtp.host)
        )
        last_error = "no usable channel (webhook not configured or not for this finding, or no SMTP host)"

        async def send(channel: Channel) -> None:
            if channel.webhook is not None:
                await channels.post_webhook(
                    self.session(), self.webhooks[channel.webhook], told, self.n.request_timeout_s
                )
            else:
                assert channel.email is not None
                await channels.send_email(self.relay(self.n.smtp), told, channel.email)

        async def on_attempt(t: Try) -> None:
            nonlocal last_error
            if not t.error:
                # Fault tests: the peer has it, the record of it is not written yet.
                self.ctx.crash_if("crash_after_notify", told.key)
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
