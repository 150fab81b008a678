"""Where a real-shaped bleed study's results go, and how fast: the alert, the on-call
webhook (issue 19), the HL7 ORU at the RIS/EHR and the FHIR DiagnosticReport on the EHR's
FHIR server (issue 20) and the TID 1500 SR in the PACS (issue 18), from the same studies in
the same run, with the peers' own cost as baselines.

    python -m bench.delivery --studies 20 --lock /tmp/radtriage-heavy.lock
    python -m bench.delivery --studies 4 --thin 48 --bone 24          # a quick look
    python -m bench.delivery --studies 20 --outage 120 --during 4     # the peers down 2 min

Each study is a head CT as a scanner sends it (models/realistic_study.py: scout, 5 mm,
0.625 mm and bone-kernel recons of 512 x 512, a dose SR), sent one association per series;
studies alternate between ascending explicit-VR files from one vendor and descending
JPEG-LS files from another. The studies are written before the lock is taken.

The stack is `radtriage up`'s on free ports (Kafka, Triton, worker, listeners), configured
with four real peers: a JSON webhook receiver that verifies the HMAC, in a process of its
own (tests/support/webhook_process.py), an MLLP receiver answering with python-hl7's ACK
(tests/support/mllp_receiver.py), Debian's Orthanc as the PACS (tests/support/orthanc.py)
and the HAPI FHIR JPA server 8.8.0 as the EHR's FHIR server (tests/support/fhir_server.py,
H2 in a file, -Xmx384m) for the `ehr-fhir` stage.

Measured per study, on one clock (one machine), from the study's `ready_at`:
- the alert (its `alerted_at`): the baseline every delivery is compared with;
- the webhook received, and the notify stage's share split in two: the alert's `alerted_at`
  to the stage's `notify_opened` audit record (the trip back through Kafka into the stage),
  and that record to the receipt (the telling);
- the webhook received, the ORU received by the MLLP peer (it answers at once), the SR
  stored in Orthanc (the pacs-export stage's `sr_stored` audit time, after Orthanc's
  C-STORE response; the SR is then looked up in Orthanc's REST API);
- the report readable from the FHIR server: a thread polls `GET DiagnosticReport?identifier=
  <accession>` every 50 ms from before the study is sent; the time is the end of the first
  answer that has it, and the window it was known to appear in (since the start of the
  last poll that did not) is kept as the poll's error. The same report's `meta.lastUpdated`
  (HAPI's own clock: the same machine's) and the stage's `fhir_stored` audit time (after
  HAPI's 2xx) are kept beside it;
- counts: alerts, webhooks, ORUs (and repeated MSH-10s), SRs in Orthanc, DiagnosticReports
  on the FHIR server per finding (`DiagnosticReport?identifier=<radtriage's report id>&
  _summary=count`, the id the stage's transaction is conditional on), dead letters.
Peers in the same run: the same ORU text sent straight to the MLLP peer over a fresh
connection, the same SR C-STOREd straight to Orthanc over a fresh association
(pynetdicom) and the same FHIR transaction POSTed straight to HAPI over a fresh connection
(re-keyed to new ids, and its accession prefixed DIRECT-, so that it creates a report as
the stage's first POST does and the bench's searches do not find it), against radtriage's
finding -> ORU received, finding -> SR stored and finding -> report stored on HAPI.
Memory: the worker's VmHWM at the end (the delivery stages run in it), HAPI's VmRSS and
VmHWM (the JVM's, before the outage stops it).

With `--outage S`: the peers named by `--down` (default all three: Orthanc, the MLLP peer
and HAPI) stop, `--during` studies are sent, they start again S seconds after they stopped
on the same ports (HAPI on the same H2 file, so what it stored before is still there);
every ORU, SR and FHIR report must then arrive exactly once, and the alerts of the studies
sent during the outage are timed as above (a PACS, RIS or EHR outage must not delay the
alert). The FHIR sender retries until `--fhir-deadline` (default max(600, 3 x S), as the
HL7 and DICOM senders), longer than the outage plus HAPI's start, so the reports wait in
the stage's retry; with a deadline shorter than that they are dead-lettered
("undelivered") instead, and the bench then replays them as `radtriage replay --stage
ehr-fhir` does (radtriage/replay.py) once the server is back, and counts again (the JSON
says how many it replayed). JSON to bench/results/delivery-<UTC>.json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from rich.console import Console
from rich.table import Table

from bench.fhir_readable import (
    NO_CACHE,
    POLL_INTERVAL_S,
    FhirWatch,
    direct_fhir,
    report_keys,
    reports_on_server,
)
from bench.lanes import own_stack_settings
from bench.output import stamped_path, write_json
from bench.proc_status import status_kb
from bench.realistic_study import PER_SERIES, Watcher, _git_commit, storescu, worker_pid
from bench.summary import spread_measured
from models.realistic_study import StudyManifest, write_realistic_head_study
from radtriage.mllp_framing import Frame, FrameDecoder, frame
from radtriage.settings import (
    REPO_ROOT,
    DicomDestination,
    EhrFhirSettings,
    EhrHl7Settings,
    Settings,
    WebhookTarget,
)
from tests.support.fhir_server import HapiFhirServer
from tests.support.mllp_receiver import MllpReceiver
from tests.support.orthanc import Orthanc
from tests.support.webhook_process import webhook_receiver_process

console = Console()
SECRET = "bench-delivery"
ORTHANC_AET = "BENCHPACS"


class TimedMllp:
    """The MLLP peer, restartable on its port, noting when each message arrived."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.port = 0
        self._receiver: MllpReceiver | None = None

    def _policy(self, message: str) -> tuple[str, str]:
        with self._lock:
            self.arrivals.append((time.time(), message))
        return "AA", ""

    def start(self) -> None:
        self._receiver = MllpReceiver(self._policy, port=self.port)
        self._receiver.__enter__()
        self.port = self._receiver.port

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.__exit__(None, None, None)
            self._receiver = None

    def of(self, accession: str) -> list[tuple[float, str]]:
        with self._lock:
            return [(at, m) for at, m in self.arrivals if f"|{accession}" in m or f"^{accession}" in m]


def control_id(message: str) -> str:
    return message.split("\r", 1)[0].split("|")[9]


@dataclass
class Delivered:
    study_uid: str
    accession: str
    phase: str
    alerts: int = 0
    webhooks: int = 0
    orus: int = 0
    oru_repeats: int = 0
    srs_in_pacs: int = 0
    sr_stored_events: int = 0
    # One entry per finding's report key: the DiagnosticReports HAPI holds under it.
    fhir_reports_per_finding: list[int] = field(default_factory=list)
    fhir_stored_events: int = 0
    fhir_readable: bool = False
    dead_letters: list[str] = field(default_factory=list)
    ready_to_alert_ms: float | None = None
    ready_to_webhook_ms: float | None = None
    # The notify stage's share (issue 19), split where the worker records it: the alert's
    # trip back through Kafka into the stage (its `notify_opened` record), then the telling.
    alert_to_webhook_ms: float | None = None
    alert_to_notify_opened_ms: float | None = None
    notify_opened_to_webhook_ms: float | None = None
    ready_to_oru_ms: float | None = None
    ready_to_sr_stored_ms: float | None = None
    finding_to_oru_ms: float | None = None
    finding_to_sr_stored_ms: float | None = None
    ready_to_fhir_readable_ms: float | None = None
    fhir_poll_window_ms: float | None = None  # the readable time is known to within this
    ready_to_fhir_last_updated_ms: float | None = None
    ready_to_fhir_stored_ms: float | None = None
    finding_to_fhir_stored_ms: float | None = None

    @property
    def complete(self) -> bool:
        # The stage's audit events too: a study found on the peers before its events were
        # read would miss its stored times (seen once for an SR, once for a FHIR report).
        return bool(
            self.alerts and self.webhooks and self.orus and self.srs_in_pacs and self.fhir_readable
            and self.sr_stored_events and self.fhir_stored_events
        )  # fmt: skip


def stats(xs: list[float | None]) -> dict[str, float | None]:
    """n, p50, p99 (nearest rank), min, max of what was measured (None: not measured)."""
    return spread_measured(xs, tail=0.99)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def srs_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    """Orthanc ids of the study's SR instances (the dose SR is never sent to it: only ours)."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
    found = orthanc.rest("POST", "/tools/find", query)
    return [str(i) for i in found]


@dataclass
class Peers:
    hooks: Any
    mllp: TimedMllp
    orthanc: Orthanc
    hapi: HapiFhirServer
    fhir: FhirWatch


def collect(m: StudyManifest, phase: str, w: Watcher, peers: Peers, *, count_fhir: bool = True) -> Delivered:
    """What reached the peers for one study; with `count_fhir`, the reports on the FHIR
    server are counted too (a search per finding: not while waiting)."""
    uid, t = m.study_uid, w.t
    hooks, mllp, orthanc = peers.hooks, peers.mllp, peers.orthanc
    d = Delivered(uid, m.accession, phase)
    alerts = w.of(w.alerts, uid)
    d.alerts = len(alerts)
    hooks_of = [r for r in hooks.received if r.body.get("study_uid") == uid]
    d.webhooks = len(hooks_of)
    orus = mllp.of(m.accession)
    d.orus = len({control_id(msg) for _, msg in orus})
    d.oru_repeats = len(orus) - d.orus
    d.srs_in_pacs = len(srs_in_orthanc(orthanc, uid))
    stored = [a for a in w.of(t.audit, uid) if a.get("decision") == "sr_stored"]
    d.sr_stored_events = len(stored)
    fhir_stored = [a for a in w.of(t.audit, uid) if a.get("decision") == "fhir_stored"]
    d.fhir_stored_events = len(fhir_stored)
    readable = peers.fhir.found.get(m.accession)
    d.fhir_readable = readable is not None
    if count_fhir:
        keys = sorted(report_keys(w.of(t.results_fhir, uid)))
        d.fhir_reports_per_finding = [reports_on_server(peers.hapi.base_url, k) for k in keys]
    d.dead_letters = [f"{x.get('stage')}: {str(x.get('error'))[:160]}" for x in w.dead(uid)]
    if not alerts:
        return d
    ready = _ts(alerts[0]["ready_at"])
    d.ready_to_alert_ms = (_ts(alerts[0]["alerted_at"]) - ready) * 1000
    alerted = _ts(alerts[0]["alerted_at"])
    opened = [_ts(a["at"]) for a in w.of(t.audit, uid) if a.get("decision") == "notify_opened"]
    if opened:
        d.alert_to_notify_opened_ms = (min(opened) - alerted) * 1000
    if hooks_of:
        hooked = min(r.at for r in hooks_of)
        d.ready_to_webhook_ms = (hooked - ready) * 1000
        d.alert_to_webhook_ms = (hooked - alerted) * 1000
        if opened:
            d.notify_opened_to_webhook_ms = (hooked - min(opened)) * 1000
    findings = [f for f in w.of(t.findings, uid) if f.get("positive")]
    found_at = _ts(findings[0]["inferred_at"]) if findings else None
    if orus:
        first = min(at for at, _ in orus)
        d.ready_to_oru_ms = (first - ready) * 1000
        if found_at is not None:
            d.finding_to_oru_ms = (first - found_at) * 1000
    if stored:
        first_sr = min(_ts(a["at"]) for a in stored)
        d.ready_to_sr_stored_ms = (first_sr - ready) * 1000
        if found_at is not None:
            d.finding_to_sr_stored_ms = (first_sr - found_at) * 1000
    if readable is not None:
        d.ready_to_fhir_readable_ms = (readable.at - ready) * 1000
        d.fhir_poll_window_ms = (readable.at - readable.not_before) * 1000
        if readable.last_updated is not None:
            d.ready_to_fhir_last_updated_ms = (readable.last_updated - ready) * 1000
    if fhir_stored:
        first_fhir = min(_ts(a["at"]) for a in fhir_stored)
        d.ready_to_fhir_stored_ms = (first_fhir - ready) * 1000
        if found_at is not None:
            d.finding_to_fhir_stored_ms = (first_fhir - found_at) * 1000
    return d


# storescu's proposal for each syntax the studies are written in (dcmtk's options).
PROPOSE = {"explicit": (), "jpeg-ls": ("-xt",)}


def send(m: StudyManifest, port: int) -> list[int]:
    """One storescu call (association) per series, as a scanner sends; a failed C-STORE
    counts as a failure even though storescu exits 0 for it."""
    rcs = []
    for kinds in PER_SERIES:
        proc = storescu(port, m.files(kinds), PROPOSE[m.transfer_syntax])
        _out, err = proc.communicate(timeout=600)
        failed = proc.returncode or (b"Store Failed" in err) or (b"E: " in err)
        rcs.append(1 if failed else 0)
        if failed:
            console.print(f"[red]storescu {kinds} failed ({proc.returncode})[/] {err[-300:]!r}")
    return rcs


def wait_delivered(ms: list[StudyManifest], w: Watcher, peers: Peers, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {m.study_uid: m for m in ms}
    while pending and time.monotonic() < deadline:
        w.poll()
        for uid, m in list(pending.items()):
            if w.dead(uid) or collect(m, "", w, peers, count_fhir=False).complete:
                del pending[uid]
        time.sleep(0.2)
    if pending:
        console.print(f"[red]{len(pending)} studies not delivered within {timeout_s:.0f} s[/]")


def direct_oru(port: int, message: str) -> float:
    """ms to send `message` over a fresh MLLP connection and read its ACK (the peer's cost)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(frame(message.encode()))
        decoder = FrameDecoder(1 << 20)
        while not any(isinstance(x, Frame) for x in decoder.feed(sock.recv(65536))):
            pass
    return (time.perf_counter() - started) * 1000


def direct_sr(orthanc: Orthanc, instance_id: str, tmp: Path) -> float:
    """ms to C-STORE an SR Orthanc holds back to it over a fresh association (pynetdicom)."""
    from pynetdicom import AE

    path = tmp / f"{instance_id}.dcm"
    path.write_bytes(orthanc.file(instance_id))
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="BENCHDIRECT")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=ORTHANC_AET)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    elapsed = (time.perf_counter() - started) * 1000
    if getattr(status, "Status", None) != 0:
        raise RuntimeError(f"direct C-STORE to Orthanc failed: {status}")
    return elapsed


def vmhwm_mb(pid: int | None) -> float | None:
    return None if pid is None else round(status_kb("VmHWM", pid) / 1024, 1)


def write_studies(args: argparse.Namespace, tmp: Path) -> list[StudyManifest]:
    out = []
    total = 1 + args.studies + (args.during if args.outage else 0)
    with console.status("writing studies…") as status:
        for i in range(total):
            status.update(f"writing study {i + 1}/{total}")
            odd = i % 2 == 1
            out.append(
                write_realistic_head_study(
                    tmp / f"s{i}",
                    bleed=True,
                    rng=np.random.default_rng(5000 + i),
                    axial_slices=args.axial,
                    thin_slices=args.thin,
                    bone_slices=args.bone,
                    instance_order="descending" if odd else "ascending",
                    vendor="ge" if odd else "siemens",
                    transfer_syntax="jpeg-ls" if odd else "explicit",
                    accession=f"DL{5000 + i:06d}",
                    patient_id=f"DELIV-{i}",
                )
            )
    return out


def configure(
    settings: Settings, hook_url: str, mllp_port: int, orthanc: Orthanc, fhir_url: str, outage_s: float,
    fhir_deadline_s: float | None,
) -> None:  # fmt: skip
    settings.telemetry.exporter = "none"
    settings.notify.webhooks = [WebhookTarget(name="ed", url=hook_url, secret=SECRET)]  # type: ignore[arg-type]
    deadline = max(600.0, outage_s * 3)
    settings.ehr.hl7 = EhrHl7Settings(host="127.0.0.1", port=mllp_port, deadline_s=deadline, retry_max_s=5.0)
    settings.ehr.fhir = EhrFhirSettings(
        base_url=fhir_url, retry_deadline_s=fhir_deadline_s or deadline, retry_max_s=5.0
    )
    settings.dispatch.destinations = [
        DicomDestination(
            name="orthanc",
            host="127.0.0.1",
            port=orthanc.dicom_port,
            ae_title=ORTHANC_AET,
            objects=["sr", "key_image", "kos"],
        )
    ]
    settings.dispatch.retry_deadline_s = deadline
    settings.dispatch.retry_max_s = 5.0


PEERS = ("pacs", "ris", "fhir")


def memory_mb(pid: int | None) -> dict[str, float | None]:
    """A process's resident memory now and at its peak (VmRSS, VmHWM)."""
    if pid is None:
        return {"vmrss_mb": None, "vmhwm_mb": None}
    return {k.lower() + "_mb": round(status_kb(k, pid) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def replay_fhir(settings: Settings) -> int:
    """`radtriage replay --stage ehr-fhir`, in this process: how many letters it sent again."""
    from radtriage.replay import Criteria, run_replay

    report = run_replay(settings, Criteria(stage_prefix="ehr-fhir"), dry_run=False)
    if report.failure:
        console.print(f"[red]replay failed: {report.failure}[/]")
    return len(report.replayed_to)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20, help="measured studies (after one warm-up)")
    ap.add_argument("--thin", type=int, default=240, help="0.625 mm slices (a scanner: 240)")
    ap.add_argument("--axial", type=int, default=32, help="5 mm slices")
    ap.add_argument("--bone", type=int, default=120, help="1.25 mm bone-kernel slices")
    ap.add_argument("--outage", type=float, default=0.0, help="seconds the peers are down (0: none)")
    ap.add_argument("--down", default=",".join(PEERS), help="which peers the outage stops: pacs,ris,fhir")
    ap.add_argument("--during", type=int, default=4, help="studies sent while they are down")
    ap.add_argument(
        "--fhir-deadline",
        type=float,
        default=None,
        help="ehr.fhir.retry_deadline_s (default max(600, 3 x outage))",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="per study, for every delivery")
    ap.add_argument("--lock", type=Path, default=None, help="flock to take after writing the studies")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    down = {p.strip() for p in args.down.split(",") if p.strip()}
    if not down <= set(PEERS):
        ap.error(f"--down takes {','.join(PEERS)}, not {args.down}")
    out_path = args.json or stamped_path(REPO_ROOT / "bench" / "results", "delivery")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="radtriage-deliv-")))
        studies = write_studies(args, tmp / "studies")
        warm, measured = studies[0], studies[1 : 1 + args.studies]
        during = studies[1 + args.studies :]
        if args.lock is not None:
            lock = stack.enter_context(args.lock.open("a"))
            with console.status(f"waiting for {args.lock}…"):
                fcntl.flock(lock, fcntl.LOCK_EX)
        from radtriage.up import running_stack

        # The code the stack runs is the checkout's when it starts, not when the run ends.
        commit = _git_commit()

        # In a process of its own, as a hospital's receiver is (tests/support/webhook_process.py).
        hooks = stack.enter_context(webhook_receiver_process(SECRET, tmp))
        mllp = TimedMllp()
        mllp.start()
        stack.callback(mllp.stop)
        (tmp / "orthanc").mkdir()
        orthanc = Orthanc(tmp / "orthanc", aet=ORTHANC_AET)
        orthanc.start()
        stack.callback(orthanc.stop)
        hapi = HapiFhirServer(tmp / "hapi")
        with console.status("starting the HAPI FHIR server…"):
            hapi.start()
        stack.callback(hapi.stop)
        hapi_start_s = [round(hapi.started_in_s, 1)]
        fhir = FhirWatch(hapi.base_url)
        stack.callback(fhir.close)
        peers = Peers(hooks, mllp, orthanc, hapi, fhir)
        settings = own_stack_settings(tmp / "home")
        configure(
            settings, hooks.url("/ed"), mllp.port, orthanc, hapi.base_url, args.outage, args.fhir_deadline
        )
        stack.enter_context(running_stack(settings))
        worker = worker_pid(os.getpid())
        w = Watcher(settings, extra_topics=[settings.topics.audit])
        stack.callback(w.close)
        port = settings.dicom.port

        console.print("warm-up study…")
        fhir.watch(warm.accession)
        send(warm, port)
        wait_delivered([warm], w, peers, args.timeout)
        results: list[Delivered] = []
        partial = out_path.with_suffix(".partial.jsonl")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        direct_oru_ms: list[float] = []
        direct_sr_ms: list[float] = []
        direct_fhir_ms: list[float] = []
        rcs: list[int] = []
        for i, m in enumerate(measured):
            fhir.watch(m.accession)
            rcs += send(m, port)
            wait_delivered([m], w, peers, args.timeout)
            d = collect(m, "normal", w, peers)
            results.append(d)
            # One line per study as it is measured: a run that dies later keeps its data.
            with partial.open("a") as fh:
                fh.write(json.dumps(asdict(d)) + "\n")
            console.print(
                f"study {i + 1}/{len(measured)}: alert {_fmt(d.ready_to_alert_ms)}, "
                f"webhook {_fmt(d.ready_to_webhook_ms)}, ORU {_fmt(d.ready_to_oru_ms)}, "
                f"SR {_fmt(d.ready_to_sr_stored_ms)}, FHIR readable {_fmt(d.ready_to_fhir_readable_ms)} "
                f"(±{_fmt(d.fhir_poll_window_ms)}) ms after ready; FHIR reports {d.fhir_reports_per_finding}"
            )
            # The peers' own cost for the same objects, in the same run.
            orus = mllp.of(m.accession)
            if orus:
                direct_oru_ms.append(direct_oru(mllp.port, orus[0][1]))
            ids = srs_in_orthanc(orthanc, m.study_uid)
            if ids:
                direct_sr_ms.append(direct_sr(orthanc, ids[0], tmp))
            for r in w.of(settings.topics.results_fhir, m.study_uid)[:1]:
                try:
                    direct_fhir_ms.append(direct_fhir(hapi.base_url, r["bundle"], m.accession))
                except requests.RequestException as exc:  # the baseline is lost, not the run
                    console.print(f"[red]direct POST to HAPI failed: {exc}[/]")
        mllp_direct = len(direct_oru_ms)  # these repeats are ours, not the pipeline's
        worker_hwm = vmhwm_mb(worker)
        hapi_memory = memory_mb(hapi.proc.pid if hapi.proc else None)

        outage: dict[str, Any] | None = None
        if args.outage and during:
            console.print(
                f"{', '.join(sorted(down))} down for {args.outage:.0f} s, {len(during)} studies sent…"
            )
            if "pacs" in down:
                orthanc.stop()
            if "ris" in down:
                mllp.stop()
            if "fhir" in down:
                hapi.stop()
            down_at = time.monotonic()
            for m in during:
                fhir.watch(m.accession)
                rcs += send(m, port)
            while time.monotonic() - down_at < args.outage:
                w.poll()
                time.sleep(0.5)
            if "pacs" in down:
                orthanc.start()
            if "ris" in down:
                mllp.start()
            if "fhir" in down:
                with console.status("starting the HAPI FHIR server again…"):
                    hapi.start()  # the same port and H2 file: what it stored is still there
                hapi_start_s.append(round(hapi.started_in_s, 1))
            back_after_s = time.monotonic() - down_at
            console.print(f"…back up after {back_after_s:.0f} s")
            wait_delivered(during, w, peers, args.timeout + 120)
            replayed = 0
            if any(x.get("stage") == "ehr-fhir" for m in during for x in w.dead(m.study_uid)):
                # Past the deadline: the reports were dead-lettered; the operator's replay.
                replayed = replay_fhir(settings)
                console.print(f"replayed {replayed} ehr-fhir dead letters")
                deadline = time.monotonic() + args.timeout
                while time.monotonic() < deadline and not all(m.accession in fhir.found for m in during):
                    w.poll()
                    time.sleep(0.5)
                w.poll()
            outage_results = [collect(m, "outage", w, peers) for m in during]
            outage = {
                "seconds_down": args.outage,
                "peers_down": sorted(down),
                "back_after_s": round(back_after_s, 1),
                "fhir_retry_deadline_s": settings.ehr.fhir.retry_deadline_s if settings.ehr.fhir else None,
                "studies": len(during),
                "orus_per_study": [d.orus for d in outage_results],
                "oru_repeats": sum(d.oru_repeats for d in outage_results),
                "srs_in_pacs_per_study": [d.srs_in_pacs for d in outage_results],
                "fhir_reports_per_finding": [d.fhir_reports_per_finding for d in outage_results],
                "fhir_stored_events_per_study": [d.fhir_stored_events for d in outage_results],
                "fhir_dead_letters": fhir_dead_letters(outage_results),
                "fhir_replayed": replayed,
                "lost": sum(1 for d in outage_results if not (d.orus and d.srs_in_pacs and _one_each(d))),
                "fhir_missing": sum(n == 0 for d in outage_results for n in d.fhir_reports_per_finding)
                + sum(not d.fhir_reports_per_finding for d in outage_results),
                "fhir_doubled": sum(n > 1 for d in outage_results for n in d.fhir_reports_per_finding),
                "ready_to_alert_ms": stats([d.ready_to_alert_ms for d in outage_results]),
                "ready_to_oru_ms": stats([d.ready_to_oru_ms for d in outage_results]),
                "ready_to_sr_stored_ms": stats([d.ready_to_sr_stored_ms for d in outage_results]),
                "ready_to_fhir_readable_ms": stats([d.ready_to_fhir_readable_ms for d in outage_results]),
                "samples": [asdict(d) for d in outage_results],
            }  # fmt: skip
            results += outage_results
        all_controls = Counter(control_id(msg) for _, msg in mllp.arrivals)
        fhir_search_ms = stats([*fhir.search_ms])
        fhir_total = reports_total(hapi.base_url)
        # Before the studies' temporary folder goes with the stack.
        files = measured[0].files() if measured else []
        study_bytes = sum(p.stat().st_size for p in files)

    normal = [d for d in results if d.phase == "normal"]

    def p50(xs: list[float | None]) -> float | None:
        return stats(xs)["p50"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if not (a and b) else round(a / b, 2)

    f2o, f2s = p50([d.finding_to_oru_ms for d in normal]), p50([d.finding_to_sr_stored_ms for d in normal])
    f2f = p50([d.finding_to_fhir_stored_ms for d in normal])
    d_oru, d_sr, d_fhir = p50([*direct_oru_ms]), p50([*direct_sr_ms]), p50([*direct_fhir_ms])
    per_finding = [n for d in normal for n in d.fhir_reports_per_finding]
    findings_of = [d.fhir_reports_per_finding for d in normal]
    result: dict[str, Any] = {
        "benchmark": "delivery",
        "at": datetime.now(UTC).isoformat(),
        "commit": commit,
        "config": {"studies": len(measured), "thin": args.thin, "axial": args.axial, "bone": args.bone,
                   "outage_s": args.outage, "during": len(during) if args.outage else 0,
                   "fhir_poll_interval_s": POLL_INTERVAL_S},
        "study_files": {"per_study": len(files), "bytes_per_study": study_bytes},
        "storescu_failures": sum(1 for rc in rcs if rc),
        "ready_to_alert_ms": stats([d.ready_to_alert_ms for d in normal]),
        "ready_to_webhook_received_ms": stats([d.ready_to_webhook_ms for d in normal]),
        "ready_to_oru_received_ms": stats([d.ready_to_oru_ms for d in normal]),
        "alert_to_webhook_received_ms": stats([d.alert_to_webhook_ms for d in normal]),
        "alert_to_notify_opened_ms": stats([d.alert_to_notify_opened_ms for d in normal]),
        "notify_opened_to_webhook_received_ms": stats([d.notify_opened_to_webhook_ms for d in normal]),
        "ready_to_sr_stored_ms": stats([d.ready_to_sr_stored_ms for d in normal]),
        "ready_to_fhir_readable_ms": stats([d.ready_to_fhir_readable_ms for d in normal]),
        "fhir_poll_window_ms": stats([d.fhir_poll_window_ms for d in normal]),
        "fhir_search_ms": fhir_search_ms,
        "ready_to_fhir_last_updated_ms": stats([d.ready_to_fhir_last_updated_ms for d in normal]),
        "ready_to_fhir_stored_audit_ms": stats([d.ready_to_fhir_stored_ms for d in normal]),
        "finding_to_oru_received_ms": stats([d.finding_to_oru_ms for d in normal]),
        "finding_to_sr_stored_ms": stats([d.finding_to_sr_stored_ms for d in normal]),
        "finding_to_fhir_stored_ms": stats([d.finding_to_fhir_stored_ms for d in normal]),
        "peer_direct_mllp_send_ms": stats([*direct_oru_ms]),
        "peer_direct_c_store_ms": stats([*direct_sr_ms]),
        "peer_direct_fhir_transaction_ms": stats([*direct_fhir_ms]),
        "ratios_p50": {
            "finding_to_oru_over_direct_mllp": ratio(f2o, d_oru),
            "finding_to_sr_over_direct_c_store": ratio(f2s, d_sr),
            "finding_to_fhir_stored_over_direct_post": ratio(f2f, d_fhir),
        },
        "counts": {
            "alerts_per_study": sorted(Counter(d.alerts for d in normal).items()),
            "webhooks_per_study": sorted(Counter(d.webhooks for d in normal).items()),
            "orus_per_study": sorted(Counter(d.orus for d in normal).items()),
            "srs_in_pacs_per_study": sorted(Counter(d.srs_in_pacs for d in normal).items()),
            "fhir_reports_per_finding": sorted(Counter(per_finding).items()),
            "fhir_findings_per_study": sorted(Counter(map(len, findings_of)).items()),
            "fhir_stored_events_per_study": sorted(Counter(d.fhir_stored_events for d in normal).items()),
            "diagnostic_reports_on_server": fhir_total,
            "oru_msh10_repeats_by_radtriage": sum(n - 1 for n in all_controls.values()) - mllp_direct,
            "webhook_duplicates": len(hooks.duplicates),
            "dead_letters": sum(len(d.dead_letters) for d in results),
        },
        "worker_vmhwm_mb": worker_hwm,
        "hapi": {"memory": hapi_memory, "heap": "-Xmx384m", "started_in_s": hapi_start_s},
        "outage": outage,
        "samples": [asdict(d) for d in normal],
    }  # fmt: skip
    write_json(out_path, result)
    print_report(result)
    console.print(f"wrote {out_path}")


def fhir_dead_letters(results: list[Delivered]) -> int:
    return sum(x.startswith("ehr-fhir") for d in results for x in d.dead_letters)


def _one_each(d: Delivered) -> bool:
    return bool(d.fhir_reports_per_finding) and all(n == 1 for n in d.fhir_reports_per_finding)


def reports_total(base_url: str) -> int | None:
    """Every DiagnosticReport on the server (the bench's direct POSTs included)."""
    try:
        answer = requests.get(
            f"{base_url}/DiagnosticReport", params={"_summary": "count"}, headers=NO_CACHE, timeout=30
        )
        return int(answer.json()["total"])
    except (requests.RequestException, KeyError, ValueError):
        return None


def print_report(r: dict[str, Any]) -> None:
    table = Table(title=f"delivery of {r['config']['studies']} real-shaped bleed head CTs ({r['commit']})")
    for col in ("from study ready to", "n", "p50 ms", "p99 ms"):
        table.add_column(col)
    for label, key in (
        ("alert (baseline)", "ready_to_alert_ms"),
        ("webhook received", "ready_to_webhook_received_ms"),
        ("ORU received", "ready_to_oru_received_ms"),
        ("SR stored in PACS", "ready_to_sr_stored_ms"),
        ("FHIR report stored (audit)", "ready_to_fhir_stored_audit_ms"),
        ("FHIR report lastUpdated", "ready_to_fhir_last_updated_ms"),
        ("FHIR report readable (search)", "ready_to_fhir_readable_ms"),
    ):
        s = r[key]
        table.add_row(label, str(s["n"]), _fmt(s["p50"]), _fmt(s["p99"]))
    console.print(table)
    a2w, a2o, o2w = (r[k] for k in ("alert_to_webhook_received_ms", "alert_to_notify_opened_ms",
                                    "notify_opened_to_webhook_received_ms"))  # fmt: skip
    console.print(
        f"the notify stage's share, p50 / p99: alert -> webhook {_fmt(a2w['p50'])} / {_fmt(a2w['p99'])} ms "
        f"(alert -> stage {_fmt(a2o['p50'])} / {_fmt(a2o['p99'])}, stage -> webhook "
        f"{_fmt(o2w['p50'])} / {_fmt(o2w['p99'])})"
    )
    console.print(
        f"ratios (p50): {r['ratios_p50']}; counts: {r['counts']}; worker VmHWM {r['worker_vmhwm_mb']} MB; "
        f"HAPI {r['hapi']}"
    )
    if r["outage"]:
        o = r["outage"]
        console.print(
            f"outage {o['seconds_down']:.0f} s ({o['peers_down']}): lost {o['lost']}, ORU repeats "
            f"{o['oru_repeats']}, FHIR reports per finding {o['fhir_reports_per_finding']} (missing "
            f"{o['fhir_missing']}, doubled {o['fhir_doubled']}, dead letters {o['fhir_dead_letters']}, "
            f"replayed {o['fhir_replayed']}), alert p50 {_fmt(o['ready_to_alert_ms']['p50'])} ms during it"
        )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


if __name__ == "__main__":
    main()
