"""Metric definitions: buckets, bounded labels, lag arithmetic, the recording helpers, the bounded probe."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from radtriage import metrics
from schemas.findings import Finding
from schemas.requests import TriageRequest
from schemas.results import ResultHeaders
from tests.support.findings import ich_alert, ich_result

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_buckets_cover_10ms_to_60s_and_hit_the_stat_objective() -> None:
    b = metrics.LATENCY_BUCKETS
    assert list(b) == sorted(set(b))
    assert b[0] == 0.01 and b[-1] == 60.0
    assert 5.0 in b  # the stat lane's ready→alert objective is a bucket edge, not an interpolation
    # Every decade between has at least two edges.
    for low, high in ((0.01, 0.1), (0.1, 1.0), (1.0, 10.0), (10.0, 60.0)):
        assert len([x for x in b if low <= x < high]) >= 2


def test_hl7_message_types_are_bounded() -> None:
    assert metrics.hl7_message_type_label("ORM^O01") == "ORM^O01"
    assert metrics.hl7_message_type_label("orm^o01^ORM_O01") == "ORM^O01"
    assert metrics.hl7_message_type_label("ADT^A04^ADT_A01") == "ADT^A04"
    assert metrics.hl7_message_type_label("") == "unreadable"
    assert metrics.hl7_message_type_label("ZZZ^Z99") == "other"
    # Whatever a sender puts in MSH-9 (a name, a UID) never becomes a label value.
    assert metrics.hl7_message_type_label("DOE^JOHN") == "other"
    assert metrics.hl7_message_type_label("1.2.840.113619.2.55") == "other"


def test_fhir_resource_labels_are_bounded() -> None:
    assert metrics.fhir_resource_label("/fhir/ServiceRequest", "ServiceRequest") == "ServiceRequest"
    assert metrics.fhir_resource_label("/fhir/ImagingStudy/123", "ImagingStudy") == "ImagingStudy"
    assert metrics.fhir_resource_label("/fhir", None) == "Bundle"
    assert metrics.fhir_resource_label("/fhir/metadata", None) == "metadata"
    assert metrics.fhir_resource_label("/fhir/Patient", "Patient") == "other"
    assert metrics.fhir_resource_label("/fhir/MRN123456", "MRN123456") == "other"


def test_status_labels() -> None:
    assert metrics.dicom_status_label(0) == "0x0000"
    assert metrics.dicom_status_label(0xA700) == "0xA700"
    assert metrics.c_store_outcome(0) == "success"
    assert metrics.c_store_outcome(0xB000) == "warning"
    assert metrics.c_store_outcome(0xC000) == "failure"
    assert metrics.c_store_outcome(0xA702) == "failure"
    assert metrics.http_code_label(201) == "201"
    assert metrics.http_code_label(1000) == "other"


def test_dead_letter_stages_are_the_codes_own_names() -> None:
    for stage in ("assemble", "route", "join.patient", "infer.stat.triton", "infer.routine.preprocess"):
        assert metrics.dead_letter_stage_label(stage) == stage
    assert metrics.dead_letter_stage_label("1.2.826.0.1.3680043") == "other"
    assert metrics.dead_letter_stage_label("Doe^John") == "other"


def test_models_and_lanes_outside_the_rules_are_other() -> None:
    metrics.set_known_models(["ich_classifier"])
    assert metrics.model_label("ich_classifier") == "ich_classifier"
    assert metrics.model_label("made-up") == "other"
    assert metrics.lane_label("stat") == "stat" and metrics.lane_label("express") == "other"


def test_seconds_between_is_never_negative() -> None:
    assert metrics.seconds_between(T0, T0 + timedelta(milliseconds=1500)) == 1.5
    # Two hosts' clocks a little apart must not subtract from a histogram's sum.
    assert metrics.seconds_between(T0, T0 - timedelta(seconds=1)) == 0.0


def test_lag_is_end_minus_committed_per_lane() -> None:
    topic_lane = {"req.stat": "stat", "req.urgent": "urgent", "req.routine": "routine"}
    end = {("req.stat", 0): 10, ("req.stat", 1): 4, ("req.urgent", 0): 7, ("req.routine", 0): 50}
    committed = {("req.stat", 0): 8, ("req.stat", 1): 4, ("req.routine", 0): -1}
    beginning = {("req.urgent", 0): 2, ("req.routine", 0): 45}
    lag = metrics.lag_by_lane(topic_lane, end, committed, beginning)
    # stat: 2 + 0; urgent never committed: from the earliest retained offset; routine: -1 = none.
    assert lag == {"stat": 2, "urgent": 5, "routine": 5}


def test_lag_is_zero_for_a_lane_without_partitions() -> None:
    assert metrics.lag_by_lane({"a": "stat", "b": "urgent"}, {("a", 0): 3}, {}, {}) == {
        "stat": 3,
        "urgent": 0,
    }


def _request(lane: str = "stat") -> TriageRequest:
    return TriageRequest(
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        instance_uris=("file:///x",),
        lane=lane,  # type: ignore[arg-type]
        rule_id="r",
        model_name="ich_classifier",
        finding="ICH",
        threshold=0.5,
        received_at=T0,
        ready_at=T0 + timedelta(seconds=2),
        routed_at=T0 + timedelta(seconds=2.1),
    )


def _finding(positive: bool) -> Finding:
    return ich_result(
        "1.2.3",
        "1.2.3.1",
        T0 + timedelta(seconds=2),
        probability=0.9 if positive else 0.1,
        positive=positive,
        rule_id="r",
        received_at=T0,
        inferred_at=T0 + timedelta(seconds=3.6),
        inference_ms=400.0,
        request_id="",
    )


def test_recording_helpers_use_the_events_timestamps() -> None:
    metrics.set_known_models(["ich_classifier"])
    labels = {"lane": "stat", "model": "ich_classifier"}
    alert_labels = {**labels, "finding": "ICH"}
    # Each series the helpers record into, with what one finding, alert and report add to it.
    expected = [
        ("radtriage_routed_to_inferred_seconds_sum", labels, 1.5),
        ("radtriage_ready_to_alert_seconds_count", alert_labels, 1),
        ("radtriage_ready_to_alert_seconds_sum", alert_labels, 4.0),
        ("radtriage_received_to_alert_seconds_sum", alert_labels, 6.0),
        # 4 s: inside the 5 s bucket, outside the 3 s one.
        ("radtriage_ready_to_alert_seconds_bucket", {**alert_labels, "le": "5.0"}, 1),
        ("radtriage_ready_to_alert_seconds_bucket", {**alert_labels, "le": "3.0"}, 0),
        ("radtriage_ready_to_report_seconds_sum", labels, 3.0),
        ("radtriage_findings_total", {**alert_labels, "positive": "true"}, 1),
        ("radtriage_alerts_total", {"finding": "ICH", "lane": "stat"}, 1),
    ]
    before = [_value(name, **series) for name, series, _ in expected]
    finding = _finding(True)
    metrics.observe_finding("stat", _request(), finding)
    alert = ich_alert(
        "1.2.3", T0 + timedelta(seconds=2), received_at=T0, alerted_at=T0 + timedelta(seconds=6)
    )
    metrics.observe_alert(alert)
    result = ResultHeaders(study_uid="1.2.3", finding="ICH", produced_at=T0 + timedelta(seconds=5))
    metrics.observe_report(finding, result)

    grown = [
        (name, series, _value(name, **series) - was)
        for (name, series, _), was in zip(expected, before, strict=True)
    ]
    assert grown == expected


def test_no_identifier_ever_becomes_a_label_value() -> None:
    """Every label value the registry holds is one of the bounded vocabularies."""
    metrics.count_hl7_message("DOE^JOHN", "AA")
    metrics.observe_http_request("/fhir/MRN42", "MRN42", 404)
    metrics.count_stow_instances(1, [0xA900])
    for family in REGISTRY.collect():
        if not family.name.startswith("radtriage_"):
            continue
        for sample in family.samples:
            for value in sample.labels.values():
                assert "DOE" not in value and "MRN" not in value and not value.startswith("1.2."), (
                    family.name,
                    sample.labels,
                )


def test_bounded_probe_gives_none_while_the_fetch_hangs_and_then_the_value() -> None:
    release = threading.Event()
    calls: list[int] = []

    def fetch() -> int:
        calls.append(1)
        release.wait(30)
        return 42

    probe = metrics.BoundedProbe(fetch, cache_s=60.0, timeout_s=0.05, name="test")
    assert probe.get() is None  # the scrape does not wait for a hung backend
    assert probe.get() is None
    assert len(calls) == 1  # one fetch in flight, not one thread per scrape
    release.set()
    deadline = threading.Event()
    for _ in range(200):
        if probe.get() == 42:
            break
        deadline.wait(0.05)
    assert probe.get() == 42
    assert len(calls) == 1  # cached


def test_bounded_probe_caches_a_failure_and_reports_it() -> None:
    calls: list[int] = []

    def fetch() -> int:
        calls.append(1)
        raise ConnectionError("broker down")

    probe = metrics.BoundedProbe(fetch, cache_s=60.0, timeout_s=5.0, name="test")
    assert probe.get() is None
    assert probe.get() is None
    assert len(calls) == 1
    assert "broker down" in probe.last_error
