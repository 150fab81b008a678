"""FHIR push latency (issue 20): report on `triage.results.fhir` -> stored on the EHR's FHIR
server, against the same transaction POSTed straight to that server, in the same run.

    python -m bench.ehr_fhir --reports 50

Starts its own single-node Kafka, the HAPI FHIR JPA server (8.8.0, H2; tests/support/
fhir_server.py) and a `radtriage worker` whose `ehr-fhir` stage sends to it. For each of
`--reports` (after one warm-up of each path), one at a time, alternating:

- baseline: a new ICH report's transaction (processors/fhir_transaction.py, the bytes the
  stage would send) POSTed directly to HAPI from this process over a kept-alive
  connection: wall ms from the POST to the answer;
- radtriage: another new report (its own study) published as a `FhirResult` on
  `triage.results.fhir`: wall ms from the publish to the stage's `fhir_stored` audit event
  (stamped by the worker right after HAPI's 2xx; same clock, one machine).

Both create a new DiagnosticReport, Observation each time (the Device exists after the
warm-up). p99 over n samples is nearest-rank. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from kafka import KafkaConsumer, KafkaProducer
from rich.console import Console

from bench.kafka_read import read_from_end
from bench.notify import stats
from bench.output import stamped_path, write_json
from processors.fhir_report import build_result_bundle
from processors.fhir_transaction import build_transaction, encode
from radtriage.settings import REPO_ROOT
from schemas.results import ResultHeaders, result_record
from tests.integration.harness import Worker, make_worker_env
from tests.support.fhir_server import HapiFhirServer
from tests.support.findings import ich_result
from tests.support.kafka import local_kafka

console = Console()


def _result(prefix: int, i: int) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """A report record as the report stage makes it: (study UID, Bundle, headers)."""
    study = f"1.2.826.0.42.{prefix}.{time.time_ns()}.{i}"
    finding = ich_result(study, study + ".2", accession_number=f"ACC{i}", patient_id=f"MRN{i}")
    meta = ResultHeaders(
        study_uid=study,
        accession_number=finding.accession_number,
        finding="ICH",
        request_id=finding.request_id,
    )
    return (study, *result_record(build_result_bundle(finding), meta))


class StoredWatch:
    """The worker's `fhir_stored` audit events, by study, with their own timestamps."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        read_from_end(self.consumer, [topic])
        self.stored: dict[str, float] = {}
        self.other: dict[str, str] = {}

    def wait(self, study: str, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while study not in self.stored:
            if study in self.other:
                raise RuntimeError(f"{study}: {self.other[study]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{study} not stored within {timeout_s} s")
            for records in self.consumer.poll(timeout_ms=50).values():
                for r in records:
                    event = json.loads(r.value)
                    if event["stage"] != "ehr":
                        continue
                    if event["decision"] == "fhir_stored":
                        self.stored[event["study_uid"]] = datetime.fromisoformat(event["at"]).timestamp()
                    else:
                        self.other[event["study_uid"]] = event["decision"]
        return self.stored[study]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-ehr-fhir-") as tmp_name:
        tmp = Path(tmp_name)
        with local_kafka(tmp / "kafka") as broker, HapiFhirServer(tmp / "hapi") as hapi:
            console.print(f"HAPI FHIR JPA server started in {hapi.started_in_s:.1f} s")
            bootstrap = broker.bootstrap_servers
            (tmp / "home").mkdir()
            setup = make_worker_env(bootstrap, tmp / "home")
            env, settings = next(setup)
            env["RADTRIAGE_EHR__FHIR"] = json.dumps({"base_url": hapi.base_url, "retry_deadline_s": 30})
            worker = Worker(env, settings.home)
            with console.status("starting the worker…"):
                worker.start()
            producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
            watch = StoredWatch(bootstrap, settings.topics.audit)
            direct = requests.Session()
            baseline: list[float] = []
            pushed: list[float] = []
            try:
                for i in range(args.reports + 1):  # the first of each warms up (JIT, connections)
                    tx, _ = build_transaction(json.loads(_result(1, i)[1]))
                    body = encode(tx)
                    start = time.perf_counter()
                    answer = direct.post(
                        hapi.base_url,
                        data=body,
                        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                        timeout=60,
                    )
                    took = (time.perf_counter() - start) * 1e3
                    answer.raise_for_status()
                    study, value, headers = _result(2, i)
                    sent_at = time.time()
                    producer.send(
                        settings.topics.results_fhir, key=study.encode(), value=value, headers=headers
                    ).get(10)
                    stored_at = watch.wait(study)
                    if i:
                        baseline.append(took)
                        pushed.append((stored_at - sent_at) * 1e3)
                    time.sleep(0.1)
                total = requests.get(
                    f"{hapi.base_url}/DiagnosticReport", params={"_summary": "count"}, timeout=30
                ).json()["total"]
            finally:
                worker.kill(signal.SIGTERM)
                next(setup, None)
                watch.consumer.close()
    b, p = stats(baseline), stats(pushed)
    result_json: dict[str, Any] = {
        "benchmark": "ehr_fhir",
        "at": datetime.now(UTC).isoformat(),
        "reports": len(pushed),
        "hapi_started_in_s": round(hapi.started_in_s, 1),
        "direct_post_to_hapi_ms": b,
        "report_on_topic_to_stored_ms": p,
        "ratio_p50": p["p50"] / b["p50"],
        "ratio_p99": p["p99"] / b["p99"],
        "diagnostic_reports_on_server": total,
        "expected_on_server": 2 * (args.reports + 1),
        "setup": "1 Kafka broker, 1 worker, HAPI FHIR JPA 8.8.0 (H2 file, -Xmx384m) on 127.0.0.1, "
        "one report at a time, alternating direct POST and radtriage",
    }
    path = stamped_path(args.out, "ehr_fhir")
    console.print_json(write_json(path, result_json))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
