"""An alert reaches the people on call through real Kafka, a real `radtriage worker`, a real
webhook receiver (verifying the signature), a real SMTP server (STARTTLS) and the real HTTP
intake serving the acknowledgement link (issue 19):

- step 1 is told at once (webhook); the worker is killed right after the receiver took it
  and before that was recorded, and its successor sends it again with the same
  Idempotency-Key (recognised by the receiver: one notification, one recognised copy);
- nobody acknowledges: step 2 (e-mail) is told once step 1's timeout has passed;
- the acknowledgement link (GET shows a form, POST records) stops the escalation: the
  fallback is never told.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from kafka import KafkaProducer

from radtriage.settings import Settings
from tests.integration.harness import Worker, finding_bytes, listener
from tests.support.kafka import Tail
from tests.support.net import free_port
from tests.support.notify_peers import WebhookReceiver, notify_peers
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

SECRET = "hook-secret"
STEP1_TIMEOUT_S = 4.0

ONCALL = """\
version: 1
recipients:
  resident: {display: Resident on call, channels: [{webhook: pager}]}
  attending: {display: Attending, channels: [{email: attending@hospital.example}]}
  operators: {channels: [{webhook: ops}]}
rules:
  - findings: [ICH]
    chain:
      - {recipients: [resident], timeout_s: %s}
      - {recipients: [attending], timeout_s: 600}
fallback: {recipients: [operators]}
"""


def _notify_env(
    env: dict[str, str], mail_env: dict[str, str], hooks: WebhookReceiver, oncall: Path, rota: str
) -> dict[str, str]:
    """The worker's environment with both webhooks (pager, ops), the SMTP server's settings and
    `rota` written to `oncall` as its on-call file."""
    oncall.write_text(rota)
    return {
        **env,
        **mail_env,
        "RADTRIAGE_NOTIFY__WEBHOOKS": (
            f'[{{"name": "pager", "url": "{hooks.url("/pager")}", "secret": "{SECRET}"}},'
            f' {{"name": "ops", "url": "{hooks.url("/ops")}", "secret": "{SECRET}"}}]'
        ),
        "RADTRIAGE_NOTIFY__ONCALL_FILE": str(oncall),
    }


def test_step_one_at_once_step_two_at_the_timeout_none_after_the_ack_across_a_kill(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    http_port = free_port()
    with notify_peers(SECRET, tmp_path / "pki") as (hooks, smtp, mail_env):
        env = {
            **_notify_env(env, mail_env, hooks, tmp_path / "oncall.yaml", ONCALL % STEP1_TIMEOUT_S),
            "RADTRIAGE_NOTIFY__ACK_SECRET": "ack-secret",
            "RADTRIAGE_NOTIFY__PUBLIC_URL": f"http://127.0.0.1:{http_port}",
            "RADTRIAGE_NOTIFY__TICK_S": "0.2",
            "RADTRIAGE_HTTP__PORT": str(http_port),
        }
        audit = Tail(settings.kafka.bootstrap_servers, [t.audit, t.deadletter])
        crashing = Worker({**env, "RADTRIAGE_STREAMS__FAULT_INJECTION": "crash_after_notify"}, settings.home)
        crashing.start()
        uid = f"1.2.826.0.19.{time.time_ns()}"
        alert_id = f"{uid}/ICH"
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        # A positive stat ICH finding: the escalate stage alerts, the notify stage tells.
        producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.93)).get(10)

        wait_until(lambda: len(hooks.on("/pager")) == 1, "step 1 at the resident's webhook", 90)
        assert crashing.proc is not None
        assert crashing.proc.wait(60) == 70  # killed after the receiver took it, before the record
        (step1,) = hooks.on("/pager")
        assert step1.body["alert_id"] == alert_id and step1.body["step"] == 0
        assert step1.body["accession_number"] == "ACC" and "patient_name" not in step1.body

        survivor = Worker(env, settings.home)
        survivor.start()
        with listener("http", env, http_port, tmp_path / "http.log"):
            wait_until(lambda: len(smtp.mails) == 1, "step 2 by e-mail", 120)
            (mail,) = smtp.mails
            assert mail.tls and mail.to == ["attending@hospital.example"]
            # Not before step 1's timeout (a lower bound, never a speed assertion).
            assert mail.at >= step1.at + STEP1_TIMEOUT_S
            # The successor sent step 1 again with the same key: the receiver knew it.
            wait_until(lambda: hooks.duplicates, "step 1 re-sent with its key after the kill", 60)
            assert hooks.duplicates == [step1.key] and len(hooks.on("/pager")) == 1

            text = mail.message.get_payload(decode=True).decode()  # type: ignore[union-attr]
            found = re.search(r"Acknowledge: (\S+)", text)
            assert found, text
            link = found.group(1)
            page = requests.get(link, timeout=10)
            assert page.status_code == 200 and "Acknowledge" in page.text
            token = re.search(r"name='t' value='([^']+)'", page.text)
            assert token is not None
            done = requests.post(
                f"http://127.0.0.1:{http_port}/notify/ack",
                data={"t": token.group(1), "by": "Dr Who"},
                timeout=20,
            )
            assert done.status_code == 200 and "Acknowledged by Dr Who" in done.text, done.text

            audit.until(
                lambda: audit.of(t.audit, decision="notify_stopped", study_uid=uid),
                timeout=60,
            )
        (stopped,) = audit.of(t.audit, decision="notify_stopped", study_uid=uid)
        assert stopped["detail"]["reason"] == "acknowledged" and stopped["detail"]["by"] == "Dr Who"
        (ack,) = audit.of(t.audit, decision="alert_acknowledged", study_uid=uid)
        assert ack["detail"]["via"] == "notification_link" and ack["detail"]["alert_id"] == alert_id
        delivered = audit.of(t.audit, decision="notify_delivered", study_uid=uid)
        assert sorted((d["detail"]["step"], d["detail"]["recipient"]) for d in delivered) == [
            (0, "resident"),
            (1, "attending"),
        ]
        assert hooks.on("/ops") == [] and len(smtp.mails) == 1
        assert not hooks.refused and not audit.of(t.deadletter)
        survivor.kill(signal.SIGTERM)


FALLBACK_ONCALL = """\
version: 1
recipients:
  resident: {channels: [{webhook: pager}, {email: resident@hospital.example}]}
  operators: {channels: [{webhook: ops}]}
rules:
  - chain:
      - {recipients: [resident, operators], timeout_s: 600}
"""


def test_a_channel_down_falls_back_undeliverable_is_a_dead_letter_and_its_replay_delivers_once(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    with notify_peers(SECRET, tmp_path / "pki") as (hooks, smtp, mail_env):
        env = {
            **_notify_env(env, mail_env, hooks, tmp_path / "oncall.yaml", FALLBACK_ONCALL),
            "RADTRIAGE_NOTIFY__ATTEMPTS": "2",
            "RADTRIAGE_NOTIFY__BACKOFF_S": "0.05",
        }
        tail = Tail(settings.kafka.bootstrap_servers, [t.audit, t.deadletter])
        hooks.down = True  # every webhook answers 503
        worker = Worker(env, settings.home)
        worker.start()
        uid = f"1.2.826.0.19.2.{time.time_ns()}"
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        producer.send(t.findings, key=uid.encode(), value=finding_bytes(uid, 0.93)).get(10)

        # The resident's webhook is down: two tries, then their e-mail.
        wait_until(lambda: len(smtp.mails) == 1, "the resident's fallback e-mail", 90)
        assert smtp.mails[0].to == ["resident@hospital.example"]
        # The operators have no other channel: undeliverable, a dead letter with the cause.
        tail.until(lambda: tail.of(t.deadletter, study_uid=uid), timeout=60)
        (letter,) = tail.of(t.deadletter, study_uid=uid)
        assert letter["stage"] == "notify" and "operators" in letter["error"] and "503" in letter["error"]
        assert letter["source_topic"] == settings.streams.notify_retry_topic
        tries = [
            (d["detail"]["recipient"], d["detail"]["channel"], d["detail"]["error"] != "")
            for d in tail.of(t.audit, decision="notify_attempt", study_uid=uid)
        ]
        assert sorted(tries) == sorted(
            [
                ("resident", "webhook:pager", True),
                ("resident", "webhook:pager", True),
                ("resident", "email:resident@hospital.example", False),
                ("operators", "webhook:ops", True),
                ("operators", "webhook:ops", True),
            ]
        )
        assert [d["detail"]["recipient"] for d in tail.of(t.audit, decision="notify_undeliverable")] == [
            "operators"
        ]

        # The receiver recovers; the real `radtriage replay` puts the letter back.
        hooks.down = False
        replayed = subprocess.run(
            [sys.executable, "-m", "radtriage.cli", "replay", "--stage", "notify"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        wait_until(lambda: len(hooks.on("/ops")) == 1, "the operators told after the replay", 60)
        tail.until(
            lambda: any(
                d["detail"]["recipient"] == "operators"
                for d in tail.of(t.audit, decision="notify_delivered", study_uid=uid)
            ),
            timeout=30,
        )
        tail.drain(2.0)
        # Once each: the resident (e-mail) is not told again by the replay, nobody twice.
        assert len(smtp.mails) == 1 and hooks.on("/pager") == [] and not hooks.duplicates
        delivered = tail.of(t.audit, decision="notify_delivered", study_uid=uid)
        assert sorted(d["detail"]["recipient"] for d in delivered) == ["operators", "resident"]
        # Opened once, by the escalate stage's hand-over in the same worker (not after the
        # alert's trip back through Kafka); the stream's read of the alert found it open.
        (opened,) = tail.of(t.audit, decision="notify_opened", study_uid=uid)
        assert opened["detail"]["via"] == "hand_over"
        worker.kill(signal.SIGTERM)
