"""bench/kafka_read.py: where the benches' Kafka readers start, on a recording fake consumer."""

from __future__ import annotations

from kafka import TopicPartition

from bench.kafka_read import read_from_end, read_from_start

EXPECTED = [TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("unknown", 0)]


class FakeConsumer:
    """What the readers ask of a KafkaConsumer, recorded."""

    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self.partitions = partitions
        self.calls: list[tuple[str, list[TopicPartition]]] = []

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions.get(topic)

    def assign(self, parts: list[TopicPartition]) -> None:
        self.calls.append(("assign", list(parts)))

    def seek_to_end(self, *parts: TopicPartition) -> None:
        self.calls.append(("seek_to_end", list(parts)))

    def seek_to_beginning(self, *parts: TopicPartition) -> None:
        self.calls.append(("seek_to_beginning", list(parts)))

    def position(self, tp: TopicPartition) -> int:
        self.calls.append(("position", [tp]))
        return 0


def test_read_from_end_assigns_every_partition_and_resolves_the_end_now() -> None:
    consumer = FakeConsumer({"a": {1, 0}})
    assert read_from_end(consumer, ["a", "unknown"]) == EXPECTED  # type: ignore[arg-type]
    assert consumer.calls == [
        ("assign", EXPECTED),
        ("seek_to_end", EXPECTED),
        *(("position", [tp]) for tp in EXPECTED),
    ]


def test_read_from_start_assigns_every_partition_at_its_beginning() -> None:
    consumer = FakeConsumer({"a": {1, 0}})
    assert read_from_start(consumer, ["a", "unknown"]) == EXPECTED  # type: ignore[arg-type]
    assert consumer.calls == [("assign", EXPECTED), ("seek_to_beginning", EXPECTED)]
