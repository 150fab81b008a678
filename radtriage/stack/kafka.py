"""A local single-node Apache Kafka broker (KRaft: broker and controller in one JVM).

No Debian or PyPI package carries Kafka; Maven Central does. The broker's jars are
copied once into the cache (outside the clone) by `mvn dependency:copy-dependencies`
on `deploy/kafka/pom.xml`, and the broker runs as `java -cp 'libs/*' kafka.Kafka`.

Version: 3.9.1, the last 3.x, checked here with all three clients the product uses —
kafka-python 3.0.12 (connectors), aiokafka 0.14.0 under faust-streaming 0.15.3
(streams, including table changelogs and consumer-group rebalances). Kafka 4.x
removed the old protocol versions (KIP-896) and its log4j2 set-up differs; moving
to it is a separate, tested step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from radtriage.settings import KAFKA_POM, KafkaSettings, Settings, default_data_dir
from radtriage.stack.process import LocalService, ServiceError, ServiceProcess, port_in_use

DEFAULT_VERSION = "3.9.1"

LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
"""


def ensure_kafka_jars(version: str, cache_root: Path, pom: Path | None = None) -> Path:
    """The broker's jars in `<cache>/kafka-<version>/libs`, fetched once with `pom` (default:
    the one under the default data_dir; `up` passes `Settings.kafka_pom`)."""
    pom = pom or default_data_dir() / KAFKA_POM
    home = cache_root / f"kafka-{version}"
    libs, marker = home / "libs", home / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise ServiceError("Kafka needs java and mvn: apt-get install openjdk-17-jre-headless maven")
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return libs
        shutil.rmtree(libs, ignore_errors=True)
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(pom),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={libs}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
            tail = (result.stdout + result.stderr)[-2000:]
            raise ServiceError(f"fetching Kafka {version} from Maven Central failed:\n{tail}")
        marker.write_text("ok\n")
    return libs


def new_cluster_id() -> str:
    """A random KRaft cluster id (base64url of a UUID) that the StorageTool accepts."""
    import base64

    # A base64url id may start with "-", which the tool's argument parser then takes for
    # an option ("expected one argument"): one start in 64 failed that way. Kafka's own
    # `random-uuid` avoids a leading dash too.
    cid = "-"
    while cid.startswith("-"):
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cid


def server_properties(
    *,
    node_id: int,
    host: str,
    port: int,
    controller_port: int,
    voters: str,
    log_dir: Path,
    replication: int,
    min_isr: int,
    listeners: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> str:
    """server.properties of one KRaft node (broker and controller in one JVM).

    `voters` is controller.quorum.voters (`id@host:port,...`); `replication` and `min_isr` are
    the internal topics' replication and the default for topics created without their own.
    `listeners` replaces the plaintext listener lines (the secure cluster passes its own).
    """
    listener_lines = (
        list(listeners)
        if listeners is not None
        else [
            f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{host}:{port}",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        ]
    )
    lines = [
        "process.roles=broker,controller",
        f"node.id={node_id}",
        f"controller.quorum.voters={voters}",
        "controller.listener.names=CONTROLLER",
        *listener_lines,
        f"log.dirs={log_dir}",
        # Internal topics (consumer offsets, transactions) and the defaults: one node cannot
        # hold more replicas than it is; a cluster of three keeps 3 copies, 2 in sync.
        f"offsets.topic.replication.factor={replication}",
        f"transaction.state.log.replication.factor={replication}",
        f"transaction.state.log.min.isr={min_isr}",
        f"default.replication.factor={replication}",
        f"min.insync.replicas={min_isr}",
        # A single worker should not wait 3 s for company before it gets partitions.
        "group.initial.rebalance.delay.ms=0",
        # Topics are created deliberately (radtriage.kafka_admin), not by a typo.
        "auto.create.topics.enable=false",
        "num.partitions=3",
        "log.retention.hours=168",
        *extra,
    ]
    return "\n".join(lines) + "\n"


class LocalKafka(LocalService):
    """One local KRaft node: alone (the default), or one voter of a LocalKafkaCluster."""

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int = 9092,
        controller_port: int = 9093,
        version: str = DEFAULT_VERSION,
        cache_root: Path,
        heap: str = "512m",
        host: str = "127.0.0.1",
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        replication: int = 1,
        min_isr: int = 1,
        listeners: Sequence[str] | None = None,
        extra_properties: Sequence[str] = (),
        format_args: Sequence[str] = (),
        ready_kwargs: Mapping[str, Any] | None = None,
        pom: Path | None = None,
    ) -> None:
        self.pom = pom
        self.data_dir, self.port, self.controller_port = data_dir, port, controller_port
        self.version, self.cache_root, self.heap, self.host = version, cache_root, heap, host
        self.node_id = node_id
        self.voters = voters or f"{node_id}@{host}:{controller_port}"
        self.cluster_id = cluster_id
        self.replication, self.min_isr = replication, min_isr
        self.listeners, self.extra_properties = listeners, tuple(extra_properties)
        # Extra StorageTool arguments (e.g. --add-scram for the secure cluster's users).
        self.format_args = tuple(format_args)
        # How the readiness probe connects (security options of kafka-python), plaintext by default.
        self.ready_kwargs = dict(ready_kwargs or {"bootstrap_servers": self.bootstrap_servers})
        self._service: ServiceProcess | None = None

    @classmethod
    def for_settings(cls, settings: Settings, data_dir: Path) -> LocalKafka:
        """The broker `settings.kafka` describes (its first bootstrap port, the controller
        port, the embedded version and POM): what `radtriage up` and the benches start."""
        return cls(
            data_dir=data_dir,
            port=int(settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1]),
            controller_port=settings.kafka.controller_port,
            version=settings.kafka.embedded_version,
            cache_root=settings.cache,
            pom=settings.kafka_pom,
        )

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        proc = self._service.process if self._service is not None else None
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _write_config(self) -> Path:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        # It may hold the inter-broker SCRAM password (secure cluster): owner only.
        props.touch(mode=0o600)
        props.write_text(
            server_properties(
                node_id=self.node_id,
                host=self.host,
                port=self.port,
                controller_port=self.controller_port,
                voters=self.voters,
                log_dir=self.data_dir / "data",
                replication=self.replication,
                min_isr=self.min_isr,
                listeners=self.listeners,
                extra=self.extra_properties,
            )
        )
        (self.data_dir / "log4j.properties").write_text(LOG4J.format(log=logs / "server.log"))
        return props

    def _format_storage(self, libs: Path, props: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return
        cid = self.cluster_id or new_cluster_id()
        result = subprocess.run(
            [
                "java",
                "-cp",
                f"{libs}/*",
                f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cid,
                "-c",
                str(props),
                *self.format_args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            # The tool echoes its arguments on some errors: never print SCRAM passwords.
            out = (result.stdout + result.stderr)[-2000:]
            for arg in self.format_args:
                if "password=" in arg:
                    out = out.replace(arg, "--add-scram <hidden>")
            raise ServiceError(f"Kafka storage format failed:\n{out}")

    def _ready(self) -> bool:
        from kafka import KafkaAdminClient

        if not port_in_use(self.port, self.host):
            return False
        admin = KafkaAdminClient(request_timeout_ms=3000, **self.ready_kwargs)
        try:
            # Ready = registered (and unfenced) in the cluster's metadata, which a broker is
            # only once the controller quorum has it; alone, that is as soon as it answers.
            brokers = admin.describe_cluster()["brokers"]
            return self.node_id in {b["broker_id"] for b in brokers}
        finally:
            admin.close()

    def launch(self) -> None:
        """Start the JVM (formatting the storage the first time); does not wait."""
        for port in (self.port, self.controller_port):
            if port_in_use(port, self.host):
                raise ServiceError(f"Kafka: port {port} is already in use (another broker running?)")
        libs = ensure_kafka_jars(self.version, self.cache_root, self.pom)
        props = self._write_config()
        self._format_storage(libs, props)
        argv = [
            "java",
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            str(props),
        ]
        self._service = ServiceProcess(f"kafka-{self.node_id}", argv, self.data_dir / "logs" / "stdout.log")
        self._service.start()

    def wait_ready(self, timeout: float = 90.0) -> None:
        if self._service is None:
            raise ServiceError(f"Kafka node {self.node_id} is not running")
        self._service.wait_until(self._ready, timeout, f"the broker on {self.bootstrap_servers}")

    def start(self, timeout: float = 90.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL the JVM (a crash: no controlled shutdown, no leadership hand-over)."""
        if self._service is None or self._service.process is None:
            return
        proc = self._service.process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        self._service = None

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()
            self._service = None


class LocalKafkaCluster(LocalService):
    """`nodes` local KRaft nodes, each broker + controller, one cluster id, all voters.

    Node i (0-based) listens on `base_port + 2i` (clients) and `controller_base_port + 2i`
    (quorum), data in `data_dir/node-<i+1>`. Internal topics and the default replication
    are min(3, nodes) with min.insync.replicas one less, so one node may be down.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        nodes: int = 3,
        ports: Sequence[int] | None = None,
        controller_ports: Sequence[int] | None = None,
        version: str = DEFAULT_VERSION,
        cache_root: Path,
        heap: str = "384m",
        host: str = "127.0.0.1",
        pom: Path | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        ports = list(ports) if ports is not None else [9092 + 2 * i for i in range(nodes)]
        controller_ports = list(controller_ports) if controller_ports is not None else [p + 1 for p in ports]
        if len(ports) != nodes or len(controller_ports) != nodes:
            raise ValueError("one client port and one controller port per node")
        self.data_dir, self.host = data_dir, host
        self.replication = min(3, nodes)
        self.min_isr = max(1, self.replication - 1)
        self.cluster_id = self._cluster_id()
        voters = ",".join(f"{i + 1}@{host}:{cp}" for i, cp in enumerate(controller_ports))
        self.nodes = [
            LocalKafka(
                data_dir=data_dir / f"node-{i + 1}",
                port=port,
                controller_port=cport,
                version=version,
                cache_root=cache_root,
                heap=heap,
                host=host,
                pom=pom,
                node_id=i + 1,
                voters=voters,
                cluster_id=self.cluster_id,
                replication=self.replication,
                min_isr=self.min_isr,
                **self._node_options(i, port, cport),
            )
            for i, (port, cport) in enumerate(zip(ports, controller_ports, strict=True))
        ]

    def _cluster_id(self) -> str:
        # Kept beside the nodes, so a restarted `radtriage up --cluster 3` reuses its data.
        path = self.data_dir / "cluster-id"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cid = new_cluster_id()
        path.write_text(cid + "\n")
        return cid

    def _node_options(self, index: int, port: int, controller_port: int) -> dict[str, Any]:
        """Per-node LocalKafka options beyond ports and ids (the secure cluster adds listeners)."""
        return {}

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self.nodes)

    def node(self, node_id: int) -> LocalKafka:
        """The node with this node.id (1-based, as Kafka numbers them)."""
        return self.nodes[node_id - 1]

    def start(self, timeout: float = 120.0) -> None:
        # All JVMs first: no node is ready before a majority of controllers has formed a quorum.
        try:
            for n in self.nodes:
                n.launch()
            for n in self.nodes:
                n.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def kill(self, node_id: int) -> None:
        self.node(node_id).kill()

    def restart(self, node_id: int, timeout: float = 120.0) -> None:
        """Start a killed (or stopped) node again on its data; returns once it is registered."""
        n = self.node(node_id)
        n.stop()
        n.start(timeout)

    def stop(self) -> None:
        for n in reversed(self.nodes):
            n.stop()


def cluster_client_settings(cluster: LocalKafkaCluster, base: KafkaSettings | None = None) -> KafkaSettings:
    """Client settings for a running local cluster: its bootstrap list, its replication."""
    return (base or KafkaSettings()).model_copy(
        update={
            "bootstrap_servers": cluster.bootstrap_servers,
            "embedded": False,
            "replication_factor": cluster.replication,
            "min_insync_replicas": cluster.min_isr,
        }
    )


def wait_in_sync(kafka: KafkaSettings, topics: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until every partition of `topics` has all its replicas in sync (e.g. after a restart)."""
    import time

    from kafka import KafkaAdminClient

    from radtriage.kafka_clients import kafka_python_kwargs

    deadline = time.monotonic() + timeout
    lagging: list[str] = ["(not asked yet)"]
    while time.monotonic() < deadline:
        admin = KafkaAdminClient(request_timeout_ms=5000, **kafka_python_kwargs(kafka))
        try:
            described = admin.describe_topics(list(topics))
        finally:
            admin.close()
        lagging = [
            f"{t['name']}[{p['partition_index']}] isr={p['isr_nodes']} replicas={p['replica_nodes']}"
            for t in described
            for p in t["partitions"] or [{"partition_index": "?", "isr_nodes": [], "replica_nodes": [0]}]
            if set(p["isr_nodes"]) != set(p["replica_nodes"])
        ]
        if not lagging:
            return
        time.sleep(0.5)
    raise ServiceError(f"replicas not in sync after {timeout:.0f}s: {lagging[:5]}")
