"""One study's latency waterfall: its stages from the events' own timestamps, and the
spans of its traces from the trace file (`settings.trace_file`, OpenTelemetry spans as
JSON lines) when there is one.

received (StudyEvent / request / finding / alert `received_at`: first instance in) →
ready (`ready_at`) → routed (TriageRequest `routed_at`) → inferred (Finding
`inferred_at`) → reported (the result's `produced_at` header) → alerted (Alert `alerted_at`).

Spans of one name are grouped (a CT study is hundreds of `dicom.c_store` spans): first
start to last end, and how many. Only names, services and times are shown: attributes
are never read into the page.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from radtriage.operator.view import StudyTrack

STAGES = (
    ("received", "received_at"),
    ("ready", "ready_at"),
    ("routed", "routed_at"),
    ("inferred", "inferred_at"),
    ("reported", "reported_at"),
    ("alerted", "alerted_at"),
)
# Span groups shown at most (a study's trace has a dozen kinds of spans).
MAX_SPAN_GROUPS = 40


@dataclass(frozen=True)
class Stage:
    name: str
    at: datetime | None
    # Seconds from the waterfall's origin, and from the previous stage that happened.
    offset_s: float | None = None
    step_s: float | None = None


@dataclass(frozen=True)
class SpanGroup:
    name: str
    service: str
    count: int
    start: datetime
    end: datetime
    errors: int = 0


@dataclass(frozen=True)
class Waterfall:
    study_uid: str
    accession_number: str
    lane: str
    origin: datetime | None
    stages: tuple[Stage, ...]
    spans: tuple[tuple[SpanGroup, float, float], ...]  # group, start offset s, duration s
    total_s: float
    dead_letter_stage: str = ""


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def span_groups(lines: Iterable[str], trace_ids: Iterable[str], study_uid: str) -> list[SpanGroup]:
    """The spans of these traces (or naming this study), grouped by name and service."""
    wanted = {t.lower() for t in trace_ids if t}
    groups: dict[tuple[str, str], SpanGroup] = {}
    for line in lines:
        # Cheap test first: the file holds every study's spans.
        if not any(t in line for t in wanted) and (not study_uid or study_uid not in line):
            continue
        try:
            span = json.loads(line)
            trace_id = str(span["context"]["trace_id"]).lower().removeprefix("0x")
            attrs = span.get("attributes") or {}
            if trace_id not in wanted and attrs.get("radtriage.study_uid") != study_uid:
                continue
            start, end = _parse_time(span["start_time"]), _parse_time(span["end_time"])
            name = str(span["name"])[:80]
            service = str(
                ((span.get("resource") or {}).get("attributes") or {}).get("service.instance.id", "")
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a torn last line, or not a span
        if start is None or end is None:
            continue
        failed = int((span.get("status") or {}).get("status_code") == "ERROR")
        key = (name, service[:40])
        old = groups.get(key)
        if old is None:
            groups[key] = SpanGroup(name, key[1], 1, start, end, failed)
        else:
            groups[key] = SpanGroup(
                name, key[1], old.count + 1, min(old.start, start), max(old.end, end), old.errors + failed
            )
    return sorted(groups.values(), key=lambda g: (g.start, g.name))[:MAX_SPAN_GROUPS]


def read_tail_lines(path: Path, max_bytes: int) -> list[str]:
    """The file's last `max_bytes` as lines (the first, maybe cut, dropped); [] if absent."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(size - max_bytes, 0))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > max_bytes else lines


def waterfall(track: StudyTrack, spans: list[SpanGroup]) -> Waterfall:
    times = [getattr(track, attr) for _, attr in STAGES]
    known = [t for t in times if t is not None] + [g.start for g in spans]
    origin = track.received_at or (min(known) if known else None)
    stages: list[Stage] = []
    previous: datetime | None = None
    for (name, _), at in zip(STAGES, times, strict=True):
        if at is None or origin is None:
            stages.append(Stage(name, at))
            continue
        step = (at - previous).total_seconds() if previous is not None else None
        stages.append(Stage(name, at, (at - origin).total_seconds(), step))
        previous = at
    placed = tuple(
        (g, (g.start - origin).total_seconds(), (g.end - g.start).total_seconds())
        for g in spans
        if origin is not None
    )
    ends = [s.offset_s for s in stages if s.offset_s is not None] + [start + d for _, start, d in placed]
    return Waterfall(
        study_uid=track.study_uid,
        accession_number=track.accession_number,
        lane=track.lane,
        origin=origin,
        stages=tuple(stages),
        spans=placed,
        total_s=max(ends, default=0.0),
        dead_letter_stage=track.dead_letter_stage,
    )
