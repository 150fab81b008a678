"""`radtriage trace`'s pure half on spans recorded from a real run (tests/integration/test_tracing.py):
a STAT HL7 order, then a 26-slice bleed head CT (three of its C-STOREs kept), through to the alert."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from radtriage.cli import main
from radtriage.trace_view import (
    SpanRecord,
    bar,
    build_timeline,
    load_study_spans,
    outcome_of,
    parse_lines,
    parse_span,
    render_timeline,
    select_study,
    timeline_json,
)

RECORDED = Path(__file__).parents[1] / "data" / "traces" / "one_study.jsonl"
STUDY = "1.2.826.0.1.3680043.8.498.55709051282844900417960247621488440358"
STUDY_TRACE = "03274a5b106f"
ORDER_TRACE = "7d60624025aa"


def recorded() -> list[SpanRecord]:
    spans, bad = parse_lines(RECORDED.read_text().splitlines())
    assert bad == 0
    return spans


def raw_span(
    name: str, trace: str, span: str, parent: str | None, start_ms: int, end_ms: int, **attrs: Any
) -> str:
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def ts(ms: int) -> str:
        return (t0 + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    return json.dumps(
        {
            "name": name,
            "context": {"trace_id": f"0x{trace}", "span_id": f"0x{span}", "trace_state": "[]"},
            "kind": "SpanKind.CONSUMER",
            "parent_id": f"0x{parent}" if parent else None,
            "start_time": ts(start_ms),
            "end_time": ts(end_ms),
            "status": {"status_code": "UNSET"},
            "attributes": attrs,
            "events": [],
            "links": [],
            "resource": {"attributes": {"service.instance.id": "streams"}, "schema_url": ""},
        }
    )


# Another study's trace, and another accession's order, in the same file.
NOISE = [
    raw_span("assemble", "aa" * 16, "a1" * 8, None, 0, 10, **{"radtriage.study_uid": "1.2.3.999"}),
    raw_span("alert", "aa" * 16, "a2" * 8, "a1" * 8, 20, 30, **{"radtriage.study_uid": "1.2.3.999"}),
    raw_span("join.order", "bb" * 16, "b1" * 8, None, 0, 5, **{"radtriage.accession_number": "OTHER1"}),
]


def test_parse_span_reads_the_sdk_json_and_rejects_other_lines() -> None:
    first = json.loads(RECORDED.read_text().splitlines()[0])
    span = parse_span(first)
    assert span.name == "send imaging.orders" and span.kind == "PRODUCER"
    assert span.trace_id.startswith(ORDER_TRACE) and len(span.trace_id) == 32
    assert span.parent_id and span.service == "hl7-listener"
    assert span.attributes["messaging.kafka.offset"] == 0
    assert 0 < span.duration_ms < 10_000
    spans, bad = parse_lines(['{"name": "x"}', "not json", "", RECORDED.read_text().splitlines()[1][:40]])
    assert spans == [] and bad == 3


def test_select_study_takes_the_study_and_its_order_traces_only() -> None:
    spans, _ = parse_lines([*RECORDED.read_text().splitlines(), *NOISE])
    chosen = select_study(spans, STUDY)
    assert {s.trace_id[:12] for s in chosen} == {STUDY_TRACE, ORDER_TRACE}
    assert len(chosen) == len(recorded())
    assert [s.start for s in chosen] == sorted(s.start for s in chosen)
    assert select_study(spans, "1.2.3.404") == []
    # The other study is found on its own, without this study's order.
    assert {s.name for s in select_study(spans, "1.2.3.999")} == {"assemble", "alert"}


def test_timeline_folds_repeated_stages_and_nests_them_under_their_parent() -> None:
    tl = build_timeline(recorded(), STUDY)
    assert tl is not None
    assert {
        "hl7.receive",
        "dicom.receive_study",
        "assemble",
        "route",
        "join.patient",
        "join.order",
    } <= tl.stages
    assert {"infer", "preprocess", "triton.infer", "report", "alert", "send triage.alerts.ich"} <= tl.stages
    rows = {(r.name, r.depth): r for r in tl.rows}
    assert rows[("dicom.c_store", 1)].count == 3
    assert rows[("send imaging.instances", 1)].count == 4  # three instances + the transfer-complete marker
    assert rows[("hl7.receive", 0)].offset_ms == 0.0
    depth = {r.name: r.depth for r in tl.rows if r.name in ("assemble", "infer", "alert")}
    assert depth["assemble"] < depth["infer"] < depth["alert"]
    infer = next(r for r in tl.rows if r.name == "infer")
    assert infer.lane == "stat" and infer.model == "ich_classifier" and infer.outcome == "positive p=1.00"
    assert infer.service == "streams"
    assert next(r for r in tl.rows if r.name == "alert").outcome == "alert sent"
    assert next(r for r in tl.rows if r.name == "hl7.receive").outcome == "ORM^O01 → AA"
    assert len(tl.trace_ids) == 2 and tl.span_count == len(recorded())
    # Unfolded, every span is a row.
    flat = build_timeline(recorded(), STUDY, fold=False)
    assert flat is not None and len(flat.rows) == len(recorded())
    assert build_timeline([], STUDY) is None


def test_totals_are_measured_between_the_study_milestones() -> None:
    spans = recorded()
    tl = build_timeline(spans, STUDY)
    assert tl is not None
    totals = dict(tl.totals)
    assemble = next(s for s in spans if s.name == "assemble")
    alert = next(s for s in spans if s.name == "alert")
    receive = next(s for s in spans if s.name == "dicom.receive_study")
    assert totals["ready → alert"] == pytest.approx((alert.end - assemble.start).total_seconds() * 1000)
    # "received" is the study's own first byte, not its order's (which came earlier).
    assert totals["received → alert"] == pytest.approx((alert.end - receive.start).total_seconds() * 1000)
    assert totals["received → ready (assembly)"] < totals["received → alert"]
    assert next(iter(totals)) == "received → ready (assembly)"


def test_outcomes_say_errors_and_duplicates() -> None:
    (err,) = parse_lines([raw_span("infer", "cc" * 16, "c1" * 8, None, 0, 9)])[0]
    failed = SpanRecord(**{**err.__dict__, "status": "ERROR", "status_message": "Triton unreachable"})
    assert outcome_of(failed) == "ERROR Triton unreachable"
    (dup,) = parse_lines(
        [raw_span("alert", "cc" * 16, "c2" * 8, None, 0, 9, **{"radtriage.duplicate": True})]
    )[0]
    assert outcome_of(dup) == "duplicate suppressed"
    tl = build_timeline([failed], "x")
    assert tl is not None and tl.rows[0].error and tl.totals == ()


def test_bar_places_the_span_on_the_axis() -> None:
    assert bar(0, 100, 100, 10) == "█" * 10
    assert bar(50, 10, 100, 10) == " " * 5 + "█" + " " * 4
    assert bar(99.9, 0, 100, 10) == " " * 9 + "█"  # a zero-length span still shows
    assert all(len(bar(o, 5, 100, 32)) == 32 for o in (0, 10, 50, 95, 100))


def test_rendered_table_and_json_carry_the_same_stages(tmp_path: Path) -> None:
    tl = build_timeline(recorded(), STUDY)
    assert tl is not None
    console = Console(record=True, width=220)
    console.print(render_timeline(tl))
    text = console.export_text()
    for word in ("dicom.c_store ×3", "triton.infer", "alert sent", "ready → alert", STUDY):
        assert word in text
    data = timeline_json(tl)
    assert [r["stage"] for r in data["spans"]] == [r.name for r in tl.rows]
    assert json.loads(json.dumps(data)) == data


def test_load_study_spans_reads_only_what_it_needs_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join([*NOISE, *RECORDED.read_text().splitlines(), '{"torn": ']) + "\n")
    spans, read, _bad = load_study_spans([path], STUDY)
    assert [s.span_id for s in spans] == [s.span_id for s in select_study(recorded(), STUDY)]
    assert read == len(NOISE) + len(recorded()) + 1
    assert load_study_spans([path], "1.2.3.404")[0] == []


def test_cli_says_when_there_is_no_such_study_or_file(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "traces.jsonl"
    path.write_text(RECORDED.read_text())
    missing = runner.invoke(main, ["trace", "1.2.3.404", "--file", str(path)])
    assert missing.exit_code == 1 and "no spans of study 1.2.3.404" in missing.output
    nofile = runner.invoke(main, ["trace", STUDY, "--file", str(tmp_path / "absent.jsonl")])
    assert nofile.exit_code == 2 and "no trace file" in nofile.output
    ok = runner.invoke(main, ["trace", STUDY, "--file", str(path), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["study_uid"] == STUDY
