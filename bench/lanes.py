"""Lane benchmark: does a stat study wait behind routine work? Nothing lost, no alert doubled?

    python -m bench.lanes                                   # own stack on free ports, steady mix
    python -m bench.lanes --rate 30 --duration 180          # 30 studies/min for 3 min, 5% stat
    python -m bench.lanes --burst 40 --stat-count 5         # 40 routine at once, then 5 stat in the backlog
    python -m bench.lanes --running                         # against `radtriage up` on the configured ports
    python -m bench.lanes --routine head-ct                 # stress: routine head CTs instead of chest films

Synthetic studies go through the real connectors, as a hospital sends them:
- stat: a bleed head CT whose STAT "code stroke" HL7 ORM^O01 arrives first over MLLP;
- routine: a routine-priority FHIR ServiceRequest (an outpatient exam), then the images:
  `--routine cxr` (default, the issue's mix) a normal PA chest radiograph (one DX image,
  the cxr_triage model); `--routine head-ct` a normal head CT (the ICH model, ~30x the
  intake and model work of a film: a stress mix in which routine work competes with stat
  for the very same model and every stage of the intake).
The phantom series are generated once and cached on disk; every send re-stamps a cached
series with fresh Study/Series/SOP Instance UIDs and a fresh accession number, so
generation cost is not in the loop.

Phases, all in one run on one stack: warm-up (discarded); idle — the stat studies one at
a time on an empty pipeline; flood — the same number of stat studies during routine load
(steady: `--rate` studies/min for `--duration` s with `--stat-fraction` stat, spread
evenly; burst: `--burst N` routine studies at once, then the stat studies every
`--stat-interval` s while the backlog drains); then a direct baseline: the same cached
series through the same model in this one process, without Kafka or Faust
(processors.dicom_volume + processors.model_inputs + processors.triton_client).

Per study, every stage comes from the pipeline's own event timestamps (InstanceEvent
received_at, StudyEvent ready_at, TriageRequest routed_at, Finding inferred_at,
FhirResult produced_at, Alert alerted_at) and, when the stack writes traces.jsonl, from
the infer / preprocess / triton.infer spans (lane wait and model work inside the
pipeline). Also recorded per phase: CPU seconds per stack process and Triton's own
queue/compute counters, to tell lane queueing from CPU contention. Percentiles are
nearest-rank: with fewer than 100 samples p99 is the maximum. Writes JSON to
bench/results/lanes-<timestamp>.json. Never run in tests: timings on shared machines
are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import proc_cpu
from bench.kafka_read import read_from_end
from bench.lane_stats import (
    END_TO_END,
    STAGES,
    StudyTimes,
    apply_event,
    infer_spans,
    overlap_ms,
    percentile,
    preprocess_interval,
    ratio,
    schedule_lanes,
    stage_table,
    summarize,
    throughput_per_min,
)
from bench.output import write_json
from radtriage.demo_messages import hl7_order, post_fhir, send_hl7, service_request
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import REPO_ROOT, Settings
from schemas.results import read_result
from tests.support.net import free_port

console = Console()

ROUTINE_NOTES = {
    "cxr": (
        "routine work is chest X-rays (one DX image each, routine FHIR order, cxr_triage model): "
        "the issue's mix"
    ),
    "head-ct": (
        "routine work is routine-lane head CTs (routine FHIR order, ich_classifier): a stress mix, "
        "each routine study ~30x the intake and model work of a chest X-ray"
    ),
}
# Bumped when the cached series must be regenerated (phantom or writer parameters changed).
CACHE_VERSION = "v1"
# The model each template kind is routed to (deploy/routing/rules.yaml), for the direct baseline.
MODEL_OF_KIND = {"bleed": "ich_classifier", "normal": "ich_classifier", "cxr": "cxr_triage"}
HEADLINE_STAGES = ("ready→finding", "ready→alert")


def now() -> datetime:
    return datetime.now(UTC)


# -- cached series ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    name: str  # bleed-0, normal-1, cxr-0, …
    files: tuple[Path, ...]
    blobs: tuple[bytes, ...]  # the Part 10 bytes, held in memory so a send reads no disk
    model: str = "ich_classifier"


def _write_cxr_template(folder: Path, i: int) -> None:
    import numpy as np

    from models.cxr_triage.phantoms import chest_radiograph_phantom
    from models.cxr_triage.writer import write_radiograph

    # Normal chest films: routine work, no critical finding to alert on.
    rx = chest_radiograph_phantom(np.random.default_rng(7500 + i), pneumothorax=False)
    write_radiograph(
        rx.pixels,
        rx.pixel_mm,
        folder,
        accession="TEMPLATE",
        patient_id="TEMPLATE",
        patient_name="Bench^Phantom",
        series_description="CHEST PA",
    )


def cached_templates(cache_root: Path, kind: str, count: int) -> list[Template]:
    """`count` phantom series of `kind` (bleed | normal head CT, cxr), generated once into the cache."""
    out: list[Template] = []
    for i in range(count):
        folder = cache_root / "bench-lanes-series" / f"{CACHE_VERSION}-{kind}-{i}"
        done = folder / ".complete"
        if not done.exists() and kind == "cxr":
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.dcm"):
                old.unlink()
            _write_cxr_template(folder, i)
            done.write_text("ok\n")
        if not done.exists():
            import numpy as np

            from models.dicom_writer import write_ct_series
            from models.phantoms import head_ct_phantom

            # Fixed seeds: the same series on every run and every machine.
            rng = np.random.default_rng(7000 + 100 * (kind == "bleed") + i)
            ph = head_ct_phantom(rng, bleed=kind == "bleed", min_bleed_ml=5.0)
            for old in folder.glob("*.dcm"):
                old.unlink()
            write_ct_series(
                ph.hu,
                ph.spacing_zyx,
                folder,
                accession="TEMPLATE",
                patient_id="TEMPLATE",
                patient_name="Bench^Phantom",
                body_part="HEAD",
                series_description="CT HEAD WO CONTRAST",
            )
            done.write_text("ok\n")
        files = tuple(sorted(folder.glob("*.dcm")))
        out.append(Template(f"{kind}-{i}", files, tuple(f.read_bytes() for f in files), MODEL_OF_KIND[kind]))
    return out


def restamp(template: Template, accession: str, patient_id: str) -> tuple[str, list[Dataset]]:
    """The template as a new study: fresh Study/Series/SOP Instance UIDs, accession and MRN."""
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    out: list[Dataset] = []
    for raw in template.blobs:
        ds = dcmread(BytesIO(raw))
        sop_uid = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.AccessionNumber = accession
        ds.PatientID = patient_id
        out.append(ds)
    return study_uid, out


class AssociationRefused(RuntimeError):
    pass


def c_store(datasets: list[Dataset], settings: Settings, host: str, times: StudyTimes) -> None:
    """One association per study, C-STORE every slice, release (the SCP's 'study complete').

    Counts the success answers on `times`: an instance is accepted only once answered 0x0000.
    """
    ae = AE(ae_title="RADTRIAGE_BENCH")
    for sop_class in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(sop_class)
    # Under a flood the SCP answers only after Kafka acks=all: allow it time rather than abort.
    ae.dimse_timeout = 120
    ae.acse_timeout = 60
    assoc = ae.associate(host, settings.dicom.port, ae_title=settings.dicom.ae_title)
    if not assoc.is_established:
        raise AssociationRefused(f"DICOM association to {host}:{settings.dicom.port} refused")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                raise RuntimeError(f"C-STORE answered status {code!r}")
            times.instances_acked += 1
    finally:
        assoc.release()


def c_store_retrying(
    datasets: list[Dataset], settings: Settings, host: str, times: StudyTimes, attempts: int = 30
) -> None:
    """Retry a refused association every second, as a modality's store queue does.

    The SCP caps concurrent associations (pynetdicom's default is 10); a refusal is the
    standard back-pressure answer, not a loss — but a stat study refused is a stat study
    waiting, so each refusal is counted on the study.
    """
    for attempt in range(attempts):
        try:
            c_store(datasets, settings, host, times)
            return
        except AssociationRefused:
            times.association_refusals += 1
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


# -- what the pipeline said: one consumer over every topic a study touches ------------------


class Collector:
    """Reads the pipeline's topics from 'now' on and folds each event into its study's times."""

    def __init__(self, settings: Settings) -> None:
        t = settings.topics
        self.kinds = {
            t.instances: "instance",
            t.studies: "study",
            t.requests_stat: "request",
            t.requests_urgent: "request",
            t.requests_routine: "request",
            t.findings: "finding",
            t.results_fhir: "report",
            t.alert_topic("ich"): "alert",
            t.alert_topic("stroke"): "alert",
            t.deadletter: "deadletter",
            t.audit: "audit",
        }
        self.consumer = KafkaConsumer(
            enable_auto_commit=False, group_id=None, **kafka_python_kwargs(settings.kafka)
        )
        read_from_end(self.consumer, self.kinds)
        self.studies: dict[str, StudyTimes] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self.thread.start()

    def track(self, times: StudyTimes) -> None:
        # Registered before the first byte is sent, so no event can arrive for an unknown study.
        with self.lock:
            self.studies[times.study_uid] = times

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                for records in self.consumer.poll(timeout_ms=200).values():
                    for record in records:
                        self._one(self.kinds[record.topic], record.value, record.headers or ())
        except BaseException as exc:  # surfaced by the main thread: a silent collector lies
            self.error = exc

    def _one(self, kind: str, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        try:
            # A report is a plain Bundle, its study and times in headers (schemas/results.py).
            data = read_result(value, headers).fields() if kind == "report" else json.loads(value or b"")
        except ValueError:  # EventDecodeError included
            return
        if not isinstance(data, dict):
            return
        uid = data.get("study_uid")
        if not uid and kind == "request":
            return
        with self.lock:
            times = self.studies.get(str(uid))
            if times is not None:
                apply_event(times, kind, data)

    def snapshot(self, phase: str) -> list[StudyTimes]:
        with self.lock:
            return [s for s in self.studies.values() if s.phase == phase]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


# -- sending ----------------------------------------------------------------------------------


class Sender:
    def __init__(self, settings: Settings, collector: Collector, host: str, run_id: str) -> None:
        self.settings, self.collector, self.host, self.run_id = settings, collector, host, run_id
        self.counter = 0
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def send(self, lane: str, template: Template, phase: str) -> StudyTimes:
        """The order first (HL7 STAT code stroke, or FHIR routine), then the images."""
        with self.lock:
            self.counter += 1
            n = self.counter
        accession = f"LN{self.run_id}{n:05d}"
        patient_id = f"BENCH-{accession}"
        study_uid, datasets = restamp(template, accession, patient_id)
        times = StudyTimes(
            study_uid=study_uid,
            lane_expected=lane,
            phase=phase,
            template=template.name,
            instances_sent=len(datasets),
            sent_at=now(),
        )
        self.collector.track(times)
        try:
            if lane == "stat":
                send_hl7(
                    self.settings,
                    hl7_order(accession, patient_id, priority="S", indication="CODE STROKE"),
                    self.host,
                )
            else:
                post_fhir(
                    self.settings, service_request(accession, patient_id, priority="routine"), self.host
                )
            c_store_retrying(datasets, self.settings, self.host, times)
        except Exception as exc:  # counted and reported: a refused send is a finding, not a crash
            with self.lock:
                self.errors.append(f"{phase}/{lane} {accession}: {type(exc).__name__}: {exc}")
            times.send_error = f"{type(exc).__name__}: {exc}"
        return times


def wait_complete(
    collector: Collector,
    phase: str,
    expected: int,
    timeout_s: float,
    progress: Progress | None = None,
    task: Any = None,
) -> bool:
    """Until `expected` studies of `phase` are complete (or the timeout); True if all are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if collector.error is not None:
            raise RuntimeError(f"collector failed: {collector.error!r}")
        done = sum(s.complete for s in collector.snapshot(phase))
        if progress is not None and task is not None:
            progress.update(task, completed=done)
        if done >= expected:
            return True
        time.sleep(0.25)
    return False


# -- Triton's own counters -----------------------------------------------------------------------

_METRIC = re.compile(r"^(nv_inference_\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")
TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_duration_us",
)


def triton_counters(metrics_port: int, model: str = "ich_classifier") -> dict[str, float]:
    """Cumulative Triton counters for `model` (empty if the metrics endpoint is not reachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m.group(1) in TRITON_COUNTERS and f'model="{model}"' in m.group(2):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def triton_phase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per phase: requests, batches, mean batch size, mean queue and compute ms per request."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in TRITON_COUNTERS}
    requests, batches = d["nv_inference_request_success"], d["nv_inference_exec_count"]
    if requests <= 0:
        return {}
    return {
        "requests": requests,
        "batches": batches,
        "mean_batch_size": requests / batches if batches else 0.0,
        "mean_queue_ms_per_request": d["nv_inference_queue_duration_us"] / requests / 1000.0,
        "mean_compute_ms_per_request": d["nv_inference_compute_infer_duration_us"] / requests / 1000.0,
        "mean_request_ms": d["nv_inference_request_duration_us"] / requests / 1000.0,
    }


# -- direct baseline -----------------------------------------------------------------------------


def direct_baseline(settings: Settings, templates: list[Template], repeats: int) -> list[dict[str, float]]:
    """The same series through the same model in this process: load + preprocess, one Triton call."""
    from processors.model_inputs import prepare_input
    from processors.triton_client import TritonModelClient

    async def run() -> list[dict[str, float]]:
        client = TritonModelClient(
            settings.triton.grpc_url, settings.triton.timeout_s, settings.triton.grpc_auth_headers()
        )
        out = []
        try:
            for _ in range(repeats):
                for template in templates:
                    t0 = time.perf_counter()
                    tensor = prepare_input(template.model, list(template.files)).tensor
                    t1 = time.perf_counter()
                    # Priority 1 (stat) like the stat lane: an idle server, so no queue either way.
                    await client.infer_probability(template.model, tensor, priority=1)
                    t2 = time.perf_counter()
                    out.append(
                        {
                            "load_preprocess_ms": (t1 - t0) * 1000,
                            "triton_ms": (t2 - t1) * 1000,
                            "total_ms": (t2 - t0) * 1000,
                            "model": template.model,
                        }
                    )
        finally:
            await client.close()
        return out

    return asyncio.run(run())


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class PhaseInfo:
    name: str
    started_at: str = ""
    ended_at: str = ""
    offered_per_min: float | None = None
    drained: bool = True
    cpu_s: dict[str, float] | None = None
    load_generator_cpu_s: float = 0.0
    triton: dict[str, float] | None = None  # the stat lane's model (ich_classifier)
    triton_by_model: dict[str, dict[str, float]] | None = None


class Phase:
    """Brackets a phase with CPU and Triton counter readings."""

    def __init__(
        self, name: str, settings: Settings, own_stack: bool, models: tuple[str, ...] = ("ich_classifier",)
    ) -> None:
        self.info = PhaseInfo(name)
        self.settings, self.own_stack, self.models = settings, own_stack, models

    def __enter__(self) -> Phase:
        self.info.started_at = now().isoformat()
        self._cpu = proc_cpu.descendants_cpu() if self.own_stack else {}
        self._self_cpu = proc_cpu.self_cpu()
        self._triton = {m: triton_counters(self.settings.triton.metrics_port, m) for m in self.models}
        return self

    def __exit__(self, *exc: object) -> None:
        self.info.ended_at = now().isoformat()
        if self.own_stack:
            self.info.cpu_s = proc_cpu.delta(proc_cpu.descendants_cpu(), self._cpu)
        self.info.load_generator_cpu_s = round(proc_cpu.self_cpu() - self._self_cpu, 2)
        self.info.triton_by_model = {
            m: triton_phase(before, triton_counters(self.settings.triton.metrics_port, m))
            for m, before in self._triton.items()
        }
        self.info.triton = self.info.triton_by_model[self.models[0]]


def own_stack_settings(home: Path) -> Settings:
    settings = Settings(home=home)
    settings.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"
    settings.kafka.controller_port = free_port()
    settings.triton.grpc_url = f"127.0.0.1:{free_port()}"
    settings.triton.http_url = f"127.0.0.1:{free_port()}"
    settings.triton.metrics_port = free_port()
    settings.dicom.port = free_port()
    settings.hl7.port = free_port()
    settings.http.port = free_port()
    # jsonl into the temporary home: the lane-wait and model-work split comes from the spans.
    settings.telemetry.exporter = "jsonl"
    return settings


def start_services(base: Settings, stack: ExitStack, triton_log: Path) -> None:
    """The Kafka broker and the Triton server `base` describes, stopped when `stack` closes:
    what the benches that run their own workers start once for the whole run."""
    from radtriage.stack.kafka import LocalKafka
    from radtriage.stack.triton import LocalTriton

    kafka = LocalKafka.for_settings(base, base.home / "kafka")
    with console.status("starting Kafka…"):
        kafka.start()
    stack.callback(kafka.stop)
    triton = LocalTriton.for_settings(base, triton_log)
    with console.status("starting Triton…"):
        triton.start()
    stack.callback(triton.stop)


def run_sends(
    sender: Sender,
    jobs: list[tuple[float, str, Template]],
    phase: str,
    senders: int,
    progress: Progress,
    label: str,
) -> float | None:
    """Send `(offset_s, lane, template)` jobs at their offsets; returns the offered rate (per min).

    Stat and routine go through separate sender pools: in a hospital the ED scanner is not
    queued behind the outpatient CT's sender, and a benchmark that did so would measure itself.
    """
    task = progress.add_task(f"{label}: sending", total=len(jobs))
    routine_pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="send-routine")
    stat_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="send-stat")
    futures: list[Future[StudyTimes]] = []
    start = time.monotonic()
    try:
        for offset, lane, template in jobs:
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool = stat_pool if lane == "stat" else routine_pool
            fut = pool.submit(sender.send, lane, template, phase)
            fut.add_done_callback(lambda _f: progress.advance(task))
            futures.append(fut)
        for fut in futures:
            fut.result()
    finally:
        routine_pool.shutdown(wait=True)
        stat_pool.shutdown(wait=True)
    studies = [f.result() for f in futures]
    starts = sorted(s.sent_at for s in studies if s.sent_at is not None)
    if len(starts) < 2:
        return None
    return (len(starts) - 1) / (starts[-1] - starts[0]).total_seconds() * 60.0


def lane_summary(studies: Iterable[StudyTimes]) -> dict[str, Any]:
    studies = list(studies)
    return {"studies": len(studies), "stages_ms": stage_table(studies)}


def integrity(studies: list[StudyTimes]) -> dict[str, Any]:
    """The issue's other two promises, checked on every study the run sent."""
    unfinished = [s.study_uid for s in studies if not s.complete]
    return {
        "studies": len(studies),
        "not_finished": len(unfinished),
        "not_finished_uids": unfinished[:20],
        # Accepted (C-STORE success) but never on imaging.instances: the "nothing lost" promise.
        "instances_lost": sum(max(0, s.instances_acked - s.instances_seen) for s in studies),
        "instances_acked": sum(s.instances_acked for s in studies),
        "send_failed": sum(bool(s.send_error) for s in studies),
        "association_refusals_stat": sum(
            s.association_refusals for s in studies if s.lane_expected == "stat"
        ),
        "association_refusals_routine": sum(
            s.association_refusals for s in studies if s.lane_expected == "routine"
        ),
        "stat_studies_refused_at_least_once": sum(
            s.association_refusals > 0 for s in studies if s.lane_expected == "stat"
        ),
        "dead_lettered": sum(bool(s.dead_letters) for s in studies),
        "dead_letters": [d for s in studies for d in s.dead_letters][:20],
        "doubled_alerts": sum(s.alerts > 1 for s in studies),
        "doubled_findings": sum(s.findings > 1 for s in studies),
        "doubled_reports": sum(s.reports > 1 for s in studies),
        "positive_without_alert": sum(bool(s.positive) and s.alerts == 0 for s in studies),
        "alert_for_negative": sum(s.positive is False and s.alerts > 0 for s in studies),
        "wrong_lane": sum(bool(s.lanes_routed) and s.lane != s.lane_expected for s in studies),
        "stat_positive": sum(bool(s.positive) for s in studies if s.lane_expected == "stat"),
        "stat_sent": sum(s.lane_expected == "stat" for s in studies),
        "routine_positive": sum(bool(s.positive) for s in studies if s.lane_expected == "routine"),
    }


def attach_spans(trace_file: Path, studies: dict[str, StudyTimes]) -> int:
    """Fill in lane-wait and model-work times from the trace file; the number of studies matched."""
    if not trace_file.exists():
        return 0
    wanted = ('"name":"infer"', '"name":"preprocess"', '"name":"triton.infer"')
    spans = []
    with trace_file.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if any(w in line for w in wanted):  # skip the per-instance spans without parsing them
                try:
                    spans.append(json.loads(line))
                except ValueError:
                    continue
    matched = 0
    for uid, sp in infer_spans(spans).items():
        times = studies.get(uid)
        if times is not None:
            times.infer_started_at = sp.infer_start
            times.preprocess_ms = sp.preprocess_ms
            times.triton_ms = sp.triton_ms
            matched += 1
    return matched


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _stat(table: dict[str, Any], stage: str, key: str) -> float | None:
    s = table.get("stages_ms", {}).get(stage)
    return None if not s or not s.get("n") else float(s[key])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=30.0, help="steady mode: studies per minute (all lanes)")
    ap.add_argument("--duration", type=float, default=120.0, help="steady mode: seconds of load")
    ap.add_argument("--stat-fraction", type=float, default=0.05, help="steady mode: share of stat studies")
    ap.add_argument("--burst", type=int, default=0, help="burst mode: N routine studies at once")
    ap.add_argument(
        "--stat-count", type=int, default=5, help="burst mode: stat studies sent into the backlog"
    )
    ap.add_argument("--stat-interval", type=float, default=8.0, help="burst mode: seconds between them")
    ap.add_argument("--stat-delay", type=float, default=5.0, help="burst mode: first stat after this many s")
    ap.add_argument(
        "--senders",
        type=int,
        default=6,
        help="concurrent DICOM associations for routine work (+2 for stat; the SCP refuses beyond 10)",
    )
    ap.add_argument(
        "--routine",
        choices=sorted(ROUTINE_NOTES),
        default="cxr",
        help="routine work: chest X-rays (the issue's 95%% mix) or head CTs (stress)",
    )
    ap.add_argument("--templates", type=int, default=3, help="cached phantom series per kind")
    ap.add_argument("--direct-repeats", type=int, default=3, help="baseline passes over the cached series")
    ap.add_argument("--drain-timeout", type=float, default=900.0, help="max seconds to wait for a phase")
    ap.add_argument("--running", action="store_true", help="use an already running `radtriage up`")
    ap.add_argument("--host", default="127.0.0.1", help="listeners' host (with --running)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    run_id = f"{int(time.time()) % 10**6:06d}"
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="radtriage-lanes-") as tmp:
        settings = Settings()
        if not args.running:
            from radtriage.up import running_stack

            settings = own_stack_settings(Path(tmp) / "home")
            stack.enter_context(running_stack(settings))
        own = not args.running

        with console.status("phantom series (cached after the first run)…"):
            bleeds = cached_templates(settings.cache, "bleed", args.templates)
            normals = cached_templates(
                settings.cache, "cxr" if args.routine == "cxr" else "normal", args.templates
            )

        models = tuple(dict.fromkeys(t.model for t in bleeds + normals))
        collector = Collector(settings)
        stack.callback(collector.close)
        sender = Sender(settings, collector, args.host, run_id)

        if args.burst > 0:
            n_stat = args.stat_count
            flood_jobs = [(0.0, "routine", normals[i % len(normals)]) for i in range(args.burst)]
            flood_jobs += [
                (args.stat_delay + k * args.stat_interval, "stat", bleeds[k % len(bleeds)])
                for k in range(n_stat)
            ]
            flood_jobs.sort(key=lambda j: j[0])
            mode = (
                f"burst of {args.burst} routine, {n_stat} stat every {args.stat_interval:g}s "
                f"from {args.stat_delay:g}s"
            )
        else:
            total = max(1, round(args.rate * args.duration / 60.0))
            lanes = schedule_lanes(total, args.stat_fraction)
            n_stat = lanes.count("stat")
            interval = 60.0 / args.rate
            flood_jobs = [
                (i * interval, lane, (bleeds if lane == "stat" else normals)[i % args.templates])
                for i, lane in enumerate(lanes)
            ]
            mode = (
                f"steady {args.rate:g}/min for {args.duration:g}s, "
                f"{args.stat_fraction:.0%} stat ({n_stat} studies)"
            )
        if n_stat == 0:
            raise SystemExit("no stat study in the flood: raise --rate/--duration/--stat-fraction")

        phases: dict[str, PhaseInfo] = {}
        console.print(f"[dim]note: {ROUTINE_NOTES[args.routine]}[/]")
        console.print(f"mode: {mode}; load before start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s)")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            # Warm-up: model load, Faust table and producer start-up; its figures are discarded.
            with Phase("warmup", settings, own, models) as ph:
                task = progress.add_task("warm-up (discarded)", total=2)
                sender.send("stat", bleeds[0], "warmup")
                sender.send("routine", normals[0], "warmup")
                if not wait_complete(collector, "warmup", 2, args.drain_timeout, progress, task):
                    raise SystemExit("warm-up studies did not finish: is the stack healthy? (see its logs)")
            phases["warmup"] = ph.info

            # Idle: each stat study alone in the pipeline, the next one only after it finished.
            with Phase("idle", settings, own, models) as ph:
                task = progress.add_task("idle: stat alone", total=n_stat)
                for k in range(n_stat):
                    sender.send("stat", bleeds[k % len(bleeds)], "idle")
                    wait_complete(collector, "idle", k + 1, 180.0, progress, task)
                    time.sleep(0.5)  # let the tail (audit, ledger) settle: nothing else in flight
            phases["idle"] = ph.info

            with Phase("flood", settings, own, models) as ph:
                ph.info.offered_per_min = run_sends(
                    sender, flood_jobs, "flood", args.senders, progress, "flood"
                )
                task = progress.add_task("flood: finished", total=len(flood_jobs))
                ph.info.drained = wait_complete(
                    collector, "flood", len(flood_jobs), args.drain_timeout, progress, task
                )
            phases["flood"] = ph.info
            time.sleep(3.0)  # a doubled alert would come late: keep listening a moment

            with Phase("direct", settings, own, models) as ph:
                task = progress.add_task("direct baseline", total=None)
                direct = direct_baseline(settings, bleeds + normals, args.direct_repeats)
                progress.update(task, total=1, completed=1)
            phases["direct"] = ph.info
        time.sleep(1.5)  # spans are exported in 0.5 s batches
        with collector.lock:
            studies = dict(collector.studies)
        spans_matched = attach_spans(settings.trace_file, studies)
        logs = settings.home / "logs"
        log_tails = {}
        stamp = f"{now():%Y%m%dT%H%M%SZ}"
        if own and logs.exists():
            # The stack's home is temporary: keep its logs next to the JSON, for the failures' why.
            shutil.copytree(logs, args.out / f"lanes-{stamp}-logs", dirs_exist_ok=True)
        if own:
            for name in ("worker", "triton"):
                path = logs / f"{name}.log"
                if path.exists():
                    lines = path.read_text(errors="replace").splitlines()
                    log_tails[name] = [ln for ln in lines if "WARN" in ln or "ERROR" in ln][-15:]

    result = build_result(args, mode, settings, studies, phases, direct, spans_matched, n_stat, sender.errors)
    result["stack_log_warnings"] = log_tails
    path = args.out / f"lanes-{stamp}.json"
    write_json(path, result)
    print_report(result)
    console.print(f"wrote {path}")


def build_result(
    args: argparse.Namespace,
    mode: str,
    settings: Settings,
    studies: dict[str, StudyTimes],
    phases: dict[str, PhaseInfo],
    direct: list[dict[str, float]],
    spans_matched: int,
    n_stat: int,
    send_errors: list[str],
) -> dict[str, Any]:
    by: dict[tuple[str, str], list[StudyTimes]] = {}
    for s in studies.values():
        by.setdefault((s.phase, s.lane_expected), []).append(s)
    groups = {f"{phase}/{lane}": lane_summary(v) for (phase, lane), v in sorted(by.items())}
    idle, flood = groups.get("idle/stat", {}), groups.get("flood/stat", {})
    headline: dict[str, Any] = {}
    for stage in HEADLINE_STAGES:
        i99, f99 = _stat(idle, stage, "p99"), _stat(flood, stage, "p99")
        i50, f50 = _stat(idle, stage, "p50"), _stat(flood, stage, "p50")
        headline[stage] = {
            "idle_p99_ms": i99,
            "flood_p99_ms": f99,
            "ratio_p99": ratio(f99, i99),
            "idle_p50_ms": i50,
            "flood_p50_ms": f50,
            "ratio_p50": ratio(f50, i50),
        }
    flood_studies = [s for s in studies.values() if s.phase == "flood"]
    # The overhead compares like with like: the stat lane's head CTs, not a mix with chest films.
    stat_direct = [d for d in direct if d.get("model", "ich_classifier") == "ich_classifier"]
    direct_total = summarize(d["total_ms"] for d in stat_direct)
    direct_pre = summarize(d["load_preprocess_ms"] for d in stat_direct)
    direct_tri = summarize(d["triton_ms"] for d in stat_direct)
    direct_by_model = {
        model: summarize(d["total_ms"] for d in direct if d.get("model") == model)
        for model in sorted({str(d.get("model")) for d in direct})
    }
    e2e_idle = _stat(idle, "ready→finding", "p50")
    overhead = {
        "definition": (
            "end-to-end = study ready → finding on Kafka (p50, stat lane, idle phase); direct = load + "
            "preprocess + one Triton call on the same series in one process (p50); per-study overhead "
            "from the trace = ready→finding minus that study's own preprocess and triton.infer spans"
        ),
        "end_to_end_idle_stat_p50_ms": e2e_idle,
        "direct_p50_ms": direct_total.get("p50"),
        "ratio_end_to_end_over_direct": ratio(e2e_idle, direct_total.get("p50")),
        "overhead_ms_p50_vs_direct": (
            None if e2e_idle is None or "p50" not in direct_total else e2e_idle - direct_total["p50"]
        ),
        "overhead_ms_excl_model_work_idle_stat": _stage_summary(idle, "ready→finding minus model work"),
        "overhead_ms_excl_model_work_flood_stat": _stage_summary(flood, "ready→finding minus model work"),
        "overhead_ms_excl_model_work_flood_routine": _stage_summary(
            groups.get("flood/routine", {}), "ready→finding minus model work"
        ),
    }
    return {
        "stat_preprocess_contention": contention(studies.values()),
        "benchmark": "lanes",
        "at": now().isoformat(),
        "command": " ".join(["python -m bench.lanes", *sys.argv[1:]]),
        "mode": mode,
        "routine_kind": args.routine,
        "note": ROUTINE_NOTES[args.routine],
        "stat_studies_per_phase": n_stat,
        "percentiles": "nearest-rank; with n < 100, p99 is the maximum",
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "stack": {
            "own_stack": not args.running,
            "lane_concurrency": settings.streams.lane_concurrency,
            "triton_lane_priority": settings.triton.lane_priority,
            "triton_model_config": _triton_config_summary(settings),
        },
        "headline_stat_lane": headline,
        "throughput": {
            "flood_offered_per_min": phases["flood"].offered_per_min,
            "flood_finished_per_min": throughput_per_min(
                (s.sent_at for s in flood_studies), (s.reported_at for s in flood_studies)
            ),
            "flood_drained_within_timeout": phases["flood"].drained,
        },
        "groups": groups,
        "direct_baseline_ms": {
            "scope": "the stat lane's model (ich_classifier) on the stat templates",
            "total": direct_total,
            "load_preprocess": direct_pre,
            "triton": direct_tri,
            "total_by_model": direct_by_model,
        },
        "pipeline_overhead": overhead,
        "integrity": integrity([s for s in studies.values() if s.phase != "warmup"]),
        "send_errors": send_errors[:20],
        "spans_matched": spans_matched,
        "phases": {k: asdict(v) for k, v in phases.items()},
        "studies": [_study_json(s) for s in studies.values()],
    }


def contention(studies: Iterable[StudyTimes]) -> list[dict[str, Any]]:
    """Per flood stat study: its preprocess vs the idle median of the same series, and how much of
    it ran alongside a routine preprocess in the same worker (evidence for in-process contention)."""
    studies = list(studies)
    idle: dict[str, list[float]] = {}
    for s in studies:
        if s.phase == "idle" and s.preprocess_ms is not None:
            idle.setdefault(s.template, []).append(s.preprocess_ms)
    routine = [
        iv
        for s in studies
        if s.phase == "flood" and s.lane_expected == "routine"
        for iv in [preprocess_interval(s)]
        if iv is not None
    ]
    out = []
    for s in studies:
        iv = preprocess_interval(s)
        if s.phase != "flood" or s.lane_expected != "stat" or iv is None:
            continue
        base = percentile(idle[s.template], 50) if idle.get(s.template) else None
        shared = overlap_ms(iv, routine)
        out.append(
            {
                "template": s.template,
                "preprocess_ms": round(iv[1] - iv[0], 1),
                "idle_median_same_series_ms": None if base is None else round(base, 1),
                "ran_alongside_routine_preprocess_ms": round(shared, 1),
                "share_alongside_routine": round(shared / (iv[1] - iv[0]), 2) if iv[1] > iv[0] else 0.0,
            }
        )
    return out


def _stage_summary(group: dict[str, Any], stage: str) -> dict[str, float]:
    return dict(group.get("stages_ms", {}).get(stage, {"n": 0}))


def _triton_config_summary(settings: Settings) -> dict[str, str]:
    path = settings.triton.model_repository / "ich_classifier" / "config.pbtxt"
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for key in (
        "max_batch_size",
        "max_queue_delay_microseconds",
        "priority_levels",
        "count",
        "kind",
        "backend",
    ):
        m = re.search(rf"^\s*{key}\s*:\s*(\S+)", text, re.MULTILINE)
        if m:
            out[key] = m.group(1).strip('"')
    return out


def _study_json(s: StudyTimes) -> dict[str, Any]:
    from bench.lane_stats import stage_durations

    d = asdict(s)
    d["stages_ms"] = {k: round(v, 1) for k, v in stage_durations(s).items()}
    return d


def print_report(result: dict[str, Any]) -> None:
    groups: dict[str, Any] = result["groups"]
    cols = [g for g in ("idle/stat", "flood/stat", "flood/routine") if g in groups]
    table = Table(title=f"radtriage lanes — {result['mode']} (ms; nearest-rank percentiles)")
    table.add_column("stage")
    for g in cols:
        table.add_column(f"{g} (n={groups[g]['studies']})\np50 / p95 / p99", justify="right")
    extra = (
        "transfer (first→last instance)",
        "last instance→ready",
        "lane wait (routed→infer start)",
        "preprocess (in pipeline)",
        "triton call (in pipeline)",
    )
    names = [n for n, _, _ in STAGES] + [n for n, _, _ in END_TO_END] + list(extra)
    for name in names:
        row = [name]
        for g in cols:
            s = groups[g]["stages_ms"].get(name)
            row.append(
                "-" if not s or not s.get("n") else f"{s['p50']:,.0f} / {s['p95']:,.0f} / {s['p99']:,.0f}"
            )
        table.add_row(*row)
    console.print(table)

    head = Table(title="headline: stat lane, idle vs under routine flood (same run)")
    for col in ("stage", "idle p50", "flood p50", "idle p99", "flood p99", "p99 ratio"):
        head.add_column(col, justify="right")
    for stage, h in result["headline_stat_lane"].items():
        r = h["ratio_p99"]
        colour = "green" if r is not None and r <= 1.5 else "red"
        head.add_row(
            stage,
            _fmt(h["idle_p50_ms"]),
            _fmt(h["flood_p50_ms"]),
            _fmt(h["idle_p99_ms"]),
            _fmt(h["flood_p99_ms"]),
            "-" if r is None else f"[{colour}]{r:.2f}x[/]",
        )
    console.print(head)

    thr = result["throughput"]
    ov = result["pipeline_overhead"]
    d = result["direct_baseline_ms"]
    integ = result["integrity"]
    console.print(
        f"throughput (flood): offered {_fmt(thr['flood_offered_per_min'], 1)}/min, finished "
        f"{_fmt(thr['flood_finished_per_min'], 1)}/min"
        + ("" if thr["flood_drained_within_timeout"] else " [red](did not drain within the timeout)[/]")
    )
    console.print(
        "direct baseline (same series, one process): load+preprocess p50 "
        f"{_fmt(d['load_preprocess'].get('p50'))} ms"
        f" + Triton p50 {_fmt(d['triton'].get('p50'))} ms = {_fmt(d['total'].get('p50'))} ms; "
        f"pipeline ready→finding (idle stat p50) {_fmt(ov['end_to_end_idle_stat_p50_ms'])} ms = "
        f"{_fmt(ov['ratio_end_to_end_over_direct'], 2)}x direct, "
        f"+{_fmt(ov['overhead_ms_p50_vs_direct'])} ms; "
        f"overhead excluding the study's own model work p50 "
        f"{_fmt(ov['overhead_ms_excl_model_work_idle_stat'].get('p50'))} ms idle / "
        f"{_fmt(ov['overhead_ms_excl_model_work_flood_routine'].get('p50'))} ms flood routine"
    )
    colour = (
        "green"
        if not any(
            integ[k]
            for k in (
                "not_finished",
                "instances_lost",
                "doubled_alerts",
                "doubled_findings",
                "wrong_lane",
                "send_failed",
            )
        )
        else "red"
    )
    console.print(
        f"[{colour}]integrity over {integ['studies']} studies: not finished {integ['not_finished']}, "
        f"instances lost {integ['instances_lost']}, dead-lettered {integ['dead_lettered']}, doubled alerts "
        f"{integ['doubled_alerts']}, doubled findings {integ['doubled_findings']}, wrong lane "
        f"{integ['wrong_lane']}, stat positives {integ['stat_positive']}/{integ['stat_sent']}; sends failed "
        f"{integ['send_failed']}, associations refused (retried) stat {integ['association_refusals_stat']} / "
        f"routine {integ['association_refusals_routine']}[/]"
    )
    for name, info in result["phases"].items():
        if info.get("cpu_s") or info.get("triton"):
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in (info.get("cpu_s") or {}).items() if v >= 0.5)
            by_model = info.get("triton_by_model") or {"ich_classifier": info.get("triton") or {}}
            tri = "; ".join(
                f"Triton {model}: batch {_fmt(t.get('mean_batch_size'), 2)}, "
                f"queue {_fmt(t.get('mean_queue_ms_per_request'), 1)} ms/req, "
                f"compute {_fmt(t.get('mean_compute_ms_per_request'), 1)} ms/req"
                for model, t in by_model.items()
                if t
            )
            console.print(
                f"[dim]{name}: CPU s {cpu}; load generator {info['load_generator_cpu_s']:.1f}; {tri}[/]"
            )
    rows = result.get("stat_preprocess_contention") or []
    if rows:
        worst = max(rows, key=lambda r: r["preprocess_ms"])
        console.print(
            f"[dim]stat preprocess under flood: slowest {worst['preprocess_ms']:.0f} ms (idle median of the "
            f"same series {_fmt(worst['idle_median_same_series_ms'])} ms), "
            f"{worst['share_alongside_routine']:.0%} of it alongside a routine preprocess in the same "
            f"worker; {sum(r['share_alongside_routine'] > 0.5 for r in rows)}/{len(rows)} stat studies "
            "mostly overlapped[/]"
        )
    console.print(f"[dim]{result['note']}; {result['percentiles']}[/]")


if __name__ == "__main__":
    main()
