"""Dead letters reach the operators through real Kafka, a real `radtriage worker`, a real
webhook receiver (verifying the signature) and a real SMTP server (STARTTLS) (issue 19,
operator notifications):

- a flood of dead letters of two causes is one digest per cause per period, whose counts
  add up to the flood, each on `triage.audit` as delivered under the key the receiver got;
- the operators' webhook down: the digest falls back to their e-mail address, every try
  on the audit trail;
- a worker SIGKILLed inside a period (its dead letters read and committed): the next one
  reads them back and the period's digest still arrives, once.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from radtriage.settings import Settings
from schemas.deadletter import DeadLetter
from tests.integration.harness import Worker
from tests.support.kafka import Tail
from tests.support.notify_peers import notify_peers, webhook_receiver
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

SECRET = "ops-secret"
DIGEST_S = 3.0
TRITON = "TritonUnavailable: connect to triton:8001 refused"
DECODE = "EventDecodeError: not JSON"


def _letters(producer: KafkaProducer, topic: str, error: str, stage: str, n: int, tag: str) -> None:
    for i in range(n):
        uid = f"1.2.826.0.19.9.{tag}.{i}"
        letter = DeadLetter(source_topic="triage.requests.stat", stage=stage, error=error, study_uid=uid)
        producer.send(topic, key=uid.encode(), value=letter.to_bytes())
    producer.flush(10)


def test_a_flood_of_dead_letters_is_one_digest_per_cause_then_email_when_the_webhook_is_down(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    with notify_peers(SECRET, tmp_path / "pki") as (hooks, smtp, mail_env):
        ops_hook = f'{{"name": "ops", "url": "{hooks.url("/ops")}", "secret": "{SECRET}"}}'
        env = {
            **env,
            **mail_env,
            "RADTRIAGE_NOTIFY__WEBHOOKS": f"[{ops_hook}]",
            "RADTRIAGE_NOTIFY__OPERATORS__WEBHOOKS": '["ops"]',
            "RADTRIAGE_NOTIFY__OPERATORS__EMAILS": '["radtriage-ops@hospital.example"]',
            "RADTRIAGE_NOTIFY__OPERATORS__DIGEST_S": str(DIGEST_S),
            "RADTRIAGE_NOTIFY__ATTEMPTS": "2",
            "RADTRIAGE_NOTIFY__BACKOFF_S": "0.05",
        }
        tail = Tail(settings.kafka.bootstrap_servers, [t.audit])
        worker = Worker(env, settings.home)
        worker.start()
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        _letters(producer, t.deadletter, TRITON, "infer-stat", 40, "a")
        _letters(producer, t.deadletter, DECODE, "assemble", 20, "b")

        def counts() -> dict[str, int]:
            out: dict[str, int] = defaultdict(int)
            for r in hooks.on("/ops"):
                out[r.body["cause"]] += r.body["count"]
            return dict(out)

        expected = {"infer-stat: TritonUnavailable": 40, "assemble: EventDecodeError": 20}
        wait_until(lambda: counts() == expected, "every dead letter in a digest", 90)
        digests = hooks.on("/ops")
        # Bounded: one message per cause per period (the flood may straddle two periods).
        periods: dict[str, set[str]] = defaultdict(set)
        for r in digests:
            assert r.body["type"] == "radtriage.ops.deadletter" and r.body["examples"]
            periods[r.body["cause"]].add(r.body["period_start"])
        assert all(len(p) <= 2 for p in periods.values()), periods
        assert len(digests) == sum(len(p) for p in periods.values())
        tail.until(lambda: len(tail.of(t.audit, decision="ops_delivered")) == len(digests), timeout=30)
        delivered = tail.of(t.audit, decision="ops_delivered")
        assert sorted(d["detail"]["key"] for d in delivered) == sorted(r.key for r in digests)
        assert {d["detail"]["channel"] for d in delivered} == {"webhook:ops"}
        assert not hooks.refused and not hooks.duplicates and smtp.mails == []

        # The operators' webhook is down: two tries, then their e-mail.
        hooks.down = True
        _letters(producer, t.deadletter, TRITON, "infer-stat", 5, "c")
        wait_until(lambda: len(smtp.mails) == 1, "the digest by e-mail", 60)
        (mail,) = smtp.mails
        assert mail.tls and mail.to == ["radtriage-ops@hospital.example"]
        assert "5 dead letter(s)" in str(mail.message["Subject"])
        key = str(mail.message["Message-ID"]).strip("<>").split("@")[0]
        tail.until(
            lambda: any(d["detail"]["key"] == key for d in tail.of(t.audit, decision="ops_delivered")), 30
        )
        tries = [
            (d["detail"]["channel"], d["detail"]["error"] != "")
            for d in tail.of(t.audit, decision="ops_attempt")
            if d["detail"]["key"] == key
        ]
        assert sorted(tries) == [
            ("email:radtriage-ops@hospital.example", False),
            ("webhook:ops", True),
            ("webhook:ops", True),
        ]
        worker.kill(signal.SIGTERM)


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """The consumer group's committed offsets on `topic`, summed over its partitions (an
    OffsetFetch: this consumer never joins the group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return sum(consumer.committed(tp) or 0 for tp in parts)
    finally:
        consumer.close()


def test_a_digest_period_in_progress_survives_a_worker_kill_and_is_told_once(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    """Dead letters read and their offsets committed, the worker SIGKILLed before the period
    ends: the next worker reads them back and the digest arrives, once, with every item."""
    env, settings = worker_env
    t = settings.topics
    digest_s = 20.0
    with webhook_receiver(SECRET) as hooks:
        ops_hook = f'{{"name": "ops", "url": "{hooks.url("/ops")}", "secret": "{SECRET}"}}'
        env = {
            **env,
            "RADTRIAGE_NOTIFY__WEBHOOKS": f"[{ops_hook}]",
            "RADTRIAGE_NOTIFY__OPERATORS__WEBHOOKS": '["ops"]',
            "RADTRIAGE_NOTIFY__OPERATORS__DIGEST_S": str(digest_s),
        }
        tail = Tail(settings.kafka.bootstrap_servers, [t.audit])
        worker = Worker(env, settings.home)
        worker.start()
        # Early in a period, so the kill below comes before its end.
        wait_until(lambda: time.time() % digest_s < 2.0, "the start of a digest period", digest_s + 5)
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        _letters(producer, t.deadletter, TRITON, "infer-stat", 7, "k")
        group = settings.streams.app_id
        wait_until(
            lambda: _committed(settings.kafka.bootstrap_servers, group, t.deadletter) >= 7,
            "the dead letters read and committed",
            digest_s / 2,
        )
        assert hooks.on("/ops") == []  # the period is not over: nothing told yet
        worker.kill(signal.SIGKILL)

        restarted = Worker(env, settings.home)
        restarted.start()
        wait_until(lambda: sum(r.body["count"] for r in hooks.on("/ops")) >= 7, "the digest", 3 * digest_s)
        tail.drain(digest_s + 3)  # a second period: nothing more
        (digest,) = hooks.on("/ops")
        assert digest.body["cause"] == "infer-stat: TritonUnavailable" and digest.body["count"] == 7
        assert not hooks.duplicates
        delivered = tail.of(t.audit, decision="ops_delivered")
        assert [d["detail"]["key"] for d in delivered] == [digest.key]
        assert "notify-ops ledger: partition" in restarted.log_file.read_text()
        restarted.kill(signal.SIGTERM)
