"""The Faust application: topics, tables and the small helpers every agent shares.

Messages are raw JSON bytes parsed with the pydantic schemas in `schemas/` (not
Faust Records), so producers in the connectors (kafka-python) and consumers here
share one definition, and an unreadable message becomes a dead letter with the
reason instead of an exception inside Faust's deserializer that stalls a partition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import EventT, TopicT

from models import registry
from radtriage import kafka_clients, metrics
from radtriage.settings import LANES, Settings
from radtriage.telemetry import HeaderList, record_ack, send_span
from schemas.base import Event
from schemas.deadletter import DeadLetter

log = logging.getLogger(__name__)

# Dead-letter payloads keep enough of the original for forensics without copying a huge message.
DEADLETTER_PAYLOAD_LIMIT = 64 * 1024


@dataclass
class TriageTopics:
    instances: TopicT
    studies: TopicT
    # Internal repartition topics of the order-study join (send side)...
    studies_by_patient: TopicT
    studies_by_accession: TopicT
    # ...and what the join's agents consume: each a pair of co-partitioned topics
    # (same key, same partition count), so one worker sees both sides of a key.
    patient_side: TopicT
    accession_side: TopicT
    lanes: dict[str, TopicT]
    findings: TopicT
    results_fhir: TopicT
    alerts: dict[str, TopicT]
    audit: TopicT
    deadletter: TopicT


def create_app(settings: Settings) -> faust.App:
    return faust.App(
        settings.streams.app_id,
        # Broker URL, credentials (SASL/TLS) and producer_acks=-1 (acks=all, and idempotence
        # through radtriage's transport): radtriage/kafka_clients.py.
        **kafka_clients.faust_app_kwargs(settings.kafka),
        store="memory://",
        # Faust keeps per-app files even with in-memory tables; by default in the working
        # directory, which for a worker started from a checkout is the checkout.
        datadir=str(settings.home / "faust"),
        # Tables (assembly state, alerts sent) are JSON; topics override this with raw
        # bytes in `declare_topics`, since their values are our own schema-checked JSON.
        key_serializer="json",
        value_serializer="json",
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        # Our own HTTP surface lives in the connectors; the Faust web server would only
        # take another port.
        web_enabled=False,
        # A 3D volume load + Triton call can take seconds; do not let Faust think we hung.
        broker_commit_every=100,
        broker_session_timeout=settings.streams.session_timeout_s,
        broker_heartbeat_interval=settings.streams.heartbeat_interval_s,
        stream_wait_empty=False,
    )


def declare_topics(app: faust.App, settings: Settings) -> TriageTopics:
    t = settings.topics

    def topic(*names: str) -> TopicT:
        return app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    s = settings.streams
    return TriageTopics(
        instances=topic(t.instances),
        studies=topic(t.studies),
        studies_by_patient=topic(s.studies_by_patient_topic),
        studies_by_accession=topic(s.studies_by_accession_topic),
        patient_side=topic(t.encounters, s.studies_by_patient_topic),
        accession_side=topic(t.orders, s.studies_by_accession_topic),
        lanes={lane: topic(t.lane_topic(lane)) for lane in LANES},
        findings=topic(t.findings),
        results_fhir=topic(t.results_fhir),
        alerts={c: topic(t.alert_topic(c)) for c in registry.alert_channels()},
        audit=topic(t.audit),
        deadletter=topic(t.deadletter),
    )


async def publish(
    topic: TopicT, key: str, event: Event, headers: HeaderList | None = None, *, partition: int | None = None
) -> int | None:
    """Send and wait for the broker's acknowledgement before the stream moves on; the
    partition it was written to (None if the client did not say). `partition`: where to
    write it (default: the producer's partitioner, by key).

    Waiting per message costs a few milliseconds but means the source offset is
    never committed ahead of what we produced from it.
    """
    return await publish_value(topic, key, event.to_bytes(), headers, about=event, partition=partition)


def key_partition(topic: TopicT, key: str) -> int | None:
    """The partition the producer's partitioner gives `key` on `topic`, from the metadata
    it has now; None when it has none for the topic yet (nothing sent there so far)."""
    try:
        return int(topic.app.producer.key_partition(topic.get_topic_name(), key.encode()).partition)
    except Exception:  # no metadata for the topic yet, or a producer not started
        return None


async def publish_value(
    topic: TopicT,
    key: str,
    value: bytes,
    headers: HeaderList | None = None,
    *,
    about: object | None = None,
    partition: int | None = None,
) -> int | None:
    """`publish` for a value that is not an Event (the results topic's plain FHIR Bundle,
    its metadata in `headers`): the same send, acknowledgement and PRODUCER span, the
    trace context added to `headers`. `about`: what the span's ids (study UID, accession
    number) are read from."""
    carrier = header_text(headers)
    # A PRODUCER span per record ("send <topic>"), whose context the record carries on.
    with send_span(topic.get_topic_name(), key, carrier, about) as (span, carried):
        sent = [(k, v.encode("latin-1")) for k, v in carried.items()]
        fut = await topic.send(key=key.encode(), value=value, headers=sent, partition=partition)
        meta = await fut
        partition = getattr(meta, "partition", None)
        record_ack(span, partition, getattr(meta, "offset", None))
        return partition if isinstance(partition, int) else None


def header_text(headers: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """A record's headers as text (latin-1: every byte kept), whichever shape the client gave."""
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    return {
        str(k): v.decode("latin-1") if isinstance(v, bytes | bytearray) else str(v or "") for k, v in items
    }


def event_key(event: EventT[Any]) -> str:
    key = event.key
    if isinstance(key, bytes | bytearray):
        return key.decode("utf-8", errors="replace")
    return "" if key is None else str(key)


async def dead_letter(
    topics: TriageTopics,
    event: EventT[Any],
    stage: str,
    error: str,
    study_uid: str = "",
    headers: HeaderList | None = None,
) -> None:
    value: Any = event.value
    payload = value.decode("utf-8", errors="replace") if isinstance(value, bytes | bytearray) else str(value)
    message = event.message
    letter = DeadLetter(
        source_topic=message.topic,
        stage=stage,
        error=error,
        key=event_key(event),
        partition=message.partition,
        offset=message.offset,
        study_uid=study_uid,
        payload=payload[:DEADLETTER_PAYLOAD_LIMIT],
        headers=header_text(event.headers),
    )
    log.warning(
        "dead letter from %s[%s]@%s stage=%s: %s",
        message.topic,
        message.partition,
        message.offset,
        stage,
        error,
    )
    await publish(topics.deadletter, letter.key or study_uid or "unknown", letter, headers)
    metrics.count_dead_letter(stage)
