"""`radtriage up`: start the whole local stack and keep it running until Ctrl-C.

Kafka and Triton are started in-process through their launchers (unless the
settings point at existing ones); the Faust worker and the listeners (DICOM, HL7
MLLP, HTTP for FHIR and STOW-RS) run as
child processes in their own sessions, so a Ctrl-C stops each cleanly in reverse
order and nothing is left behind. While running it prints every result, alert,
unrouted study and dead letter as it appears on Kafka.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.table import Table

from radtriage import metrics
from radtriage.kafka_admin import ensure_topics
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import REPO_ROOT, SETTINGS_JSON_ENV, Settings
from radtriage.stack.process import ServiceProcess, port_in_use
from radtriage.worker import ready_file

if TYPE_CHECKING:
    from radtriage.stack.kafka import LocalKafkaCluster
    from radtriage.stack.orthanc import LocalOrthanc

console = Console(stderr=True)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a child: ours, plus exactly our resolved settings."""
    env = dict(os.environ)
    # The children need the real secrets (tokens, passwords), not the masked dump.
    env[SETTINGS_JSON_ENV] = settings.inheritable_json()
    # One prometheus_client multiprocess directory for all children: the HTTP process's
    # /metrics serves their aggregate. Set before the child imports prometheus_client.
    env[metrics.MULTIPROC_ENV] = str(metrics.multiproc_dir(settings))
    return env


def spawn(name: str, args: list[str], settings: Settings) -> ServiceProcess:
    """A radtriage subcommand as a child service that sees exactly our resolved settings."""
    service = ServiceProcess(
        name,
        [sys.executable, "-m", "radtriage.cli", *args],
        settings.home / "logs" / f"{name}.log",
        env=child_env(settings),
        cwd=REPO_ROOT,
    )
    service.start()
    return service


@contextlib.contextmanager
def running_stack(settings: Settings, pacs: LocalOrthanc | None = None) -> Iterator[list[tuple[str, str]]]:
    """Start everything `settings` asks for (and `pacs`, a local Orthanc the settings
    already name as a destination: `up --pacs`); stop it all on exit, in reverse order."""
    stoppers: list[tuple[str, object]] = []
    endpoints: list[tuple[str, str]] = []
    children: list[ServiceProcess] = []
    # Metric files of a previous run would add up with this one's.
    metrics.reset_multiproc_dir(metrics.multiproc_dir(settings))
    try:
        if settings.kafka.embedded and settings.kafka.embedded_nodes > 1:
            kafka_cluster = _start_cluster(settings)
            stoppers.append(("kafka cluster", kafka_cluster))
            endpoints.append(
                (
                    "Kafka",
                    f"{settings.kafka.bootstrap_servers} (embedded {settings.kafka.embedded_version}, "
                    f"{len(kafka_cluster.nodes)} brokers, RF {kafka_cluster.replication}, "
                    f"min ISR {kafka_cluster.min_isr})",
                )
            )
        elif settings.kafka.embedded:
            from radtriage.stack.kafka import LocalKafka

            _start_in_process(
                stoppers,
                "kafka",
                "starting Apache Kafka (KRaft, single node)…",
                lambda: LocalKafka.for_settings(settings, settings.home / "kafka"),
            )
            endpoints.append(
                ("Kafka", f"{settings.kafka.bootstrap_servers} (embedded {settings.kafka.embedded_version})")
            )
        else:
            endpoints.append(("Kafka", f"{settings.kafka.bootstrap_servers} (external)"))
        ensure_topics(
            settings.kafka,
            dict.fromkeys(
                settings.topics.all() + settings.streams.internal_topics(), settings.kafka.partitions
            ),
        )
        if settings.triton.embedded:
            from radtriage.stack.triton import LocalTriton

            _start_in_process(
                stoppers,
                "triton",
                "starting Triton Inference Server (CPU)…",
                lambda: LocalTriton.for_settings(settings, settings.home / "logs" / "triton.log"),
            )
            endpoints.append(
                ("Triton", f"gRPC {settings.triton.grpc_url}, HTTP {settings.triton.http_url} (embedded)")
            )
        else:
            endpoints.append(("Triton", f"gRPC {settings.triton.grpc_url} (external)"))

        if pacs is not None:
            _start_in_process(stoppers, "orthanc", "starting Orthanc (the local PACS)…", lambda: pacs)
            web = f", DICOMweb {pacs.web_ui.rsplit('/app/', 1)[0]}/dicom-web" if pacs.dicomweb else ""
            endpoints.append(
                ("PACS (Orthanc)", f"web UI {pacs.web_ui}, C-STORE port {pacs.dicom_port} AE ORTHANC{web}")
            )

        ready_file(settings).unlink(missing_ok=True)
        worker = spawn("worker", ["worker"], settings)
        children.append(worker)
        with console.status("starting Faust workers (waiting for partition assignment)…"):
            worker.wait_until(ready_file(settings).exists, 120, "partition assignment and warm-up")
        endpoints.append(("Faust worker", f"app '{settings.streams.app_id}', log {worker.log_file}"))

        dicom = settings.dicom
        _spawn_listener(children, settings, "dicom-scp", dicom.main_port, "the DICOM port to open")
        ports = [str(dicom.port)] * dicom.plain_enabled + [f"{dicom.tls_port} (TLS)"] * dicom.tls.enabled
        endpoints.append(("DICOM C-STORE SCP", f"port {', '.join(ports)}, AE title {dicom.ae_title}"))

        _spawn_listener(children, settings, "hl7-listener", settings.hl7.port, "the MLLP port to open")
        endpoints.append(("HL7 v2 MLLP", f"port {settings.hl7.port} (ORM^O01, OMI^O23, ADT^A01/A04/A08)"))

        _spawn_listener(children, settings, "http", settings.http.port, "the HTTP port to open")
        base = f"{settings.http.scheme}://127.0.0.1:{settings.http.port}"
        endpoints.append(("FHIR R4", f"{base}/fhir (ServiceRequest, ImagingStudy, Bundle)"))
        endpoints.append(("DICOMweb STOW-RS", f"{base}/dicomweb/studies"))
        endpoints.append(("Health", f"{base}/healthz"))
        endpoints.append(("Prometheus metrics", f"{base}/metrics (every local process)"))
        yield endpoints
    finally:
        for child in reversed(children):
            console.print(f"stopping {child.name}…")
            pid = child.process.pid if child.process is not None else None
            child.stop()
            if pid is not None:
                metrics.forget_process(pid, settings)
        for name, service in reversed(stoppers):
            console.print(f"stopping {name}…")
            service.stop()  # type: ignore[attr-defined]


class _InProcess(Protocol):
    def start(self) -> None: ...


def _start_in_process(
    stoppers: list[tuple[str, object]], name: str, status: str, make: Callable[[], _InProcess]
) -> None:
    """Build and start a service run from here (Kafka, Triton, Orthanc) under a status
    line; it joins `stoppers`, which are stopped in reverse order on exit."""
    with console.status(status):
        service = make()
        service.start()
    stoppers.append((name, service))


def _spawn_listener(
    children: list[ServiceProcess], settings: Settings, name: str, port: int, waiting_for: str
) -> None:
    """`radtriage <name>` as a child service, waited for until it listens on `port`."""
    child = spawn(name, [name], settings)
    children.append(child)
    child.wait_until(lambda: port_in_use(port), 30, waiting_for)


def _start_cluster(settings: Settings) -> LocalKafkaCluster:
    """Start `kafka.embedded_nodes` local brokers and point `settings` (and so every child) at them."""
    from radtriage.stack.kafka import LocalKafkaCluster, cluster_client_settings

    k = settings.kafka
    n = k.embedded_nodes
    port = int(k.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    cluster = LocalKafkaCluster(
        data_dir=settings.home / f"kafka-cluster-{n}",
        nodes=n,
        ports=[port + 2 * i for i in range(n)],
        controller_ports=[k.controller_port + 2 * i for i in range(n)],
        version=k.embedded_version,
        cache_root=settings.cache,
        pom=settings.kafka_pom,
    )
    with console.status(f"starting Apache Kafka (KRaft, {n} brokers)…"):
        cluster.start()
    settings.kafka = cluster_client_settings(cluster, k).model_copy(update={"embedded": True})
    return cluster


def _print_event(topic: str, value: bytes) -> None:
    data = json.loads(value)
    uid = data.get("study_uid", "?")
    if topic.startswith("triage.alerts"):
        console.print(
            f"[bold red]ALERT[/] {data['finding']} study {uid} p={data['probability']:.2f} "
            f"(threshold {data['threshold']:.2f}, {data['model_name']} v{data['model_version']}) on {topic}"
        )
    elif topic.endswith("results.fhir"):
        report = data["bundle"]["entry"][0]["resource"]
        console.print(f"[green]REPORT[/] study {uid}: {report.get('conclusion', '')}")
    elif topic.endswith("deadletter"):
        console.print(
            f"[yellow]DEAD LETTER[/] from {data['source_topic']} ({data['stage']}): {data['error']}"
        )
    elif topic.endswith("audit") and data.get("decision") == "unrouted":
        console.print(f"[magenta]UNROUTED[/] study {uid}: {data['detail'].get('series', '')}")
    elif topic.endswith("audit") and data.get("decision") in ("routed", "lane_upgraded"):
        detail = data["detail"]
        verb = "UPGRADED" if data["decision"] == "lane_upgraded" else "ROUTED"
        console.print(
            f"[cyan]{verb}[/] study {uid} → {detail.get('model')} on [bold]{detail.get('lane')}[/] "
            f"({detail.get('lane_reason', '')})"
        )


def _tail_outputs(settings: Settings, stop: threading.Event) -> None:
    from kafka import KafkaConsumer

    t = settings.topics
    consumer = KafkaConsumer(
        *t.alert_topics(),
        t.results_fhir,
        t.deadletter,
        t.audit,
        **kafka_python_kwargs(settings.kafka),
        auto_offset_reset="latest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=500,
    )
    try:
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    with contextlib.suppress(Exception):
                        _print_event(record.topic, record.value)
    finally:
        consumer.close()


def run_up(settings: Settings, pacs: LocalOrthanc | None = None) -> None:
    started = time.monotonic()
    stop = threading.Event()

    def _on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    # A shell without job control starts background commands with SIGINT ignored;
    # Ctrl-C (or `kill -INT`) must still stop the stack.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with running_stack(settings, pacs) as endpoints:
            table = Table(title=f"radtriage is up ({time.monotonic() - started:.1f}s)")
            table.add_column("component")
            table.add_column("endpoint")
            for name, where in endpoints:
                table.add_row(name, where)
            console.print(table)
            console.print(
                f"Send a study: [bold]storescu -aec {settings.dicom.ae_title} 127.0.0.1 "
                f"{settings.dicom.port} *.dcm[/]   or run [bold]radtriage demo[/].   Ctrl-C stops everything."
            )
            tail = threading.Thread(target=_tail_outputs, args=(settings, stop), daemon=True)
            tail.start()
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                console.print("Ctrl-C: stopping the stack…")
                # The output tail goes first, so it does not watch the broker go away.
                stop.set()
                tail.join(5)
    except KeyboardInterrupt:
        console.print("Ctrl-C during start-up: stopping what was started…")
    finally:
        stop.set()
