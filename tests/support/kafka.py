"""Reading records back from Kafka topics, to assert on what a component published.

- `read_topic`: every record of one topic from its beginning, until a count arrived (and a
  short settle for extras): "exactly these events" on a topic of the test's own;
- `TopicReader`: records of several topics as they arrive, polled until a predicate holds,
  from the topics' beginning or from their end (only what happens from now on);
- `Tail`: a `TopicReader` from the end whose records are (topic, JSON value, headers);
- `read_to_end`: the values of a topic up to its end as of now;
- `local_kafka`: a real single-node broker of the test's own (the session's is in conftest).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, TopicPartition

from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import KafkaSettings, Settings
from schemas.results import HEADER_NAMES, MEDIA_TYPE, read_result
from tests.support.net import free_port

if TYPE_CHECKING:
    from radtriage.stack.kafka import LocalKafka

# Partitions of the topics a test makes for itself (the product's default).
PARTITIONS = 3


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    raw: bytes
    headers: dict[str, bytes]

    @cached_property
    def value(self) -> dict[str, Any]:
        """The value decoded as a JSON object; a results record (a plain FHIR Bundle, its
        metadata in headers) as its metadata's fields plus `bundle` (schemas/results.py)."""
        content_type = self.headers.get(HEADER_NAMES["content_type"], b"")
        if content_type.startswith(MEDIA_TYPE.encode()):
            return read_result(self.raw, list(self.headers.items())).fields()
        return dict(json.loads(self.raw))

    @classmethod
    def of(cls, r: Any) -> Record:
        """From a kafka-python ConsumerRecord."""
        return cls(r.topic, r.partition, r.offset, r.key or b"", r.value or b"", dict(r.headers or []))


def _consumer(kafka: str | KafkaSettings) -> KafkaConsumer:
    """`kafka`: a bootstrap address, or the settings of a secured cluster."""
    if isinstance(kafka, str):
        kafka = KafkaSettings(bootstrap_servers=kafka)
    return KafkaConsumer(group_id=None, enable_auto_commit=False, **kafka_python_kwargs(kafka))


class TopicReader:
    """Records of `topics` (all their partitions), polled by `until` / `drain`."""

    def __init__(
        self,
        kafka: str | KafkaSettings,
        topics: Sequence[str],
        *,
        from_beginning: bool = False,
        partitions: int | None = None,
        poll_ms: int = 200,
    ) -> None:
        """`partitions`: read partitions 0..n-1 of each topic instead of asking the broker;
        `poll_ms`: how long one poll waits for records."""
        self.consumer = _consumer(kafka)
        self.poll_ms = poll_ms
        parts = [
            TopicPartition(t, p)
            for t in topics
            for p in (
                range(partitions)
                if partitions is not None
                else sorted(self.consumer.partitions_for_topic(t) or {0})
            )
        ]
        self.consumer.assign(parts)
        if from_beginning:
            self.consumer.seek_to_beginning(*parts)
        else:
            self.consumer.seek_to_end(*parts)
            for tp in parts:
                self.consumer.position(tp)  # resolve "the end" now, not at the first poll
        self.records: list[Record] = []

    def poll(self) -> None:
        for recs in self.consumer.poll(timeout_ms=self.poll_ms).values():
            self.records += [Record.of(r) for r in recs]

    def until(self, predicate: Callable[[], object], timeout: float = 60) -> None:
        """Poll until `predicate()` holds; fail (showing what was read) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            self.poll()
        assert predicate(), self.describe()

    def drain(self, seconds: float) -> None:
        """Poll for `seconds` (to catch records that should not come)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()

    def of(self, topic: str) -> list[Record]:
        return [r for r in self.records if r.topic == topic]

    def describe(self) -> object:
        return Counter(r.topic for r in self.records)

    def close(self) -> None:
        self.consumer.close()


class Tail(TopicReader):
    """What is published on `topics` from now on, as (topic, JSON value, headers)."""

    def __init__(self, kafka: str | KafkaSettings, topics: Sequence[str], poll_ms: int = 200) -> None:
        super().__init__(kafka, topics, poll_ms=poll_ms)

    @property
    def seen(self) -> list[tuple[str, dict[str, Any], dict[str, bytes]]]:
        return [(r.topic, r.value, r.headers) for r in self.records]

    def poll(self) -> None:
        read = len(self.records)
        super().poll()
        for r in self.records[read:]:
            _ = r.value  # decoded as read: a value that is not JSON fails the poll, not a later look

    def of(self, topic: str, **match: Any) -> list[dict[str, Any]]:  # type: ignore[override]
        """Values on `topic` whose fields equal `match`."""
        return [d for t, d, _ in self.seen if t == topic and all(d.get(k) == v for k, v in match.items())]

    def describe(self) -> object:
        return [(t, d.get("study_uid"), d.get("decision") or d.get("stage")) for t, d, _ in self.seen]


def read_topic(
    bootstrap: str,
    topic: str,
    want: int,
    timeout_s: float = 30,
    settle_s: float = 2,
    partitions: int = PARTITIONS,
) -> list[Record]:
    """Every record of `topic` (partitions 0..`partitions`-1) from its beginning: until `want`
    arrived, then `settle_s` more to catch extras; what arrived by `timeout_s` otherwise."""
    reader = TopicReader(bootstrap, [topic], from_beginning=True, partitions=partitions)
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < (settle_until or deadline):
            reader.poll()
            if settle_until is None and len(reader.records) >= want:
                settle_until = time.monotonic() + settle_s
    finally:
        reader.close()
    return reader.records


def read_to_end(
    kafka: str | KafkaSettings, topic: str, until: int | None = None, timeout_s: float = 60
) -> list[bytes]:
    """The values of `topic` from its beginning up to its end as of now or, with `until`,
    until that many arrived; what arrived by `timeout_s` otherwise."""
    consumer = _consumer(kafka)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until is None and all(consumer.position(tp) >= ends[tp] for tp in parts):
                break
            if until is not None and len(values) >= until:
                break
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records]
        return values
    finally:
        consumer.close()


@contextmanager
def local_kafka(data_dir: Path) -> Iterator[LocalKafka]:
    """A real single-node Apache Kafka (KRaft) on free ports, by the project's own launcher
    (the one `radtriage up` uses), stopped after the `with` block."""
    from radtriage.stack.kafka import LocalKafka  # only where a test starts a broker

    settings = Settings()
    broker = LocalKafka(
        data_dir=data_dir,
        port=free_port(),
        controller_port=free_port(),
        version=settings.kafka.embedded_version,
        cache_root=settings.cache,
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
