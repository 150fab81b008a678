"""Does a PACS outage delay the alerts? And finding -> SR stored through the real worker
(issue 18: the pacs-export outbox, streams/stages/outbox.py).

    python -m bench.pacs_outage --burst 200 --single 20 --json

Starts its own single-node Kafka, a real Orthanc (the destination: SR, key image, KOS of
every finding) and a `radtriage worker`. Three phases, each with positive stat ICH
findings published on `triage.findings` as the lane would (no model runs), each on a
small CT of its own study in the worker's blob store:

1. `single`: one finding at a time, waiting for its SR to be stored: finding -> SR stored
   in Orthanc (the forwarder, the outbox hop, the build and the C-STORE), p50/p99;
2. `up`: a burst of `--burst` findings with Orthanc up: finding -> alert, p50/p99/max;
3. `down`: Orthanc stopped, the same burst: finding -> alert while pacs-export retries
   its first finding (the deadline is 600 s, so for the whole phase), then Orthanc back
   and every object of the burst stored (counted in Orthanc).

Latencies are Kafka record timestamps (CreateTime: the bench's producer for the finding,
the worker's for the alert and the audit event), one clock. Writes JSON to
bench/results/pacs_outage.json (or stdout with --json).
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from kafka import KafkaConsumer, KafkaProducer

from bench.kafka_read import read_from_start
from bench.output import print_or_write, run_header
from bench.summary import spread
from models.dicom_writer import write_ct_series
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import REPO_ROOT, Settings
from tests.integration.harness import Worker, make_worker_env
from tests.support.findings import ich_result
from tests.support.kafka import local_kafka
from tests.support.orthanc import Orthanc
from tests.support.wait import wait_until

RESULTS = REPO_ROOT / "bench" / "results" / "pacs_outage.json"
OBJECTS = ["sr", "key_image", "kos"]


def stats(xs: list[float]) -> dict[str, float]:
    """n, p50, p99 (nearest rank: with 20 samples the maximum), max, to 0.1 ms."""
    s = spread(xs, tail=0.99)
    return {"n": s["n"], "p50": round(s["p50"], 1), "p99": round(s["p99"], 1), "max": round(s["max"], 1)}


def findings(settings: Settings, work: Path, n: int, tag: int) -> list[tuple[str, bytes]]:
    """`n` positive ICH findings, each on a 4-slice CT of its own study in the blob store
    (`tag`, a number, tells the phases' studies apart)."""
    blobs = LocalBlobStore(settings.blob_dir)
    out = []
    for i in range(n):
        study, series = f"1.2.826.0.18.{tag}.{time.time_ns()}.{i}", pydicom.uid.generate_uid()
        files = write_ct_series(
            np.full((4, 16, 16), 40.0),
            (5.0, 1.0, 1.0),
            work / f"{tag}{i}",
            study_uid=study,
            series_uid=series,
        )
        for f in files:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            blobs.put_instance(study, series, uid, f.read_bytes())
        out.append((study, ich_result(study, series, request_id=f"{study}/bench").to_bytes()))
    return out


def read_all(bootstrap: str, topics: list[str]) -> Iterator[Any]:
    """Every record of `topics` up to their ends as of now."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = read_from_start(consumer, topics)
        ends = consumer.end_offsets(parts)
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in parts) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                yield from records
    finally:
        consumer.close()


class Times:
    """Record timestamps (ms) by study: findings, alerts, SRs stored."""

    def __init__(self, bootstrap: str, settings: Settings) -> None:
        t = settings.topics
        self.finding: dict[str, int] = {}
        self.alert: dict[str, int] = {}
        self.sr_stored: dict[str, int] = {}
        self.stored_objects = 0
        for r in read_all(bootstrap, [t.findings, t.alert_topic("ich"), t.audit]):
            value = json.loads(r.value)
            study = value.get("study_uid", "")
            if r.topic == t.findings:
                self.finding[study] = r.timestamp
            elif r.topic == t.audit:
                if value["stage"] == "export" and value["decision"].endswith("_stored"):
                    self.stored_objects += 1
                    if value["decision"] == "sr_stored":
                        self.sr_stored.setdefault(study, r.timestamp)
            else:
                self.alert.setdefault(study, r.timestamp)

    def to_alert(self, studies: list[str]) -> list[float]:
        return [float(self.alert[s] - self.finding[s]) for s in studies if s in self.alert]

    def to_sr(self, studies: list[str]) -> list[float]:
        return [float(self.sr_stored[s] - self.finding[s]) for s in studies if s in self.sr_stored]


def burst(producer: KafkaProducer, topic: str, batch: list[tuple[str, bytes]]) -> list[str]:
    for study, value in batch:
        producer.send(topic, key=study.encode(), value=value)
    producer.flush(30)
    return [study for study, _ in batch]


class AlertWatch:
    """The studies alerted so far, read by one consumer as the alerts come (not a new
    consumer per look: that would load the box being measured)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        read_from_start(self.consumer, [topic])
        self.seen: set[str] = set()

    def count(self, studies: set[str]) -> int:
        for records in self.consumer.poll(timeout_ms=200).values():
            self.seen.update(json.loads(r.value)["study_uid"] for r in records)
        return len(self.seen & studies)


def holds(orthanc: Orthanc, n: int) -> Callable[[], bool]:
    return lambda: orthanc.instance_count() >= n


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with local_kafka(tmp / "kafka") as broker:
        bootstrap = broker.bootstrap_servers
        (tmp / "home").mkdir()
        setup = make_worker_env(bootstrap, tmp / "home")
        env, settings = next(setup)
        orthanc = Orthanc(tmp / "pacs")
        orthanc.start()
        destination = {
            "name": "orthanc",
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "ae_title": orthanc.aet,
            "objects": OBJECTS,
        }
        env["RADTRIAGE_DISPATCH__DESTINATIONS"] = json.dumps([destination])
        env["RADTRIAGE_DISPATCH__RETRY_DEADLINE_S"] = "600"
        env["RADTRIAGE_DISPATCH__TIMEOUT_S"] = "5"
        worker = Worker(env, settings.home)
        single = findings(settings, tmp / "ct", args.single + 1, 1)
        up = findings(settings, tmp / "ct", args.burst, 2)
        down = findings(settings, tmp / "ct", args.burst, 3)
        worker.start()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        t = settings.topics
        watch = AlertWatch(bootstrap, t.alert_topic("ich"))
        try:
            # 1. One at a time (the first warms up connections and imports).
            singles = []
            for i, (study, value) in enumerate(single):
                producer.send(t.findings, key=study.encode(), value=value).get(10)
                # SR, key image, KOS of each finding so far.
                wait_until(holds(orthanc, 3 * (i + 1)), f"finding {i} in Orthanc", 120)
                singles.append(study)
            # 2. A burst with Orthanc up; every alert out, every object stored.
            up_studies = burst(producer, t.findings, up)
            wait_until(lambda: watch.count(set(up_studies)) == len(up_studies), "up alerts", 600)
            total = 3 * (len(single) + len(up))
            wait_until(lambda: orthanc.instance_count() >= total, "up burst stored", 1800)
            # 3. Orthanc down, the same burst; then back, and everything stored once.
            orthanc.stop()
            down_at = time.monotonic()
            down_studies = burst(producer, t.findings, down)
            wait_until(
                lambda: watch.count(set(down_studies)) == len(down_studies), "alerts with the PACS down", 600
            )
            alerts_done_s = time.monotonic() - down_at
            orthanc.start()
            total += 3 * len(down)
            wait_until(lambda: orthanc.instance_count() >= total, "down burst stored", 1800)
            held = orthanc.instance_count()
        finally:
            watch.consumer.close()
            worker.kill(signal.SIGTERM)
            orthanc.stop()
            next(setup, None)
        times = Times(bootstrap, settings)
    return {
        "finding_to_sr_stored_ms_one_at_a_time": stats(times.to_sr(singles[1:])),
        "burst": args.burst,
        "finding_to_alert_ms_pacs_up": stats(times.to_alert(up_studies)),
        "finding_to_alert_ms_pacs_down": stats(times.to_alert(down_studies)),
        "pacs_down_all_alerts_out_after_s": round(alerts_done_s, 1),
        "finding_to_sr_stored_ms_burst_pacs_up": stats(times.to_sr(up_studies)),
        "objects_in_orthanc": held,
        "objects_expected": total,
        "objects_stored_audited": times.stored_objects,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--single", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print the JSON instead of writing it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-pacs-outage-") as tmp:
        results = run(args, Path(tmp))
    print_or_write(run_header("pacs_outage") | {"results": results}, RESULTS, print_only=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
