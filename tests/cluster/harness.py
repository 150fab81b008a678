"""A real local 3-node Kafka cluster for tests: start it, hand out per-role client settings.

`ClusterUnderTest` is what the fixtures in tests/cluster/conftest.py yield: the bootstrap
list, the node handles (kill = SIGKILL, restart on the same data), and Settings / env for
a role (admin, dicom, hl7, http, worker, operator). On the plaintext cluster every role
gets the same connection; on the secure one (step 3) each its own SCRAM user.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from radtriage.kafka_acls import ROLES, apply_acls
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import KafkaSettings, Settings
from radtriage.stack.kafka import LocalKafka, LocalKafkaCluster, cluster_client_settings, wait_in_sync
from radtriage.stack.kafka_secure import SecureLocalKafkaCluster
from tests.support.net import free_port

# Small heaps: the machine (2 cores, 24 GiB) also runs Triton and workers in the fault tests.
NODE_HEAP = "384m"


class ClusterUnderTest:
    def __init__(self, cluster: LocalKafkaCluster) -> None:
        self.cluster = cluster
        self._secure = isinstance(cluster, SecureLocalKafkaCluster)

    @property
    def bootstrap_servers(self) -> str:
        return self.cluster.bootstrap_servers

    @property
    def nodes(self) -> list[LocalKafka]:
        return self.cluster.nodes

    @property
    def secure(self) -> bool:
        return self._secure

    def kill(self, node_id: int) -> None:
        """SIGKILL node `node_id` (1-based)."""
        self.cluster.kill(node_id)

    def restart(self, node_id: int) -> None:
        """Start node `node_id` again on its data; returns once it is registered in the cluster."""
        self.cluster.restart(node_id)

    def kafka_settings(self, role: str = "admin") -> KafkaSettings:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {ROLES}")
        if isinstance(self.cluster, SecureLocalKafkaCluster):
            return self.cluster.client_settings(role)
        return cluster_client_settings(self.cluster)

    def apply_acls(self, settings: Settings) -> None:
        """The roles' ACLs for other topic names / app id (e.g. per-test suffixes); secure only."""
        apply_acls(self.kafka_settings("admin"), settings)

    def settings_for(self, role: str = "admin", **overrides: object) -> Settings:
        """Settings of a radtriage process of `role` on this cluster (other fields: defaults/overrides)."""
        settings = Settings(**overrides)  # type: ignore[arg-type]
        settings.kafka = self.kafka_settings(role)
        return settings

    def env_for(self, role: str = "admin") -> dict[str, str]:
        """RADTRIAGE_KAFKA__* variables for a child process of `role` (password via a file)."""
        k = self.kafka_settings(role)
        env = {
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
            "RADTRIAGE_KAFKA__EMBEDDED": "false",
            "RADTRIAGE_KAFKA__REPLICATION_FACTOR": str(k.replication_factor),
            "RADTRIAGE_KAFKA__MIN_INSYNC_REPLICAS": str(k.min_insync_replicas),
            "RADTRIAGE_KAFKA__SECURITY_PROTOCOL": k.security_protocol,
        }
        if k.uses_sasl:
            env["RADTRIAGE_KAFKA__SASL_MECHANISM"] = k.sasl_mechanism
            env["RADTRIAGE_KAFKA__SASL_USERNAME"] = k.sasl_username
            if k.sasl_password_file is not None:
                env["RADTRIAGE_KAFKA__SASL_PASSWORD_FILE"] = str(k.sasl_password_file)
            else:
                env["RADTRIAGE_KAFKA__SASL_PASSWORD"] = k.sasl_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(k, name)
            if value is not None:
                env[f"RADTRIAGE_KAFKA__{name.upper()}"] = str(value)
        return env

    def ensure_topics(self, topics: Sequence[str], partitions: int = 3) -> None:
        """Create topics (as admin) with the cluster's replication and min.insync.replicas."""
        # A cluster that has just formed settles its metadata slowly on a loaded 2-core
        # machine (CI: Triton and the previous module's cluster still stopping); 30 s was
        # not always enough.
        ensure_topics(self.kafka_settings("admin"), dict.fromkeys(topics, partitions), timeout_s=120.0)

    def wait_in_sync(self, topics: Sequence[str], timeout: float = 60.0) -> None:
        """Every partition of `topics` back to a full ISR (e.g. after restart)."""
        wait_in_sync(self.kafka_settings("admin"), topics, timeout)


@contextlib.contextmanager
def running_cluster(data_dir: Path, nodes: int = 3, secure: bool = False) -> Iterator[ClusterUnderTest]:
    """A cluster on free ports with radtriage's topics (RF 3, min ISR 2); stopped after.

    secure: SASL_SSL + SCRAM-SHA-512 with test-made certificates and the roles' ACLs."""
    settings = Settings()
    cls = SecureLocalKafkaCluster if secure else LocalKafkaCluster
    cluster = cls(
        data_dir=data_dir,
        nodes=nodes,
        ports=[free_port() for _ in range(nodes)],
        controller_ports=[free_port() for _ in range(nodes)],
        version=settings.kafka.embedded_version,
        cache_root=settings.cache,
        heap=os.environ.get("RADTRIAGE_TEST_KAFKA_HEAP", NODE_HEAP),
    )
    cluster.start()
    try:
        handle = ClusterUnderTest(cluster)
        topics = settings.topics.all() + settings.streams.internal_topics()
        handle.ensure_topics(topics, settings.kafka.partitions)
        yield handle
    finally:
        cluster.stop()
