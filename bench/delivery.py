"""Where a real-shaped bleed study's results go, and how fast: the alert, the on-call
webhook (issue 19), the HL7 ORU at the RIS/EHR (issue 20) and the TID 1500 SR in the PACS
(issue 18), from the same studies in the same run, with the peers' own cost as baselines.

    python -m bench.delivery --studies 20 --lock /tmp/radtriage-heavy.lock
    python -m bench.delivery --studies 4 --thin 48 --bone 24          # a quick look
    python -m bench.delivery --studies 20 --outage 120 --during 4     # the peers down 2 min

Each study is a head CT as a scanner sends it (models/realistic_study.py: scout, 5 mm,
0.625 mm and bone-kernel recons of 512 x 512, a dose SR), sent one association per series;
studies alternate between ascending explicit-VR files from one vendor and descending
JPEG-LS files from another. The studies are written before the lock is taken.

The stack is `radtriage up`'s on free ports (Kafka, Triton, worker, listeners), configured
with three real peers of our own: a JSON webhook receiver that verifies the HMAC
(tests/support/notify_peers.py), an MLLP receiver answering with python-hl7's ACK
(tests/support/mllp_receiver.py) and Debian's Orthanc as the PACS (tests/support/orthanc.py).

Measured per study, on one clock (one machine), from the study's `ready_at`:
- the alert (its `alerted_at`): the baseline every delivery is compared with;
- the webhook received, the ORU received by the MLLP peer (it answers at once), the SR
  stored in Orthanc (the pacs-export stage's `sr_stored` audit time, after Orthanc's
  C-STORE response; the SR is then looked up in Orthanc's REST API);
- counts: alerts, webhooks, ORUs (and repeated MSH-10s), SRs in Orthanc, dead letters.
Peers in the same run: the same ORU text sent straight to the MLLP peer over a fresh
connection, and the same SR C-STOREd straight to Orthanc over a fresh association
(pynetdicom), against radtriage's finding -> ORU received and finding -> SR stored.
Memory: the worker's VmHWM at the end (the delivery stages run in it).

With `--outage S`: Orthanc and the MLLP peer stop, `--during` studies are sent, both come
back S seconds after they stopped on the same ports; every ORU and SR must then arrive
exactly once, and the alerts of the studies sent during the outage are timed as above (a
PACS or RIS outage must not delay the alert). JSON to bench/results/delivery-<UTC>.json.
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
from rich.console import Console
from rich.table import Table

from bench.lanes import own_stack_settings
from bench.notify import stats as _stats
from bench.realistic_study import PER_SERIES, Watcher, _git_commit, _status_kb, storescu, worker_pid
from models.realistic_study import StudyManifest, write_realistic_head_study
from radtriage.mllp_framing import Frame, FrameDecoder, frame
from radtriage.settings import REPO_ROOT, DicomDestination, EhrHl7Settings, Settings, WebhookTarget
from tests.support.mllp_receiver import MllpReceiver
from tests.support.notify_peers import webhook_receiver
from tests.support.orthanc import Orthanc

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
    dead_letters: list[str] = field(default_factory=list)
    ready_to_alert_ms: float | None = None
    ready_to_webhook_ms: float | None = None
    ready_to_oru_ms: float | None = None
    ready_to_sr_stored_ms: float | None = None
    finding_to_oru_ms: float | None = None
    finding_to_sr_stored_ms: float | None = None

    @property
    def complete(self) -> bool:
        return bool(self.alerts and self.webhooks and self.orus and self.srs_in_pacs)


def stats(xs: list[float | None]) -> dict[str, float | None]:
    """n, p50, p99 (nearest rank), min, max of what was measured (None: not measured)."""
    vals = [x for x in xs if x is not None]
    return dict(_stats(vals)) if vals else {"n": 0, "p50": None, "p99": None, "min": None, "max": None}


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def srs_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    """Orthanc ids of the study's SR instances (the dose SR is never sent to it: only ours)."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
    found = orthanc.rest("POST", "/tools/find", query)
    return [str(i) for i in found]


def collect(
    m: StudyManifest, phase: str, w: Watcher, hooks: Any, mllp: TimedMllp, orthanc: Orthanc
) -> Delivered:
    uid, t = m.study_uid, w.t
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
    d.dead_letters = [f"{x.get('stage')}: {str(x.get('error'))[:160]}" for x in w.dead(uid)]
    if not alerts:
        return d
    ready = _ts(alerts[0]["ready_at"])
    d.ready_to_alert_ms = (_ts(alerts[0]["alerted_at"]) - ready) * 1000
    if hooks_of:
        d.ready_to_webhook_ms = (min(r.at for r in hooks_of) - ready) * 1000
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


def wait_delivered(
    ms: list[StudyManifest], w: Watcher, hooks: Any, mllp: TimedMllp, orthanc: Orthanc, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {m.study_uid: m for m in ms}
    while pending and time.monotonic() < deadline:
        w.poll()
        for uid, m in list(pending.items()):
            if w.dead(uid) or collect(m, "", w, hooks, mllp, orthanc).complete:
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
    return None if pid is None else round(_status_kb(pid, "VmHWM") / 1024, 1)


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


def configure(settings: Settings, hook_url: str, mllp_port: int, orthanc: Orthanc, outage_s: float) -> None:
    settings.telemetry.exporter = "none"
    settings.notify.webhooks = [WebhookTarget(name="ed", url=hook_url, secret=SECRET)]  # type: ignore[arg-type]
    deadline = max(600.0, outage_s * 3)
    settings.ehr.hl7 = EhrHl7Settings(host="127.0.0.1", port=mllp_port, deadline_s=deadline, retry_max_s=5.0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20, help="measured studies (after one warm-up)")
    ap.add_argument("--thin", type=int, default=240, help="0.625 mm slices (a scanner: 240)")
    ap.add_argument("--axial", type=int, default=32, help="5 mm slices")
    ap.add_argument("--bone", type=int, default=120, help="1.25 mm bone-kernel slices")
    ap.add_argument("--outage", type=float, default=0.0, help="seconds the PACS and RIS are down (0: none)")
    ap.add_argument("--during", type=int, default=4, help="studies sent while they are down")
    ap.add_argument("--timeout", type=float, default=300.0, help="per study, for every delivery")
    ap.add_argument("--lock", type=Path, default=None, help="flock to take after writing the studies")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out_path = (
        args.json or REPO_ROOT / "bench" / "results" / f"delivery-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )

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

        hooks = stack.enter_context(webhook_receiver(SECRET))
        mllp = TimedMllp()
        mllp.start()
        stack.callback(mllp.stop)
        (tmp / "orthanc").mkdir()
        orthanc = Orthanc(tmp / "orthanc", aet=ORTHANC_AET)
        orthanc.start()
        stack.callback(orthanc.stop)
        settings = own_stack_settings(tmp / "home")
        configure(settings, hooks.url("/ed"), mllp.port, orthanc, args.outage)
        stack.enter_context(running_stack(settings))
        worker = worker_pid(os.getpid())
        w = Watcher(settings, extra_topics=[settings.topics.audit])
        stack.callback(w.close)
        port = settings.dicom.port

        console.print("warm-up study…")
        send(warm, port)
        wait_delivered([warm], w, hooks, mllp, orthanc, args.timeout)
        results: list[Delivered] = []
        partial = out_path.with_suffix(".partial.jsonl")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        direct_oru_ms: list[float] = []
        direct_sr_ms: list[float] = []
        rcs: list[int] = []
        for i, m in enumerate(measured):
            rcs += send(m, port)
            wait_delivered([m], w, hooks, mllp, orthanc, args.timeout)
            d = collect(m, "normal", w, hooks, mllp, orthanc)
            results.append(d)
            # One line per study as it is measured: a run that dies later keeps its data.
            with partial.open("a") as fh:
                fh.write(json.dumps(asdict(d)) + "\n")
            console.print(
                f"study {i + 1}/{len(measured)}: alert {_fmt(d.ready_to_alert_ms)}, "
                f"webhook {_fmt(d.ready_to_webhook_ms)}, ORU {_fmt(d.ready_to_oru_ms)}, "
                f"SR {_fmt(d.ready_to_sr_stored_ms)} ms after ready"
            )
            # The peers' own cost for the same objects, in the same run.
            orus = mllp.of(m.accession)
            if orus:
                direct_oru_ms.append(direct_oru(mllp.port, orus[0][1]))
            ids = srs_in_orthanc(orthanc, m.study_uid)
            if ids:
                direct_sr_ms.append(direct_sr(orthanc, ids[0], tmp))
        mllp_direct = len(direct_oru_ms)  # these repeats are ours, not the pipeline's

        outage: dict[str, Any] | None = None
        if args.outage and during:
            console.print(f"PACS and RIS down for {args.outage:.0f} s, {len(during)} studies sent…")
            orthanc.stop()
            mllp.stop()
            down_at = time.monotonic()
            for m in during:
                rcs += send(m, port)
            while time.monotonic() - down_at < args.outage:
                w.poll()
                time.sleep(0.5)
            orthanc.start()
            mllp.start()
            console.print("…back up")
            wait_delivered(during, w, hooks, mllp, orthanc, args.timeout + 120)
            outage_results = [collect(m, "outage", w, hooks, mllp, orthanc) for m in during]
            outage = {
                "seconds_down": args.outage,
                "studies": len(during),
                "orus_per_study": [d.orus for d in outage_results],
                "oru_repeats": sum(d.oru_repeats for d in outage_results),
                "srs_in_pacs_per_study": [d.srs_in_pacs for d in outage_results],
                "lost": sum(1 for d in outage_results if not (d.orus and d.srs_in_pacs)),
                "ready_to_alert_ms": stats([d.ready_to_alert_ms for d in outage_results]),
                "ready_to_oru_ms": stats([d.ready_to_oru_ms for d in outage_results]),
                "ready_to_sr_stored_ms": stats([d.ready_to_sr_stored_ms for d in outage_results]),
                "samples": [asdict(d) for d in outage_results],
            }
            results += outage_results
        worker_hwm = vmhwm_mb(worker)
        all_controls = Counter(control_id(msg) for _, msg in mllp.arrivals)
        # Before the studies' temporary folder goes with the stack.
        files = measured[0].files() if measured else []
        study_bytes = sum(p.stat().st_size for p in files)

    normal = [d for d in results if d.phase == "normal"]

    def p50(xs: list[float | None]) -> float | None:
        return stats(xs)["p50"]

    f2o, f2s = p50([d.finding_to_oru_ms for d in normal]), p50([d.finding_to_sr_stored_ms for d in normal])
    d_oru, d_sr = p50([*direct_oru_ms]), p50([*direct_sr_ms])
    result: dict[str, Any] = {
        "benchmark": "delivery",
        "at": datetime.now(UTC).isoformat(),
        "commit": commit,
        "config": {"studies": len(measured), "thin": args.thin, "axial": args.axial, "bone": args.bone,
                   "outage_s": args.outage, "during": len(during) if args.outage else 0},
        "study_files": {"per_study": len(files), "bytes_per_study": study_bytes},
        "storescu_failures": sum(1 for rc in rcs if rc),
        "ready_to_alert_ms": stats([d.ready_to_alert_ms for d in normal]),
        "ready_to_webhook_received_ms": stats([d.ready_to_webhook_ms for d in normal]),
        "ready_to_oru_received_ms": stats([d.ready_to_oru_ms for d in normal]),
        "ready_to_sr_stored_ms": stats([d.ready_to_sr_stored_ms for d in normal]),
        "finding_to_oru_received_ms": stats([d.finding_to_oru_ms for d in normal]),
        "finding_to_sr_stored_ms": stats([d.finding_to_sr_stored_ms for d in normal]),
        "peer_direct_mllp_send_ms": stats([*direct_oru_ms]),
        "peer_direct_c_store_ms": stats([*direct_sr_ms]),
        "ratios_p50": {
            "finding_to_oru_over_direct_mllp": None if not (f2o and d_oru) else round(f2o / d_oru, 2),
            "finding_to_sr_over_direct_c_store": None if not (f2s and d_sr) else round(f2s / d_sr, 2),
        },
        "counts": {
            "alerts_per_study": sorted(Counter(d.alerts for d in normal).items()),
            "webhooks_per_study": sorted(Counter(d.webhooks for d in normal).items()),
            "orus_per_study": sorted(Counter(d.orus for d in normal).items()),
            "srs_in_pacs_per_study": sorted(Counter(d.srs_in_pacs for d in normal).items()),
            "oru_msh10_repeats_by_radtriage": sum(n - 1 for n in all_controls.values()) - mllp_direct,
            "webhook_duplicates": len(hooks.duplicates),
            "dead_letters": sum(len(d.dead_letters) for d in results),
        },
        "worker_vmhwm_mb": worker_hwm,
        "outage": outage,
        "samples": [asdict(d) for d in normal],
    }  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result)
    console.print(f"wrote {out_path}")


def print_report(r: dict[str, Any]) -> None:
    table = Table(title=f"delivery of {r['config']['studies']} real-shaped bleed head CTs ({r['commit']})")
    for col in ("from study ready to", "n", "p50 ms", "p99 ms"):
        table.add_column(col)
    for label, key in (
        ("alert (baseline)", "ready_to_alert_ms"),
        ("webhook received", "ready_to_webhook_received_ms"),
        ("ORU received", "ready_to_oru_received_ms"),
        ("SR stored in PACS", "ready_to_sr_stored_ms"),
    ):
        s = r[key]
        table.add_row(label, str(s["n"]), _fmt(s["p50"]), _fmt(s["p99"]))
    console.print(table)
    console.print(
        f"ratios (p50): {r['ratios_p50']}; counts: {r['counts']}; worker VmHWM {r['worker_vmhwm_mb']} MB"
    )
    if r["outage"]:
        o = r["outage"]
        console.print(
            f"outage {o['seconds_down']:.0f} s: lost {o['lost']}, ORU repeats {o['oru_repeats']}, "
            f"alert p50 {_fmt(o['ready_to_alert_ms']['p50'])} ms during it"
        )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


if __name__ == "__main__":
    main()
