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

import fcntl
import shutil
import subprocess
import uuid
from pathlib import Path

from radtriage.settings import REPO_ROOT
from radtriage.stack.process import ServiceError, ServiceProcess, port_in_use

POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
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


def ensure_kafka_jars(version: str, cache_root: Path) -> Path:
    """The broker's jars in `<cache>/kafka-<version>/libs`, fetched once."""
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
                str(POM),
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


class LocalKafka:
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
    ) -> None:
        self.data_dir, self.port, self.controller_port = data_dir, port, controller_port
        self.version, self.cache_root, self.heap, self.host = version, cache_root, heap, host
        self._service: ServiceProcess | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def _write_config(self) -> Path:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{self.host}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={self.data_dir / 'data'}",
                    # One node: internal topics cannot have more replicas than brokers.
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "min.insync.replicas=1",
                    # A single worker should not wait 3 s for company before it gets partitions.
                    "group.initial.rebalance.delay.ms=0",
                    # Topics are created deliberately (radtriage.kafka_admin), not by a typo.
                    "auto.create.topics.enable=false",
                    "num.partitions=3",
                    "log.retention.hours=168",
                ]
            )
            + "\n"
        )
        (self.data_dir / "log4j.properties").write_text(LOG4J.format(log=logs / "server.log"))
        return props

    def _format_storage(self, libs: Path, props: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return
        import base64

        # A base64url id may start with "-", which the tool's argument parser then takes for
        # an option ("expected one argument"): one start in 64 failed that way. Kafka's own
        # `random-uuid` avoids a leading dash too.
        cid = "-"
        while cid.startswith("-"):
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
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
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise ServiceError(f"Kafka storage format failed:\n{(result.stdout + result.stderr)[-2000:]}")

    def _ready(self) -> bool:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=3000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def start(self, timeout: float = 90.0) -> None:
        for port in (self.port, self.controller_port):
            if port_in_use(port, self.host):
                raise ServiceError(f"Kafka: port {port} is already in use (another broker running?)")
        libs = ensure_kafka_jars(self.version, self.cache_root)
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
        self._service = ServiceProcess("kafka", argv, self.data_dir / "logs" / "stdout.log")
        self._service.start()
        self._service.wait_until(self._ready, timeout, f"the broker on {self.bootstrap_servers}")

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()
            self._service = None

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
