"""Scale-out benchmark: throughput of 1 vs N Faust workers in one consumer group.

    python -m bench.scale_out                        # 1 and 3 workers, 48 head CTs each
    python -m bench.scale_out --workers 1 2 3 --studies 60 --senders 3

One stack of our own on free ports (a local Kafka broker, Triton), then, for each worker
count, a fresh consumer group on fresh topics (`--partitions`, 6 by default, so that 3
workers get 2 partitions each). The same burst of routine head CTs (cached phantom
series re-stamped with fresh UIDs, half bleeds) is first C-STOREd through the DICOM SCP
into `imaging.instances` with no worker running — a backlog, as after an outage or a
morning batch — so the intake (one SCP process, which on this machine takes ~1
study/s) does not cap what the workers can do. Then the workers start; once the last
one is assigned its partitions (the group is stable) the clock starts: throughput =
reports produced after that moment / (last report - that moment), in studies per
minute, and the ratio is against the 1-worker run of the same invocation. Also
recorded: C-STORE acks, findings/reports/alerts per study (duplicates would show), and
CPU seconds per component during the drain, because on a 2-core machine more workers
share the same two cores: the ratio says how much of the stream work a single worker
left on the table, not how a cluster of machines scales. Writes JSON to
bench/results/scale-out-<timestamp>.json. Never run in tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.lane_stats import StudyTimes
from bench.lanes import (
    Collector,
    Template,
    c_store_retrying,
    cached_templates,
    own_stack_settings,
    restamp,
    start_services,
    wait_complete,
)
from bench.output import stamped_path, write_json
from bench.proc_cpu import delta, descendants_cpu
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import REPO_ROOT, Settings
from radtriage.stack.process import ServiceProcess, port_in_use
from radtriage.up import spawn
from radtriage.worker import ready_file

console = Console()
RESULTS = REPO_ROOT / "bench" / "results"


def run_settings(base: Settings, run: str, partitions: int) -> Settings:
    """`base` with its own app id (consumer group, tables) and topics for one run."""
    settings = base.model_copy(deep=True)
    settings.streams.app_id = f"radtriage-scale-{run}"
    settings.kafka.partitions = partitions
    for name in type(settings.topics).model_fields:
        setattr(settings.topics, name, f"{getattr(settings.topics, name)}.{run}")
    return settings


def start_scp(settings: Settings) -> ServiceProcess:
    ensure_topics(
        settings.kafka.bootstrap_servers,
        dict.fromkeys(settings.topics.all() + settings.streams.internal_topics(), settings.kafka.partitions),
        replication_factor=settings.kafka.replication_factor,
    )
    scp = spawn(f"dicom-scp-{settings.streams.app_id}", ["dicom-scp"], settings)
    scp.wait_until(lambda: port_in_use(settings.dicom.port), 30, "the DICOM port to open")
    return scp


def start_workers(settings: Settings, workers: int) -> tuple[list[ServiceProcess], datetime]:
    """Start the workers; returns them and the moment the last one was assigned its partitions."""
    owns = []
    for i in range(workers):
        own = settings.model_copy(deep=True)
        own.streams.instance_name = f"w{i}"
        ready_file(own).unlink(missing_ok=True)
        owns.append(own)
    children = [spawn(f"worker-{o.streams.app_id}-{o.streams.instance_name}", ["worker"], o) for o in owns]
    for own, child in zip(owns, children, strict=True):
        child.wait_until(ready_file(own).exists, 180, "partition assignment")
    return children, datetime.now(UTC)


def send_burst(
    settings: Settings, collector: Collector, templates: list[Template], count: int, senders: int, run: str
) -> list[StudyTimes]:
    studies: list[StudyTimes] = []

    def one(i: int) -> StudyTimes:
        template = templates[i % len(templates)]
        accession = f"SO{run[-6:]}{i:04d}"
        uid, datasets = restamp(template, accession, f"SCALE-{accession}")
        times = StudyTimes(
            study_uid=uid,
            lane_expected="routine",
            phase=run,
            template=template.name,
            instances_sent=len(datasets),
            sent_at=datetime.now(UTC),
        )
        collector.track(times)
        try:
            c_store_retrying(datasets, settings, "127.0.0.1", times)
        except Exception as exc:  # a refused send is a result, not a crash
            times.send_error = f"{type(exc).__name__}: {exc}"
        return times

    with ThreadPoolExecutor(max_workers=senders, thread_name_prefix="send") as pool:
        studies = list(pool.map(one, range(count)))
    return studies


def wait_drained(
    collector: Collector, phase: str, expected: int, stall_s: float, progress: Progress, task: Any
) -> bool:
    """Until every study of `phase` is complete, or none completed for `stall_s` (then False:
    the unfinished ones are counted as lost, not waited for)."""
    done, last_change = -1, time.monotonic()
    while True:
        if collector.error is not None:
            raise RuntimeError(f"collector failed: {collector.error!r}")
        now_done = sum(s.complete for s in collector.snapshot(phase))
        if now_done != done:
            done, last_change = now_done, time.monotonic()
            progress.update(task, completed=done)
        if done >= expected:
            return True
        if time.monotonic() - last_change > stall_s:
            return False
        time.sleep(0.25)


def summarise(
    workers: int, studies: list[StudyTimes], cpu: dict[str, float], complete: bool, stable_at: datetime
) -> dict[str, Any]:
    reported = [s.reported_at for s in studies if s.reported_at]
    after = [r for r in reported if r > stable_at]
    span_s = (max(after) - stable_at).total_seconds() if after else None
    return {
        "workers": workers,
        "studies": len(studies),
        "complete": complete,
        "instances_sent": sum(s.instances_sent for s in studies),
        "instances_acked": sum(s.instances_acked for s in studies),
        "send_errors": sum(bool(s.send_error) for s in studies),
        "reported": sum(s.reports >= 1 for s in studies),
        "unfinished": sum(not s.complete for s in studies if not s.send_error),
        "duplicate_findings": sum(max(s.findings - 1, 0) for s in studies),
        "duplicate_reports": sum(max(s.reports - 1, 0) for s in studies),
        "alerts": sum(s.alerts for s in studies),
        "duplicate_alerts": sum(max(s.alerts - 1, 0) for s in studies),
        "dead_letters": sum(len(s.dead_letters) for s in studies),
        "reported_before_group_stable": len(reported) - len(after),
        "group_stable_to_last_report_s": span_s,
        "throughput_per_min": (len(after) / span_s * 60.0) if span_s else None,
        "cpu_s": {k: round(v, 1) for k, v in sorted(cpu.items())},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--studies", type=int, default=48)
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=6)
    # No study completed for this long: the rest are counted unfinished (lost), not waited for.
    ap.add_argument("--stall", type=float, default=120.0)
    args = ap.parse_args(argv)
    if args.workers[0] != 1:
        ap.error("the first worker count is the baseline and must be 1")

    home = Path(tempfile.mkdtemp(prefix="radtriage-scale-"))
    base = own_stack_settings(home)
    base.telemetry.exporter = "none"
    # Routine lane: one model run at a time per worker, so the worker count is the parallelism.
    templates = cached_templates(base.cache, "normal", 2) + cached_templates(base.cache, "bleed", 2)
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        start_services(base, stack, home / "triton.log")
        for workers in args.workers:
            run = f"{workers}w-{int(time.time())}"
            settings = run_settings(base, run, args.partitions)
            children = [start_scp(settings)]
            collector = Collector(settings)
            try:
                # Warm-up: Triton's model and the page cache, through a worker, not counted.
                warm_children, _ = start_workers(settings, 1)
                warm = send_burst(settings, collector, templates, 2, args.senders, run + "-warm")
                wait_complete(collector, run + "-warm", len(warm), 600)
                for child in warm_children:
                    child.stop()
                with console.status(f"{workers} worker(s): filling the backlog ({args.studies} studies)…"):
                    studies = send_burst(settings, collector, templates, args.studies, args.senders, run)
                cpu_before = descendants_cpu()
                with console.status(f"{workers} worker(s): starting…"):
                    workers_started, stable_at = start_workers(settings, workers)
                children += workers_started
                with Progress(console=console) as progress:
                    task = progress.add_task(f"{workers} worker(s): draining", total=args.studies)
                    complete = wait_drained(collector, run, len(studies), args.stall, progress, task)
                cpu = delta(descendants_cpu(), cpu_before)
                runs.append(summarise(workers, studies, cpu, complete, stable_at))
            finally:
                collector.close()
                for child in reversed(children):
                    child.stop()
    baseline = runs[0]["throughput_per_min"]
    for r in runs:
        r["ratio_vs_1_worker"] = (
            round(r["throughput_per_min"] / baseline, 3) if baseline and r["throughput_per_min"] else None
        )
    result = {
        "benchmark": "scale_out",
        "at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args),
        "runs": runs,
    }
    out = stamped_path(RESULTS, "scale-out")
    write_json(out, result)
    table = Table(title=f"scale-out: {args.studies} routine head CTs per run, {args.partitions} partitions")
    for col in ("workers", "studies/min", "ratio", "reported", "unfinished", "dup reports", "dup alerts"):
        table.add_column(col, justify="right")
    for r in runs:
        tput = r["throughput_per_min"]
        table.add_row(
            str(r["workers"]),
            f"{tput:.1f}" if tput else "-",
            f"{r['ratio_vs_1_worker']:.2f}×" if r["ratio_vs_1_worker"] else "-",
            f"{r['reported']}/{r['studies']}",
            str(r["unfinished"]),
            str(r["duplicate_reports"]),
            str(r["duplicate_alerts"]),
        )
    console.print(table)
    console.print(f"written: {out}")


if __name__ == "__main__":
    main()
