"""Real-shaped studies end to end (issue 16): what a full head CT as a scanner sends it
costs, against its 5 mm series alone, measured in the same run.

    python -m bench.realistic_study                    # starts its own stack on free ports
    python -m bench.realistic_study --runs 3 --json bench/results/realistic.json
    python -m bench.realistic_study --thin 48 --bone 24 --concurrent 2   # a quick look
    python -m bench.realistic_study --lock /tmp/radtriage-heavy.lock     # write, then wait for the lock

Cases, alternating within each run (each run a fresh bleed phantom, new UIDs per case):
  full_one_association  scout + 5 mm x 32 + 0.625 mm x 240 + bone 1.25 mm x 120 + dose SR
                        (512 x 512), every file in one storescu call, in the order a
                        scanner makes them (SR last: storescu stops at the first refused
                        C-STORE, so an SR sent first and refused would stop the images
                        too; tests/e2e/test_realistic_study.py sends it first to check
                        that it is accepted);
  full_per_series       the same study, one storescu call per series (scout, 5 mm, thin,
                        bone, SR: the order a scanner reconstructs and sends them);
  axial_5mm_alone       the same bleed as its 5 mm series alone: the baseline.
Then `--concurrent` (5) full bleed studies at once, one association each: no OOM, no dead
letter, each alerted once.

Measured, per study, from the events' own timestamps on Kafka (as bench/latency.py):
study ready -> ICH alert (the alert's ready_at -> alerted_at), first instance received ->
alert, and scan start -> alert (the bench's wall clock when the first storescu started ->
alerted_at; one machine, one clock); alerts per study (must be 1), dead letters, findings
and the series they read; and the peak resident memory of the worker's preprocessing
processes (its multiprocessing children), sampled from /proc every 100 ms during the
case (psutil is not a dependency), plus each process's VmHWM at the end. The studies are
all written before the stack starts, so writing them does not compete with the pipeline
for the two cores. JSON to --json (default bench/results/realistic_study-<UTC>.json),
a table on stdout, and the full-study / 5 mm-alone p50 ratios.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer
from rich.console import Console
from rich.table import Table

from bench.kafka_read import read_from_end
from bench.lanes import own_stack_settings
from bench.output import stamped_path, write_json
from bench.proc_status import children, cmdline, status_kb
from bench.summary import spread_measured
from models.realistic_study import ALL_KINDS, SeriesKind, StudyManifest, write_realistic_head_study
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import REPO_ROOT, Settings
from schemas.base import EventDecodeError
from schemas.results import read_result
from tests.support.dicom import dcmtk_tool

# Wide enough for the result table when stdout is a log file, not a terminal (rich: 80).
console = Console(width=int(os.environ.get("COLUMNS", "160")))

CASES = ("full_one_association", "full_per_series", "axial_5mm_alone")
ONE_ASSOCIATION: list[list[SeriesKind]] = [["scout", "axial", "thin", "bone", "dose_sr"]]
PER_SERIES: list[list[SeriesKind]] = [["scout"], ["axial"], ["thin"], ["bone"], ["dose_sr"]]
AXIAL_ONLY: list[list[SeriesKind]] = [["axial"]]
# The assembly quiet period (streams.assembly_quiet_s, 10 s) plus ample margin.
NO_STUDY_GIVE_UP_S = 60.0


def stats(xs: Sequence[float | None]) -> dict[str, float | None]:
    return spread_measured(xs, tail=0.95)


# --- the worker's preprocessing processes, from /proc ------------------------------------


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def worker_pid(root: int) -> int | None:
    """The Faust worker (`radtriage.cli worker`) among `root`'s descendants."""
    kids = children()
    todo, seen = [root], set()
    while todo:
        for pid in kids.get(todo.pop(), []):
            if pid in seen:
                continue
            seen.add(pid)
            argv = cmdline(pid)
            if "radtriage.cli" in argv and argv[argv.index("radtriage.cli") + 1 :][:1] == ["worker"]:
                return pid
            todo.append(pid)
    return None


def pool_pids(worker: int) -> list[int]:
    """The worker's preprocessing pool processes (multiprocessing children; the resource
    tracker is one too, but holds no pixels)."""
    out = []
    todo = [worker]
    kids = children()
    while todo:
        for pid in kids.get(todo.pop(), []):
            argv = " ".join(cmdline(pid))
            if "multiprocessing" in argv and "resource_tracker" not in argv:
                out.append(pid)
            todo.append(pid)
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def wait_idle(worker: int | None, w: Watcher, quiet_s: float = 4.0, cap_s: float = 240.0) -> float:
    """Poll Kafka until the worker and its pool used under 10 % of a core for `quiet_s`
    (or `cap_s` passed); returns how long that took, in ms."""
    start = time.monotonic()
    if worker is None:
        return 0.0

    def cpu() -> float:
        return _cpu_s(worker) + sum(_cpu_s(p) for p in pool_pids(worker))

    last, quiet_since = cpu(), time.monotonic()
    while time.monotonic() - start < cap_s:
        w.poll(timeout_ms=1000)
        now = cpu()
        if now - last > 0.1:  # more than 10 % of a core over the last second
            quiet_since = time.monotonic()
        last = now
        if time.monotonic() - quiet_since >= quiet_s:
            break
    return (time.monotonic() - start) * 1000


class RssSampler:
    """Peak RSS of the worker's pool processes while a case runs (sum and largest one)."""

    def __init__(self, worker: int | None, interval_s: float = 0.1) -> None:
        self.worker = worker
        self.interval_s = interval_s
        self.peak_sum_kb = 0
        self.peak_one_kb = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.worker is not None:
                pids = pool_pids(self.worker)
                self.pids |= set(pids)
                rss = [status_kb("VmRSS", p) for p in pids]
                self.peak_sum_kb = max(self.peak_sum_kb, sum(rss))
                self.peak_one_kb = max([self.peak_one_kb, *rss])
            self._stop.wait(self.interval_s)

    def result(self) -> dict[str, Any]:
        alive = [p for p in self.pids if Path(f"/proc/{p}").exists()]
        return {
            "pool_peak_rss_sum_mb": round(self.peak_sum_kb / 1024, 1),
            "pool_peak_rss_one_mb": round(self.peak_one_kb / 1024, 1),
            # VmHWM: each process's high-water mark since it started (not only this case).
            "pool_vmhwm_mb": {str(p): round(status_kb("VmHWM", p) / 1024, 1) for p in alive},
            "pool_processes_seen": len(self.pids),
            "pool_processes_gone": len(self.pids) - len(alive),
        }


# --- outputs on Kafka ----------------------------------------------------------------------


class Watcher:
    """Reads the outputs from 'now' on and files them under their study UID."""

    def __init__(self, settings: Settings, extra_topics: Sequence[str] = ()) -> None:
        t = settings.topics
        # The head CT's alerts: the channel of the model the realistic study is routed to.
        self.alerts = t.alert_topic("ich")
        self.topics = [t.studies, t.findings, t.results_fhir, self.alerts, t.deadletter, *extra_topics]
        self.t = t
        self.consumer = KafkaConsumer(
            enable_auto_commit=False, group_id=None, **kafka_python_kwargs(settings.kafka)
        )
        read_from_end(self.consumer, self.topics)
        self.seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.unkeyed_dead: list[dict[str, Any]] = []

    def poll(self, timeout_ms: int = 200) -> None:
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for r in records:
                try:
                    # The results topic: a plain Bundle, its study and finding in headers.
                    data = (
                        read_result(r.value, r.headers or ()).fields()
                        if r.topic == self.t.results_fhir
                        else json.loads(r.value)
                    )
                except (EventDecodeError, ValueError, TypeError):
                    continue
                uid = data.get("study_uid") or ""
                if r.topic == self.t.deadletter and not uid:
                    self.unkeyed_dead.append(data)
                self.seen.setdefault(uid, []).append((r.topic, data))

    def of(self, topic: str, uid: str) -> list[dict[str, Any]]:
        return [d for t, d in self.seen.get(uid, []) if t == topic]

    def dead(self, uid: str) -> list[dict[str, Any]]:
        # Intake dead letters may not carry the study UID; their payload still names it.
        return self.of(self.t.deadletter, uid) + [
            d for d in self.unkeyed_dead if uid in str(d.get("payload", ""))
        ]

    def close(self) -> None:
        self.consumer.close()


def _ms(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() * 1000.0


@dataclass
class Sample:
    case: str
    run: int
    study_uid: str
    files: int
    bytes: int
    send_rcs: list[int] = field(default_factory=list)
    send_ms: float = 0.0
    ready_events: int = 0
    alerts: int = 0
    reports: int = 0
    dead_letters: list[str] = field(default_factory=list)
    # The series each finding read, as kind (#number description).
    finding_series: list[str] = field(default_factory=list)
    ready_to_alert_ms: float | None = None
    received_to_alert_ms: float | None = None
    scan_start_to_alert_ms: float | None = None
    last_send_to_alert_ms: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    # How long the pipeline kept working on the study after the grace period (amended reads).
    settle_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.alerts == 1 and not self.dead_letters and all(rc == 0 for rc in self.send_rcs)


def storescu(port: int, files: Sequence[Path], options: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """dcmtk's storescu sending `files` to the listener. `options`, e.g. `-xt`: storescu
    proposes only uncompressed syntaxes unless told, and cannot decompress JPEG-LS itself
    (each such C-STORE then fails, and storescu still exits 0)."""
    # dcmtk's, not the venv's pynetdicom app of the same name (first on PATH when activated).
    exe = dcmtk_tool("storescu")
    # TCP_NODELAY: without it dcmtk waits for a delayed ACK (~45 ms) on every C-STORE.
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.Popen(
        [exe, *options, "-aec", "RADTRIAGE", "-aet", "BENCH_REAL", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def _series_name(m: StudyManifest, uid: str) -> str:
    for s in m.series:
        if s.series_uid == uid:
            return f"{s.kind} (#{s.series_number} {s.description})"
    return f"? {uid}"


def _fill(sample: Sample, w: Watcher, m: StudyManifest, scan_start: datetime, sent_end: datetime) -> None:
    uid = m.study_uid
    t = w.t
    alerts = w.of(w.alerts, uid)
    sample.alerts = len(alerts)
    sample.reports = len(w.of(t.results_fhir, uid))
    sample.ready_events = len(w.of(t.studies, uid))
    sample.dead_letters = [f"{d.get('stage')}: {str(d.get('error'))[:200]}" for d in w.dead(uid)]
    sample.finding_series = [_series_name(m, d["series_uid"]) for d in w.of(t.findings, uid)]
    if alerts:
        a = alerts[0]
        sample.ready_to_alert_ms = _ms(a["ready_at"], a["alerted_at"])
        sample.received_to_alert_ms = _ms(a["received_at"], a["alerted_at"])
        sample.scan_start_to_alert_ms = _ms(scan_start.isoformat(), a["alerted_at"])
        sample.last_send_to_alert_ms = _ms(sent_end.isoformat(), a["alerted_at"])


def run_case(
    case: str,
    run: int,
    m: StudyManifest,
    sends: list[list[SeriesKind]],
    port: int,
    w: Watcher,
    worker: int | None,
    timeout_s: float,
    grace_s: float,
) -> Sample:
    files = m.files()
    sample = Sample(case, run, m.study_uid, len(files), sum(f.stat().st_size for f in files))
    with RssSampler(worker) as rss:
        scan_start = datetime.now(UTC)
        t0 = time.monotonic()
        for kinds in sends:
            proc = storescu(port, m.files(kinds))
            _out, err = proc.communicate(timeout=600)
            sample.send_rcs.append(proc.returncode)
            if proc.returncode:
                console.print(
                    f"[red]{case} run {run}: storescu {kinds} exited {proc.returncode}[/] {err[-300:]!r}"
                )
        sample.send_ms = (time.monotonic() - t0) * 1000
        sent_end = datetime.now(UTC)
        deadline = time.monotonic() + timeout_s
        # No study-ready event this long after the last send: nothing was assembled (every
        # C-STORE refused), so no outcome will come; waiting out the timeout measures nothing.
        no_study_by = time.monotonic() + NO_STUDY_GIVE_UP_S
        uid = m.study_uid
        while time.monotonic() < deadline and not (w.of(w.alerts, uid) or w.dead(uid)):
            if time.monotonic() > no_study_by and not w.of(w.t.studies, uid):
                console.print(
                    f"[red]{case} run {run}: no study ready {NO_STUDY_GIVE_UP_S:.0f} s after the send[/]"
                )
                break
            w.poll()
        end = time.monotonic() + grace_s  # a second alert or a late dead letter shows up now
        while time.monotonic() < end:
            w.poll()
        # A study sent per series is read again when a later series is preferred (an
        # amendment) well after its alert; that read must be counted here and must not run
        # into the next case's timing. Wait until the worker and its pool are idle.
        settle_ms = wait_idle(worker, w)
    sample.settle_ms = settle_ms
    sample.memory = rss.result()
    _fill(sample, w, m, scan_start, sent_end)
    return sample


def run_concurrent(
    studies: list[StudyManifest], port: int, w: Watcher, worker: int | None, timeout_s: float, grace_s: float
) -> dict[str, Any]:
    """Every study at once, one association each: the memory and queueing worst case."""
    with RssSampler(worker) as rss:
        scan_start = datetime.now(UTC)
        procs = [storescu(port, m.files(ONE_ASSOCIATION[0])) for m in studies]
        rcs = []
        for p in procs:
            p.communicate(timeout=900)  # reads its stderr: a full pipe would stall the sender
            rcs.append(p.returncode)
        sent_end = datetime.now(UTC)
        deadline = time.monotonic() + timeout_s
        no_study_by = time.monotonic() + NO_STUDY_GIVE_UP_S

        def settled(m: StudyManifest) -> bool:
            uid = m.study_uid
            if w.of(w.alerts, uid) or w.dead(uid):
                return True
            return time.monotonic() > no_study_by and not w.of(w.t.studies, uid)

        while time.monotonic() < deadline and not all(settled(m) for m in studies):
            w.poll()
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            w.poll()
        wait_idle(worker, w)
    samples = []
    for i, (m, rc) in enumerate(zip(studies, rcs, strict=True)):
        files = m.files()
        s = Sample("concurrent", i, m.study_uid, len(files), sum(f.stat().st_size for f in files), [rc])
        _fill(s, w, m, scan_start, sent_end)
        samples.append(s)
    return {
        "studies": len(studies),
        "all_alerted_once": all(s.alerts == 1 for s in samples),
        "dead_letters": sum(len(s.dead_letters) for s in samples),
        "storescu_rcs": rcs,
        "scan_start_to_alert_ms": stats([s.scan_start_to_alert_ms for s in samples]),
        "ready_to_alert_ms": stats([s.ready_to_alert_ms for s in samples]),
        "memory": rss.result(),
        "samples": [asdict(s) for s in samples],
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def _summary(samples: list[Sample]) -> dict[str, Any]:
    return {
        "runs": len(samples),
        "ok_runs": sum(s.ok for s in samples),
        "ready_to_alert_ms": stats([s.ready_to_alert_ms for s in samples]),
        "received_to_alert_ms": stats([s.received_to_alert_ms for s in samples]),
        "scan_start_to_alert_ms": stats([s.scan_start_to_alert_ms for s in samples]),
        "last_send_to_alert_ms": stats([s.last_send_to_alert_ms for s in samples]),
        "send_ms": stats([s.send_ms for s in samples]),
        "alerts_per_study": [s.alerts for s in samples],
        "ready_events_per_study": [s.ready_events for s in samples],
        "dead_letters": sum(len(s.dead_letters) for s in samples),
        "pool_peak_rss_sum_mb": stats([s.memory.get("pool_peak_rss_sum_mb") for s in samples]),
        "pool_peak_rss_one_mb": stats([s.memory.get("pool_peak_rss_one_mb") for s in samples]),
        "finding_series": sorted({x for s in samples for x in s.finding_series}),
    }


def _phys_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--thin", type=int, default=240, help="0.625 mm slices (a scanner: 240)")
    ap.add_argument("--axial", type=int, default=32, help="5 mm slices")
    ap.add_argument("--bone", type=int, default=120, help="1.25 mm bone-kernel slices")
    ap.add_argument("--concurrent", type=int, default=5, help="full studies sent at once (0: skip)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per study, after its last send")
    ap.add_argument("--grace", type=float, default=12.0, help="keep reading this long after an outcome")
    ap.add_argument("--running", action="store_true", help="use an already running stack")
    ap.add_argument("--json", type=Path, default=None, help="where to write the result")
    ap.add_argument(
        "--traces",
        action="store_true",
        help="keep the stack's span file (jsonl) for `radtriage trace`; printed at the end",
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where to write the studies (default: a temp dir)"
    )
    ap.add_argument(
        "--lock",
        type=Path,
        default=None,
        help="take this flock (/tmp/radtriage-heavy.lock) after writing the studies, before the stack starts",
    )
    args = ap.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    out_path = args.json or stamped_path(REPO_ROOT / "bench" / "results", "realistic_study")

    with ExitStack() as stack:
        tmp = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="radtriage-real-", dir=args.workdir))
        )
        plan: list[tuple[str, int, StudyManifest, list[list[SeriesKind]]]] = []
        started = time.monotonic()
        with console.status("writing studies…") as status:

            def write(name: str, seed: int, include: tuple[SeriesKind, ...] = ALL_KINDS) -> StudyManifest:
                status.update(f"writing {name}")
                return write_realistic_head_study(
                    tmp / name,
                    bleed=True,
                    rng=np.random.default_rng(seed),  # same seed: the same phantom, the same bleed
                    include=include,
                    axial_slices=args.axial,
                    thin_slices=args.thin,
                    bone_slices=args.bone,
                    accession=f"BR{seed % 10**6:06d}",
                    patient_id=f"BENCH-{seed}",
                )

            warm = write("warmup", 1000)
            for run in range(args.runs):
                seed = 2000 + run
                plan.append(("full_one_association", run, write(f"r{run}-one", seed), ONE_ASSOCIATION))
                plan.append(("full_per_series", run, write(f"r{run}-per", seed), PER_SERIES))
                plan.append(("axial_5mm_alone", run, write(f"r{run}-5mm", seed, ("axial",)), AXIAL_ONLY))
            crowd = [write(f"concurrent-{i}", 3000 + i) for i in range(args.concurrent)]
        console.print(f"wrote {len(plan) + 1 + len(crowd)} studies in {time.monotonic() - started:.0f} s")

        if args.lock is not None:
            # Writing the studies takes minutes of CPU but starts nothing shared: only the
            # stack and the measurement need the machine-wide lock.
            lock = stack.enter_context(args.lock.open("a"))
            with console.status(f"waiting for {args.lock}…"):
                fcntl.flock(lock, fcntl.LOCK_EX)
            console.print(f"holding {args.lock}")
        settings = Settings()
        if not args.running:
            from radtriage.up import running_stack

            settings = own_stack_settings(tmp / "home")
            # Spans cost a little CPU per stage: off unless asked for (to see where time goes).
            settings.telemetry.exporter = "jsonl" if args.traces else "none"
            stack.enter_context(running_stack(settings))
        worker = worker_pid(os.getpid())
        if worker is None:
            console.print("[yellow]no worker process among ours: pool memory is not measured[/]")
        w = Watcher(settings)
        stack.callback(w.close)
        port = settings.dicom.port

        # The first study after the stack says ready (issue 16: it must be as fast as a warm
        # one, since a worker says ready only once its lanes are warm): kept apart, compared
        # with the warm per-series p50 below, not counted in the cases.
        first = run_case("warmup", -1, warm, PER_SERIES, port, w, worker, args.timeout, args.grace)
        samples: list[Sample] = []
        partial = out_path.with_suffix(".partial.jsonl")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        for case, run, m, sends in plan:
            console.print(f"{case} run {run + 1}/{args.runs}…")
            s = run_case(case, run, m, sends, port, w, worker, args.timeout, args.grace)
            samples.append(s)
            # One line per case as it finishes: a run that dies later still leaves its data.
            with partial.open("a") as fh:
                fh.write(json.dumps(asdict(s), default=str) + "\n")
            console.print(
                f"  alerts {s.alerts}, ready→alert {s.ready_to_alert_ms}, "
                f"scan→alert {s.scan_start_to_alert_ms}, dead {len(s.dead_letters)}, "
                f"read {s.finding_series}, pool peak {s.memory.get('pool_peak_rss_sum_mb')} MB, "
                f"busy {s.settle_ms / 1000:.0f} s more"
            )
        concurrent = None
        if crowd:
            console.print(f"{len(crowd)} full studies at once…")
            concurrent = run_concurrent(crowd, port, w, worker, args.timeout * 2, args.grace)
        worker_alive = worker is not None and Path(f"/proc/{worker}").exists()
        if args.traces and settings.trace_file.exists():
            spans = out_path.with_suffix(".spans.jsonl")
            spans.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(settings.trace_file, spans)
            console.print(
                f"spans in {spans}: radtriage trace {warm.study_uid} --file {spans}  (the first study)"
            )
        worker_log = settings.home / "logs" / "worker.log"
        log_text = worker_log.read_text(errors="replace") if worker_log.exists() else ""
        trouble = [
            line
            for line in log_text.splitlines()
            if any(k in line for k in ("BrokenProcessPool", "MemoryError", "Killed"))
        ]

    by_case = {c: _summary([s for s in samples if s.case == c]) for c in CASES}
    base = by_case["axial_5mm_alone"]
    ratios = {
        f"{c}_over_axial_5mm_alone_p50": {
            k: _ratio(by_case[c][k]["p50"], base[k]["p50"])
            for k in ("ready_to_alert_ms", "scan_start_to_alert_ms")
        }
        for c in ("full_one_association", "full_per_series")
    }
    ratios["first_study_after_ready_over_warm_per_series_p50"] = {
        k: _ratio(getattr(first, k), by_case["full_per_series"][k]["p50"])
        for k in ("ready_to_alert_ms", "scan_start_to_alert_ms")
    }
    result: dict[str, Any] = {
        "benchmark": "realistic_study",
        "at": datetime.now(UTC).isoformat(),
        "commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "mem_gb": round(_phys_bytes() / 2**30, 1)},
        "config": {"runs": args.runs, "thin": args.thin, "axial": args.axial, "bone": args.bone,
                   "concurrent": args.concurrent, "timeout_s": args.timeout, "grace_s": args.grace},
        "cases": by_case,
        "ratios": ratios,
        "concurrent": concurrent,
        "first_study_after_ready": asdict(first),
        "worker_alive_at_end": worker_alive,
        "worker_log_trouble": trouble[:20],
        "samples": [asdict(s) for s in samples],
    }  # fmt: skip
    write_json(out_path, result)

    def f(v: float | int | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    table = Table(title=f"real-shaped head CT, {args.runs} run(s) per case ({result['commit']})")
    for col in (
        "case",
        "ok/runs",
        "ready→alert p50 ms",
        "scan start→alert p50 ms",
        "alerts/study",
        "dead",
        "pool peak MB",
        "series read",
    ):
        table.add_column(col)
    for c in CASES:
        b = by_case[c]
        table.add_row(
            c,
            f"{b['ok_runs']}/{b['runs']}",
            f(b["ready_to_alert_ms"]["p50"]),
            f(b["scan_start_to_alert_ms"]["p50"]),
            ",".join(map(str, b["alerts_per_study"])),
            str(b["dead_letters"]),
            f(b["pool_peak_rss_sum_mb"]["max"]),
            "; ".join(b["finding_series"]),
        )
    if concurrent is not None:
        table.add_row(
            f"{concurrent['studies']} at once",
            f"{sum(s['alerts'] == 1 and not s['dead_letters'] for s in concurrent['samples'])}"
            f"/{concurrent['studies']}",
            f(concurrent["ready_to_alert_ms"]["p50"]),
            f(concurrent["scan_start_to_alert_ms"]["p50"]),
            ",".join(str(s["alerts"]) for s in concurrent["samples"]),
            str(concurrent["dead_letters"]),
            f(concurrent["memory"]["pool_peak_rss_sum_mb"]),
            "; ".join(sorted({x for s in concurrent["samples"] for x in s["finding_series"]})),
        )
    console.print(table)
    for name, r in ratios.items():
        console.print(
            f"{name}: ready→alert {r['ready_to_alert_ms']}, scan start→alert {r['scan_start_to_alert_ms']}"
        )
    if trouble:
        console.print(f"[red]worker log: {len(trouble)} line(s) of pool trouble[/] e.g. {trouble[0][:200]}")
    console.print(f"worker alive at the end: {worker_alive}; wrote {out_path}")


if __name__ == "__main__":
    main()
