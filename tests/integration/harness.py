"""Shared harness of the stream tests: a real `radtriage worker` process on per-test topics,
and a tail of Kafka topics to assert on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from radtriage.kafka_admin import ensure_topics
from radtriage.settings import REPO_ROOT, Settings
from schemas.findings import Finding
from tests.conftest import free_port

_workers: list[Worker] = []


class Worker:
    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.env, self.home = env, home
        self.proc: subprocess.Popen[bytes] | None = None
        _workers.append(self)

    def start(self) -> None:
        ready = self.home / "run" / "worker.ready"
        ready.unlink(missing_ok=True)
        log = (self.home / "worker.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radtriage.cli", "worker"],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert self.proc.poll() is None, (self.home / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        self.proc.wait(30)


def make_worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    # A fresh app id and fresh topics per test: its own consumer group, tables and
    # traffic, not the history other tests left on the session's broker.
    suffix = f"{tmp_path.name[-12:]}-{free_port()}"
    settings = Settings(home=tmp_path)
    settings.kafka.bootstrap_servers = kafka_bootstrap
    settings.streams.app_id = f"radtriage-test-{suffix}"
    env = dict(os.environ)
    for field in type(settings.topics).model_fields:
        name = f"{getattr(settings.topics, field)}.{suffix}"
        setattr(settings.topics, field, name)
        env[f"RADTRIAGE_TOPICS__{field.upper()}"] = name
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


class Tail:
    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        parts = [TopicPartition(t, p) for t in topics for p in sorted(self.c.partitions_for_topic(t) or {0})]
        self.c.assign(parts)
        self.c.seek_to_end(*parts)
        for tp in parts:
            self.c.position(tp)
        self.seen: list[tuple[str, dict[str, Any], dict[str, bytes]]] = []

    def until(self, predicate: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            for recs in self.c.poll(timeout_ms=200).values():
                self.seen += [(r.topic, json.loads(r.value), dict(r.headers or [])) for r in recs]
        assert predicate(), [
            (t, d.get("study_uid"), d.get("decision") or d.get("stage")) for t, d, _ in self.seen
        ]

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for recs in self.c.poll(timeout_ms=200).values():
                self.seen += [(r.topic, json.loads(r.value), dict(r.headers or [])) for r in recs]

    def of(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        return [d for t, d, _ in self.seen if t == topic and all(d.get(k) == v for k, v in match.items())]


def finding_bytes(
    uid: str, p: float, ready_at: datetime | None = None, received_before_s: float = 0.0
) -> bytes:
    """A stat-lane ICH finding for `uid` with probability `p` (positive at >= 0.5), as a lane
    agent would publish it: tests drive the report/escalate agents without a model."""
    ready = ready_at or datetime.now(UTC)
    return Finding(
        study_uid=uid,
        accession_number="ACC",
        patient_id="MRN",
        series_uid=uid + ".1",
        finding="ICH",
        probability=p,
        threshold=0.5,
        positive=p >= 0.5,
        model_name="ich_classifier",
        model_version="1",
        lane="stat",
        rule_id="ct-head-noncontrast-ich",
        received_at=ready - timedelta(seconds=received_before_s),
        ready_at=ready,
        inference_ms=5.0,
    ).to_bytes()
