"""The 3-broker fault test: a steady stream of head CTs through a replicated, secured Kafka
cluster while a broker and then a worker are SIGKILLed.

Everything is real: three KRaft brokers (SASL_SSL + SCRAM-SHA-512, ACLs per role; the
`secure_kafka_cluster` fixture), topics with replication factor 3 and min.insync.replicas=2,
the DICOM SCP (`radtriage dicom-scp`, connector credentials), three `radtriage worker`s in
one consumer group (worker credentials), the session's Triton, and dcmtk's `storescu` as
the scanner. A study counts as accepted when storescu got success for every instance; a
sender that got a failure resends, as a modality does.

Asserted (counts, never timings): every accepted study gets exactly one finding and one
report, every bleed exactly one alert (and no study a second one), nothing accepted is
lost. The figures are also written to `$RADTRIAGE_HOME/fault-summary.json` and printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.settings import Settings
from tests.integration.harness import Worker, listener
from tests.support.dicom import storescu_send
from tests.support.kafka import Tail
from tests.support.net import free_port

pytestmark = pytest.mark.integration

STUDIES = 18
WORKERS = 3
# The cluster fixture creates radtriage's own topic names (the ACLs name them) with the
# default partition count: one partition per worker here.
PARTITIONS = Settings().kafka.partitions
# Each wait below is bounded and fails with what it was waiting for; the test's own
# budget is their sum plus the cluster's set-up, so pytest-timeout (600 s by default, which
# a slow CI machine once hit here with no word on which study was missing) never fires first.
SEND_WAIT_S = 300.0
OUTPUTS_WAIT_S = 600.0


@dataclass
class Sent:
    uid: str
    bleed: bool
    attempts: int = 0
    accepted: bool = False
    failures: list[str] = field(default_factory=list)


def _storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return storescu_send(port, files, calling="CT_FAULT", timeout=180)


class Scanner:
    """Sends head CT phantoms one after another with storescu; resends a study that got a failure."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port, self.folder = port, folder
        self.rng = np.random.default_rng(20261201)
        self.sent: list[Sent] = []
        self.progress = threading.Event()

    def run(self, count: int) -> None:
        for i in range(count):
            bleed = i % 2 == 0
            ph = head_ct_phantom(self.rng, bleed=bleed, min_bleed_ml=5.0)
            files = write_ct_series(ph.hu, ph.spacing_zyx, self.folder / f"study-{i:03d}", shuffle_files=True)
            study = Sent(str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), bleed)
            self.sent.append(study)
            while not study.accepted and study.attempts < 5:
                study.attempts += 1
                done = _storescu(self.port, files)
                study.accepted = done.returncode == 0 and "Failed" not in done.stderr
                if not study.accepted:
                    study.failures.append(f"rc={done.returncode}: {done.stderr[-300:]}")
                    time.sleep(2.0)
            self.progress.set()


@pytest.fixture
def scp(secure_kafka_cluster, tmp_path: Path) -> Iterator[tuple[dict[str, str], int]]:  # type: ignore[no-untyped-def]
    env = _env(secure_kafka_cluster, "dicom", tmp_path)
    port = free_port()
    env["RADTRIAGE_DICOM__PORT"] = str(port)
    with listener("dicom-scp", env, port, tmp_path / "scp.log"):
        yield env, port


def _env(cluster, role: str, home: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = dict(os.environ)
    env.pop("RADTRIAGE_SETTINGS_JSON", None)
    env.update(cluster.env_for(role))
    env.update(
        {
            "RADTRIAGE_HOME": str(home),
            # The product's quiet period (10 s): studies complete on the sender's release
            # here, and a shorter one would split a study stalled by the broker failover
            # (see streams/assembly.py, AssemblyState.emitted_at).
            "RADTRIAGE_TELEMETRY__EXPORTER": "none",
            "RADTRIAGE_METRICS__ENABLED": "false",
        }
    )
    return env


@pytest.mark.timeout(int(3 * SEND_WAIT_S + OUTPUTS_WAIT_S + 600))
def test_a_killed_broker_and_a_killed_worker_lose_nothing_and_double_nothing(
    secure_kafka_cluster,
    scp: tuple[dict[str, str], int],
    triton_grpc_url: str,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    settings = Settings(home=tmp_path)
    t = settings.topics
    secure_kafka_cluster.ensure_topics(settings.topics.all() + settings.streams.internal_topics(), PARTITIONS)
    worker_env = {
        **_env(secure_kafka_cluster, "worker", tmp_path),
        "RADTRIAGE_TRITON__GRPC_URL": triton_grpc_url,
        "RADTRIAGE_TRITON__TIMEOUT_S": "30",
    }
    workers = [Worker(worker_env, tmp_path, name=f"w{i}") for i in range(WORKERS)]
    for w in workers:
        w.start()
    tail = Tail(
        secure_kafka_cluster.kafka_settings("admin"),
        [t.studies, t.requests_stat, t.findings, t.results_fhir, t.alert_topic("ich"), t.deadletter, t.audit],
    )
    _, port = scp
    scanner = Scanner(port, tmp_path / "dicom")
    sending = threading.Thread(target=scanner.run, args=(STUDIES,), daemon=True)
    sending.start()

    def wait_sent(n: int) -> None:
        deadline = time.monotonic() + SEND_WAIT_S
        while sum(s.accepted for s in scanner.sent) < n and sending.is_alive():
            assert time.monotonic() < deadline, "the scanner stalled"
            time.sleep(0.5)

    wait_sent(STUDIES // 3)
    killed_broker = 2
    secure_kafka_cluster.kill(killed_broker)
    try:
        wait_sent(2 * STUDIES // 3)
        workers[0].kill(signal.SIGKILL)
        sending.join(SEND_WAIT_S)
        assert not sending.is_alive(), "the scanner never finished"
        _assert_outcome(
            secure_kafka_cluster, scanner, tail, settings, killed_broker, workers[0].name, tmp_path
        )
    finally:
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.kill(signal.SIGTERM)
        secure_kafka_cluster.restart(killed_broker)


def _where_they_stopped(tail: Tail, settings: Settings, accepted: list[Sent], home: Path) -> str:
    """Which stage each unreported study last reached, and what every stage said of it: the
    difference between a slow machine and a lost study, and where a lost one went."""
    t = settings.topics
    stages = [
        ("assembled", t.studies),
        ("routed", t.requests_stat),
        ("found", t.findings),
        ("dead-lettered", t.deadletter),
    ]
    missing = [s for s in accepted if not tail.of(t.results_fhir, study_uid=s.uid)]
    lines: list[str] = []
    for log in sorted(home.glob("worker-*.log")):
        text = log.read_text(errors="replace").splitlines()
        lines.append(f"--- {log.name} (last 40 lines, then every line naming an unreported study)")
        lines += text[-40:]
        lines += [f"  | {line}" for line in text if any(s.uid in line for s in missing)][-60:]
    # Last, so a CI log that keeps only the tail of the output still says which study.
    lines.append(f"{OUTPUTS_WAIT_S:.0f} s after the last send, studies without a report:")
    for s in missing:
        reached = [name for name, topic in stages if tail.of(topic, study_uid=s.uid)]
        lines.append(f"  {s.uid} (bleed={s.bleed}): {', '.join(reached) or 'not even assembled'}")
        lines.append(f"    sent {s.attempts}x; failures: {s.failures or 'none'}")
        for study in tail.of(t.studies, study_uid=s.uid):
            sizes = [len(series["instance_uris"]) for series in study["series"]]
            lines.append(f"    study {study['ready_reason']} ready {study['ready_at']}: instances {sizes}")
        for req in tail.of(t.requests_stat, study_uid=s.uid):
            lines.append(
                f"    request {req['request_id']}: {len(req['instance_uris'])} instances,"
                f" amends {req.get('amends_request_id') or '-'}"
            )
        for audit in tail.of(t.audit, study_uid=s.uid):
            lines.append(f"    audit {audit.get('stage')}/{audit.get('decision')}: {audit.get('detail')}")
        for dead in tail.of(t.deadletter, study_uid=s.uid):
            lines.append(f"    dead letter {dead.get('stage')}: {dead.get('error')}")
    return "\n".join(lines)


def _assert_outcome(  # type: ignore[no-untyped-def]
    secure_kafka_cluster,
    scanner: Scanner,
    tail: Tail,
    settings: Settings,
    killed_broker: int,
    killed_worker: str,
    tmp_path: Path,
) -> None:
    t = settings.topics

    accepted = [s for s in scanner.sent if s.accepted]
    try:
        tail.until(
            lambda: all(len(tail.of(t.results_fhir, study_uid=s.uid)) >= 1 for s in accepted),
            timeout=OUTPUTS_WAIT_S,
        )
    except AssertionError:
        pytest.fail(_where_they_stopped(tail, settings, accepted, tmp_path))
    tail.drain(10.0)  # a duplicate would arrive after the first copy

    findings = Counter(d["study_uid"] for d in tail.of(t.findings))
    reports = Counter(d["study_uid"] for d in tail.of(t.results_fhir))
    alerts = Counter(d["study_uid"] for d in tail.of(t.alert_topic("ich")))
    positive = {d["study_uid"] for d in tail.of(t.findings) if d["positive"]}
    bleeds = {s.uid for s in accepted if s.bleed}
    summary = {
        "studies": len(scanner.sent),
        "accepted": len(accepted),
        "resends": sum(s.attempts - 1 for s in scanner.sent),
        "killed_broker": killed_broker,
        "killed_worker": killed_worker,
        "reports": sum(reports.values()),
        "studies_reported": len(reports),
        "duplicate_findings": sum(n - 1 for n in findings.values() if n > 1),
        "duplicate_reports": sum(n - 1 for n in reports.values() if n > 1),
        "bleeds": len(bleeds),
        "alerts": sum(alerts.values()),
        "duplicate_alerts": sum(n - 1 for n in alerts.values() if n > 1),
        "bleeds_alerted": len(bleeds & set(alerts)),
        "lost": len([s for s in accepted if s.uid not in reports]),
        "dead_letters": len(tail.of(t.deadletter)),
        # Studies whose assembly lost instances it had folded and read them back from the log
        # (streams/assembly_reread.py): the loss is a consumer-side one not fixed yet, the
        # read-back is what keeps the study whole (docs/ARCHITECTURE.md, Study assembly).
        "assembly_read_backs": sum(
            log.read_text(errors="replace").count("read back and folded in")
            for log in tmp_path.glob("worker-*.log")
        ),
        "doubled": sorted(
            uid for uid in set(findings) | set(reports) if findings[uid] > 1 or reports[uid] > 1
        ),
    }
    (tmp_path / "fault-summary.json").write_text(json.dumps(summary, indent=2))
    print("fault test:", json.dumps(summary))
    assert len(accepted) == STUDIES, [s.failures for s in scanner.sent if not s.accepted]
    assert summary["lost"] == 0
    assert all(findings[s.uid] == 1 for s in accepted), findings
    assert all(reports[s.uid] == 1 for s in accepted), reports
    assert bleeds <= positive, "a >= 5 mL bleed the model missed"
    assert all(alerts[uid] == (1 if uid in positive else 0) for uid in {s.uid for s in accepted}), alerts
