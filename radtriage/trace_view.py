"""`radtriage trace STUDY_UID`: one study's spans as a waterfall, from the JSON-lines trace file.

The jsonl exporter (radtriage/tracing_sdk.py) appends every finished span of every process
to one file, one OpenTelemetry SDK span JSON per line. A study's spans are found the way
an operator thinks of them: every span naming the study (`radtriage.study_uid`), then
the whole traces those spans belong to, then the traces of the study's order (same
`radtriage.accession_number`, no other study in them). Everything below but the file
reading is pure: parse, select, build the timeline, render.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STUDY_ATTR = "radtriage.study_uid"
ACCESSION_ATTR = "radtriage.accession_number"

# Span names of the study's intake, for "received".
_INTAKE_PREFIXES = ("dicom.", "POST /dicomweb", "hl7.", "POST /fhir", "fhir.")


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start: datetime
    end: datetime
    status: str
    status_message: str
    attributes: Mapping[str, Any]
    service: str

    @property
    def duration_ms(self) -> float:
        return (self.end - self.start).total_seconds() * 1000.0


def _hex(value: Any) -> str:
    text = str(value or "")
    return text[2:] if text.startswith("0x") else text


def _time(value: Any) -> datetime:
    # The SDK writes "2024-05-01T10:00:00.123456Z".
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def parse_span(obj: Mapping[str, Any]) -> SpanRecord:
    """One span as the SDK's `ReadableSpan.to_json()` writes it; ValueError if it is not one."""
    try:
        context = obj["context"]
        resource = (obj.get("resource") or {}).get("attributes") or {}
        status = obj.get("status") or {}
        kind = str(obj.get("kind") or "SpanKind.INTERNAL").removeprefix("SpanKind.")
        return SpanRecord(
            trace_id=_hex(context["trace_id"]),
            span_id=_hex(context["span_id"]),
            parent_id=_hex(obj["parent_id"]) if obj.get("parent_id") else None,
            name=str(obj["name"]),
            kind=kind,
            start=_time(obj["start_time"]),
            end=_time(obj["end_time"]),
            status=str(status.get("status_code") or "UNSET"),
            status_message=str(status.get("description") or ""),
            attributes=dict(obj.get("attributes") or {}),
            service=str(resource.get("service.instance.id") or resource.get("service.name") or ""),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a span: {exc}") from exc


def parse_lines(lines: Iterable[str]) -> tuple[list[SpanRecord], int]:
    """Spans from JSON lines, and how many lines were not spans (a torn last line, say)."""
    spans, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            spans.append(parse_span(json.loads(line)))
        except ValueError:  # json.JSONDecodeError is a ValueError
            bad += 1
    return spans, bad


def select_study(spans: Sequence[SpanRecord], study_uid: str) -> list[SpanRecord]:
    """Every span of the study's traces and of its order's traces, by start time."""
    by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    study_traces = {s.trace_id for s in spans if s.attributes.get(STUDY_ATTR) == study_uid}
    accessions = {
        str(s.attributes[ACCESSION_ATTR])
        for t in study_traces
        for s in by_trace[t]
        if s.attributes.get(ACCESSION_ATTR)
    }
    order_traces = set()
    for trace_id, members in by_trace.items():
        if trace_id in study_traces or not accessions:
            continue
        studies = {s.attributes[STUDY_ATTR] for s in members if s.attributes.get(STUDY_ATTR)}
        same_accession = any(s.attributes.get(ACCESSION_ATTR) in accessions for s in members)
        if same_accession and studies <= {study_uid}:
            order_traces.add(trace_id)
    chosen = study_traces | order_traces
    return sorted((s for s in spans if s.trace_id in chosen), key=lambda s: (s.start, s.end))


def load_study_spans(paths: Sequence[Path], study_uid: str) -> tuple[list[SpanRecord], int, int]:
    """The study's spans from trace files: (spans, spans read, unreadable lines).

    Two cheap passes over the text (substring tests before any JSON parsing), since a
    trace file holds every study the stack ever saw.
    """
    texts = [p.read_text(encoding="utf-8", errors="replace").splitlines() for p in paths if p.exists()]
    lines = [line for text in texts for line in text]
    seeds, bad = parse_lines(line for line in lines if study_uid in line)
    trace_ids = {s.trace_id for s in seeds}
    accessions = {str(s.attributes[ACCESSION_ATTR]) for s in seeds if s.attributes.get(ACCESSION_ATTR)}
    if not trace_ids:
        return [], sum(1 for line in lines if line.strip()), bad
    needles = [f"0x{t}" for t in trace_ids] + [f'"{a}"' for a in accessions]
    first, bad2 = parse_lines(line for line in lines if any(n in line for n in needles))
    # Traces reached through the accession may name it only on some spans: fetch them whole.
    more_ids = {s.trace_id for s in first} - trace_ids
    if more_ids:
        extra = [f"0x{t}" for t in more_ids]
        first, bad2 = parse_lines(line for line in lines if any(n in line for n in needles + extra))
    return select_study(first, study_uid), sum(1 for line in lines if line.strip()), bad + bad2


# -- the timeline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    depth: int
    name: str
    count: int
    service: str
    kind: str
    offset_ms: float
    duration_ms: float
    lane: str
    model: str
    outcome: str
    error: bool
    trace_id: str


@dataclass(frozen=True)
class Timeline:
    study_uid: str
    trace_ids: tuple[str, ...]
    started_at: datetime
    total_ms: float
    span_count: int
    rows: tuple[Row, ...]
    # (label, milliseconds) between the study's milestones, in order.
    totals: tuple[tuple[str, float], ...]

    @property
    def stages(self) -> set[str]:
        return {r.name for r in self.rows}


def outcome_of(span: SpanRecord) -> str:
    """What the span says happened, in a few words."""
    a = span.attributes
    if span.status == "ERROR":
        return f"ERROR {span.status_message}".strip()[:80]
    name = span.name
    if name == "alert":
        return "duplicate suppressed" if a.get("radtriage.duplicate") else "alert sent"
    if name == "infer" and "radtriage.positive" in a:
        verdict = "positive" if a["radtriage.positive"] else "negative"
        return f"{verdict} p={float(a.get('radtriage.probability', 0.0)):.2f}"
    if name == "triton.infer" and "triton.model_version" in a:
        return f"v{a['triton.model_version']} client {float(a.get('triton.client_ms', 0.0)):.0f} ms"
    if name == "route" and a.get("radtriage.route") == "unrouted":
        return "unrouted"
    if "radtriage.rule" in a and name in ("route", "join.order", "join.patient"):
        return f"rule {a['radtriage.rule']} ({a.get('radtriage.lane_basis', '')})".replace(" ()", "")
    if name == "assemble" and "radtriage.ready_reason" in a:
        return f"ready: {a['radtriage.ready_reason']}, {a.get('radtriage.series_count', '?')} series"
    if name == "dicom.receive_study":
        return f"{a.get('dicom.instances', '?')} instances, {a.get('dicom.association_end', 'open')}"
    if name == "dicom.c_store" and "dicom.status" in a:
        return f"DICOM status 0x{int(a['dicom.status']):04X}"
    if name == "hl7.receive" and "hl7.ack_code" in a:
        return f"{a.get('hl7.message_type', '')} → {a['hl7.ack_code']}".strip()
    if span.kind == "SERVER" and "http.response.status_code" in a:
        return f"HTTP {a['http.response.status_code']}"
    if span.kind == "PRODUCER" and "messaging.destination.partition.id" in a:
        return f"acked p{a['messaging.destination.partition.id']}@{a.get('messaging.kafka.offset', '?')}"
    if span.kind == "CONSUMER" and "messaging.kafka.offset" in a:
        return f"from p{a.get('messaging.destination.partition.id', '?')}@{a['messaging.kafka.offset']}"
    return ""


def _tree_groups(spans: Sequence[SpanRecord], fold: bool) -> list[tuple[int, list[SpanRecord]]]:
    """Depth-first order (children by start time); with `fold`, siblings of one name become
    one group (a study's forty C-STOREs are one row, ×40)."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        children[s.parent_id if s.parent_id in ids else None].append(s)
    for members in children.values():
        members.sort(key=lambda s: (s.start, s.end))

    def groups(members: list[SpanRecord]) -> list[list[SpanRecord]]:
        if not fold:
            return [[s] for s in members]
        # Siblings of one name fold into one group, placed where the first of them started
        # (a C-STORE and its publish alternate forty times under one study span).
        by_name: dict[tuple[str, str], list[SpanRecord]] = {}
        for s in members:
            by_name.setdefault((s.trace_id, s.name), []).append(s)
        return list(by_name.values())

    result: list[tuple[int, list[SpanRecord]]] = []

    def walk(group: list[SpanRecord], depth: int) -> None:
        result.append((depth, group))
        kids = sorted((c for s in group for c in children.get(s.span_id, [])), key=lambda s: (s.start, s.end))
        for sub in groups(kids):
            walk(sub, depth + 1)

    for top in groups(children[None]):
        walk(top, 0)
    return result


def _first(spans: Sequence[SpanRecord], name: str, **match: Any) -> SpanRecord | None:
    for s in spans:
        if s.name == name and all(s.attributes.get(k) == v for k, v in match.items()):
            return s
    return None


def study_totals(spans: Sequence[SpanRecord], study_uid: str) -> list[tuple[str, float]]:
    """Milestone to milestone, in ms: received, ready (assembly done), infer, report, alert."""
    own = [s for s in spans if s.attributes.get(STUDY_ATTR) == study_uid] or list(spans)
    own_traces = {s.trace_id for s in own}
    intake = [s for s in spans if s.trace_id in own_traces and s.name.startswith(_INTAKE_PREFIXES)]
    received = min((s.start for s in intake), default=None)
    assemble = _first(spans, "assemble")
    infer = next((s for s in spans if s.name == "infer" and "radtriage.positive" in s.attributes), None)
    report = _first(spans, "report")
    alerts = (s for s in spans if s.name == "alert" and not s.attributes.get("radtriage.duplicate"))
    alert = next(alerts, None)
    ready = assemble.start if assemble else None
    points: list[tuple[str, datetime | None, datetime | None]] = [
        ("received → ready (assembly)", received, ready),
        ("ready → inference start (route, join, lane queue)", ready, infer.start if infer else None),
        ("inference (preprocess + Triton)", infer.start if infer else None, infer.end if infer else None),
        ("ready → report", ready, report.end if report else None),
        ("ready → alert", ready, alert.end if alert else None),
        ("received → alert", received, alert.end if alert else None),
    ]
    return [(label, (b - a).total_seconds() * 1000.0) for label, a, b in points if a and b]


def build_timeline(spans: Sequence[SpanRecord], study_uid: str, *, fold: bool = True) -> Timeline | None:
    """The waterfall of a study's selected spans; None when there are none."""
    if not spans:
        return None
    t0 = min(s.start for s in spans)
    t_end = max(s.end for s in spans)
    rows = []
    for depth, group in _tree_groups(spans, fold):
        first, last = group[0], group[-1]
        start = min(s.start for s in group)
        end = max(s.end for s in group)
        attrs: dict[str, Any] = {}
        for s in group:
            attrs.update({k: v for k, v in s.attributes.items() if k not in attrs})
        errors = [s for s in group if s.status == "ERROR"]
        rows.append(
            Row(
                depth=depth,
                name=first.name,
                count=len(group),
                service=first.service,
                kind=first.kind,
                offset_ms=(start - t0).total_seconds() * 1000.0,
                duration_ms=(end - start).total_seconds() * 1000.0,
                lane=str(attrs.get("radtriage.lane", "")),
                model=str(attrs.get("radtriage.model") or attrs.get("triton.model_name") or ""),
                outcome=outcome_of(errors[0] if errors else last),
                error=bool(errors),
                trace_id=first.trace_id,
            )
        )
    trace_ids = tuple(dict.fromkeys(s.trace_id for s in spans))
    return Timeline(
        study_uid=study_uid,
        trace_ids=trace_ids,
        started_at=t0,
        total_ms=(t_end - t0).total_seconds() * 1000.0,
        span_count=len(spans),
        rows=tuple(rows),
        totals=tuple(study_totals(spans, study_uid)),
    )


def bar(offset_ms: float, duration_ms: float, total_ms: float, width: int) -> str:
    """The span's place on a `width`-character time axis (at least one mark)."""
    if total_ms <= 0 or width <= 0:
        return "█" * max(width, 0)
    start = min(int(offset_ms / total_ms * width), width - 1)
    end = max(start + 1, min(width, round((offset_ms + duration_ms) / total_ms * width)))
    return " " * start + "█" * (end - start) + " " * (width - end)


def _ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def render_timeline(tl: Timeline, bar_width: int = 32) -> RenderableType:
    traces = ", ".join(t[:12] + "…" for t in tl.trace_ids)
    title = (
        f"study {tl.study_uid}: {tl.span_count} spans in {len(tl.trace_ids)} trace(s) [{traces}], "
        f"{_ms(tl.total_ms)} ms from {tl.started_at:%Y-%m-%d %H:%M:%S.%f}"[:-3]
        + " UTC"
    )
    table = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    table.add_column("stage", no_wrap=True)
    table.add_column("process", style="dim", no_wrap=True)
    table.add_column("start ms", justify="right")
    table.add_column("dur ms", justify="right")
    table.add_column("waterfall", no_wrap=True)
    table.add_column("lane")
    table.add_column("model")
    table.add_column("outcome")
    several = len(tl.trace_ids) > 1
    for r in tl.rows:
        label = "  " * r.depth + r.name + (f" ×{r.count}" if r.count > 1 else "")
        if several and r.depth == 0:
            label += f" [{r.trace_id[:8]}]"
        style = "red" if r.error else ("bold" if r.depth == 0 else "")
        table.add_row(
            Text(label, style=style),
            r.service,
            _ms(r.offset_ms),
            _ms(r.duration_ms),
            Text(bar(r.offset_ms, r.duration_ms, tl.total_ms, bar_width), style="red" if r.error else "cyan"),
            r.lane,
            r.model,
            Text(r.outcome, style="red" if r.error else ""),
        )
    totals = Table(title="totals", title_justify="left", show_header=False, box=None, pad_edge=False)
    totals.add_column("what")
    totals.add_column("ms", justify="right")
    for label, ms in tl.totals:
        totals.add_row(label, _ms(ms))
    if not tl.totals:
        totals.add_row("(no milestones: the study's spans may still be in flight)", "")
    return Group(table, Text(""), totals)


def timeline_json(tl: Timeline) -> dict[str, Any]:
    return {
        "study_uid": tl.study_uid,
        "trace_ids": list(tl.trace_ids),
        "started_at": tl.started_at.isoformat(),
        "total_ms": round(tl.total_ms, 3),
        "span_count": tl.span_count,
        "spans": [
            {
                "stage": r.name,
                "depth": r.depth,
                "count": r.count,
                "process": r.service,
                "kind": r.kind,
                "start_ms": round(r.offset_ms, 3),
                "duration_ms": round(r.duration_ms, 3),
                "lane": r.lane,
                "model": r.model,
                "outcome": r.outcome,
                "error": r.error,
                "trace_id": r.trace_id,
            }
            for r in tl.rows
        ],
        "totals_ms": {label: round(ms, 3) for label, ms in tl.totals},
    }
