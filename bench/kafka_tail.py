"""Reading topics from 'now' on: what every bench's output watcher does before it sends."""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaConsumer, TopicPartition


def read_from_end(consumer: KafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    """Assign `consumer` every partition of `topics` (partition 0 of a topic the broker does
    not know yet) at its end; returns the partitions.

    The end offsets are resolved here, before anything is sent: left to the first poll, "the
    end" could already lie past the records the bench is about to cause.
    """
    parts = [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or {0})
    ]
    consumer.assign(parts)
    consumer.seek_to_end(*parts)
    for tp in parts:
        consumer.position(tp)
    return parts
