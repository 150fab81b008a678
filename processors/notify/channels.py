"""The channels a notification goes out through: an incoming webhook (JSON signed with
HMAC-SHA256, Teams, Slack) over aiohttp, and e-mail over SMTP with STARTTLS (aiosmtplib, over
kept connections: processors/notify/smtp_relay.py).

Hand-written rather than apprise: the signed webhook (signature, timestamp and
Idempotency-Key headers) is ours whatever the library, Teams and Slack are one JSON POST
each, and apprise's notifiers report success as a bool, where the retry and fallback
policy (deliver.py) needs to know whether a failure is worth retrying (a 503 is, a 404
is not) and why, for the audit trail.
"""

from __future__ import annotations

import functools
import json
import ssl
import time
from datetime import datetime
from email.message import EmailMessage

import aiohttp
import aiosmtplib

from processors.notify import message
from processors.notify.signing import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    webhook_signature,
)
from processors.notify.smtp_relay import SmtpRelay
from radtriage.settings import SmtpSettings, WebhookTarget


class ChannelError(Exception):
    """A send that failed; `retryable` says whether the same channel may work on a retry."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


def webhook_payload(target: WebhookTarget, notice: message.Notice, now: datetime) -> bytes:
    body = {
        "json": message.json_body,
        "teams": message.teams_body,
        "slack": message.slack_body,
    }[target.format](notice, now)
    return json.dumps(body, separators=(",", ":")).encode()


def webhook_headers(target: WebhookTarget, body: bytes, key: str, timestamp: int) -> dict[str, str]:
    headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: key}
    secret = target.secret.get_secret_value()
    if secret:
        headers[TIMESTAMP_HEADER] = str(timestamp)
        headers[SIGNATURE_HEADER] = webhook_signature(secret, body, timestamp)
    return headers


async def post_webhook(
    session: aiohttp.ClientSession, target: WebhookTarget, notice: message.Notice, timeout_s: float
) -> None:
    body = webhook_payload(target, notice, datetime.now(notice.alert.alerted_at.tzinfo))
    await post_json(session, target, body, notice.key, timeout_s)


async def post_json(
    session: aiohttp.ClientSession, target: WebhookTarget, body: bytes, key: str, timeout_s: float
) -> None:
    """POST one message body to a webhook, signed when it has a secret."""
    headers = webhook_headers(target, body, key, int(time.time()))
    try:
        async with session.post(
            target.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status < 300:
                return
            # Overloaded or down (5xx, 429, 408): try again; anything else will not change.
            retry = resp.status >= 500 or resp.status in (408, 429)
            raise ChannelError(f"HTTP {resp.status}", retryable=retry)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ChannelError(f"{type(exc).__name__}: {exc}"[:300], retryable=True) from exc


def smtp_tls_context(smtp: SmtpSettings) -> ssl.SSLContext:
    return _tls_context(str(smtp.cafile) if smtp.cafile else None)


@functools.lru_cache(maxsize=8)
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """One context per CA file, made once: building one reads and parses the CA file (the
    system's whole store without one) on the event loop, per e-mail, under a flood too.
    A changed CA file takes a worker restart, as every setting does."""
    return ssl.create_default_context(cafile=cafile)


def smtp_relay(smtp: SmtpSettings) -> SmtpRelay:
    """The kept connections to the relay of these settings (one per notifier, made on first use)."""
    return SmtpRelay(smtp, smtp_tls_context)


async def send_email(relay: SmtpRelay, notice: message.Notice, to: str) -> None:
    await send_mail(
        relay, message.email(notice, datetime.now(notice.alert.alerted_at.tzinfo), relay.smtp.sender, to)
    )


async def send_mail(relay: SmtpRelay, mail: EmailMessage) -> None:
    """Hand one message to the relay (STARTTLS as configured), over a kept connection."""
    try:
        await relay.send(mail)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        raise ChannelError(f"recipient refused: {exc}"[:300], retryable=False) from exc
    except aiosmtplib.SMTPResponseException as exc:
        # 4xx: temporary (greylisting, busy); 5xx: permanent.
        raise ChannelError(f"SMTP {exc.code}: {exc.message}"[:300], retryable=exc.code < 500) from exc
    except (aiosmtplib.SMTPException, TimeoutError, OSError, ssl.SSLError) as exc:
        raise ChannelError(f"{type(exc).__name__}: {exc}"[:300], retryable=True) from exc
