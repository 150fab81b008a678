"""The Kafka broker killed (SIGKILL) and restarted while orders and studies are in flight.

A real broker of this test's own (the session's one must not be killed), the real HL7
listener process, a real worker. While the broker is down the listener holds each ACK
for up to its produce timeout, then answers AR 207 ("retry later"); the sender — here
as an interface engine does — resends every message that was not AA'd. Afterwards every
message is on `imaging.orders`; everything acknowledged AA is there exactly once; and
the worker, which lived through the outage, routes a study sent after it. Counts, never
timings.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from radtriage.demo_messages import hl7_order
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from radtriage.stack.kafka import LocalKafka
from radtriage.stack.process import port_in_use
from tests.integration.harness import Worker, pixelless_series, release
from tests.support.kafka import Tail, local_kafka
from tests.support.net import free_port
from tests.support.process import start_radtriage, wait_listening

pytestmark = pytest.mark.integration


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    with local_kafka(tmp_path / "kafka") as broker:
        yield broker


def _kill(broker: LocalKafka) -> None:
    service = broker._service
    assert service is not None and service.process is not None
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait(30)
    broker._service = None


def _ack_code(ack: bytes | str) -> str:
    text = ack.decode(errors="replace") if isinstance(ack, bytes) else ack
    msa = next(s for s in text.replace("\n", "\r").split("\r") if s.startswith("MSA"))
    return msa.split("|")[1]


def _send_until_accepted(port: int, messages: dict[str, str], acks: dict[str, list[str]]) -> None:
    """Send each message; resend what was not AA'd (as an interface engine does), in order."""
    pending = list(messages)
    while pending:
        accession = pending[0]
        try:
            with MLLPClient("127.0.0.1", port) as client:
                code = _ack_code(client.send_message(messages[accession]))
        except OSError:
            code = "no answer"
        acks.setdefault(accession, []).append(code)
        if code == "AA":
            pending.pop(0)
        else:
            time.sleep(0.5)


def test_broker_killed_and_restarted_while_orders_and_studies_are_in_flight(
    own_kafka: LocalKafka, tmp_path: Path
) -> None:
    bootstrap = own_kafka.bootstrap_servers
    settings = Settings(home=tmp_path)
    settings.kafka.bootstrap_servers = bootstrap
    ensure_topics(
        bootstrap,
        dict.fromkeys(settings.topics.all() + settings.streams.internal_topics(), settings.kafka.partitions),
    )
    hl7_port = free_port()
    env = dict(os.environ)
    env.pop("RADTRIAGE_SETTINGS_JSON", None)
    env.update(
        {
            "RADTRIAGE_HOME": str(tmp_path),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RADTRIAGE_HL7__PORT": str(hl7_port),
            "RADTRIAGE_KAFKA__PRODUCE_TIMEOUT_S": "8",
            "RADTRIAGE_TRITON__GRPC_URL": f"127.0.0.1:{free_port()}",
            "RADTRIAGE_TRITON__TIMEOUT_S": "1",
            "RADTRIAGE_TELEMETRY__EXPORTER": "none",
        }
    )
    worker = Worker(env, tmp_path)
    worker.start()
    listener = start_radtriage(["hl7-listener"], env, tmp_path / "hl7.log")
    try:
        wait_listening(listener, hl7_port, tmp_path / "hl7.log")

        stamp = time.time_ns()
        batches = [
            {f"K{stamp}{b}{i:02d}": "" for i in range(10)} for b in range(3)
        ]  # before, during, after the outage
        for batch in batches:
            for accession in batch:
                batch[accession] = hl7_order(accession, f"MRN{accession}", priority="R", indication="x")
        acks: dict[str, list[str]] = {}
        _send_until_accepted(hl7_port, batches[0], acks)

        _kill(own_kafka)
        assert not port_in_use(own_kafka.port)  # the outage is real
        during = threading.Thread(target=_send_until_accepted, args=(hl7_port, batches[1], acks))
        during.start()
        time.sleep(3.0)  # messages now wait on (or are refused for) a broker that is gone
        own_kafka.start()
        during.join(180)
        assert not during.is_alive(), "the listener never accepted the messages after the broker returned"
        _send_until_accepted(hl7_port, batches[2], acks)

        # The worker lived through the outage: a study sent now is routed.
        uid = f"1.2.826.0.20.{stamp}"
        tail = Tail(bootstrap, [settings.topics.requests_stat, settings.topics.audit])
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        for ev in pixelless_series(uid):
            producer.send(settings.topics.instances, key=uid.encode(), value=ev.to_bytes())
        producer.send(settings.topics.instances, key=uid.encode(), value=release(uid)).get(30)
        tail.until(lambda: bool(tail.of(settings.topics.requests_stat, study_uid=uid)), timeout=120)
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(60)
        worker.kill(signal.SIGTERM)

    # Every message ended AA'd (the sender resent what was refused) ...
    all_sent = {a for batch in batches for a in batch}
    assert {a for a, codes in acks.items() if codes[-1] == "AA"} == all_sent
    assert all(code in ("AA", "AR", "no answer") for codes in acks.values() for code in codes), acks
    # ... and is on the topic; one that was AA'd on its first try exactly once.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    parts = [
        TopicPartition(settings.topics.orders, p)
        for p in consumer.partitions_for_topic(settings.topics.orders) or ()
    ]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = consumer.end_offsets(parts)
    seen: Counter[str] = Counter()
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for records in consumer.poll(timeout_ms=500).values():
            seen.update(json.loads(r.value)["accession_number"] for r in records)
    consumer.close()
    assert set(seen) == all_sent
    first_try = {a for a, codes in acks.items() if codes == ["AA"]}
    assert all(seen[a] == 1 for a in first_try), {a: seen[a] for a in first_try if seen[a] != 1}
