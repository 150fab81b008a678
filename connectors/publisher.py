"""Publish events durably: the one way every connector puts something into Kafka.

`publish` returns only once the broker has acknowledged the record with acks=all,
so a connector can answer its sender (C-STORE success, HL7 ACK, HTTP 201) knowing
the event is safe; any failure is a `PublishError` the connector turns into a
standard refusal that makes the sender retry.

Delivery is at-least-once end to end: when `publish` gives up, the record may still
reach Kafka a little later, and the sender's retry then publishes it again. Consumers
are written for that (study assembly keys instances by SOP Instance UID, the blob
store overwrites a re-sent instance with itself).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError
from kafka.producer.future import RecordMetadata
from opentelemetry.trace import Span

from radtriage.kafka_clients import (
    as_kafka_settings,
    auth_reason,
    authentication_failures,
    kafka_python_producer_kwargs,
)
from radtriage.settings import KafkaSettings
from radtriage.telemetry import record_ack, send_span
from schemas.base import Event

__all__ = ["EventPublisher", "PendingPublish", "PublishError", "RecordMetadata"]


class PublishError(RuntimeError):
    """Kafka did not acknowledge the event in time; the sender must be told to retry."""


def _describe(exc: BaseException) -> str:
    # kafka-python's errors already start with their class name; others do not.
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class PendingPublish:
    """A record on its way to the broker (`EventPublisher.publishing`)."""

    def __init__(
        self,
        publisher: EventPublisher,
        producer: KafkaProducer,
        future: Any,
        topic: str,
        started: float,
        span: Span | None,
    ) -> None:
        self._publisher, self._producer, self._future = publisher, producer, future
        self._topic, self._started, self._span = topic, started, span

    def wait(self) -> RecordMetadata:
        """Block until acks=all; `PublishError` if not within the publisher's timeout,
        counted from the send (one budget: connecting, metadata and the acknowledgement)."""
        remaining = max(self._publisher.timeout_s - (time.monotonic() - self._started), 0.05)
        try:
            metadata: RecordMetadata = self._future.get(timeout=remaining)
        except Exception as exc:  # every KafkaError, and the producer's own Type/ValueErrors
            raise self._publisher._failed(self._producer, self._topic, exc) from exc
        record_ack(self._span, metadata.partition, metadata.offset)
        return metadata


class EventPublisher:
    """A thread-safe, lazily connected, acks=all Kafka producer for connectors.

    Safe to share between threads (pynetdicom runs one thread per association):
    kafka-python's producer is thread-safe, and only its creation is serialised here.
    """

    def __init__(self, kafka: KafkaSettings | str, *, timeout_s: float, client_id: str) -> None:
        """`kafka`: the connection settings (security included), or a plaintext bootstrap list."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._kafka = as_kafka_settings(kafka)
        self._bootstrap = self._kafka.bootstrap_servers
        self._timeout_s = timeout_s
        self._client_id = client_id
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        # When the last attempt to connect failed, and why: threads that queued behind
        # that attempt fail at once instead of each waiting a full timeout in turn.
        self._failed_at = float("-inf")
        self._failure = ""
        self._closed = False

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def _new_producer(self) -> KafkaProducer:
        timeout_ms = int(self._timeout_s * 1000)
        linger_ms = 1
        return KafkaProducer(
            # Durability: acks=all (the leader answers only once every in-sync replica has the
            # record) and idempotence (a retried batch is never written twice), with the
            # connection's security options.
            **kafka_python_producer_kwargs(self._kafka),
            client_id=self._client_id,
            # `retries` stays at its idempotent default (unbounded); delivery_timeout_ms is
            # what bounds retrying. It is set to its minimum (request timeout + linger) so a
            # record we already reported as failed does not linger in the producer for the
            # 120 s default and surface long after the sender was told to retry.
            request_timeout_ms=timeout_ms,
            delivery_timeout_ms=timeout_ms + linger_ms,
            # Senders wait synchronously per object; batching only pays between concurrent
            # associations, so the linger is kept to a millisecond.
            linger_ms=linger_ms,
            # A record is one small JSON event; instance payloads live in the blob store.
            max_request_size=1 << 20,
            # send() waits for topic metadata at most this long...
            max_block_ms=timeout_ms,
            # ...and the constructor for the first broker connection: both bounded, so the
            # sender hears "retry later" before its own DIMSE/ACK timeout.
            bootstrap_timeout_ms=timeout_ms,
            # Come back quickly after a broker restart (default backs off up to 30 s).
            reconnect_backoff_max_ms=1000,
        )

    def _get_producer(self, started: float) -> KafkaProducer:
        # Created on first use (not in __init__), so a connector starts — and answers with
        # a retryable failure — even while Kafka is still coming up or briefly down.
        with self._lock:
            if self._closed:
                raise PublishError("publisher is closed")
            if self._producer is not None:
                return self._producer
            if self._failed_at >= started:
                # Another thread tried while we queued for the lock, and failed: same answer.
                raise PublishError(self._failure)
            with authentication_failures() as auth:
                try:
                    self._producer = self._new_producer()
                except Exception as exc:  # NoBrokersAvailable, KafkaTimeoutError, socket errors...
                    self._failed_at = time.monotonic()
                    if auth.last:  # the brokers answered, and refused our credentials
                        reason = auth_reason(auth.last)
                        self._failure = f"Kafka at {self._bootstrap} refused the login: {reason}"
                    else:
                        self._failure = f"Kafka at {self._bootstrap} unreachable: {_describe(exc)}"
                    raise PublishError(self._failure) from exc
            return self._producer

    def _discard_if_broken(self, producer: KafkaProducer) -> None:
        """Drop a producer that can no longer send (closed or fatal idempotence state), so
        the next publish builds a fresh one instead of failing forever."""
        sender = getattr(producer, "_sender", None)
        txn = getattr(producer, "_transaction_manager", None)
        broken = bool(getattr(producer, "_closed", False))
        broken = broken or (sender is not None and not sender.is_alive())
        broken = broken or (txn is not None and txn.has_fatal_error())
        if not broken:
            return
        with self._lock:
            if self._producer is producer:
                self._producer = None
        producer.close(timeout=0)

    def publish(
        self, topic: str, key: str, event: Event, headers: Mapping[str, str] | None = None
    ) -> RecordMetadata:
        """Send `event` and block until Kafka acknowledged it (acks=all).

        Returns the record's metadata (partition, offset); raises `PublishError` with the
        reason if the broker did not acknowledge within `timeout_s`.
        """
        with self.publishing(topic, key, event, headers) as pending:
            return pending.wait()

    @contextmanager
    def publishing(
        self, topic: str, key: str, event: Event, headers: Mapping[str, str] | None = None
    ) -> Iterator[PendingPublish]:
        """Start sending `event`; the block does other work, then `wait()`s for the ack.

        For a connector whose own durable work (an fsync) can run while the record is on
        its way to the broker: the two latencies overlap instead of adding up. The
        PRODUCER span covers the block. Leaving the block without waiting does not take
        the record back: it may still be acknowledged (at-least-once, as after a timeout).
        """
        started = time.monotonic()
        # A PRODUCER span per record (OpenTelemetry messaging conventions); its context is
        # the traceparent the record carries.
        with send_span(topic, key, headers, event) as (span, carried):
            header_list = [(k, v.encode()) for k, v in carried.items()]
            producer = self._get_producer(started)
            try:
                future = producer.send(topic, key=key.encode(), value=event.to_bytes(), headers=header_list)
            except Exception as exc:  # every KafkaError, and the producer's own Type/ValueErrors
                raise self._failed(producer, topic, exc) from exc
            yield PendingPublish(self, producer, future, topic, started, span)

    def _failed(self, producer: KafkaProducer, topic: str, exc: BaseException) -> PublishError:
        self._discard_if_broken(producer)
        return PublishError(
            f"Kafka did not acknowledge {topic} within {self._timeout_s:g}s: {_describe(exc)}"
        )

    def close(self) -> None:
        """Flush what is in flight (bounded by the timeout) and release the connection."""
        with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=self._timeout_s)
            except KafkaTimeoutError:
                # What was still in flight was already reported as failed to its sender;
                # shutting down must not fail on it (e.g. a cluster below min.insync.replicas).
                pass
