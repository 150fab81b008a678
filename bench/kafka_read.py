"""Where a bench's Kafka reader starts: every partition of its topics, from the beginning or
from 'now' on (what every bench's output watcher does before it sends)."""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaConsumer, TopicPartition


def partitions(consumer: KafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of `topics`; partition 0 of a topic the broker does not know yet
    (auto-created by the first record: the bench may read before anything is written)."""
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or {0})
    ]


def read_from_start(consumer: KafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    """Assign `consumer` every partition of `topics` at its beginning; returns the partitions."""
    parts = partitions(consumer, topics)
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    return parts


def read_from_end(consumer: KafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    """Assign `consumer` every partition of `topics` at its end; returns the partitions.

    The end offsets are resolved here, before anything is sent: left to the first poll, "the
    end" could already lie past the records the bench is about to cause.
    """
    parts = partitions(consumer, topics)
    consumer.assign(parts)
    consumer.seek_to_end(*parts)
    for tp in parts:
        consumer.position(tp)
    return parts
