"""Tracing overhead per study: the same bleed studies with telemetry.exporter=jsonl vs none, one run.

    python -m bench.tracing --runs 10     # starts its own Kafka + Triton on free ports

One Kafka and one Triton for the whole run; the radtriage processes (worker, DICOM SCP,
HL7 and HTTP listeners) are restarted per phase with the phase's exporter. Phases go
none, jsonl, jsonl, none (ABBA), so a drift of the machine over the run (page cache,
JIT, another engineer's job) weighs on both modes alike; each phase sends one warm-up
study first. Every study is the demo's "bleed, STAT order first" case (HL7 order, then
a head CT over C-STORE), generated from the same seed in each phase, and ready → alert
comes from the events' own timestamps (StudyEvent.ready_at → Alert.alerted_at).

What "none" still does: the SDK tracer provider is installed either way, so spans are
created, their attributes set and traceparent propagated; "none" only drops them at the
end. The difference is therefore the cost of exporting (BatchSpanProcessor + the
JSON-lines file), not of instrumentation as a whole. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.lanes import own_stack_settings, start_services
from bench.latency import stats
from bench.output import stamped_path, write_json
from radtriage.demo import CASES, OutputWatcher, run_case
from radtriage.settings import REPO_ROOT, Settings

console = Console()
SCHEDULE = ("none", "jsonl", "jsonl", "none")


def run_phase(base: Settings, mode: str, index: int, runs: int, tmp: Path) -> dict[str, Any]:
    from radtriage.up import running_stack

    settings = base.model_copy(deep=True)
    settings.home = tmp / f"phase{index}-{mode}"
    settings.kafka.embedded = False
    settings.triton.embedded = False
    settings.telemetry.exporter = mode  # type: ignore[assignment]
    case = CASES[0]  # head CT, bleed, STAT order first
    ready_to_alert: list[float] = []
    received_to_alert: list[float] = []
    with running_stack(settings):
        watcher = OutputWatcher(settings)
        rng = np.random.default_rng(20260301)
        workdir = tmp / f"dicom{index}"
        run_case(case, settings, watcher, np.random.default_rng(1), workdir, 120, 0.0)  # warm-up
        for i in range(runs):
            console.log(f"phase {index} ({mode}): study {i + 1}/{runs}")
            o = run_case(case, settings, watcher, rng, workdir, 120, 0.0)
            if o.ready_to_alert_ms is None:
                raise SystemExit(f"phase {index} ({mode}) study {i}: no alert ({o.dead_letter or 'timeout'})")
            ready_to_alert.append(o.ready_to_alert_ms)
            received_to_alert.append(o.received_to_alert_ms or 0.0)
        watcher.close()
    # The processes are stopped now: their last span batches are on file.
    spans = 0
    size = 0
    if settings.trace_file.exists():
        size = settings.trace_file.stat().st_size
        spans = sum(1 for line in settings.trace_file.read_text().splitlines() if line.strip())
    return {
        "phase": index,
        "exporter": mode,
        "ready_to_alert_ms": ready_to_alert,
        "received_to_alert_ms": received_to_alert,
        # Warm-up study included: it is on file too.
        "spans_per_study": spans / (runs + 1),
        "trace_bytes_per_study": size / (runs + 1),
    }


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Pure: both modes' distributions and jsonl − none per study."""
    by_mode: dict[str, dict[str, list[float]]] = {}
    for p in phases:
        m = by_mode.setdefault(p["exporter"], {"ready_to_alert_ms": [], "received_to_alert_ms": []})
        m["ready_to_alert_ms"] += p["ready_to_alert_ms"]
        m["received_to_alert_ms"] += p["received_to_alert_ms"]
    out: dict[str, Any] = {}
    for mode, m in by_mode.items():
        out[mode] = {k: {**stats(v), "mean": statistics.fmean(v)} for k, v in m.items()}
    if "jsonl" in out and "none" in out:
        out["jsonl_minus_none_ms"] = {
            k: {stat: out["jsonl"][k][stat] - out["none"][k][stat] for stat in ("p50", "p95", "mean")}
            for k in ("ready_to_alert_ms", "received_to_alert_ms")
        }
    jsonl = [p for p in phases if p["exporter"] == "jsonl"]
    if jsonl:
        out["spans_per_study"] = statistics.fmean(p["spans_per_study"] for p in jsonl)
        out["trace_bytes_per_study"] = statistics.fmean(p["trace_bytes_per_study"] for p in jsonl)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="studies per phase (4 phases, ABBA)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args()

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="radtriage-bench-tracing-") as tmp_name:
        tmp = Path(tmp_name)
        base = own_stack_settings(tmp / "services")
        start_services(base, stack, base.home / "logs" / "triton.log")
        phases = [run_phase(base, mode, i, args.runs, tmp) for i, mode in enumerate(SCHEDULE)]

    summary = summarize(phases)
    result = {
        "benchmark": "tracing_overhead",
        "at": datetime.now(UTC).isoformat(),
        "runs_per_phase": args.runs,
        "schedule": list(SCHEDULE),
        "case": CASES[0].name,
        "what_none_still_does": "spans created and propagated by the SDK provider, not exported",
        "summary": summary,
        "phases": phases,
    }
    path = stamped_path(args.out, "tracing")
    write_json(path, result)

    table = Table(title=f"tracing overhead, {2 * args.runs} studies per exporter (ABBA)")
    for col in ("measure", "exporter", "p50 ms", "p95 ms", "mean ms"):
        table.add_column(col)
    for measure in ("ready_to_alert_ms", "received_to_alert_ms"):
        for mode in ("none", "jsonl"):
            s = summary[mode][measure]
            table.add_row(measure, mode, f"{s['p50']:.0f}", f"{s['p95']:.0f}", f"{s['mean']:.0f}")
        d = summary["jsonl_minus_none_ms"][measure]
        table.add_row(measure, "jsonl − none", f"{d['p50']:+.0f}", f"{d['p95']:+.0f}", f"{d['mean']:+.0f}")
    console.print(table)
    console.print(
        f"{summary['spans_per_study']:.0f} spans and {summary['trace_bytes_per_study'] / 1024:.0f} KiB "
        f"of trace file per study; wrote {path}"
    )


if __name__ == "__main__":
    main()
