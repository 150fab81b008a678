"""Create the topics radtriage needs, idempotently, on any Kafka (embedded or not)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from radtriage.kafka_clients import as_kafka_settings, kafka_python_kwargs
from radtriage.settings import KafkaSettings


class KafkaUnavailable(RuntimeError):
    pass


def topic_config(kafka: KafkaSettings, config: Mapping[str, str] | None = None) -> dict[str, str]:
    """Per-topic configs: min.insync.replicas from the settings unless `config` says otherwise."""
    return {"min.insync.replicas": str(kafka.min_insync_replicas), **dict(config or {})}


def ensure_topics(
    kafka: KafkaSettings | str,
    topics: Mapping[str, int],
    replication_factor: int | None = None,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create each missing topic with its partition count; existing topics are left as they are.

    `kafka` is the connection settings (security included), or just a plaintext bootstrap
    list; the replication factor and min.insync.replicas default to the settings'.
    """
    k = as_kafka_settings(kafka)
    replicas = k.replication_factor if replication_factor is None else replication_factor
    deadline = time.monotonic() + timeout_s
    while True:
        admin = _admin_client(k, deadline)
        try:
            _create_missing(admin, k, topics, replicas, config)
            return
        except TopicAlreadyExistsError:
            return  # another process created them meanwhile
        except KafkaError as exc:
            # A cluster just started may not have every broker in its metadata yet
            # (UnknownBrokerId, NotController...): retried until the deadline, each time with a
            # new client, because kafka-python's admin keeps the controller id and brokers it
            # bootstrapped with (a client made before the controller registered asked it for
            # 120 s and never learnt of it: CI's 3-node cluster, 2026-12-07).
            retriable = getattr(exc, "retriable", False) or type(exc).__name__ in _TRANSIENT
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            admin.close()


def _admin_client(k: KafkaSettings, deadline: float) -> KafkaAdminClient:
    """An admin client, retried until `deadline` while the cluster cannot be reached."""
    while True:
        try:
            return KafkaAdminClient(request_timeout_ms=10000, **kafka_python_kwargs(k))
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"Kafka at {k.bootstrap_servers} unreachable: {exc}") from exc
            time.sleep(1)


_TRANSIENT = {"UnknownBrokerIdError", "NodeNotReadyError", "NotControllerError", "KafkaConnectionError"}


def _create_missing(
    admin: KafkaAdminClient,
    k: KafkaSettings,
    topics: Mapping[str, int],
    replicas: int,
    config: Mapping[str, str] | None,
) -> None:
    existing = set(admin.list_topics())
    missing = [
        NewTopic(name, partitions, replicas, topic_configs=topic_config(k, config))
        for name, partitions in topics.items()
        if name not in existing
    ]
    if missing:
        admin.create_topics(missing)
        # Accepted is not usable yet: wait until each has a leader for every partition, so
        # the caller's first produce does not meet UnknownTopicOrPartition.
        admin.wait_for_topics([t.name for t in missing], timeout_ms=30000)
