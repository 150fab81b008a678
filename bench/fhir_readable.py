"""Reading radtriage's reports back from a FHIR server, for bench/delivery.py's FHIR leg:
when a study's DiagnosticReport became readable (polled by accession, with the poll's own
error and the server's meta.lastUpdated beside it), how many reports the server holds per
finding, and the server's own cost for the same transaction POSTed straight to it.

Pure parts (`found_report`, `report_keys`, `fresh_copy`) are unit-tested
(tests/unit/test_bench_fhir_readable.py); the rest talks to the server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import requests

from processors.fhir_transaction import CREATE_ONCE, build_transaction, encode


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


FHIR_JSON = "application/fhir+json"
# Short against the ~100 ms a transaction takes on HAPI, long enough not to load it.
POLL_INTERVAL_S = 0.05
# Every search runs again on HAPI rather than answering from a recent search's results.
NO_CACHE = {"Cache-Control": "no-cache", "Accept": FHIR_JSON}


@dataclass(frozen=True)
class Readable:
    """When a report was first read back from the FHIR server (this machine's clock)."""

    at: float  # the end of the first search that found it
    not_before: float  # the start of the last search that did not: it appeared in between
    last_updated: float | None  # the report's meta.lastUpdated (HAPI's clock, the same machine)


def found_report(search: dict[str, Any]) -> tuple[bool, float | None]:
    """Whether a search's Bundle has a DiagnosticReport, and the earliest meta.lastUpdated
    among them (None: none has one)."""
    reports = [
        e["resource"]
        for e in search.get("entry", [])
        if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "DiagnosticReport"
    ]
    times = [_ts(r["meta"]["lastUpdated"]) for r in reports if "lastUpdated" in r.get("meta", {})]
    return bool(reports), min(times, default=None)


class FhirWatch:
    """Polls the FHIR server for each watched accession's DiagnosticReport from a thread of
    its own, every `interval_s`, until found: when it became readable, to within a poll."""

    def __init__(self, base_url: str, interval_s: float = POLL_INTERVAL_S) -> None:
        self.base_url, self.interval_s = base_url, interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # accession -> start of the last search that missed
        self.found: dict[str, Readable] = {}
        self.search_ms: list[float] = []  # each answered search's own duration
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fhir-watch", daemon=True)
        self._thread.start()

    def watch(self, accession: str) -> None:
        with self._lock:
            self._pending[accession] = time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _search(self, session: requests.Session, accession: str) -> dict[str, Any] | None:
        try:
            answer = session.get(
                f"{self.base_url}/DiagnosticReport",
                params={"identifier": accession},
                headers=NO_CACHE,
                timeout=10,
            )
        except requests.RequestException:
            return None  # the server is down (the outage): searched again next round
        if not answer.ok:
            return None
        body: dict[str, Any] = answer.json()
        return body

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            with self._lock:
                pending = list(self._pending)
            for accession in pending:
                started = time.time()
                body = self._search(session, accession)
                ended = time.time()
                if body is None:
                    continue
                self.search_ms.append((ended - started) * 1000)
                found, last_updated = found_report(body)
                with self._lock:
                    if not found:
                        self._pending[accession] = started
                        continue
                    missed = self._pending.pop(accession)
                    self.found[accession] = Readable(ended, missed, last_updated)
            self._stop.wait(self.interval_s)


def report_keys(results: list[dict[str, Any]]) -> set[str]:
    """The tokens (`system|value`) radtriage's transactions key each report on, from the
    study's `triage.results.fhir` records: one per finding."""
    return {build_transaction(r["bundle"])[1].token for r in results}


def reports_on_server(base_url: str, token: str) -> int:
    """How many DiagnosticReports the server holds under one report key."""
    answer = requests.get(
        f"{base_url}/DiagnosticReport",
        params={"identifier": token, "_summary": "count"},
        headers=NO_CACHE,
        timeout=30,
    )
    answer.raise_for_status()
    return int(answer.json()["total"])


def fresh_copy(bundle: dict[str, Any], accession: str) -> dict[str, Any]:
    """The report Bundle with new ids for everything radtriage updates (the Device, created
    once, keeps its own) and its accession prefixed DIRECT-: POSTed as a transaction it
    creates a new report, as the stage's first POST of a report does, that the accession
    searches do not find."""
    text = json.dumps(bundle)
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") not in CREATE_ONCE and resource.get("id"):
            text = text.replace(resource["id"], str(uuid.uuid4()))
    if accession:
        text = text.replace(f'"{accession}"', f'"DIRECT-{accession}"')
    copied: dict[str, Any] = json.loads(text)
    return copied


def direct_fhir(base_url: str, bundle: dict[str, Any], accession: str) -> float:
    """ms to POST a new report's transaction straight to the FHIR server over a fresh
    connection and read its answer (the peer's cost)."""
    transaction, _ = build_transaction(fresh_copy(bundle, accession))
    payload = encode(transaction)
    started = time.perf_counter()
    answer = requests.post(
        base_url, data=payload, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=60
    )
    elapsed = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    return elapsed
