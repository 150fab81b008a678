"""`radtriage status`: the pure half (lag, in flight, percentiles, alerts, the screen) and the
promise that an unreachable Kafka/Triton is shown as DOWN instead of hanging or crashing."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from radtriage.settings import Settings
from radtriage.status import (
    AlertRow,
    ConnectorStatus,
    LaneStatus,
    ModelStatus,
    ProbeTimeout,
    Snapshot,
    bounded,
    consumer_lag,
    gather,
    in_flight,
    percentile,
    ready_to_finding_ms,
    recent_alerts,
    render_status,
)
from schemas.routing_rules import RoutingRules
from tests.support.net import free_port

NOW = datetime(2026, 3, 4, 10, 0, 0, tzinfo=UTC)
UID = "1.2.826.0.1.3680043.8.498.1234"


def iso(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat()


def test_percentile_is_nearest_rank() -> None:
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == 50.0 and percentile(xs, 99) == 99.0 and percentile(xs, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_consumer_lag_counts_uncommitted_partitions_from_their_first_record() -> None:
    end = {("triage.requests.stat", 0): 10, ("triage.requests.stat", 1): 4, ("triage.requests.routine", 0): 7}
    committed = {("triage.requests.stat", 0): 8, ("triage.requests.routine", 0): 7}
    beginning = {("triage.requests.stat", 1): 1}
    assert consumer_lag(end, committed, beginning) == {
        "triage.requests.stat": 2 + 3,
        "triage.requests.routine": 0,
    }


def test_ready_to_finding_by_lane_within_the_window() -> None:
    findings = [
        {"lane": "stat", "ready_at": iso(60), "inferred_at": iso(59)},  # 1000 ms
        {"lane": "stat", "ready_at": iso(30), "inferred_at": iso(27.5)},  # 2500 ms
        {"lane": "routine", "ready_at": iso(100), "inferred_at": iso(90)},
        {"lane": "stat", "ready_at": iso(4000), "inferred_at": iso(3999)},  # before the window
        {"lane": "stat", "ready_at": "garbage", "inferred_at": iso(1)},
    ]
    out = ready_to_finding_ms(findings, NOW - timedelta(seconds=900))
    assert sorted(out["stat"]) == pytest.approx([1000.0, 2500.0])
    assert out["routine"] == pytest.approx([10000.0]) and out["urgent"] == []


def test_in_flight_counts_open_work_once_on_its_latest_lane() -> None:
    rule = "ct-head-noncontrast-ich"
    requests = [
        {"study_uid": "a", "rule_id": rule, "lane": "routine"},
        {"study_uid": "a", "rule_id": rule, "lane": "stat"},  # the late STAT order moved it up
        {"study_uid": "b", "rule_id": rule, "lane": "routine"},  # done
        {"study_uid": "c", "rule_id": rule, "lane": "urgent"},  # dead-lettered
        {"study_uid": "d", "rule_id": rule, "lane": "urgent"},
    ]
    findings = [{"study_uid": "b", "rule_id": rule}]
    dead = [{"study_uid": "c"}, {"study_uid": ""}]
    assert in_flight(requests, findings, dead) == {"stat": 1, "urgent": 1, "routine": 0}


def test_recent_alerts_newest_first_and_bounded() -> None:
    alerts = [
        {
            "study_uid": f"1.2.{i}",
            "finding": "ICH",
            "probability": 0.9,
            "lane": "stat",
            "model_name": "ich_classifier",
            "model_version": "1",
            "ready_at": iso(100 - i + 2),
            "alerted_at": iso(100 - i),
        }
        for i in range(15)
    ] + [{"study_uid": "broken"}]
    rows = recent_alerts(alerts, 10)
    assert [r.study_uid for r in rows] == [f"1.2.{i}" for i in range(14, 4, -1)]
    assert rows[0].ready_to_alert_ms == pytest.approx(2000.0) and rows[0].model == "ich_classifier v1"


def snapshot(up: bool = True) -> Snapshot:
    lanes = (
        LaneStatus("stat", "triage.requests.stat", 0, 1, 12, 2300.0, 4100.0),
        LaneStatus("urgent", "triage.requests.urgent", 0, 0, 0, None, None),
        LaneStatus("routine", "triage.requests.routine", 37, 5, 40, 9100.0, 30500.0),
    )
    return Snapshot(
        taken_at=NOW,
        window_s=900.0,
        bootstrap_servers="127.0.0.1:9092",
        group="radtriage",
        kafka_up=True,
        kafka_detail="",
        triton_url="127.0.0.1:8001",
        triton_up=True,
        triton_detail="",
        lanes=lanes,
        models=(ModelStatus("ich_classifier", True, "3", "routed to by rules"),),
        connectors=(
            ConnectorStatus(
                "DICOM C-STORE", "127.0.0.1:11112", True, "imaging.instances", NOW - timedelta(seconds=42)
            ),
            ConnectorStatus("HL7 MLLP", "127.0.0.1:2575", False, "imaging.orders", None),
        ),
        alerts=(AlertRow(NOW - timedelta(minutes=3), UID, "ICH", 0.97, "stat", "ich_classifier v3", 2345.0),),
    )


def screen(snap: Snapshot) -> str:
    console = Console(record=True, width=200)
    console.print(render_status(snap))
    return console.export_text()


def test_status_screen_shows_lanes_models_connectors_and_alerts() -> None:
    text = screen(snapshot())
    lines = text.splitlines()
    routine = next(line for line in lines if "triage.requests.routine" in line)
    assert "37" in routine and "9,100 ms" in routine and "30,500 ms" in routine
    stat = next(line for line in lines if "triage.requests.stat" in line)
    assert "2,300 ms" in stat and "4,100 ms" in stat
    model = next(line for line in lines if "ich_classifier" in line and "routed" in line)
    assert "UP" in model and " 3 " in model
    dicom = next(line for line in lines if "DICOM C-STORE" in line)
    assert "UP" in dicom and "42s ago" in dicom
    hl7 = next(line for line in lines if "HL7 MLLP" in line)
    assert "DOWN" in hl7 and "never" in hl7
    alert = next(line for line in lines if UID in line)
    assert "3 min ago" in alert and "0.97" in alert and "2,345 ms" in alert
    assert screen(snapshot()) == text  # a pure function of the snapshot


def test_status_screen_when_everything_is_down() -> None:
    down = replace(
        snapshot(),
        kafka_up=False,
        kafka_detail="KafkaTimeoutError: Unable to bootstrap from 127.0.0.1:9092",
        triton_up=False,
        triton_detail="StatusCode.UNAVAILABLE",
        lanes=tuple(
            replace(ln, lag=None, in_flight=None, findings=0, p50_ms=None, p99_ms=None)
            for ln in snapshot().lanes
        ),
        models=(ModelStatus("ich_classifier", False, "", "Triton unreachable"),),
        alerts=(),
    )
    text = screen(down)
    assert "Kafka  DOWN" in text and "Unable to bootstrap" in text and "Triton DOWN" in text
    routine = next(line for line in text.splitlines() if "triage.requests.routine" in line)
    assert "37" not in routine and routine.count("-") >= 4
    assert "(Kafka DOWN)" in text and "Triton unreachable" in text


def test_bounded_gives_up_on_a_call_that_never_returns() -> None:
    with pytest.raises(ProbeTimeout):
        bounded(lambda: time.sleep(30), 0.2, "sleeper")
    with pytest.raises(ZeroDivisionError):
        bounded(lambda: 1 / 0, 1.0, "raiser")
    assert bounded(lambda: 42, 1.0, "answer") == 42


def test_gather_against_nothing_listening_reports_down() -> None:
    settings = Settings()
    settings.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"
    settings.triton.grpc_url = f"127.0.0.1:{free_port()}"
    settings.dicom.port, settings.hl7.port, settings.http.port = free_port(), free_port(), free_port()
    settings.status.probe_timeout_s = 0.5
    snap = gather(settings, NOW)
    assert not snap.kafka_up and snap.kafka_detail
    assert not snap.triton_up and snap.triton_detail
    assert all(ln.lag is None and ln.in_flight is None for ln in snap.lanes)
    routed = list(dict.fromkeys(r.model for r in RoutingRules.load(settings.routing_rules).rules))
    assert [m.name for m in snap.models] == routed and "ich_classifier" in routed
    assert not any(m.up for m in snap.models)
    assert not any(c.reachable for c in snap.connectors)
    assert "DOWN" in screen(snap)
