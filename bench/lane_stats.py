"""Pure half of `bench/lanes.py`: per-study stage timestamps, stage durations, percentiles.

Nothing here touches the network or the clock, so the arithmetic the benchmark's
headline rests on (which timestamp starts and ends a stage, what "p99" means for a
handful of samples, the idle-vs-flood ratio) is unit-tested on its own
(tests/unit/test_bench_lanes.py).

Every timestamp comes from the pipeline's own Kafka events (each stage stamps its
event when it produces it, all processes on one machine, one clock) or from the
spans in `$RADTRIAGE_HOME/traces.jsonl` — never from the benchmark's receive time,
which would add the benchmark's own consumer lag to every figure.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# The stages, in pipeline order; each is (name, start field, end field) on StudyTimes.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("received→ready", "received_at", "ready_at"),
    ("ready→routed", "ready_at", "routed_at"),
    ("routed→inferred", "routed_at", "inferred_at"),
    ("inferred→reported", "inferred_at", "reported_at"),
    ("inferred→alerted", "inferred_at", "alerted_at"),
)
# End-to-end spans over several stages.
END_TO_END: tuple[tuple[str, str, str], ...] = (
    ("ready→finding", "ready_at", "inferred_at"),
    ("ready→report", "ready_at", "reported_at"),
    ("ready→alert", "ready_at", "alerted_at"),
    ("received→report", "received_at", "reported_at"),
    ("received→alert", "received_at", "alerted_at"),
)


def _ts(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _min_ts(current: datetime | None, new: datetime | None) -> datetime | None:
    if new is None:
        return current
    return new if current is None or new < current else current


def _max_ts(current: datetime | None, new: datetime | None) -> datetime | None:
    if new is None:
        return current
    return new if current is None or new > current else current


@dataclass
class StudyTimes:
    """What the pipeline said about one study the benchmark sent."""

    study_uid: str
    lane_expected: str = ""  # the lane the study's order asks for
    phase: str = ""  # warmup | idle | flood
    template: str = ""  # which cached phantom series was sent (bleed-0, normal-2, …)
    instances_sent: int = 0
    # C-STORE success answers: only these are "accepted", so only these can be "lost".
    instances_acked: int = 0
    # Associations the SCP refused before this study got in (the sender retries, as a modality does).
    association_refusals: int = 0
    send_error: str = ""  # the study never got in (gave up retrying, or an order was refused)
    sent_at: datetime | None = None  # the benchmark's clock: order sent (same machine, same clock)
    # From the events (first occurrence where a stage can repeat).
    received_at: datetime | None = None  # first InstanceEvent.received_at (== StudyEvent.received_at)
    last_received_at: datetime | None = None
    instances_seen: int = 0
    ready_at: datetime | None = None
    studies_seen: int = 0
    routed_at: datetime | None = None  # first TriageRequest.routed_at
    lanes_routed: list[str] = field(default_factory=list)
    inferred_at: datetime | None = None
    finding_lane: str = ""
    probability: float | None = None
    positive: bool | None = None
    findings: int = 0
    reported_at: datetime | None = None
    reports: int = 0
    alerted_at: datetime | None = None
    alerts: int = 0
    skipped_already_done: int = 0
    dead_letters: list[str] = field(default_factory=list)
    # From the trace file (infer span and its children), when there is one.
    infer_started_at: datetime | None = None
    preprocess_ms: float | None = None
    triton_ms: float | None = None

    @property
    def complete(self) -> bool:
        """Reported, and alerted if the finding was positive (or dead-lettered: it will not finish).

        Whether an alert is due is the model's call (the finding's `positive`), not the phantom's
        label, so a missed bleed does not make the benchmark wait for an alert that cannot come.
        """
        if self.dead_letters or self.send_error:
            return True
        if self.reported_at is None or self.positive is None:
            return False
        return self.alerted_at is not None if self.positive else True

    @property
    def lane(self) -> str:
        """The lane the work ended on (the last routing decision), else the one expected."""
        return self.lanes_routed[-1] if self.lanes_routed else self.lane_expected


def apply_event(times: StudyTimes, kind: str, data: Mapping[str, Any]) -> None:
    """Fold one decoded Kafka event about `times.study_uid` into its timestamps.

    `kind`: instance | study | request | finding | report | alert | deadletter | audit.
    Repeats are counted rather than overwritten: a second alert or finding for the
    same study is exactly what the issue says must never happen, so it must show.
    """
    if kind == "instance":
        if data.get("kind", "instance") != "instance":
            return  # the transfer-complete marker and the stream's nudges are not instances
        at = _ts(data.get("received_at"))
        times.instances_seen += 1
        times.received_at = _min_ts(times.received_at, at)
        times.last_received_at = _max_ts(times.last_received_at, at)
    elif kind == "study":
        times.studies_seen += 1
        times.ready_at = _min_ts(times.ready_at, _ts(data.get("ready_at")))
        # The study's own clock start wins over what the instances topic showed us, if we missed some.
        times.received_at = _min_ts(times.received_at, _ts(data.get("received_at")))
    elif kind == "request":
        times.routed_at = _min_ts(times.routed_at, _ts(data.get("routed_at")))
        times.lanes_routed.append(str(data.get("lane", "")))
    elif kind == "finding":
        times.findings += 1
        times.inferred_at = _min_ts(times.inferred_at, _ts(data.get("inferred_at")))
        times.finding_lane = str(data.get("lane", ""))
        times.probability = float(data["probability"]) if "probability" in data else None
        times.positive = bool(data.get("positive"))
    elif kind == "report":
        times.reports += 1
        times.reported_at = _min_ts(times.reported_at, _ts(data.get("produced_at")))
    elif kind == "alert":
        times.alerts += 1
        times.alerted_at = _min_ts(times.alerted_at, _ts(data.get("alerted_at")))
    elif kind == "deadletter":
        times.dead_letters.append(f"{data.get('stage', '?')}: {str(data.get('error', ''))[:200]}")
    elif kind == "audit":
        if data.get("decision") == "skipped_already_done":
            times.skipped_already_done += 1
    else:
        raise ValueError(f"unknown event kind {kind!r}")


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000.0


def stage_durations(times: StudyTimes) -> dict[str, float]:
    """Every stage and end-to-end span (ms) this study has both ends of."""
    out: dict[str, float] = {}
    for name, start, end in STAGES + END_TO_END:
        ms = _ms(getattr(times, start), getattr(times, end))
        if ms is not None:
            out[name] = ms
    # The DICOM transfer itself, and how long assembly took after the last instance landed.
    transfer = _ms(times.received_at, times.last_received_at)
    if transfer is not None:
        out["transfer (first→last instance)"] = transfer
    assembly = _ms(times.last_received_at, times.ready_at)
    if assembly is not None:
        out["last instance→ready"] = assembly
    # From the trace: time a routed request waited for its lane's agent, and the model's work.
    wait = _ms(times.routed_at, times.infer_started_at)
    if wait is not None:
        out["lane wait (routed→infer start)"] = wait
    if times.preprocess_ms is not None:
        out["preprocess (in pipeline)"] = times.preprocess_ms
    if times.triton_ms is not None:
        out["triton call (in pipeline)"] = times.triton_ms
    finding = out.get("ready→finding")
    if finding is not None and times.preprocess_ms is not None and times.triton_ms is not None:
        # What the pipeline adds around the model's own work, for this very study.
        out["ready→finding minus model work"] = finding - times.preprocess_ms - times.triton_ms
    return out


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]): always one of the samples, never interpolated.

    With fewer than 100 samples p99 is the maximum — the honest reading of a small run.
    """
    if not xs:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(xs)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(xs: Iterable[float]) -> dict[str, float]:
    values = [float(x) for x in xs]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def stage_table(studies: Iterable[StudyTimes]) -> dict[str, dict[str, float]]:
    """Summary (n, p50, p95, p99, …) per stage over the given studies."""
    samples: dict[str, list[float]] = {}
    for times in studies:
        for name, ms in stage_durations(times).items():
            samples.setdefault(name, []).append(ms)
    return {name: summarize(xs) for name, xs in samples.items()}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def throughput_per_min(starts: Iterable[datetime | None], ends: Iterable[datetime | None]) -> float | None:
    """Finished studies per minute: count of ends over first start → last end."""
    first = min((s for s in starts if s is not None), default=None)
    done = [e for e in ends if e is not None]
    if first is None or not done:
        return None
    elapsed = (max(done) - first).total_seconds()
    return len(done) / elapsed * 60.0 if elapsed > 0 else None


def schedule_lanes(total: int, stat_fraction: float) -> list[str]:
    """Which lane each of `total` studies of a steady run asks for: stat studies spread evenly.

    Study i is stat when floor((i + 1)·f) > floor(i·f), so 5% of 100 gives stat at 19, 39, …
    — never a clump at the start, where the flood has not built up yet.
    """
    if not 0.0 <= stat_fraction <= 1.0:
        raise ValueError("stat_fraction must be within [0, 1]")
    return [
        "stat"
        if math.floor((i + 1) * stat_fraction + 1e-9) > math.floor(i * stat_fraction + 1e-9)
        else "routine"
        for i in range(total)
    ]


@dataclass(frozen=True)
class SpanTimes:
    """The three spans of one inference, as found in traces.jsonl."""

    study_uid: str
    lane: str
    infer_start: datetime
    preprocess_ms: float | None
    triton_ms: float | None


def infer_spans(spans: Iterable[Mapping[str, Any]]) -> dict[str, SpanTimes]:
    """Per study UID, its `infer` span's start and its `preprocess` / `triton.infer` children.

    Children are matched by parent span id (the infer span is their parent); where a study
    was inferred more than once (a lane upgrade raced its first run) the earliest wins, as
    the finding it produced is the one the benchmark timed. Triton retries are summed.
    """
    infer: dict[str, tuple[str, str, datetime]] = {}  # span id -> (study, lane, start)
    children: dict[str, list[Mapping[str, Any]]] = {}
    for span in spans:
        name = span.get("name")
        span_id = str((span.get("context") or {}).get("span_id", ""))
        if name == "infer":
            attrs = span.get("attributes") or {}
            uid = attrs.get("radtriage.study_uid")
            start = _ts(span.get("start_time"))
            if uid and start is not None:
                infer[span_id] = (str(uid), str(attrs.get("radtriage.lane", "")), start)
        elif name in ("preprocess", "triton.infer") and span.get("parent_id"):
            children.setdefault(str(span["parent_id"]), []).append(span)
    out: dict[str, SpanTimes] = {}
    for span_id, (uid, lane, start) in infer.items():
        if uid in out and out[uid].infer_start <= start:
            continue
        pre: float | None = None
        tri: float | None = None
        for child in children.get(span_id, []):
            ms = _ms(_ts(child.get("start_time")), _ts(child.get("end_time")))
            if ms is None:
                continue
            if child.get("name") == "preprocess":
                pre = (pre or 0.0) + ms
            else:
                tri = (tri or 0.0) + ms
        out[uid] = SpanTimes(uid, lane, start, pre, tri)
    return out


def overlap_ms(interval: tuple[float, float], others: Iterable[tuple[float, float]]) -> float:
    """How long (ms) `interval` shared the clock with any of `others` (each counted; ms epochs).

    Used to ask whether a slow stat preprocess ran while a routine preprocess ran in the same
    worker process (same interpreter, same two cores).
    """
    start, end = interval
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in others)


def preprocess_interval(times: StudyTimes) -> tuple[float, float] | None:
    """The preprocess span as (start, end) in epoch ms; it begins as the infer span starts."""
    if times.infer_started_at is None or times.preprocess_ms is None:
        return None
    start = times.infer_started_at.timestamp() * 1000.0
    return start, start + times.preprocess_ms
