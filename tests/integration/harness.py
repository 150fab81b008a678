"""Shared harness of the stream tests: a real `radtriage worker` process on per-test topics,
the listeners as processes, and stat-lane traffic (findings, requests) without a model. The
tail of Kafka topics to assert on is tests/support/kafka.py's `Tail`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from kafka import KafkaProducer

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.blobstore import LocalBlobStore
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings, Topics
from schemas.instances import InstanceEvent
from schemas.requests import Lane, TriageRequest
from schemas.routing_rules import RoutingRules
from tests.support.findings import ich_result
from tests.support.net import free_port
from tests.support.process import start_radtriage, wait_listening, wait_ready
from tests.support.settings import isolated_settings

_workers: list[Worker] = []


class Worker:
    def __init__(self, env: dict[str, str], home: Path, name: str = "") -> None:
        """`name` tells apart several workers of one consumer group sharing a home."""
        self.env, self.home, self.name = dict(env), home, name
        if name:
            self.env["RADTRIAGE_STREAMS__INSTANCE_NAME"] = name
        self.proc: subprocess.Popen[bytes] | None = None
        _workers.append(self)

    @property
    def log_file(self) -> Path:
        return self.home / (f"worker-{self.name}.log" if self.name else "worker.log")

    def start(self) -> None:
        ready = self.home / "run" / (f"worker-{self.name}.ready" if self.name else "worker.ready")
        ready.unlink(missing_ok=True)
        self.proc = start_radtriage(["worker"], self.env, self.log_file)
        wait_ready(self.proc, ready.exists, self.log_file, "worker never became ready", 120)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        self.proc.wait(30)


def make_worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    # A fresh app id and fresh topics per test: its own consumer group, tables and
    # traffic, not the history other tests left on the session's broker.
    suffix = f"{tmp_path.name[-12:]}-{free_port()}"
    settings = isolated_settings(tmp_path, kafka_bootstrap, Topics.model_fields, suffix=suffix)
    settings.streams.app_id = f"radtriage-test-{suffix}"
    env = dict(os.environ)
    for field in Topics.model_fields:
        env[f"RADTRIAGE_TOPICS__{field.upper()}"] = getattr(settings.topics, field)
    env.update(
        {
            "RADTRIAGE_HOME": str(tmp_path),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "RADTRIAGE_STREAMS__APP_ID": settings.streams.app_id,
            "RADTRIAGE_STREAMS__ASSEMBLY_QUIET_S": "2",
            # No Triton here: requests that reach a lane fail fast and are dead-lettered.
            "RADTRIAGE_TRITON__GRPC_URL": f"127.0.0.1:{free_port()}",
            "RADTRIAGE_TRITON__TIMEOUT_S": "1",
            "RADTRIAGE_TELEMETRY__EXPORTER": "none",
        }
    )
    env.pop("RADTRIAGE_SETTINGS_JSON", None)
    ensure_topics(
        kafka_bootstrap,
        dict.fromkeys(settings.topics.all() + settings.streams.internal_topics(), settings.kafka.partitions),
    )
    yield env, settings
    # A failed assertion must not leave a worker running behind the test session.
    for worker in _workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill(signal.SIGKILL)
    _workers.clear()


@contextlib.contextmanager
def listener(command: str, env: dict[str, str], port: int, log: Path, timeout: float = 60) -> Iterator[None]:
    """`radtriage <command>` (dicom-scp, hl7-listener, http) in its own session, until its
    port accepts connections; SIGTERMed (and waited for) on exit."""
    proc = start_radtriage([command], env, log)
    try:
        wait_listening(proc, port, log, timeout)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def pixelless_series(
    uid: str,
    count: int = 10,
    *,
    body_part: str = "HEAD",
    description: str = "CT HEAD WO CONTRAST",
    **fields: str,
) -> list[InstanceEvent]:
    """`count` CT instance events of one series of study `uid` whose blobs do not exist: they
    route as the description says, and a lane that reads them dead-letters the request."""
    return [
        InstanceEvent(
            study_uid=uid,
            series_uid=uid + ".1",
            sop_instance_uid=f"{uid}.1.{i}",
            modality="CT",
            body_part=body_part,
            series_description=description,
            blob_uri=f"file:///nowhere/{i}.dcm",
            **fields,  # type: ignore[arg-type]
        )
        for i in range(count)
    ]


def release(uid: str, count: int = 10) -> bytes:
    """The sender's transfer-complete marker for `count` instances of study `uid`."""
    return InstanceEvent(kind="transfer_complete", study_uid=uid, instance_count=count).to_bytes()


def finding_bytes(
    uid: str,
    p: float,
    ready_at: datetime | None = None,
    received_before_s: float = 0.0,
    request_id: str = "",
) -> bytes:
    """A stat-lane ICH finding for `uid` with probability `p` (positive at >= 0.5), as a lane
    agent would publish it: tests drive the report/escalate agents without a model."""
    ready = ready_at or datetime.now(UTC)
    return ich_result(
        uid,
        uid + ".1",
        ready,
        accession_number="ACC",
        patient_id="MRN",
        probability=p,
        positive=p >= 0.5,
        received_at=ready - timedelta(seconds=received_before_s),
        inferred_at=datetime.now(UTC),  # read now, however long ago the study was ready
        inference_ms=5.0,
        request_id=request_id,
    ).to_bytes()


RULE = "ct-head-noncontrast-ich"


def store_series(settings: Settings, study: str, series: str, files: Iterable[Path]) -> tuple[str, ...]:
    """The files in the worker's blob store, as the listener would have stored them: their URIs."""
    blobs = LocalBlobStore(settings.blob_dir)
    return tuple(
        blobs.put_instance(
            study, series, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f.read_bytes()
        )
        for f in files
    )


def send_request(
    settings: Settings,
    producer: KafkaProducer,
    lane: Lane,
    rule_id: str,
    study: str,
    series: str,
    uris: tuple[str, ...],
    **fields: Any,
) -> None:
    """The request of rule `rule_id` (its model, finding and threshold as the routing rules
    say) for a series in the blob store (`uris`) on `lane`'s topic, as the router publishes
    it, ready now; `fields` add to it."""
    (rule,) = [r for r in RoutingRules.load(settings.routing_rules).rules if r.id == rule_id]
    now = datetime.now(UTC)
    request = TriageRequest(
        study_uid=study,
        series_uid=series,
        instance_uris=uris,
        lane=lane,
        rule_id=rule_id,
        model_name=rule.model,
        finding=rule.finding,
        threshold=rule.threshold,
        received_at=now,
        ready_at=now,
        request_id=f"{study}/{rule_id}",
        **fields,
    )
    producer.send(settings.topics.lane_topic(lane), key=study.encode(), value=request.to_bytes()).get(10)


class Studies:
    """Head CT phantoms written as DICOM into the worker's blob store, sent as lane requests."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings, self.tmp = settings, tmp_path
        self.rng = np.random.default_rng(20240917)
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        self.bleeds: set[str] = set()
        self.lane: dict[str, Lane] = {}

    def send(self, lane: Lane, *, bleed: bool) -> str:
        ph = head_ct_phantom(self.rng, bleed=bleed, min_bleed_ml=5.0)
        study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        files = write_ct_series(
            ph.hu, ph.spacing_zyx, self.tmp / "dicom" / study_uid, study_uid=study_uid, series_uid=series_uid
        )
        uris = store_series(self.settings, study_uid, series_uid, files)
        send_request(
            self.settings, self.producer, lane, RULE, study_uid, series_uid, uris, lane_reason="fault test"
        )
        if bleed:
            self.bleeds.add(study_uid)
        self.lane[study_uid] = lane
        return study_uid
