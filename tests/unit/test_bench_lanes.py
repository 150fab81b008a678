"""The pure half of bench/lanes.py: percentiles, stage extraction, schedules, span matching.

No timing assertions: these check the arithmetic on fixed timestamps, not how fast anything is.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bench.lane_stats import (
    StudyTimes,
    apply_event,
    infer_spans,
    overlap_ms,
    percentile,
    preprocess_interval,
    ratio,
    schedule_lanes,
    stage_durations,
    stage_table,
    summarize,
    throughput_per_min,
)

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def at(ms: float) -> str:
    return (T0 + timedelta(milliseconds=ms)).isoformat()


def full_study(uid: str = "1.2.3", positive: bool = True) -> StudyTimes:
    """A study whose events arrive in pipeline order, 100 ms apart per stage."""
    s = StudyTimes(study_uid=uid, lane_expected="stat", phase="idle", instances_sent=2)
    apply_event(s, "instance", {"kind": "instance", "study_uid": uid, "received_at": at(0)})
    apply_event(s, "instance", {"kind": "instance", "study_uid": uid, "received_at": at(40)})
    apply_event(s, "instance", {"kind": "transfer_complete", "study_uid": uid, "received_at": at(50)})
    apply_event(s, "study", {"study_uid": uid, "received_at": at(0), "ready_at": at(100)})
    apply_event(s, "request", {"study_uid": uid, "lane": "stat", "routed_at": at(200)})
    apply_event(
        s,
        "finding",
        {"study_uid": uid, "lane": "stat", "inferred_at": at(700), "probability": 0.9, "positive": positive},
    )
    apply_event(s, "report", {"study_uid": uid, "produced_at": at(800)})
    if positive:
        apply_event(s, "alert", {"study_uid": uid, "alerted_at": at(750)})
    return s


def test_percentile_is_nearest_rank_and_one_of_the_samples() -> None:
    xs = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(xs, 50) == 50.0
    assert percentile(xs, 95) == 95.0
    assert percentile(xs, 99) == 99.0
    assert percentile(xs, 100) == 100.0
    assert percentile(xs, 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_p99_of_a_small_sample_is_its_maximum() -> None:
    xs = [10.0, 12.0, 11.0, 400.0, 13.0]
    assert percentile(xs, 99) == 400.0
    assert percentile(xs, 95) == 400.0
    assert percentile(xs, 50) == 12.0


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s == {"n": 4, "p50": 2.0, "p95": 4.0, "p99": 4.0, "mean": 2.5, "min": 1.0, "max": 4.0}
    assert summarize([]) == {"n": 0}


def test_stage_durations_from_event_timestamps() -> None:
    s = full_study()
    d = stage_durations(s)
    assert d["received→ready"] == pytest.approx(100)
    assert d["ready→routed"] == pytest.approx(100)
    assert d["routed→inferred"] == pytest.approx(500)
    assert d["inferred→reported"] == pytest.approx(100)
    assert d["inferred→alerted"] == pytest.approx(50)
    assert d["ready→finding"] == pytest.approx(600)
    assert d["ready→alert"] == pytest.approx(650)
    assert d["received→alert"] == pytest.approx(750)
    assert d["received→report"] == pytest.approx(800)
    assert d["transfer (first→last instance)"] == pytest.approx(40)
    assert d["last instance→ready"] == pytest.approx(60)
    assert s.instances_seen == 2  # the transfer-complete marker is not an instance
    assert s.last_received_at == T0 + timedelta(milliseconds=40)
    assert s.complete


def test_missing_stages_are_left_out_not_zero() -> None:
    s = StudyTimes(study_uid="x")
    apply_event(s, "study", {"study_uid": "x", "received_at": at(0), "ready_at": at(100)})
    d = stage_durations(s)
    assert d == {"received→ready": pytest.approx(100)}  # no instance events seen: no transfer stages
    assert not s.complete


def test_negative_finding_is_complete_without_an_alert() -> None:
    s = full_study(positive=False)
    assert s.alerted_at is None
    assert s.complete
    assert "ready→alert" not in stage_durations(s)


def test_positive_finding_waits_for_its_alert() -> None:
    s = StudyTimes(study_uid="x")
    apply_event(s, "finding", {"inferred_at": at(10), "probability": 0.5, "positive": True, "lane": "stat"})
    apply_event(s, "report", {"produced_at": at(20)})
    assert not s.complete
    apply_event(s, "alert", {"alerted_at": at(30)})
    assert s.complete


def test_report_before_finding_is_not_complete() -> None:
    # Different topics: the report may reach the benchmark before the finding does.
    s = StudyTimes(study_uid="x")
    apply_event(s, "report", {"produced_at": at(20)})
    assert not s.complete


def test_repeats_are_counted_and_the_first_timestamp_kept() -> None:
    s = full_study()
    apply_event(s, "alert", {"alerted_at": at(5000)})
    apply_event(s, "finding", {"inferred_at": at(4000), "probability": 0.9, "positive": True, "lane": "stat"})
    assert s.alerts == 2
    assert s.findings == 2
    assert stage_durations(s)["ready→alert"] == pytest.approx(650)


def test_lane_upgrade_keeps_first_routing_time_and_last_lane() -> None:
    s = StudyTimes(study_uid="x", lane_expected="stat")
    apply_event(s, "request", {"lane": "routine", "routed_at": at(100)})
    apply_event(s, "request", {"lane": "stat", "routed_at": at(300)})
    assert s.routed_at == T0 + timedelta(milliseconds=100)
    assert s.lane == "stat"
    assert s.lanes_routed == ["routine", "stat"]


def test_dead_letter_finishes_a_study_and_keeps_the_reason() -> None:
    s = StudyTimes(study_uid="x")
    apply_event(s, "deadletter", {"stage": "infer.stat.triton", "error": "gave up"})
    assert s.complete
    assert s.dead_letters == ["infer.stat.triton: gave up"]


def test_audit_counts_skipped_duplicates_only() -> None:
    s = StudyTimes(study_uid="x")
    apply_event(s, "audit", {"decision": "routed"})
    apply_event(s, "audit", {"decision": "skipped_already_done"})
    assert s.skipped_already_done == 1


def test_unknown_event_kind_is_an_error() -> None:
    with pytest.raises(ValueError):
        apply_event(StudyTimes(study_uid="x"), "nonsense", {})


def test_trace_derived_stages() -> None:
    s = full_study()
    s.infer_started_at = T0 + timedelta(milliseconds=250)
    s.preprocess_ms = 300.0
    s.triton_ms = 150.0
    d = stage_durations(s)
    assert d["lane wait (routed→infer start)"] == pytest.approx(50)
    assert d["ready→finding minus model work"] == pytest.approx(600 - 300 - 150)


def test_stage_table_over_studies() -> None:
    a, b = full_study("a"), full_study("b")
    b.inferred_at = T0 + timedelta(milliseconds=1100)  # ready→finding 1000
    table = stage_table([a, b])
    assert table["ready→finding"]["n"] == 2
    assert table["ready→finding"]["p50"] == pytest.approx(600)
    assert table["ready→finding"]["p99"] == pytest.approx(1000)


def test_ratio() -> None:
    assert ratio(300.0, 200.0) == 1.5
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None


def test_throughput_per_min() -> None:
    starts = [T0, T0 + timedelta(seconds=10)]
    ends = [T0 + timedelta(seconds=30), T0 + timedelta(seconds=60), None]
    assert throughput_per_min(starts, ends) == pytest.approx(2.0)
    assert throughput_per_min([], ends) is None
    assert throughput_per_min(starts, [None]) is None


def test_schedule_spreads_stat_evenly() -> None:
    lanes = schedule_lanes(100, 0.05)
    stat = [i for i, lane in enumerate(lanes) if lane == "stat"]
    assert stat == [19, 39, 59, 79, 99]
    assert schedule_lanes(10, 0.0) == ["routine"] * 10
    assert schedule_lanes(4, 1.0) == ["stat"] * 4
    assert schedule_lanes(40, 0.1).count("stat") == 4
    with pytest.raises(ValueError):
        schedule_lanes(10, 1.5)


def span(name: str, span_id: str, parent: str | None, start_ms: float, end_ms: float, **attrs: str) -> dict:
    return {
        "name": name,
        "context": {"trace_id": "0xabc", "span_id": span_id},
        "parent_id": parent,
        "start_time": at(start_ms).replace("+00:00", "Z"),
        "end_time": at(end_ms).replace("+00:00", "Z"),
        "attributes": attrs,
    }


def test_infer_spans_match_children_by_parent_and_sum_retries() -> None:
    spans = [
        span("infer", "0x1", "0x0", 100, 900, **{"radtriage.study_uid": "s1", "radtriage.lane": "stat"}),
        span("preprocess", "0x2", "0x1", 110, 400),
        span("triton.infer", "0x3", "0x1", 400, 500),
        span("triton.infer", "0x4", "0x1", 600, 700),  # a retry
        span("dicom.c_store", "0x5", "0x9", 0, 5),
        # Another study's infer with no children (say, preprocess failed before its span closed).
        span("infer", "0x6", None, 50, 60, **{"radtriage.study_uid": "s2", "radtriage.lane": "routine"}),
    ]
    out = infer_spans(spans)
    assert out["s1"].lane == "stat"
    assert out["s1"].infer_start == T0 + timedelta(milliseconds=100)
    assert out["s1"].preprocess_ms == pytest.approx(290)
    assert out["s1"].triton_ms == pytest.approx(200)
    assert out["s2"].preprocess_ms is None and out["s2"].triton_ms is None


def test_infer_spans_keep_the_earliest_run_of_a_study() -> None:
    spans = [
        span("infer", "0x7", None, 500, 900, **{"radtriage.study_uid": "s1", "radtriage.lane": "stat"}),
        span("infer", "0x1", None, 100, 400, **{"radtriage.study_uid": "s1", "radtriage.lane": "routine"}),
        span("preprocess", "0x2", "0x1", 110, 300),
    ]
    out = infer_spans(spans)
    assert out["s1"].lane == "routine"
    assert out["s1"].preprocess_ms == pytest.approx(190)


def test_overlap_ms() -> None:
    assert overlap_ms((100.0, 200.0), [(0.0, 150.0), (180.0, 400.0), (300.0, 500.0)]) == pytest.approx(70)
    assert overlap_ms((100.0, 200.0), []) == 0.0
    assert overlap_ms((100.0, 200.0), [(200.0, 300.0)]) == 0.0  # touching is not sharing


def test_preprocess_interval() -> None:
    s = StudyTimes(study_uid="x")
    assert preprocess_interval(s) is None
    s.infer_started_at = T0
    s.preprocess_ms = 250.0
    start, end = preprocess_interval(s) or (0.0, 0.0)
    assert end - start == pytest.approx(250)
    assert start == pytest.approx(T0.timestamp() * 1000)


def test_a_study_that_never_got_in_is_finished_not_pending() -> None:
    s = StudyTimes(study_uid="x", send_error="AssociationRefused: refused")
    assert s.complete
