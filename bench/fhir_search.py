"""FHIR read/search on `/fhir`: how long the results view takes to rebuild from the topic,
what it costs in memory, how fast searches answer, and how soon a new report is found.

    python -m bench.fhir_search                    # 10,000 reports
    python -m bench.fhir_search --reports 2000 --json

What runs: a local Kafka (the project's LocalKafka); `--reports` report records built by
processors/fhir_report.py from findings of every shape (tests/support/findings.py
`gallery`, cycled; each its own study, accession and patient), one a second of
`produced_at`, published on a fresh `triage.results.fhir` topic (3 partitions). Then, each
in a fresh process so that peak memory (VmHWM) is its own:

- baseline: the topic read raw with kafka-python from the beginning to the end, no
  decoding — what any rebuild must pay at least;
- view: connectors/fhir/results_view.py `ResultsView` started and waited on until ready
  (decode, relink, index every record); then searches on it directly (index + searchset
  Bundle + JSON text, as the route does, without HTTP): by identifier (a random
  accession number) and by `_lastUpdated` (a random ten-minute window, `_count=50`);
- http: a `radtriage http` process: time from start to the view being ready; the same
  searches over HTTP (requests, keep-alive); and the lag: a record published while it
  runs, polled for by identifier every 5 ms until found (`--lag-samples` times).

Writes JSON to bench/results/fhir_search.json (or stdout with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from bench.output import print_or_write
from bench.proc_status import status_kb
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import REPO_ROOT, Settings
from tests.support.kafka import local_kafka
from tests.support.net import free_port

RESULTS = REPO_ROOT / "bench" / "results" / "fhir_search.json"
T0 = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
PARTITIONS = 3


def _mem() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    return {key: status_kb(key) / 1024 for key in ("VmHWM", "VmRSS")}


def baseline_child(bootstrap: str, topic: str) -> dict[str, Any]:
    """The topic read raw from the beginning to its end: no decoding, nothing kept."""
    from kafka import KafkaConsumer, TopicPartition

    before = _mem()
    t = time.perf_counter()
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    ends = c.end_offsets(parts)
    n = nbytes = header_bytes = 0
    while any(c.position(tp) < ends[tp] for tp in parts):
        for records in c.poll(timeout_ms=200, max_records=2000).values():
            n += len(records)
            nbytes += sum(len(r.value) for r in records)
            header_bytes += sum(len(k) + len(v or b"") for r in records for k, v in r.headers or ())
    elapsed = time.perf_counter() - t
    c.close()
    return {
        "records": n,
        "bytes": nbytes,
        # The results' metadata travels in headers (schemas/results.py): counted apart.
        "header_bytes": header_bytes,
        "seconds": elapsed,
        "mem_before": before,
        "mem_after": _mem(),
    }


def view_child(bootstrap: str, topic: str, reports: int, samples: int) -> dict[str, Any]:
    """The view rebuilt, then searched in process (index + searchset + JSON text)."""
    from connectors.fhir.results_index import ResultsIndex
    from connectors.fhir.results_view import ResultsView
    from connectors.fhir.search import parse_query, searchset

    accessions = [f"ACC{i:07d}" for i in range(reports)]  # as _records names them
    settings = Settings()
    settings.kafka.bootstrap_servers = bootstrap
    settings.topics.results_fhir = topic
    settings.fhir_search.max_resources = 10_000_000
    before = _mem()
    view = ResultsView(settings)
    t = time.perf_counter()
    view.start()
    assert view.wait_ready(600), "the view was not ready in 600 s"
    rebuild = time.perf_counter() - t
    after = _mem()
    rng = random.Random(7)

    def timed(items: list[tuple[str, str]]) -> tuple[float, int]:
        query = parse_query("DiagnosticReport", items, strict=False, default_count=50, max_count=500)

        def run(index: ResultsIndex) -> int:
            total, page = index.search(query)
            json.dumps(searchset("http://h", query, total, [s.resource for s in page]))
            return total

        t = time.perf_counter()
        total = view.locked(run)
        return (time.perf_counter() - t) * 1000, total

    by_id, by_date, totals = [], [], []
    for _ in range(samples):
        ms, total = timed([("identifier", rng.choice(accessions))])
        assert total == 1, total
        by_id.append(ms)
        lo = T0 + timedelta(seconds=rng.uniform(0, reports - 600))
        hi = lo + timedelta(minutes=10)
        ms, total = timed([("_lastUpdated", "ge" + lo.isoformat()), ("_lastUpdated", "lt" + hi.isoformat())])
        by_date.append(ms)
        totals.append(total)
    view.stop()
    return {
        "records": view.records,
        "resources": view.index.counts(),
        "seconds": rebuild,
        "mem_before": before,
        "mem_after": after,
        "search_ms": {"identifier": by_id, "last_updated": by_date},
        "last_updated_totals": totals,
    }


def quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max": round(ordered[-1], 3),
    }


def _child(kind: str, *args: str) -> dict[str, Any]:
    """`--child kind args` in a fresh process (its own peak memory); its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.fhir_search", "--child", kind, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


Headers = list[tuple[str, bytes]]


def _records(n: int) -> tuple[list[tuple[str, bytes, Headers]], list[str]]:
    from processors.fhir_report import build_result_bundle
    from schemas.results import ResultHeaders, result_record
    from tests.support.findings import gallery

    shapes = list(gallery().values())
    out, accessions = [], []
    for i in range(n):
        base = shapes[i % len(shapes)]
        f = base.model_copy(
            update={
                "study_uid": f"1.2.826.0.1.3680043.10.{i}",
                "accession_number": f"ACC{i:07d}",
                "patient_id": f"MRN{i % 4000:06d}",
                "inferred_at": T0 + timedelta(seconds=i),
            }
        )
        meta = ResultHeaders(
            study_uid=f.study_uid,
            accession_number=f.accession_number,
            finding=f.finding,
            request_id=f.request_id,
            produced_at=T0 + timedelta(seconds=i),
        )
        value, headers = result_record(build_result_bundle(f), meta)
        out.append((f.study_uid, value, headers))
        accessions.append(f.accession_number)
    return out, accessions


def _publish(bootstrap: str, topic: str, records: Sequence[tuple[str, bytes, Headers]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_request_size=4 << 20)
    for key, value, headers in records:
        producer.send(topic, key=key.encode(), value=value, headers=headers)
    producer.flush(120)
    producer.close()


def _http(
    bootstrap: str, topic: str, home: Path, accessions: Sequence[str], samples: int, lag_samples: int
) -> dict[str, Any]:
    from processors.fhir_report import build_result_bundle
    from schemas.results import ResultHeaders, result_record
    from tests.support.findings import finding

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADTRIAGE_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "RADTRIAGE_HOME": str(home),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RADTRIAGE_TOPICS__RESULTS_FHIR": topic,
            "RADTRIAGE_HTTP__PORT": str(port),
            "RADTRIAGE_HTTP__BIND_ADDRESS": "127.0.0.1",
            "RADTRIAGE_TELEMETRY__EXPORTER": "none",
            "RADTRIAGE_OPERATOR__ENABLED": "false",
            "RADTRIAGE_FHIR_SEARCH__MAX_RESOURCES": "10000000",
        }
    )
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    log = (home / "http.log").open("ab")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "radtriage.cli", "http"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        healthy_s = None
        while True:
            assert proc.poll() is None, "radtriage http exited"
            try:
                r = session.get(f"{base}/fhir/DiagnosticReport", params={"_count": "0"}, timeout=5)
                healthy_s = healthy_s or time.perf_counter() - started
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - started
        rng = random.Random(11)
        by_id, by_date = [], []
        for _ in range(samples):
            t = time.perf_counter()
            r = session.get(
                f"{base}/fhir/DiagnosticReport", params={"identifier": rng.choice(accessions)}, timeout=5
            )
            by_id.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200 and r.json()["total"] == 1
            lo = T0 + timedelta(seconds=rng.uniform(0, len(accessions) - 600))
            params = [
                ("_lastUpdated", "ge" + lo.isoformat()),
                ("_lastUpdated", "lt" + (lo + timedelta(minutes=10)).isoformat()),
            ]
            t = time.perf_counter()
            r = session.get(f"{base}/fhir/DiagnosticReport", params=[*params, ("_count", "50")], timeout=5)
            by_date.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
        lags = []
        for i in range(lag_samples):
            f = finding(study_uid=f"1.2.826.0.1.3680043.11.{i}", accession_number=f"LAG{i:05d}")
            value, headers = result_record(
                build_result_bundle(f), ResultHeaders(study_uid=f.study_uid, finding=f.finding)
            )
            t = time.perf_counter()
            producer.send(topic, key=f.study_uid.encode(), value=value, headers=headers).get(10)
            acked = time.perf_counter()
            while (
                session.get(
                    f"{base}/fhir/DiagnosticReport", params={"identifier": f.accession_number}, timeout=5
                ).json()["total"]
                == 0
            ):
                time.sleep(0.005)
            lags.append(
                {
                    "acked_to_found_ms": (time.perf_counter() - acked) * 1000,
                    "send_to_found_ms": (time.perf_counter() - t) * 1000,
                }
            )
        producer.close()
        proc.terminate()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return {
        "start_to_listening_s": round(healthy_s or 0, 3),
        "start_to_ready_s": round(ready_s, 3),
        "search_ms": {"identifier": quantiles(by_id), "last_updated": quantiles(by_date)},
        "lag_ms": {
            "acked_to_found": quantiles([x["acked_to_found_ms"] for x in lags]),
            "send_to_found": quantiles([x["send_to_found_ms"] for x in lags]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=500, help="searches of each kind")
    ap.add_argument("--lag-samples", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="print the JSON instead of writing it")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # the measured processes
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "baseline":
            print(json.dumps(baseline_child(rest[0], rest[1])))
        else:
            print(json.dumps(view_child(rest[0], rest[1], int(rest[2]), int(rest[3]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-fhir-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        kafka = stack.enter_context(local_kafka(work / "kafka"))
        bootstrap = str(kafka.bootstrap_servers)
        topic = "triage.results.fhir.bench"
        ensure_topics(bootstrap, {topic: PARTITIONS})
        t = time.perf_counter()
        records, accessions = _records(args.reports)
        built_s = time.perf_counter() - t
        t = time.perf_counter()
        _publish(bootstrap, topic, records)
        published_s = time.perf_counter() - t
        topic_bytes = sum(len(v) for _, v, _ in records)
        # The metadata's headers (names and values), apart from the values above.
        header_bytes = sum(len(k) + len(v) for _, _, headers in records for k, v in headers)
        del records
        print(
            f"{args.reports} records built in {built_s:.1f} s, published in {published_s:.1f} s",
            file=sys.stderr,
        )
        baseline = _child("baseline", bootstrap, topic)
        print(f"baseline: {baseline['seconds']:.2f} s", file=sys.stderr)
        view = _child("view", bootstrap, topic, str(args.reports), str(args.samples))
        print(f"view: {view['seconds']:.2f} s", file=sys.stderr)
        home = work / "home"
        home.mkdir()
        http = _http(bootstrap, topic, home, accessions, args.samples, args.lag_samples)
        print(f"http: ready after {http['start_to_ready_s']:.2f} s", file=sys.stderr)
    result = {
        "bench": "fhir_search",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "reports": args.reports,
        "topic": {"partitions": PARTITIONS, "bytes": topic_bytes, "header_bytes": header_bytes},
        "baseline_raw_read": {
            "seconds": round(baseline["seconds"], 3),
            "records": baseline["records"],
            "peak_rss_mb": round(baseline["mem_after"]["VmHWM"], 1),
            "rss_before_mb": round(baseline["mem_before"]["VmRSS"], 1),
        },
        "view_rebuild": {
            "seconds": round(view["seconds"], 3),
            "records": view["records"],
            "resources": view["resources"],
            "peak_rss_mb": round(view["mem_after"]["VmHWM"], 1),
            "rss_before_mb": round(view["mem_before"]["VmRSS"], 1),
            "rss_after_mb": round(view["mem_after"]["VmRSS"], 1),
            "records_per_s": round(view["records"] / view["seconds"], 1),
        },
        "search_in_process_ms": {
            "identifier": quantiles(view["search_ms"]["identifier"]),
            "last_updated_10min_count50": quantiles(view["search_ms"]["last_updated"]),
            "last_updated_matches_median": statistics.median(view["last_updated_totals"]),
        },
        "http": http,
    }
    print_or_write(result, RESULTS, print_only=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
