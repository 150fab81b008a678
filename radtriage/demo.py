"""`radtriage demo`: replay synthetic studies through a running stack and show what happened.

Eight studies per run, one or more per route, each with the hospital messages a real one
would come with:
- a head CT with a bleed whose STAT "code stroke" order (HL7 ORM^O01 over MLLP)
  arrives before the images: routed straight to the stat lane;
- a head CT with a bleed of a patient registered as an outpatient (HL7 ADT^A04)
  whose images come first (routine lane) and whose STAT order comes after: the
  queued work is moved up to the stat lane (or, if the routine lane already finished
  it, the audit says so);
- a normal head CT with a routine outpatient FHIR ServiceRequest: routine lane;
- a head/neck CTA with a left-sided large-vessel occlusion of a patient the ED registered
  (HL7 ADT^A04, patient class E) whose order has not arrived: the CTA route is
  time-critical, so stat; a stroke alert naming the side;
- a chest film (DX) with a pneumothorax: routine lane, a positive report, no alert
  (chest films have no alert channel);
- a four-view screening mammogram (MG) with a spiculated mass in the right breast:
  routine lane, a positive report suggesting BI-RADS 5 in the right breast, no alert;
- a chest CT with one solid lung nodule: routine lane, a positive report listing the
  nodule (size, lung, position), no alert;
- an abdominal CT that no rule takes: unrouted.
Each routed case must come out with its route's kind of finding (ICH, LVO, CXR_CRITICAL,
BIRADS, NODULE), positive or negative as the phantom is, the LVO case with the phantom's
side, the mammogram with its category and the chest CT with its nodule's size and lung.
Images go over a DICOM association (C-STORE, then release) to the running listener,
and each study is followed on Kafka until its outcome. Latencies are measured from
the timestamps the pipeline records (first instance received, study ready,
alert/report produced).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from pydicom import dcmread
from pynetdicom import AE
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from radtriage.demo_messages import (
    MessageError,
    hl7_adt,
    hl7_order,
    post_fhir,
    send_hl7,
    service_request,
)
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import Settings
from schemas.base import EventDecodeError
from schemas.findings import Finding
from schemas.results import read_result

console = Console()
# SNOMED CT 272741003 |Laterality|: the Observation component that names a finding's side.
LATERALITY_SNOMED = "272741003"
# How long the demo waits after its last case for result objects still on their way to a
# PACS (they follow the report: the SEG and key image are built after it).
PACS_GRACE_S = 5.0


@dataclass
class DemoCase:
    name: str
    expect: str  # "alert", "report", "unrouted"
    make: Callable[[np.random.Generator, Path, str], list[Path]]
    # Hospital messages around the images: "stat_first" (HL7 STAT order, then images),
    # "stat_late" (ADT outpatient, images, then HL7 STAT order), "fhir_routine" (FHIR
    # routine ServiceRequest, then images), "ed_no_order" (ADT emergency patient, then
    # images, no order), "" (images only).
    orders: str = ""
    # The lane the study's work must end in ("" for unrouted).
    expect_lane: str = ""
    # The finding the route produces, whether it is positive, and its side ("" = not checked).
    expect_finding: str = ""
    expect_positive: bool | None = None
    expect_side: str = ""
    # Words the finding's detail must hold (a BI-RADS category, a nodule count; "" = not checked).
    expect_detail: str = ""


@dataclass
class Outcome:
    case: str
    study_uid: str
    expected: str
    expect_lane: str = ""
    route: str = "-"
    lanes: list[str] = field(default_factory=list)
    lane_reason: str = ""
    inferred_on: str = ""
    finding: str = "-"
    probability: float | None = None
    positive: bool | None = None
    laterality: str = ""
    # Where the model puts a positive finding, in a few words (`finding_detail`).
    detail: str = ""
    expect_finding: str = ""
    expect_positive: bool | None = None
    expect_side: str = ""
    expect_detail: str = ""
    alert: bool = False
    report: bool = False
    unrouted: bool = False
    dead_letter: str = ""
    # Result objects the pacs-export stage stored in (or gave up on for) a PACS, as its
    # audit records say: "sr", "seg", ... ("sr failed"), with the destination's name.
    pacs: list[str] = field(default_factory=list)
    sent_s: float = 0.0
    ready_to_alert_ms: float | None = None
    ready_to_report_ms: float | None = None
    received_to_alert_ms: float | None = None
    timestamps: dict[str, str] = field(default_factory=dict)

    @property
    def final_lane(self) -> str:
        return self.lanes[-1] if self.lanes else ""

    @property
    def ok(self) -> bool:
        if self.dead_letter:
            return False
        if self.expected != "unrouted" and self.final_lane != self.expect_lane:
            return False
        if self.expect_finding and self.finding != self.expect_finding:
            return False
        if self.expect_positive is not None and self.positive != self.expect_positive:
            return False
        if self.expect_side and self.laterality != self.expect_side:
            return False
        if self.expect_detail and self.expect_detail not in self.detail:
            return False
        return {
            "alert": self.alert and self.report,
            "report": self.report and not self.alert,
            "unrouted": self.unrouted and not self.report and not self.alert,
        }[self.expected]


def _write_ct(
    hu: np.ndarray, spacing_zyx: tuple[float, float, float], out: Path, accession: str, body: str, desc: str
) -> list[Path]:
    from models.dicom_writer import write_ct_series

    return write_ct_series(
        hu,
        spacing_zyx,
        out,
        accession=accession,
        patient_id=f"DEMO-{accession}",
        patient_name="Demo^Phantom",
        body_part=body,
        series_description=desc,
    )


def _head(bleed: bool) -> Callable[[np.random.Generator, Path, str], list[Path]]:
    def make(rng: np.random.Generator, out: Path, accession: str) -> list[Path]:
        from models.phantoms import head_ct_phantom

        ph = head_ct_phantom(rng, bleed=bleed, min_bleed_ml=5.0)
        return _write_ct(ph.hu, ph.spacing_zyx, out, accession, "HEAD", "CT HEAD WO CONTRAST")

    return make


def _abdomen(rng: np.random.Generator, out: Path, accession: str) -> list[Path]:
    from models.phantoms import chest_ct_phantom

    # No rule reads an abdominal CT: routing goes by the headers, never the pixels.
    ph = chest_ct_phantom(rng)
    return _write_ct(ph.hu, ph.spacing_zyx, out, accession, "ABDOMEN", "CT ABDOMEN PELVIS WO CONTRAST")


# Fixed phantoms for the newer routes, so the demo shows each model's typical answer
# rather than whatever the shared generator draws: on these the served models say
# P(LVO) 1.00 with P(left) 0.97, P(pneumothorax) 1.00, for the right breast's
# spiculated mass P(BI-RADS 4/5) 1.00, category 5 (P 0.98), and for the chest CT's
# 16.8 mm solid nodule in the right lung one nodule, 17.3 mm in the right lung (P 1.00),
# within 1.2 mm of its centre.
CTA_SEED, FILM_SEED, MAMMO_SEED, NODULE_SEED = 7101, 20261124, 5007, 9008
NODULE_MIN_MM = 14.0
NODULE_DEMO_MM, NODULE_DEMO_LUNG = 17, "right"


def _chest_nodule(rng: np.random.Generator, out: Path, accession: str) -> list[Path]:
    from models.nodule_detector.phantoms import chest_ct_phantom

    ph = chest_ct_phantom(
        np.random.default_rng(NODULE_SEED), nodules=1, kinds=("solid",), min_diameter_mm=NODULE_MIN_MM
    )
    return _write_ct(ph.hu, ph.spacing_zyx, out, accession, "CHEST", "CT CHEST WO CONTRAST")


def _cta(rng: np.random.Generator, out: Path, accession: str) -> list[Path]:
    from models.lvo_detector.phantoms import cta_phantom

    ph = cta_phantom(np.random.default_rng(CTA_SEED), lvo=True, side="left")
    return _write_ct(ph.hu, ph.spacing_zyx, out, accession, "HEAD", "CTA HEAD NECK")


def _film(rng: np.random.Generator, out: Path, accession: str) -> list[Path]:
    from models.cxr_triage.phantoms import chest_radiograph_phantom
    from models.cxr_triage.writer import write_radiograph

    r = chest_radiograph_phantom(np.random.default_rng(FILM_SEED), pneumothorax=True, min_rim_fraction=0.1)
    return [
        write_radiograph(
            r.pixels,
            r.pixel_mm,
            out,
            accession=accession,
            patient_id=f"DEMO-{accession}",
            patient_name="Demo^Phantom",
        )
    ]


def _mammogram(rng: np.random.Generator, out: Path, accession: str) -> list[Path]:
    from models.mammo_birads.phantoms import mammo_study_phantom
    from models.mammo_birads.writer import write_mammogram_study

    study = mammo_study_phantom(np.random.default_rng(MAMMO_SEED), category=5, side="right")
    return write_mammogram_study(
        study, out, accession=accession, patient_id=f"DEMO-{accession}", patient_name="Demo^Phantom"
    )


CASES = (
    DemoCase("head CT, bleed, STAT order first", "alert", _head(True), "stat_first", "stat", "ICH", True),
    DemoCase("head CT, bleed, STAT order late", "alert", _head(True), "stat_late", "stat", "ICH", True),
    DemoCase(
        "head CT, normal, routine order", "report", _head(False), "fhir_routine", "routine", "ICH", False
    ),
    DemoCase(
        "CTA, left LVO, ED patient, no order", "alert", _cta, "ed_no_order", "stat", "LVO", True, "left"
    ),
    DemoCase("chest film, pneumothorax", "report", _film, "", "routine", "CXR_CRITICAL", True),
    DemoCase(
        "mammogram, suspicious",
        "report",
        _mammogram,
        "",
        "routine",
        "BIRADS",
        True,
        expect_detail="BI-RADS 5",
    ),
    DemoCase(
        "chest CT, lung nodule",
        "report",
        _chest_nodule,
        "",
        "routine",
        "NODULE",
        True,
        expect_detail=f"{NODULE_DEMO_MM} mm, {NODULE_DEMO_LUNG} lung",
    ),
    DemoCase("CT abdomen (no rule)", "unrouted", _abdomen),
)


class SendError(RuntimeError):
    pass


__all__ = ["MessageError", "SendError", "run_demo"]


def send_series(paths: list[Path], settings: Settings, host: str = "127.0.0.1") -> None:
    """C-STORE every file over one association, then release it (the 'study complete' signal).

    One presentation context per SOP class among the files (CT volumes, CR/DX films).
    """
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title="RADTRIAGE_DEMO")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(host, settings.dicom.port, ae_title=settings.dicom.ae_title)
    if not assoc.is_established:
        raise SendError(
            f"DICOM association to {host}:{settings.dicom.port} ({settings.dicom.ae_title}) refused"
        )
    try:
        for path, ds in zip(paths, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                raise SendError(f"C-STORE of {path.name} answered status {code!r}")
    finally:
        assoc.release()


def _ms(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() * 1000.0


class OutputWatcher:
    """Reads the output topics from 'now' on and files every message under its study UID."""

    def __init__(self, settings: Settings) -> None:
        t = settings.topics
        self.results_topic = t.results_fhir
        self.topics = [*t.alert_topics(), t.results_fhir, t.findings, t.audit, t.deadletter]
        self.consumer = KafkaConsumer(
            enable_auto_commit=False, group_id=None, **kafka_python_kwargs(settings.kafka)
        )
        parts = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(self.consumer.partitions_for_topic(topic) or {0})
        ]
        self.consumer.assign(parts)
        self.consumer.seek_to_end(*parts)
        for tp in parts:  # resolve the end offsets now, before anything is sent
            self.consumer.position(tp)
        self.seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def poll(self, timeout_ms: int = 200) -> None:
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                try:
                    if record.topic == self.results_topic:
                        # A plain Bundle, its study and finding in headers: as one object.
                        data = read_result(record.value, record.headers or ()).fields()
                    else:
                        data = json.loads(record.value)
                except (EventDecodeError, ValueError, TypeError):
                    continue
                uid = data.get("study_uid") or ""
                self.seen.setdefault(uid, []).append((record.topic, data))

    def close(self) -> None:
        self.consumer.close()


def finding_detail(finding: Finding) -> str:
    """Where a positive finding is, as the demo's table shows it: the side, the slices."""
    if not finding.positive:
        return ""
    parts = []
    if finding.laterality in ("left", "right") and finding.laterality_probability is not None:
        parts.append(f"{finding.laterality} side (p {finding.laterality_probability:.2f})")
    if finding.nodules:
        parts.append(
            ", ".join(
                f"{n.diameter_mm:.0f} mm, {n.lung} lung (p {n.probability:.2f})" for n in finding.nodules[:3]
            )
            + (f" and {len(finding.nodules) - 3} more" if len(finding.nodules) > 3 else "")
        )
    b = finding.birads
    if b is not None:
        parts.append(f"BI-RADS {b.category}" + (f", {b.side} breast" if b.side else ""))
    r = finding.slice_range
    if r is not None:
        if r.first_instance_number is not None and r.last_instance_number is not None:
            lo, hi = sorted((r.first_instance_number, r.last_instance_number))
            parts.append(f"images {lo}-{hi}" if lo != hi else f"image {lo}")
        else:
            parts.append(f"z {r.first_position_mm:.0f} to {r.last_position_mm:.0f} mm")
    return "; ".join(parts)


def _apply(outcome: Outcome, topic: str, data: dict[str, Any], settings: Settings) -> None:
    t = settings.topics
    if topic == t.findings:
        try:
            outcome.detail = finding_detail(Finding.model_validate(data))
        except ValueError as exc:  # the pipeline's own event, but the demo must not crash on it
            outcome.detail = f"unreadable finding: {exc}"
    elif topic in t.alert_topics():
        outcome.alert = True
        outcome.finding = data["finding"]
        outcome.probability = data["probability"]
        outcome.laterality = data.get("laterality") or outcome.laterality
        ready = datetime.fromisoformat(data["ready_at"])
        alerted = datetime.fromisoformat(data["alerted_at"])
        outcome.ready_to_alert_ms = _ms(ready, alerted)
        outcome.received_to_alert_ms = _ms(datetime.fromisoformat(data["received_at"]), alerted)
    elif topic == t.results_fhir:
        outcome.report = True
        report = data["bundle"]["entry"][0]["resource"]
        obs = data["bundle"]["entry"][1]["resource"]
        outcome.finding = data["finding"]
        outcome.probability = obs["valueQuantity"]["value"]
        outcome.positive = obs["interpretation"][0]["coding"][0]["code"] == "POS"
        for component in obs.get("component", []):
            if any(c.get("code") == LATERALITY_SNOMED for c in component["code"].get("coding", [])):
                outcome.laterality = str(component["valueCodeableConcept"]["text"]).lower()
        outcome.ready_to_report_ms = _ms(
            datetime.fromisoformat(report["effectiveDateTime"]), datetime.fromisoformat(data["produced_at"])
        )
    elif topic == t.audit:
        if data["decision"] == "unrouted":
            outcome.unrouted = True
            outcome.route = "unrouted"
        elif data["stage"] == "route" and data["decision"] in ("routed", "lane_upgraded"):
            outcome.route = str(data["detail"]["model"])
            outcome.lanes.append(str(data["detail"]["lane"]))
            outcome.lane_reason = str(data["detail"].get("lane_reason", ""))
        elif data["stage"] == "infer" and data["decision"] in ("positive", "negative"):
            outcome.inferred_on = str(data["detail"].get("lane", ""))
        elif data["stage"] == "export":
            outcome.pacs += pacs_entry(data["decision"], data["detail"])
    elif topic == t.deadletter:
        outcome.dead_letter = f"{data['stage']}: {data['error']}"


def pacs_entry(decision: str, detail: dict[str, Any]) -> list[str]:
    """What one export audit record adds to the demo's PACS column ("sr", "seg failed", ...):
    stored and failed objects; a retry says nothing yet."""
    what = str(detail.get("object", "?"))
    where = f"@{detail['destination']}" if detail.get("destination") else ""
    if decision.endswith("_stored"):
        return [f"{what}{where}"]
    if decision.endswith("_failed"):
        return [f"{what}{where} failed"]
    return []


def _finished(outcome: Outcome) -> bool:
    if outcome.dead_letter:
        return True
    if outcome.expected == "alert":
        return outcome.alert and outcome.report
    if outcome.expected == "unrouted":
        return outcome.unrouted
    return outcome.report or outcome.unrouted


def run_case(
    case: DemoCase,
    settings: Settings,
    watcher: OutputWatcher,
    rng: np.random.Generator,
    workdir: Path,
    timeout_s: float,
    grace_s: float,
) -> Outcome:
    accession = f"DEMO{int(time.time() * 1000) % 10**10:010d}"
    out = workdir / accession
    files = case.make(rng, out, accession)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    outcome = Outcome(
        case=case.name,
        study_uid=study_uid,
        expected=case.expect,
        expect_lane=case.expect_lane,
        expect_finding=case.expect_finding,
        expect_positive=case.expect_positive,
        expect_side=case.expect_side,
        expect_detail=case.expect_detail,
    )
    patient_id = f"DEMO-{accession}"
    started = time.monotonic()
    if case.orders == "stat_first":
        send_hl7(settings, hl7_order(accession, patient_id, priority="S", indication="CODE STROKE"))
    elif case.orders == "fhir_routine":
        post_fhir(settings, service_request(accession, patient_id, priority="routine"))
    elif case.orders == "stat_late":
        send_hl7(settings, hl7_adt(patient_id, patient_class="O"))
    elif case.orders == "ed_no_order":
        send_hl7(settings, hl7_adt(patient_id, patient_class="E"))
    send_series(files, settings)
    if case.orders == "stat_late":
        # The order the ED placed while the scan ran reaches radtriage after the images.
        _wait_for(watcher, outcome, settings, lambda o: bool(o.lanes), timeout_s)
        send_hl7(settings, hl7_order(accession, patient_id, priority="S", indication="CODE STROKE"))
    outcome.sent_s = time.monotonic() - started
    deadline = time.monotonic() + timeout_s
    done_at: float | None = None
    while time.monotonic() < deadline:
        _poll_into(watcher, outcome, settings)
        if _finished(outcome):
            # Keep listening a little: a duplicate or unexpected alert must show up as a failure.
            done_at = done_at or time.monotonic()
            if time.monotonic() - done_at >= grace_s:
                break
    return outcome


def _collect_late(
    watcher: OutputWatcher, outcomes: list[Outcome], settings: Settings, seconds: float
) -> None:
    """Records of earlier studies that arrived after their case was done (result objects
    in the PACS follow the report), filed under their outcomes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        watcher.poll()
    for outcome in outcomes:
        for topic, data in watcher.seen.pop(outcome.study_uid, []):
            _apply(outcome, topic, data, settings)


def _poll_into(watcher: OutputWatcher, outcome: Outcome, settings: Settings) -> None:
    watcher.poll()
    for topic, data in watcher.seen.pop(outcome.study_uid, []):
        _apply(outcome, topic, data, settings)


def _wait_for(
    watcher: OutputWatcher,
    outcome: Outcome,
    settings: Settings,
    predicate: Callable[[Outcome], bool],
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(outcome) and not outcome.dead_letter and time.monotonic() < deadline:
        _poll_into(watcher, outcome, settings)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.0f} ms"


def run_demo(
    settings: Settings, runs: int = 1, json_out: Path | None = None, timeout_s: float = 120.0
) -> bool:
    rng = np.random.default_rng(20261124)
    watcher = OutputWatcher(settings)
    outcomes: list[Outcome] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="radtriage-demo-") as tmp,
            Progress(console=console) as progress,
        ):
            task = progress.add_task("sending demo studies", total=runs * len(CASES))
            for _ in range(runs):
                for case in CASES:
                    progress.update(task, description=f"{case.name}")
                    outcomes.append(run_case(case, settings, watcher, rng, Path(tmp), timeout_s, grace_s=1.0))
                    progress.advance(task)
        if any(o.pacs for o in outcomes):
            # A PACS is configured (`radtriage up --pacs`): its objects follow the report;
            # give the last ones a few seconds to land before the table.
            _collect_late(watcher, outcomes, settings, PACS_GRACE_S)
    finally:
        watcher.close()

    table = Table(title="radtriage demo")
    for col in (
        "study",
        "route",
        "lane",
        "inferred on",
        "finding",
        "probability",
        "where",
        "alert",
        "report",
        "ready→alert",
        "ready→report",
        "PACS",
        "result",
    ):
        table.add_column(col)
    for o in outcomes[-len(CASES) :] if runs > 1 else outcomes:
        table.add_row(
            o.case,
            o.route,
            " → ".join(o.lanes) or "-",
            o.inferred_on or "-",
            o.finding,
            "-" if o.probability is None else f"{o.probability:.3f}",
            o.detail or "-",
            "yes" if o.alert else "no",
            "yes" if o.report else ("unrouted" if o.unrouted else "no"),
            _fmt(o.ready_to_alert_ms),
            _fmt(o.ready_to_report_ms),
            ", ".join(o.pacs) or "-",
            "[green]as expected[/]" if o.ok else "[red]UNEXPECTED[/]",
        )
    console.print(table)
    for o in outcomes[-len(CASES) :] if runs > 1 else outcomes:
        if o.lane_reason:
            note = ""
            if o.inferred_on and o.inferred_on != o.final_lane:
                # Honest about the race: an idle routine lane may finish before the order lands.
                note = f" (the {o.inferred_on} lane had already run the model when the order arrived)"
            console.print(f"[dim]{o.case}: {o.final_lane} lane — {o.lane_reason}{note}[/]")
    if any(o.pacs for o in outcomes):
        console.print(
            "[dim]Result objects in the PACS: open its viewer on these studies "
            '(`radtriage up --pacs`: Orthanc\'s web UI, README "Results in a PACS"):[/]'
        )
        for o in outcomes[-len(CASES) :] if runs > 1 else outcomes:
            if o.pacs:
                console.print(f"[dim]  {o.case}: {o.study_uid}[/]")
    for o in outcomes:
        if o.dead_letter:
            console.print(f"[red]dead letter[/] for {o.case} ({o.study_uid}): {o.dead_letter[:300]}")
    alert_ms = [o.ready_to_alert_ms for o in outcomes if o.ready_to_alert_ms is not None]
    summary: dict[str, Any] = {"runs": runs, "studies": len(outcomes), "all_ok": all(o.ok for o in outcomes)}
    if alert_ms:
        summary |= {
            "ready_to_alert_ms_p50": statistics.median(alert_ms),
            "ready_to_alert_ms_max": max(alert_ms),
            "alerts": len(alert_ms),
        }
        console.print(
            f"study ready → alert over {len(alert_ms)} alert(s): p50 {statistics.median(alert_ms):,.0f} ms, "
            f"max {max(alert_ms):,.0f} ms"
        )
    if json_out:
        json_out.write_text(
            json.dumps({"summary": summary, "outcomes": [asdict(o) for o in outcomes]}, indent=2)
        )
    return bool(summary["all_ok"])
