"""The notify channels against real peers (no Kafka): an HTTP server verifying the webhook
signature, an SMTP server requiring STARTTLS, and the fallback from a channel that is down
to the recipient's next one (issue 19)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from processors.notify import channels, message
from processors.notify.deliver import Try, deliver
from radtriage.settings import SmtpSettings, WebhookTarget
from schemas.oncall import Channel
from tests.certs import Pki, make_pki
from tests.support.findings import ich_alert
from tests.support.notify_peers import SmtpServer, smtp_server, webhook_receiver

pytestmark = pytest.mark.integration

SECRET = "hook-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def smtp(pki: Pki) -> Iterator[SmtpServer]:
    with smtp_server(pki) as server:
        yield server


def notice(key: str = "key-1") -> message.Notice:
    now = datetime.now(UTC)
    alert = ich_alert(
        "1.2.840.1",
        now - timedelta(seconds=80),
        accession_number="ACC42",
        probability=0.91,
        received_at=now - timedelta(seconds=90),
    )
    return message.Notice(
        alert=alert,
        step=0,
        recipient="neuro",
        recipient_display="Neuroradiologist",
        key=key,
        study_url=message.study_url("http://rt.example", alert.study_uid),
        ack_url="http://rt.example/notify/ack?t=abc",
    )


async def post(target: WebhookTarget, n: message.Notice) -> None:
    async with aiohttp.ClientSession() as session:
        await channels.post_webhook(session, target, n, timeout_s=5)


def test_signed_json_teams_and_slack_webhooks_reach_a_receiver_that_verifies_them() -> None:
    with webhook_receiver(SECRET) as receiver:
        for fmt in ("json", "teams", "slack"):
            target = WebhookTarget(url=receiver.url(f"/{fmt}"), secret=SECRET, format=fmt)  # type: ignore[arg-type]
            asyncio.run(post(target, notice(key=f"k-{fmt}")))
        (json_hook,) = receiver.on("/json")
        assert json_hook.body["accession_number"] == "ACC42" and json_hook.body["idempotency_key"] == "k-json"
        (teams,) = receiver.on("/teams")
        card = teams.body["attachments"][0]["content"]
        assert card["type"] == "AdaptiveCard" and "ACC42" in str(card["body"])
        (slack,) = receiver.on("/slack")
        assert "ICH" in slack.body["text"] and slack.body["blocks"]
        assert not receiver.refused

        # The same notification again (a retry after a kill): recognised by its key.
        asyncio.run(post(WebhookTarget(url=receiver.url("/json"), secret=SECRET), notice(key="k-json")))
        assert receiver.duplicates == ["k-json"] and len(receiver.on("/json")) == 1

        # Signed with another secret: the receiver refuses it, and it is not retryable.
        with pytest.raises(channels.ChannelError) as err:
            asyncio.run(post(WebhookTarget(url=receiver.url("/json"), secret="wrong"), notice("k-x")))
        assert err.value.retryable is False and "401" in str(err.value)
        assert receiver.refused == ["signature does not match the body"]


def test_a_receiver_down_or_absent_is_a_retryable_failure() -> None:
    with webhook_receiver(SECRET) as receiver:
        receiver.down = True
        with pytest.raises(channels.ChannelError) as err:
            asyncio.run(post(WebhookTarget(url=receiver.url(), secret=SECRET), notice()))
        assert err.value.retryable and "503" in str(err.value)
        gone = receiver.url()
    with pytest.raises(channels.ChannelError) as err:
        asyncio.run(post(WebhookTarget(url=gone, secret=SECRET), notice()))
    assert err.value.retryable


def test_email_goes_through_starttls_and_carries_the_idempotency_key(smtp: SmtpServer, pki: Pki) -> None:
    settings = SmtpSettings(
        host="127.0.0.1", port=smtp.port, starttls=True, sender="rt@test.example", cafile=pki.ca
    )
    asyncio.run(email(settings, notice(), "neuro@h.example"))
    (mail,) = smtp.mails
    assert mail.tls and mail.to == ["neuro@h.example"]
    assert mail.message["Message-ID"] == "<key-1@radtriage>"
    text = mail.message.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "Accession: ACC42" in text and "Acknowledge: http://rt.example/notify/ack?t=abc" in text


async def email(settings: SmtpSettings, n: message.Notice, to: str) -> None:
    relay = channels.smtp_relay(settings)
    try:
        await channels.send_email(relay, n, to)
    finally:
        await relay.close()


def test_emails_share_kept_connections_and_reconnect_when_dropped_or_idle(smtp: SmtpServer, pki: Pki) -> None:
    settings = SmtpSettings(
        host="127.0.0.1", port=smtp.port, starttls=True, cafile=pki.ca, connections=2, idle_s=0.3
    )

    async def run() -> int:
        relay = channels.smtp_relay(settings)
        # A burst of 10 at once: at most 2 sessions, each used again.
        await asyncio.gather(
            *(channels.send_email(relay, notice(f"b-{i}"), "a@h.example") for i in range(10))
        )
        burst = relay.opened
        # The relay drops its clients (a restart): the next mail still goes, on a new session.
        for client, _ in relay._idle:
            client.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        await channels.send_email(relay, notice("after-drop"), "a@h.example")
        # Idle past idle_s: closed and made again rather than trusted.
        await asyncio.sleep(0.4)
        await channels.send_email(relay, notice("after-idle"), "a@h.example")
        await relay.close()
        return burst

    burst = asyncio.run(run())
    mails = smtp.mails
    assert len(mails) == 12 and all(m.tls for m in mails)
    assert sorted(str(m.message["Message-ID"]) for m in mails) == sorted(
        [f"<b-{i}@radtriage>" for i in range(10)] + ["<after-drop@radtriage>", "<after-idle@radtriage>"]
    )
    assert burst <= 2 and len({m.peer for m in mails[:10]}) == burst
    assert len({m.peer for m in mails}) == burst + 2


def test_email_refuses_a_server_it_cannot_verify(smtp: SmtpServer, pki: Pki) -> None:
    untrusted = SmtpSettings(
        host="127.0.0.1", port=smtp.port, starttls=True, cafile=pki.other_ca, timeout_s=5
    )
    with pytest.raises(channels.ChannelError):
        asyncio.run(email(untrusted, notice(), "neuro@h.example"))
    # Without STARTTLS the server (require_starttls) refuses the mail: nothing goes in clear.
    plain = SmtpSettings(host="127.0.0.1", port=smtp.port, starttls=False, timeout_s=5)
    with pytest.raises(channels.ChannelError):
        asyncio.run(email(plain, notice(), "neuro@h.example"))
    assert smtp.mails == []


def test_a_webhook_down_falls_back_to_email_then_recovers(smtp: SmtpServer, pki: Pki, tmp_path: Path) -> None:
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, starttls=True, cafile=pki.ca)
    with webhook_receiver(SECRET) as receiver:
        target = WebhookTarget(url=receiver.url(), secret=SECRET)
        tries: list[Try] = []

        async def run(n: message.Notice) -> str | None:
            relay = channels.smtp_relay(settings)
            async with aiohttp.ClientSession() as session:

                async def send(channel: Channel) -> None:
                    if channel.webhook is not None:
                        await channels.post_webhook(session, target, n, timeout_s=5)
                    else:
                        await channels.send_email(relay, n, str(channel.email))

                async def record(t: Try) -> None:
                    tries.append(t)

                chans = [Channel(webhook="hook"), Channel(email="neuro@h.example")]
                return await deliver(chans, send, record, attempts=2, backoff_s=0.01)

        receiver.down = True
        assert asyncio.run(run(notice("k-1"))) == "email:neuro@h.example"
        assert [(t.channel, bool(t.error)) for t in tries] == [
            ("webhook:hook", True),
            ("webhook:hook", True),
            ("email:neuro@h.example", False),
        ]
        receiver.down = False
        assert asyncio.run(run(notice("k-2"))) == "webhook:hook"
        assert [r.key for r in receiver.received] == ["k-2"] and [
            m.message["Message-ID"] for m in smtp.mails
        ] == ["<k-1@radtriage>"]
