"""Prometheus metrics of every radtriage process: definitions, multiprocess set-up, scrape-time collectors.

Each process (worker, dicom-scp, hl7-listener, http) records its own metrics with
prometheus_client where things happen. Two ways to collect them:

- One host (`radtriage up`): every child gets the same multiprocess directory
  (`PROMETHEUS_MULTIPROC_DIR` = `$RADTRIAGE_HOME/metrics`, wiped by `up` at start), and
  the HTTP process's `GET /metrics` serves the aggregate of all of them
  (`MultiProcessCollector`). prometheus_client picks its value store when it is first
  imported, so the variable is set by the parent, before the child starts.
- A pod per process (Kubernetes, no multiprocess directory): each process's registry is
  its own; the HTTP process serves its registry on `/metrics`, and worker / dicom-scp /
  hl7-listener serve theirs with `start_http_server` on `metrics.port` when it is set.

Latencies come from the events' own timestamps (schemas/), so a histogram measures what
the study experienced across processes and restarts, not one function's run time.
Label values are always bounded — lanes, model names from the routing rules, stages,
status codes — never a study UID, accession number or patient id.

Consumer lag and model readiness are read at scrape time by collectors in the HTTP
process (`ConsumerLagCollector`, `ModelReadyCollector`), cached for a few seconds, and
every call they make runs in a background thread the scrape waits on for a bounded
time: an unreachable Kafka or Triton makes their gauges absent or 0, never `/metrics`
slow or failing.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client opens its per-process files in this directory on first use; a
# process started by hand with the variable set must not fail because it is missing.
if os.environ.get(MULTIPROC_ENV):
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

from aiohttp import web  # noqa: E402
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from radtriage.kafka_lag import lag_by_lane  # noqa: E402  # re-exported: the lag gauge's arithmetic
from radtriage.settings import LANES, KafkaSettings, Settings  # noqa: E402
from schemas.alerts import Alert  # noqa: E402
from schemas.findings import Finding  # noqa: E402
from schemas.requests import TriageRequest  # noqa: E402
from schemas.results import ResultHeaders  # noqa: E402

log = logging.getLogger(__name__)

OTHER = "other"

# 10 ms (a Kafka hop) … 60 s (a routine study behind a backlog), dense around the stat
# lane's 5 s ready→alert objective so histogram_quantile is not guessing there.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip

# -- histograms: stage latencies from the events' timestamps --------------------------------

STUDY_ASSEMBLY = Histogram(
    "radtriage_study_assembly_seconds",
    "First instance received to study ready (StudyEvent.ready_at - received_at)",
    ["ready_reason"],
    buckets=LATENCY_BUCKETS,
)
READY_TO_ROUTED = Histogram(
    "radtriage_ready_to_routed_seconds",
    "Study ready to triage request routed on its lane (TriageRequest.routed_at - ready_at)",
    ["lane", "model"],
    buckets=LATENCY_BUCKETS,
)
ROUTED_TO_INFERRED = Histogram(
    "radtriage_routed_to_inferred_seconds",
    "Request routed to finding inferred (Finding.inferred_at - TriageRequest.routed_at)",
    ["lane", "model"],
    buckets=LATENCY_BUCKETS,
)
READY_TO_ALERT = Histogram(
    "radtriage_ready_to_alert_seconds",
    "End to end: study ready to alert published (Alert.alerted_at - ready_at)",
    ["lane", "model", "finding"],
    buckets=LATENCY_BUCKETS,
)
RECEIVED_TO_ALERT = Histogram(
    "radtriage_received_to_alert_seconds",
    "End to end: first instance received to alert published (Alert.alerted_at - received_at)",
    ["lane", "model", "finding"],
    buckets=LATENCY_BUCKETS,
)
READY_TO_REPORT = Histogram(
    "radtriage_ready_to_report_seconds",
    "End to end: study ready to FHIR report published (the result's produced_at - Finding.ready_at)",
    ["lane", "model"],
    buckets=LATENCY_BUCKETS,
)
PREPROCESS = Histogram(
    "radtriage_preprocess_duration_seconds",
    "Series loading and MONAI preprocessing of one request",
    ["lane", "model"],
    buckets=LATENCY_BUCKETS,
)
TRITON_INFER = Histogram(
    "radtriage_triton_infer_duration_seconds",
    "One successful Triton inference call, queue included",
    ["lane", "model"],
    buckets=LATENCY_BUCKETS,
)

# -- counters --------------------------------------------------------------------------------

STUDIES_ASSEMBLED = Counter(
    "radtriage_studies_assembled_total", "Studies complete and published for routing", ["ready_reason"]
)
ASSEMBLY_REREADS = Counter(
    "radtriage_assembly_rereads_total",
    "Release markers counting more instances than the assembly held, by what reading the"
    " log back found (restored: the missing ones folded in; nothing_missing: a resend's"
    " count; not_in_log; failed: the log could not be read)",
    ["outcome"],
)
ASSEMBLY_REREAD_INSTANCES = Counter(
    "radtriage_assembly_reread_instances_total", "Instances the assembly lacked and read back from the log"
)
STUDIES_UNROUTED = Counter("radtriage_studies_unrouted_total", "Studies no routing rule takes")
REQUESTS_ROUTED = Counter(
    "radtriage_requests_routed_total",
    "Triage requests published on a lane (action: routed, or lane_upgraded by a late order)",
    ["lane", "model", "action"],
)
TRITON_FAILURES = Counter(
    "radtriage_triton_infer_failures_total",
    "Failed Triton inference attempts (each retry counts)",
    ["lane", "model"],
)
FINDINGS = Counter("radtriage_findings_total", "Findings published", ["lane", "model", "finding", "positive"])
ALERTS = Counter("radtriage_alerts_total", "Critical-finding alerts published", ["finding", "lane"])
ALERTS_SUPPRESSED = Counter(
    "radtriage_alerts_suppressed_total", "Alerts not sent again: already on the alert topic", ["finding"]
)
REPORTS = Counter("radtriage_reports_total", "FHIR DiagnosticReport bundles published", ["finding"])
EHR_HL7 = Counter(
    "radtriage_ehr_hl7_total",
    "ORU^R01 results for the EHR/RIS over MLLP, by outcome (acknowledged, refused, undelivered, unbuildable)",
    ["outcome"],
)
EHR_FHIR = Counter(
    "radtriage_ehr_fhir_total",
    "FHIR transactions of reports to the EHR's FHIR server, by outcome (stored, refused, undelivered,"
    " unsendable)",
    ["outcome"],
)
DEAD_LETTERS = Counter("radtriage_dead_letters_total", "Messages sent to triage.deadletter", ["stage"])
# The notify stage (streams/stages/notify.py): every try by channel kind (webhook, email) and
# outcome (delivered, failed), recipients no channel reached, escalations ended by reason,
# and audit records it could not read.
NOTIFY_ATTEMPTS = Counter(
    "radtriage_notify_attempts_total", "Notification tries, by channel kind and outcome", ["kind", "outcome"]
)
NOTIFY_UNDELIVERABLE = Counter(
    "radtriage_notify_undeliverable_total", "Notifications no channel of the recipient took"
)
NOTIFY_STOPPED = Counter("radtriage_notify_stopped_total", "Escalations ended, by reason", ["reason"])
NOTIFY_UNREADABLE = Counter(
    "radtriage_notify_unreadable_total", "Records the notify stage could not read (skipped)", ["topic_kind"]
)
# Alerts first (streams/alert_first.py): how long a report, ORU or result-object build of
# a finding that alerts waited for the alert to be told; "bound" = notify.alert_first_s ran out.
ALERT_FIRST_WAIT = Histogram(
    "radtriage_alert_first_wait_seconds",
    "A finding's other deliveries waiting for its alert to be told first",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
# Operator notifications (streams/stages/notify_ops.py): items gathered (dead letters,
# stuck requests) and digests sent, by kind and outcome (delivered, undeliverable).
NOTIFY_OPS_ITEMS = Counter(
    "radtriage_notify_ops_items_total", "Dead letters and stuck requests gathered for operators", ["kind"]
)
NOTIFY_OPS_DIGESTS = Counter(
    "radtriage_notify_ops_digests_total", "Operator digests, by kind and outcome", ["kind", "outcome"]
)
HL7_MESSAGES = Counter(
    "radtriage_hl7_messages_total", "HL7 v2 messages answered over MLLP", ["message_type", "ack_code"]
)
FHIR_REQUESTS = Counter(
    "radtriage_fhir_requests_total", "FHIR REST requests answered", ["resource_type", "code"]
)
HTTP_AUTH_REFUSALS = Counter(
    "radtriage_http_auth_refusals_total",
    "HTTP requests refused 401 for want of valid credentials, by reason",
    ["reason"],
)
# The reasons connectors/http/auth.py refuses for (its REFUSAL_REASONS); anything else is "other".
HTTP_AUTH_REFUSAL_REASONS = frozenset(
    {"missing_credentials", "malformed_authorization", "invalid_token", "client_cert_required"}
)
STOW_REQUESTS = Counter("radtriage_stow_requests_total", "DICOMweb STOW-RS requests answered", ["code"])
STOW_INSTANCES = Counter(
    "radtriage_stow_instances_total",
    "STOW-RS instances, stored or failed, by the C-STORE status they got",
    ["outcome", "status"],
)
DICOM_C_STORE = Counter(
    "radtriage_dicom_c_store_total", "DICOM C-STORE requests answered, by status", ["outcome", "status"]
)
DICOM_ASSOCIATIONS = Counter(
    "radtriage_dicom_associations_total", "DICOM association requests, accepted or rejected", ["result"]
)
DICOM_ASSOCIATION_REFUSALS = Counter(
    "radtriage_dicom_association_refusals_total",
    "DICOM callers refused: by the caller allow-list (A-ASSOCIATE-RJ) or a failed TLS handshake",
    ["reason"],  # connectors/dicom/callers.py REASONS
)
DICOM_REJECTED_CONTEXTS = Counter(
    "radtriage_dicom_rejected_presentation_contexts_total",
    "DICOM presentation contexts the SCP rejected at association, by reason",
    ["reason"],  # connectors/dicom/negotiation.py CONTEXT_REJECTION_REASONS
)
PACS_EXPORTS = Counter(
    "radtriage_pacs_exports_total",
    "Result objects sent to a PACS (streams/stages/pacs_export.py), by destination and outcome",
    ["destination", "object", "outcome"],  # stored, retried, failed
)
LOCALISATION_MAPS = Counter(
    "radtriage_localisation_maps_total",
    "Localisation maps kept for the DICOM SEG (streams/stages/infer.py), by outcome",
    ["outcome"],  # stored, failed
)
RESULTS_NOT_BUILT = Counter(
    "radtriage_results_not_built_total",
    "Result objects a destination wanted that could not be built (streams/stages/pacs_export.py)",
    ["object", "reason"],
)
OUTBOX_FINDINGS = Counter(
    "radtriage_outbox_findings_total",
    "Findings a delivery stage's forwarder put on its outbox topic, or skipped as not wanted "
    "by its configuration (streams/stages/outbox.py)",
    ["stage", "outcome"],  # forwarded, skipped
)
DICOM_OWN_RESULTS_IGNORED = Counter(
    "radtriage_dicom_own_results_ignored_total",
    "radtriage's own result objects sent back to its listener and not ingested (no export loop)",
)
FHIR_READ_REFUSALS = Counter(
    "radtriage_fhir_read_refusals_total",
    "FHIR reads and searches of results refused (400, 404, 503), by reason",
    ["resource_type", "reason"],  # FHIR_READ_REFUSAL_REASONS
)
FHIR_VIEW_RECORDS = Counter(
    "radtriage_fhir_view_records_total",
    "Results-topic records the FHIR read/search view consumed, by outcome",
    ["outcome"],  # applied, unchanged, unreadable
)
FHIR_VIEW_EVICTED = Counter(
    "radtriage_fhir_view_evicted_total",
    "Resources the FHIR read/search view dropped to stay within fhir_search.max_resources",
    ["resource_type"],
)
HL7_CONNECTIONS_REFUSED = Counter(
    "radtriage_hl7_connections_refused_total",
    "MLLP connections closed unread: source address not allowed, or TLS handshake failed",
    ["reason"],  # source_not_allowed, tls_handshake_failed
)

# -- gauges (livesum: the sum over live processes; a dead one's share is removed) -------------

STUDIES_ASSEMBLING = Gauge(
    "radtriage_studies_assembling",
    "Studies receiving instances, not yet ready",
    multiprocess_mode="livesum",
)
REQUESTS_IN_FLIGHT = Gauge(
    "radtriage_requests_in_flight",
    "Triage requests being preprocessed or inferred right now",
    ["lane"],
    multiprocess_mode="livesum",
)
HL7_OPEN_CONNECTIONS = Gauge(
    "radtriage_hl7_open_connections", "Open MLLP connections", multiprocess_mode="livesum"
)
DICOM_OPEN_ASSOCIATIONS = Gauge(
    "radtriage_dicom_open_associations",
    # One association per TCP connection (PS3.8), so it is counted by connection: a link that
    # drops fires neither release nor abort, but always closes.
    "Open DICOM associations (TCP connections to the SCP)",
    multiprocess_mode="livesum",
)

FHIR_VIEW_RESOURCES = Gauge(
    "radtriage_fhir_view_resources",
    "Resources the FHIR read/search view holds (latest versions), by type",
    ["resource_type"],
    multiprocess_mode="livesum",
)
FHIR_VIEW_READY = Gauge(
    "radtriage_fhir_view_ready",
    "1 once the FHIR read/search view has read the results topic up to where it ended at start",
    multiprocess_mode="livesum",
)

# -- bounded labels (pure) -------------------------------------------------------------------

_known_models: frozenset[str] = frozenset()


def set_known_models(names: Iterable[str]) -> None:
    """The model names the routing rules use; any other name is labelled "other"."""
    global _known_models
    _known_models = frozenset(names)


def model_label(name: str) -> str:
    return name if name in _known_models else OTHER


def lane_label(lane: str) -> str:
    return lane if lane in LANES else OTHER


def bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


HL7_MESSAGE_TYPES = frozenset(
    {"ORM^O01", "OMI^O23", "ORU^R01", "ACK"} | {f"ADT^A{n:02d}" for n in range(1, 63)}
)
HL7_ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


def hl7_message_type_label(message_type: str) -> str:
    """MSH-9 as `CODE^EVENT` (the structure component dropped), or "other"/"unreadable".

    MSH-9 is whatever the sender wrote, so only known types become label values."""
    parts = [p.strip().upper() for p in (message_type or "").split("^")]
    if not parts[0]:
        return "unreadable"
    label = "^".join(parts[:2]) if len(parts) > 1 and parts[1] else parts[0]
    return bounded(label, HL7_MESSAGE_TYPES)


FHIR_RESOURCE_TYPES = frozenset({"ServiceRequest", "ImagingStudy", "DiagnosticReport", "Observation"})
FHIR_READ_REFUSAL_REASONS = frozenset(
    {"unknown_parameter", "unsupported_modifier", "invalid_value", "not_found", "view_loading", "disabled"}
)
FHIR_VIEW_OUTCOMES = frozenset({"applied", "unchanged", "unreadable"})


def fhir_resource_label(path: str, resource_type: str | None) -> str:
    """What a /fhir request addressed: a resource type we take, "Bundle" (POST /fhir),
    "metadata", or "other" — never a type name a client made up."""
    if path.rstrip("/") == "/fhir":
        return "Bundle"
    if resource_type == "metadata" or path == "/fhir/metadata":
        return "metadata"
    return bounded(resource_type or "", FHIR_RESOURCE_TYPES)


def http_code_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else OTHER


def dicom_status_label(status: int) -> str:
    """A DICOM status as written in PS3.7 (0xA700)."""
    return f"0x{status & 0xFFFF:04X}"


def observe_http_request(path: str, resource_type: str | None, status: int) -> None:
    """One answered request of the HTTP intake, with the status the client got."""
    code = http_code_label(status)
    if path == "/fhir" or path.startswith("/fhir/"):
        FHIR_REQUESTS.labels(fhir_resource_label(path, resource_type), code).inc()
    elif path == "/dicomweb/studies" or path.startswith("/dicomweb/studies/"):
        STOW_REQUESTS.labels(code).inc()


def count_http_auth_refusal(reason: str) -> None:
    HTTP_AUTH_REFUSALS.labels(bounded(reason, HTTP_AUTH_REFUSAL_REASONS)).inc()


def count_fhir_read_refusal(resource_type: str, reason: str) -> None:
    FHIR_READ_REFUSALS.labels(
        bounded(resource_type, FHIR_RESOURCE_TYPES), bounded(reason, FHIR_READ_REFUSAL_REASONS)
    ).inc()


def observe_fhir_view(
    outcome: str, evicted: Mapping[str, int], resources: Mapping[str, int], ready: bool
) -> None:
    """One record the results view consumed: its outcome, what it evicted, what it holds now."""
    FHIR_VIEW_RECORDS.labels(bounded(outcome, FHIR_VIEW_OUTCOMES)).inc()
    for resource_type, n in evicted.items():
        FHIR_VIEW_EVICTED.labels(bounded(resource_type, FHIR_RESOURCE_TYPES)).inc(n)
    for resource_type, n in resources.items():
        FHIR_VIEW_RESOURCES.labels(bounded(resource_type, FHIR_RESOURCE_TYPES)).set(n)
    FHIR_VIEW_READY.set(1.0 if ready else 0.0)


def count_stow_instances(stored: int, failed_statuses: Iterable[int]) -> None:
    if stored:
        STOW_INSTANCES.labels("stored", dicom_status_label(0)).inc(stored)
    for status in failed_statuses:
        STOW_INSTANCES.labels("failed", dicom_status_label(status)).inc()


def c_store_outcome(status: int) -> str:
    """PS3.7 C.4: 0x0000 success, 0x0001 and 0xBxxx warning, anything else a failure."""
    if status == 0:
        return "success"
    if status == 0x0001 or status & 0xF000 == 0xB000:
        return "warning"
    return "failure"


def count_c_store(status: int) -> None:
    DICOM_C_STORE.labels(c_store_outcome(status), dicom_status_label(status)).inc()


def count_hl7_message(message_type: str | None, ack_code: str) -> None:
    """`message_type` None: the message could not be handled at all (internal error)."""
    label = "unknown" if message_type is None else hl7_message_type_label(message_type)
    HL7_MESSAGES.labels(label, bounded(ack_code, HL7_ACK_CODES)).inc()


def seconds_between(start: datetime, end: datetime) -> float:
    """`end - start` in seconds; never negative (clocks of two hosts may disagree slightly)."""
    return max((end - start).total_seconds(), 0.0)


# -- recording helpers (the streams call these with their events) ----------------------------


def observe_study_ready(reason: str, received_at: datetime, ready_at: datetime) -> None:
    STUDIES_ASSEMBLED.labels(reason).inc()
    STUDY_ASSEMBLY.labels(reason).observe(seconds_between(received_at, ready_at))


def observe_routed(lane: str, model: str, action: str, ready_at: datetime, routed_at: datetime) -> None:
    lane, model = lane_label(lane), model_label(model)
    REQUESTS_ROUTED.labels(lane, model, bounded(action, ("routed", "lane_upgraded"))).inc()
    READY_TO_ROUTED.labels(lane, model).observe(seconds_between(ready_at, routed_at))


def observe_finding(lane: str, request: TriageRequest, finding: Finding) -> None:
    """A finding published by the lane that ran the request."""
    lane, model = lane_label(lane), model_label(finding.model_name)
    FINDINGS.labels(lane, model, finding.finding, "true" if finding.positive else "false").inc()
    ROUTED_TO_INFERRED.labels(lane, model).observe(seconds_between(request.routed_at, finding.inferred_at))


def observe_alert(alert: Alert) -> None:
    lane, model = lane_label(alert.lane), model_label(alert.model_name)
    ALERTS.labels(alert.finding, lane).inc()
    READY_TO_ALERT.labels(lane, model, alert.finding).observe(
        seconds_between(alert.ready_at, alert.alerted_at)
    )
    RECEIVED_TO_ALERT.labels(lane, model, alert.finding).observe(
        seconds_between(alert.received_at, alert.alerted_at)
    )


def observe_report(finding: Finding, result: ResultHeaders) -> None:
    REPORTS.labels(result.finding).inc()
    READY_TO_REPORT.labels(lane_label(finding.lane), model_label(finding.model_name)).observe(
        seconds_between(finding.ready_at, result.produced_at)
    )


def observe_ehr_hl7(outcome: str) -> None:
    EHR_HL7.labels(outcome).inc()


def observe_ehr_fhir(outcome: str) -> None:
    EHR_FHIR.labels(outcome).inc()


def observe_preprocess(lane: str, model: str, seconds: float) -> None:
    PREPROCESS.labels(lane_label(lane), model_label(model)).observe(max(seconds, 0.0))


def observe_triton(lane: str, model: str, seconds: float) -> None:
    TRITON_INFER.labels(lane_label(lane), model_label(model)).observe(max(seconds, 0.0))


def count_triton_failure(lane: str, model: str) -> None:
    TRITON_FAILURES.labels(lane_label(lane), model_label(model)).inc()


P = ParamSpec("P")
R = TypeVar("R")


def count_dead_letter(stage: str) -> None:
    """One letter Kafka took, by its stage (called by `streams.app.dead_letter` after the ack)."""
    DEAD_LETTERS.labels(dead_letter_stage_label(stage)).inc()


_STAGE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+){0,3}$")


def dead_letter_stage_label(stage: str) -> str:
    # Stages are the code's own dotted names (`infer.stat.triton`); the check only keeps a
    # future caller from turning a free-form string into a label.
    return stage if _STAGE.match(stage) and len(stage) <= 48 else OTHER


def prepare_worker(models: Iterable[str]) -> None:
    """Known models, and each lane's series at 0, so rates and absences work from the start."""
    set_known_models(models)
    for lane in LANES:
        REQUESTS_IN_FLIGHT.labels(lane)
    STUDIES_ASSEMBLING.set(0)


# -- process set-up --------------------------------------------------------------------------


def multiproc_dir(settings: Settings) -> Path:
    """Where `radtriage up`'s children keep their metric files."""
    return settings.home / "metrics"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def reset_multiproc_dir(path: Path) -> None:
    """Empty (or create) a multiprocess directory: files of a previous run would add up."""
    path.mkdir(parents=True, exist_ok=True)
    for f in path.glob("*.db"):
        f.unlink(missing_ok=True)


def _forget_self(pid: int) -> None:
    # A child forked from this process inherits the hook; only the process itself may
    # remove its files.
    if os.getpid() == pid:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]  # prometheus_client has no hints here


def start_process_metrics(settings: Settings, *, serve: bool = True) -> int | None:
    """Call once in a process's entry point. Returns the own /metrics port if one was started.

    In multiprocess mode a process's live gauges must leave with it (mark_process_dead);
    `up` also does it for a child that died without running its exit hooks.
    """
    if multiprocess_enabled():
        atexit.register(_forget_self, os.getpid())
    if serve and settings.metrics.port:
        server, _thread = start_http_server(settings.metrics.port, addr=settings.metrics.bind_address)
        port = int(server.server_address[1])
        log.info("Prometheus metrics on %s:%d/metrics", settings.metrics.bind_address, port)
        return port
    return None


def forget_process(pid: int, settings: Settings) -> None:
    """A child of `up` is gone (even by SIGKILL, with no exit hooks): drop its live gauges."""
    path = multiproc_dir(settings)
    if path.is_dir():
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


# -- scrape-time collectors (HTTP process) ---------------------------------------------------

LAG_METRIC = "radtriage_consumer_lag"
LAG_UP_METRIC = "radtriage_consumer_lag_up"
MODEL_READY_METRIC = "radtriage_model_ready"
# What the collectors below can expose (they have no samples until asked at scrape time).
SCRAPE_TIME_METRICS = (LAG_METRIC, LAG_UP_METRIC, MODEL_READY_METRIC)

T = TypeVar("T")


class BoundedProbe(Generic[T]):
    """A value fetched in a background thread, cached `cache_s`, waited for at most `timeout_s`.

    At most one fetch is in flight: a scrape during a hung fetch waits for that one (up to
    the timeout) instead of piling up threads. A failed or late fetch gives None, and a
    failure is cached like a value so an outage is not hammered on every scrape.
    """

    def __init__(self, fetch: Callable[[], T], cache_s: float, timeout_s: float, name: str) -> None:
        self._fetch, self._cache_s, self._timeout_s, self._name = fetch, cache_s, timeout_s, name
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at = -1e18
        self._pending: threading.Event | None = None
        self.last_error = ""

    def _run(self, done: threading.Event) -> None:
        try:
            value: T | None = self._fetch()
            error = ""
        except Exception as exc:
            value, error = None, f"{type(exc).__name__}: {exc}"[:200]
        with self._lock:
            self._value, self._at, self.last_error, self._pending = value, time.monotonic(), error, None
        if error:
            log.warning("%s unavailable: %s", self._name, error)
        done.set()

    def get(self) -> T | None:
        with self._lock:
            if time.monotonic() - self._at < self._cache_s:
                return self._value
            if self._pending is None:
                self._pending = threading.Event()
                # Daemon: a fetch hung on a dead broker must not hold the process at exit.
                threading.Thread(
                    target=self._run, args=(self._pending,), daemon=True, name=f"probe-{self._name}"
                ).start()
            pending = self._pending
        if not pending.wait(self._timeout_s):
            self.last_error = f"no answer within {self._timeout_s:g} s"
            return None
        with self._lock:
            return self._value


class KafkaLagReader:
    """Committed vs end offsets of the lane topics for one group, with kafka-python.

    The clients are kept between reads (a connection per scrape would cost more than the
    read) and rebuilt after a failure."""

    def __init__(
        self, kafka: KafkaSettings | str, group: str, topic_lane: Mapping[str, str], timeout_s: float
    ) -> None:
        from radtriage.kafka_clients import as_kafka_settings

        self.kafka = as_kafka_settings(kafka)
        self.bootstrap, self.group, self.topic_lane = self.kafka.bootstrap_servers, group, dict(topic_lane)
        # kafka-python wants request_timeout_ms above its fetch_max_wait_ms (500).
        self._timeout_ms = max(int(timeout_s * 1000), 1000)
        self._admin: Any = None
        self._consumer: Any = None

    def _clients(self) -> tuple[Any, Any]:
        from kafka import KafkaAdminClient, KafkaConsumer

        from radtriage.kafka_clients import kafka_python_kwargs

        bounded_ms = {"request_timeout_ms": self._timeout_ms, **kafka_python_kwargs(self.kafka)}
        if self._admin is None:
            self._admin = KafkaAdminClient(
                client_id="radtriage-metrics",
                bootstrap_timeout_ms=self._timeout_ms,
                **bounded_ms,
            )
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                client_id="radtriage-metrics",
                group_id=None,
                enable_auto_commit=False,
                bootstrap_timeout_ms=self._timeout_ms,
                **bounded_ms,
            )
        return self._admin, self._consumer

    def close(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing a broken client may fail again; it is dropped anyway
                    log.debug("closing a Kafka client failed", exc_info=True)
        self._admin = self._consumer = None

    def read(self) -> dict[str, int]:
        from kafka import TopicPartition

        try:
            admin, consumer = self._clients()
            parts = [
                TopicPartition(topic, p)
                for topic in self.topic_lane
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            end = consumer.end_offsets(parts, timeout_ms=self._timeout_ms)
            beginning = consumer.beginning_offsets(parts, timeout_ms=self._timeout_ms)
            offsets = admin.list_group_offsets({self.group: parts}).get(self.group, {})
        except Exception:
            self.close()
            raise
        return lag_by_lane(
            self.topic_lane,
            {(tp.topic, tp.partition): int(o) for tp, o in end.items()},
            {(tp.topic, tp.partition): int(m.offset) for tp, m in offsets.items()},
            {(tp.topic, tp.partition): int(o) for tp, o in beginning.items()},
        )


class ConsumerLagCollector(Collector):
    """`radtriage_consumer_lag{group,lane,topic}` and `radtriage_consumer_lag_up{group}` at scrape time."""

    def __init__(self, settings: Settings) -> None:
        m = settings.metrics
        self.group = settings.streams.app_id
        self.topic_lane = {settings.topics.lane_topic(lane): lane for lane in LANES}
        self.reader = KafkaLagReader(settings.kafka, self.group, self.topic_lane, m.probe_timeout_s)
        self.probe = BoundedProbe(self.reader.read, m.scrape_cache_s, m.probe_timeout_s, "consumer lag")

    def describe(self) -> list[Metric]:
        return []  # collect() talks to Kafka: never at registration

    def collect(self) -> Iterator[Metric]:
        lag = self.probe.get()
        up = GaugeMetricFamily(
            LAG_UP_METRIC,
            "1 if the lane topics' consumer lag was read from Kafka, 0 if Kafka did not answer in time",
            labels=["group"],
        )
        up.add_metric([self.group], 0.0 if lag is None else 1.0)
        yield up
        if lag is None:
            return  # absent, not stale: an alert on lag must not fire on an old number
        family = GaugeMetricFamily(
            LAG_METRIC,
            "Messages on a lane topic not yet committed by the stream processors' consumer group",
            labels=["group", "lane", "topic"],
        )
        for topic, lane in self.topic_lane.items():
            family.add_metric([self.group, lane, topic], float(lag.get(lane, 0)))
        yield family


class ModelReadyCollector(Collector):
    """`radtriage_model_ready{model}`: Triton's readiness of each model the routing rules name,
    in the version they name (a model is ready when every version its rules ask for is)."""

    def __init__(self, settings: Settings, models: Iterable[tuple[str, str]]) -> None:
        """`models`: (name, version) pairs; version "" is the one Triton's policy serves."""
        m = settings.metrics
        self.url, self.wanted, self.timeout_s = (
            settings.triton.grpc_url,
            sorted(set(models)),
            m.probe_timeout_s,
        )
        self.models = sorted({name for name, _ in self.wanted})
        self.headers = settings.triton.grpc_auth_headers()
        self.probe = BoundedProbe(self._read, m.scrape_cache_s, m.probe_timeout_s, "Triton model readiness")
        self._client: Any = None

    def _read(self) -> dict[str, bool]:
        from tritonclient.grpc import InferenceServerClient
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            self._client = InferenceServerClient(url=self.url)
        ready = dict.fromkeys(self.models, True)
        for model, version in self.wanted:
            try:
                up = bool(
                    self._client.is_model_ready(
                        model, version, headers=self.headers, client_timeout=self.timeout_s
                    )
                )
            except InferenceServerException:
                up = False
            ready[model] = ready[model] and up
        return ready

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ready = self.probe.get() or {}
        family = GaugeMetricFamily(
            MODEL_READY_METRIC, "1 if Triton reports the model ready, else 0", labels=["model"]
        )
        for model in self.models:
            family.add_metric([model], 1.0 if ready.get(model) else 0.0)
        yield family


class _ThisProcess(Collector):
    """The default registry (this process's metrics), as part of another registry."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def exposition_registry(settings: Settings, models: Iterable[tuple[str, str]]) -> CollectorRegistry:
    """What the HTTP process's /metrics serves: every local process's metrics (multiprocess
    mode) or this one's, plus the scrape-time lag and model collectors."""
    registry = CollectorRegistry()
    if multiprocess_enabled():
        # A registry of its own, as prometheus_client's docs say: the default one would
        # export this process's values a second time next to the aggregate.
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # as above
    else:
        registry.register(_ThisProcess())
    registry.register(ConsumerLagCollector(settings))
    registry.register(ModelReadyCollector(settings, models))
    return registry


def metrics_handler(settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /metrics` in the Prometheus text format."""
    from schemas.routing_rules import RoutingRules

    try:
        models = [(r.model, r.model_version) for r in RoutingRules.load(settings.routing_rules).rules]
    except Exception as exc:  # no readable rules: serve the rest, say why once
        log.warning("routing rules unreadable, no model readiness in /metrics: %s", exc)
        models = []
    set_known_models(name for name, _ in models)
    registry = exposition_registry(settings, models)

    async def handler(request: web.Request) -> web.Response:
        # Off the event loop: the collectors may wait (bounded) on Kafka and Triton.
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
