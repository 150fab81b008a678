"""Publish events durably: the one way every connector puts something into Kafka.

`publish` returns only once the broker has acknowledged the record with acks=all,
so a connector can answer its sender (C-STORE success, HL7 ACK, HTTP 201) knowing
the event is safe; any failure is a `PublishError` the connector turns into a
standard refusal that makes the sender retry.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from kafka import KafkaProducer
from kafka.errors import KafkaError

from schemas.base import Event


class PublishError(RuntimeError):
    """Kafka did not acknowledge the event in time; the sender must be told to retry."""


class EventPublisher:
    def __init__(self, bootstrap_servers: str, *, timeout_s: float, client_id: str) -> None:
        self._bootstrap = bootstrap_servers
        self._timeout_s = timeout_s
        self._client_id = client_id
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def _get_producer(self) -> KafkaProducer:
        # Created on first use, so a connector starts (and answers with a retryable
        # failure) even while Kafka is still coming up.
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self._bootstrap,
                        client_id=self._client_id,
                        acks="all",
                        enable_idempotence=True,
                        retries=5,
                        linger_ms=1,
                        max_block_ms=int(self._timeout_s * 1000),
                        # Bounded, so a sender waiting on us hears "retry later" before its own
                        # DIMSE/ACK timeout; the next request tries to connect again.
                        bootstrap_timeout_ms=int(self._timeout_s * 1000),
                        reconnect_backoff_max_ms=2000,
                        request_timeout_ms=int(self._timeout_s * 1000),
                        compression_type=None,
                    )
                except KafkaError as exc:
                    raise PublishError(f"Kafka at {self._bootstrap} unreachable: {exc}") from exc
            return self._producer

    def publish(self, topic: str, key: str, event: Event, headers: Mapping[str, str] | None = None) -> None:
        header_list = [(k, v.encode()) for k, v in (headers or {}).items()]
        try:
            future = self._get_producer().send(
                topic, key=key.encode(), value=event.to_bytes(), headers=header_list
            )
            future.get(timeout=self._timeout_s)
        except KafkaError as exc:
            raise PublishError(
                f"Kafka did not acknowledge {topic} within {self._timeout_s:g}s: {exc}"
            ) from exc

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=self._timeout_s)
                self._producer = None
