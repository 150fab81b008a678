"""The local 3-node cluster: replicated topics, and acks=all writes surviving a SIGKILLed broker.

Real brokers (three JVMs, KRaft, each broker + controller). Counts, not timings: every
record the cluster acknowledged with acks=all is read back after a node was killed.
"""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from connectors.publisher import EventPublisher, PublishError
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import Settings
from schemas.deadletter import DeadLetter
from tests.cluster.harness import ClusterUnderTest
from tests.support.kafka import read_to_end

pytestmark = pytest.mark.integration


def _letter(i: int) -> DeadLetter:
    return DeadLetter(source_topic="imaging.orders", stage="test", error=f"record {i}", payload="")


def test_three_brokers_and_topics_replicated_three_times_two_in_sync(kafka_cluster: ClusterUnderTest) -> None:
    k = kafka_cluster.kafka_settings("admin")
    admin = KafkaAdminClient(**kafka_python_kwargs(k))
    try:
        brokers = {b["broker_id"] for b in admin.describe_cluster()["brokers"]}
        topic = Settings().topics.deadletter
        # Each broker learns of a new topic from the metadata log a moment after creation.
        admin.wait_for_topics([topic], timeout_ms=30000)
        [described] = admin.describe_topics([topic])
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    assert brokers == {1, 2, 3}
    assert len(kafka_cluster.bootstrap_servers.split(",")) == 3
    assert described["error_code"] == 0 and len(described["partitions"]) == 3
    assert {len(p["replica_nodes"]) for p in described["partitions"]} == {3}
    assert {len(p["isr_nodes"]) for p in described["partitions"]} == {3}
    assert configs["topic"][topic]["min.insync.replicas"]["value"] == "2"


def test_acks_all_survives_a_killed_broker_without_loss(kafka_cluster: ClusterUnderTest) -> None:
    topic = "cluster.test.durability"
    kafka_cluster.ensure_topics([topic])
    dicom = kafka_cluster.kafka_settings("dicom")
    publisher = EventPublisher(dicom, timeout_s=20.0, client_id="test-cluster")
    acked = 0
    try:
        for i in range(50):
            publisher.publish(topic, f"k{i}", _letter(i))
            acked += 1
        kafka_cluster.kill(2)
        # Two of three replicas remain: min.insync.replicas=2 is met, acks=all still succeeds.
        for i in range(50, 100):
            publisher.publish(topic, f"k{i}", _letter(i))
            acked += 1
        kafka_cluster.kill(3)
        # One replica left: below min.insync.replicas, so acks=all must refuse (not hang, not lose).
        short = EventPublisher(kafka_cluster.kafka_settings("dicom"), timeout_s=5.0, client_id="test-short")
        try:
            with pytest.raises(PublishError) as refused:
                short.publish(topic, "k-refused", _letter(-1))
        finally:
            short.close()
    finally:
        publisher.close()
        for node in (2, 3):
            if not kafka_cluster.cluster.node(node).running:
                kafka_cluster.restart(node)
    assert "NotEnoughReplicas" in str(refused.value) or "Timeout" in str(refused.value)
    kafka_cluster.wait_in_sync([topic])
    values = read_to_end(kafka_cluster.kafka_settings("admin"), topic, timeout_s=100)
    errors = [DeadLetter.model_validate_json(v).error for v in values]
    assert acked == 100
    # Every acknowledged record is there exactly once (idempotence: no duplicate from a retry).
    assert sorted(e for e in errors if e != "record -1") == sorted(f"record {i}" for i in range(100))
