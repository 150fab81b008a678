"""Shared e2e harness: `radtriage up` as a user runs it (embedded Kafka + Triton, every
listener on free ports), and a reader of the output topics."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from tests.support.kafka import Tail
from tests.support.net import free_port
from tests.support.process import start_radtriage

OUTCOME_TIMEOUT_S = 120.0


@dataclass
class Stack:
    env: dict[str, str]
    bootstrap: str
    dicom_port: int
    hl7_port: int
    http_port: int
    home: Path
    process: subprocess.Popen[bytes]
    log: Path


def start_stack(
    tmp_path_factory: pytest.TempPathFactory, extra_env: Callable[[Path], dict[str, str]] | None = None
) -> Iterator[Stack]:
    """`radtriage up` on free ports; `extra_env(home)` adds settings (e.g. security) to its env."""
    home = tmp_path_factory.mktemp("radtriage-home")
    kafka_port, dicom_port, hl7_port, http_port = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update(
        {
            "RADTRIAGE_HOME": str(home),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
            "RADTRIAGE_KAFKA__CONTROLLER_PORT": str(free_port()),
            "RADTRIAGE_TRITON__GRPC_URL": f"127.0.0.1:{free_port()}",
            "RADTRIAGE_TRITON__HTTP_URL": f"127.0.0.1:{free_port()}",
            "RADTRIAGE_TRITON__METRICS_PORT": str(free_port()),
            "RADTRIAGE_DICOM__PORT": str(dicom_port),
            "RADTRIAGE_HL7__PORT": str(hl7_port),
            "RADTRIAGE_HTTP__PORT": str(http_port),
            "RADTRIAGE_STREAMS__ASSEMBLY_QUIET_S": "4",
        }
    )
    if extra_env is not None:
        env.update(extra_env(home))
    env.pop("RADTRIAGE_SETTINGS_JSON", None)
    log = home / "up.log"
    proc = start_radtriage(["up"], env, log)
    st = Stack(env, f"127.0.0.1:{kafka_port}", dicom_port, hl7_port, http_port, home, proc, log)
    deadline = time.monotonic() + 300
    while "radtriage is up" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"radtriage up did not come up (rc={proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.5)
    try:
        yield st
    finally:
        for consumer in _consumers:
            consumer.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise


_consumers: list[KafkaConsumer] = []


class Outputs(Tail):
    """Everything produced on the output topics since the reader was created."""

    TOPICS: tuple[str, ...] = (
        "triage.alerts.ich",
        "triage.results.fhir",
        "triage.audit",
        "triage.deadletter",
        "imaging.studies",
        "triage.requests.stat",
        "triage.requests.urgent",
        "triage.requests.routine",
    )

    def __init__(self, bootstrap: str) -> None:
        super().__init__(bootstrap, self.TOPICS, poll_ms=300)
        _consumers.append(self.consumer)

    def poll_until(self, predicate: Callable[[], object], timeout: float = OUTCOME_TIMEOUT_S) -> None:
        self.until(predicate, timeout)

    def of(self, topic: str, study_uid: str) -> list[dict[str, Any]]:  # type: ignore[override]
        return super().of(topic, study_uid=study_uid)
