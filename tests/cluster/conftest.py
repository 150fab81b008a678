"""Fixtures of the cluster tests: a real 3-node KRaft cluster, started once per module that asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.harness import ClusterUnderTest, running_cluster


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterUnderTest]:
    """A plaintext 3-broker cluster (each node broker + controller), torn down after the module."""
    with running_cluster(tmp_path_factory.mktemp("kafka-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def secure_kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterUnderTest]:
    """A 3-broker cluster on SASL_SSL (SCRAM-SHA-512, certificates made by the test) with the
    roles' ACLs; `kafka_settings(role)` / `settings_for(role)` / `env_for(role)` per role."""
    with running_cluster(tmp_path_factory.mktemp("kafka-secure"), secure=True) as cluster:
        yield cluster
