"""The operator page's fold, snapshot, rendering and actions, on schema objects alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import reduce
from pathlib import Path

import pytest

from radtriage.operator.actions import ActionError, ack_event, parse_ack, parse_replay, replay_letter
from radtriage.operator.decode import Observed, Record, Unreadable, decode, topic_kinds
from radtriage.operator.render import page_html, sections, short_uid, waterfall_html
from radtriage.operator.view import (
    Fact,
    LedgerLoaded,
    Limits,
    LogStatus,
    View,
    fold,
    snapshot,
)
from radtriage.operator.waterfall import read_tail_lines, span_groups, waterfall
from radtriage.replay import (
    REPLAY_HEADER,
    Coordinates,
    append_record,
    consumed_topics,
    locked_record,
    record_line,
)
from radtriage.settings import Settings
from schemas.alerts import Alert
from schemas.audit import AuditEvent
from schemas.base import Event
from schemas.deadletter import DeadLetter
from schemas.findings import Finding
from schemas.requests import Lane, TriageRequest
from schemas.results import ResultHeaders
from schemas.studies import SeriesRef, StudyEvent
from streams.join import request_id
from tests.support.findings import ich_alert, ich_result

T0 = datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
UID = "1.2.826.0.1.3680043.8.498.1234567890123456789"
MRN = "MRN-NEVER-ON-THE-PAGE"
TOPICS = Settings().topics
KINDS = topic_kinds(TOPICS)
CONSUMED = consumed_topics(Settings())
LIMITS = Limits(alerts=3, studies=50, finished=3, deadletters=3)
_offsets: dict[str, int] = {}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def obs(
    topic: str, event: Event | ResultHeaders, *, trace: str = "", replay_of: Coordinates | None = None
) -> Observed:
    offset = _offsets[topic] = _offsets.get(topic, -1) + 1
    return Observed(event, Coordinates(topic, 0, offset), trace, replay_of)  # type: ignore[arg-type]


def run(*facts: Fact, view: View | None = None) -> View:
    return reduce(lambda v, f: fold(v, f, LIMITS), facts, view or View())


def study(uid: str = UID) -> StudyEvent:
    series = SeriesRef(series_uid=uid + ".1", modality="CT", instance_uris=("file:///a.dcm",))
    return StudyEvent(
        study_uid=uid,
        accession_number="ACC1",
        patient_id=MRN,
        series=(series,),
        received_at=at(0),
        ready_at=at(2),
        ready_reason="transfer_complete",
    )


def request(
    uid: str = UID, lane: Lane = "routine", routed: float = 3, upgraded_from: Lane | None = None
) -> TriageRequest:
    return TriageRequest(
        study_uid=uid,
        accession_number="ACC1",
        patient_id=MRN,
        series_uid=uid + ".1",
        instance_uris=("file:///a.dcm",),
        lane=lane,
        rule_id="ct-head-noncontrast-ich",
        model_name="ich_classifier",
        finding="ICH",
        threshold=0.05,
        received_at=at(0),
        ready_at=at(2),
        routed_at=at(routed),
        request_id=request_id(uid, "ct-head-noncontrast-ich", at(2)),
        upgraded_from=upgraded_from,
    )


def finding(uid: str = UID, p: float = 0.9, inferred: float = 5) -> Finding:
    return ich_result(
        uid,
        uid + ".1",
        at(2),
        accession_number="ACC1",
        patient_id=MRN,
        probability=p,
        threshold=0.05,
        positive=p >= 0.05,
        received_at=at(0),
        inferred_at=at(inferred),
        inference_ms=120.0,
        request_id="",
    )


def alert(uid: str = UID, alerted: float = 6) -> Alert:
    return ich_alert(
        uid,
        at(2),
        accession_number="ACC1",
        threshold=0.05,
        received_at=at(0),
        alerted_at=at(alerted),
        trace_id="ab" * 16,
    )


def ack(alert_id: str, by: str, when: float) -> AuditEvent:
    return AuditEvent(
        study_uid=UID,
        stage="alert",
        decision="alert_acknowledged",
        detail={"alert_id": alert_id, "by": by, "at": at(when).isoformat()},
        at=at(when),
    )


def letter(payload: str, stage: str = "infer.stat.triton", source: str = TOPICS.requests_stat) -> DeadLetter:
    return DeadLetter(
        source_topic=source,
        stage=stage,
        error="gave up after 3 attempt(s)",
        key=UID,
        study_uid=UID,
        payload=payload,
    )


# -- alerts and acknowledgements -------------------------------------------------------------


def test_alerts_newest_first_bounded_and_duplicates_keep_the_first() -> None:
    uids = [f"{UID}.{i}" for i in range(5)]
    view = run(*(obs(TOPICS.alert_topic("ich"), alert(u, alerted=10 + i)) for i, u in enumerate(uids)))
    view = run(obs(TOPICS.alert_topic("ich"), alert(uids[4], alerted=99)), view=view)
    snap = snapshot(view, at(100), CONSUMED)
    assert [a.study_uid for a, _ in snap.alerts] == [uids[4], uids[3], uids[2]]  # bounded to 3, newest first
    assert snap.alerts[0][0].alerted_at == at(14)  # the copy did not replace the first


def test_ack_before_or_after_its_alert_and_the_first_ack_wins() -> None:
    a = alert()
    for facts in (
        [obs(TOPICS.alert_topic("ich"), a), obs(TOPICS.audit, ack(a.alert_id, "JD", 30))],
        [obs(TOPICS.audit, ack(a.alert_id, "JD", 30)), obs(TOPICS.alert_topic("ich"), a)],  # lookback order
    ):
        view = run(
            *facts,
            obs(TOPICS.audit, ack(a.alert_id, "LATE", 40)),
            obs(TOPICS.audit, ack(a.alert_id, "ZZ", 35)),
        )
        ((_row, got),) = snapshot(view, at(50), CONSUMED).alerts
        assert got is not None and (got.by, got.at) == ("JD", at(30))
    # an earlier ack read later still wins (two pages clicked; the log decides)
    view = run(
        obs(TOPICS.alert_topic("ich"), a),
        obs(TOPICS.audit, ack(a.alert_id, "B", 31)),
        obs(TOPICS.audit, ack(a.alert_id, "A", 30)),
    )
    assert view.acks[a.alert_id].by == "A"


def test_other_audit_events_and_malformed_acks_change_nothing() -> None:
    a = alert()
    view = run(obs(TOPICS.alert_topic("ich"), a))
    noise = [
        AuditEvent(study_uid=UID, stage="alert", decision="alert_sent", detail={"alert_id": a.alert_id}),
        AuditEvent(
            study_uid=UID, stage="alert", decision="alert_acknowledged", detail={"alert_id": a.alert_id}
        ),
        AuditEvent(
            study_uid=UID, stage="alert", decision="alert_acknowledged", detail={"alert_id": 5, "by": "X"}
        ),
        AuditEvent(
            study_uid=UID,
            stage="alert",
            decision="alert_acknowledged",
            detail={"alert_id": a.alert_id, "by": " "},
        ),
        AuditEvent(
            study_uid=UID,
            stage="route",
            decision="alert_acknowledged",
            detail={"alert_id": a.alert_id, "by": "X"},
        ),
    ]
    after = run(*(obs(TOPICS.audit, n) for n in noise), view=view)
    assert after.acks == {} and after.version == view.version


# -- the worklist -------------------------------------------------------------------------------


def test_worklist_lifecycle_route_upgrade_finish_and_late_copies() -> None:
    view = run(obs(TOPICS.studies, study()), obs(TOPICS.requests_routine, request(lane="routine", routed=3)))
    lanes = snapshot(view, at(4), CONSUMED).lanes
    assert [len(lanes[x]) for x in ("stat", "urgent", "routine")] == [0, 0, 1]
    # a late STAT order re-queues the same request on the stat lane: it moves, once, keeping its age
    view = run(obs(TOPICS.requests_stat, request(lane="stat", routed=8, upgraded_from="routine")), view=view)
    lanes = snapshot(view, at(9), CONSUMED).lanes
    assert [len(lanes[x]) for x in ("stat", "urgent", "routine")] == [1, 0, 0]
    (item,) = lanes["stat"]
    assert item.routed_at == at(3) and item.upgraded_from == "routine"
    # a slower copy read later never moves it back
    view = run(obs(TOPICS.requests_routine, request(lane="routine", routed=3)), view=view)
    assert snapshot(view, at(9), CONSUMED).lanes["stat"] == (item,)
    # the finding finishes it; a copy read after that (lookback order) does not reopen it
    view = run(obs(TOPICS.findings, finding()), obs(TOPICS.requests_stat, request(lane="stat")), view=view)
    snap = snapshot(view, at(10), CONSUMED)
    assert all(not items for items in snap.lanes.values())
    assert [(f.study_uid, f.positive) for f in snap.finished] == [(UID, True)]
    # the same finding processed again (at-least-once) is listed once
    view = run(obs(TOPICS.findings, finding()), view=view)
    assert len(snapshot(view, at(11), CONSUMED).finished) == 1


def test_finding_read_before_its_request_closes_it() -> None:
    view = run(obs(TOPICS.findings, finding()), obs(TOPICS.requests_stat, request(lane="stat")))
    assert not any(snapshot(view, at(10), CONSUMED).lanes.values())


def test_finished_is_bounded_newest_first() -> None:
    view = run(*(obs(TOPICS.findings, finding(f"{UID}.{i}", inferred=10 + i)) for i in range(5)))
    assert [f.study_uid for f in snapshot(view, at(20), CONSUMED).finished] == [
        f"{UID}.{i}" for i in (4, 3, 2)
    ]


# -- dead letters ---------------------------------------------------------------------------------


def test_dead_letter_closes_its_request_and_a_replay_reopens_it() -> None:
    req = request(lane="stat")
    dl = obs(TOPICS.deadletter, letter(req.model_dump_json()))
    view = run(obs(TOPICS.requests_stat, req), dl)
    snap = snapshot(view, at(10), CONSUMED)
    assert not snap.lanes["stat"]
    (lv,) = snap.letters
    assert (lv.state, lv.row.letter.stage) == ("replayable", "infer.stat.triton")
    assert view.studies[UID].dead_letter_stage == "infer.stat.triton"
    # the original request read again (restart, lookback) stays closed...
    view = run(obs(TOPICS.requests_stat, req), view=view)
    assert not snapshot(view, at(10), CONSUMED).lanes["stat"]
    # ...the replayed copy reopens it, and the letter shows as replayed
    view = run(obs(TOPICS.requests_stat, req, replay_of=dl.coords), view=view)
    snap = snapshot(view, at(11), CONSUMED)
    assert [w.request_id for w in snap.lanes["stat"]] == [req.request_id]
    assert snap.letters[0].state == "replayed"


def test_replayed_copy_read_before_its_dead_letter_stays_open() -> None:
    req = request(lane="stat")
    dl = Observed(letter(req.model_dump_json()), Coordinates(TOPICS.deadletter, 2, 77))
    view = run(obs(TOPICS.requests_stat, req, replay_of=dl.coords), dl)
    assert len(snapshot(view, at(10), CONSUMED).lanes["stat"]) == 1


def test_letter_states_follow_the_replay_rule_and_the_ledger() -> None:
    good = obs(TOPICS.deadletter, letter(request().model_dump_json()))
    hl7 = obs(TOPICS.deadletter, letter("file:///q.hl7", stage="hl7.mllp", source="hl7.mllp"))
    bad_utf8 = obs(TOPICS.deadletter, letter("caf\ufffd", stage="assemble", source=TOPICS.instances))
    view = run(good, hl7, bad_utf8)
    states = {lv.row.coords: (lv.state, lv.reason) for lv in snapshot(view, at(9), CONSUMED).letters}
    assert states[good.coords] == ("replayable", "")
    assert states[hl7.coords][0] == states[bad_utf8.coords][0] == "not_replayable"
    assert "not a Kafka topic" in states[hl7.coords][1]
    view = run(LedgerLoaded(frozenset({good.coords})), view=view)
    assert {lv.row.coords: lv.state for lv in snapshot(view, at(9), CONSUMED).letters}[
        good.coords
    ] == "replayed"


def test_dead_letters_are_bounded() -> None:
    view = run(
        *(obs(TOPICS.deadletter, letter("x", stage="assemble", source=TOPICS.instances)) for _ in range(7))
    )
    assert len(view.letters) == LIMITS.deadletters


# -- decoding, status, waterfall ---------------------------------------------------------------


def test_decode_garbage_and_wrong_schemas_are_unreadable_and_counted() -> None:
    records = [
        Record(TOPICS.alert_topic("ich"), 0, 1, b"\x00\xff not json"),
        Record(TOPICS.alert_topic("ich"), 0, 2, None),
        Record(TOPICS.audit, 0, 3, finding().to_bytes()),  # a finding on the audit topic
        Record(TOPICS.findings, 0, 4, b'{"schema_version": 7}'),
        Record(TOPICS.deadletter, 0, 5, b"[1,2,3]"),
        Record("some.other.topic", 0, 6, alert().to_bytes()),
    ]
    out = [decode(r, KINDS) for r in records]
    assert all(isinstance(o, Unreadable) for o in out)
    view = run(*out)  # type: ignore[arg-type]
    assert view.unreadable[TOPICS.alert_topic("ich")] == 2 and sum(view.unreadable.values()) == 6
    assert view.alerts == {} and view.studies == {}


def test_decode_reads_trace_and_replay_headers() -> None:
    tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rec = Record(
        TOPICS.requests_stat,
        1,
        9,
        request().to_bytes(),
        (("traceparent", tp), (REPLAY_HEADER, b"triage.deadletter:2:41")),
    )
    got = decode(rec, KINDS)
    assert isinstance(got, Observed)
    assert got.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert got.replay_of == Coordinates("triage.deadletter", 2, 41)
    assert got.coords == Coordinates(TOPICS.requests_stat, 1, 9)


def test_log_status_changes_bump_the_version_only_when_they_change() -> None:
    view = run(LogStatus(True, "live", at(0)))
    same = run(LogStatus(True, "live", at(5)), view=view)
    assert same is view
    down = run(LogStatus(False, "event log unavailable: x", at(9)), view=view)
    assert not down.status.available and down.status.since == at(9)
    html = sections(snapshot(down, at(10), CONSUMED))["status"]
    assert "Event log unavailable" in html


def _span(name: str, start: float, end: float, trace: str, **attrs: str) -> str:
    return json.dumps(
        {
            "name": name,
            "context": {"trace_id": "0x" + trace, "span_id": "0x1"},
            "start_time": at(start).isoformat().replace("+00:00", "Z"),
            "end_time": at(end).isoformat().replace("+00:00", "Z"),
            "status": {"status_code": "UNSET"},
            "attributes": attrs,
            "resource": {"attributes": {"service.instance.id": "worker"}},
        }
    )


def test_waterfall_stages_and_grouped_spans(tmp_path: Path) -> None:
    trace = "ab" * 16
    view = run(
        obs(TOPICS.studies, study()),
        obs(TOPICS.requests_stat, request(lane="stat", routed=3)),
        obs(TOPICS.findings, finding(inferred=5)),
        obs(TOPICS.results_fhir, ResultHeaders(study_uid=UID, finding="ICH", produced_at=at(5.5))),
        obs(TOPICS.alert_topic("ich"), alert(alerted=6)),
    )
    track = view.studies[UID]
    assert track.trace_ids == (trace,)
    path = tmp_path / "traces.jsonl"
    lines = [
        _span("dicom.c_store", 0.0, 0.1, "cd" * 16, **{"radtriage.study_uid": UID}),
        _span("dicom.c_store", 0.5, 0.9, "cd" * 16, **{"radtriage.study_uid": UID}),
        _span("infer", 3.1, 4.9, trace),
        _span("infer", 3.1, 4.9, "ef" * 16),  # another study's trace
        "{torn line",
    ]
    path.write_text("\n".join(lines) + "\n")
    groups = span_groups(read_tail_lines(path, 1 << 20), track.trace_ids, UID)
    assert [(g.name, g.count) for g in groups] == [("dicom.c_store", 2), ("infer", 1)]
    w = waterfall(track, groups)
    assert [(s.name, s.offset_s) for s in w.stages] == [
        ("received", 0.0),
        ("ready", 2.0),
        ("routed", 3.0),
        ("inferred", 5.0),
        ("reported", 5.5),
        ("alerted", 6.0),
    ]
    assert w.stages[3].step_s == 2.0 and w.total_s == 6.0
    html = waterfall_html(w)
    assert html.count('class="wf-stage"') == 6 and "dicom.c_store ×2" in html
    # the alert may go out before the report (two agents): said so, not a negative step
    view = run(
        obs(TOPICS.results_fhir, ResultHeaders(study_uid=UID, finding="ICH", produced_at=at(6.5))),
        view=view,
    )
    assert "500 ms before" in waterfall_html(waterfall(view.studies[UID], []))
    assert read_tail_lines(tmp_path / "absent.jsonl", 100) == []


# -- rendering and actions --------------------------------------------------------------------


def test_page_shows_ids_and_codes_never_the_patient_id() -> None:
    a = alert()
    req = request(f"{UID}.7", lane="urgent")
    view = run(
        obs(TOPICS.studies, study()),
        obs(TOPICS.requests_urgent, req),
        obs(TOPICS.findings, finding()),
        obs(TOPICS.alert_topic("ich"), a),
        obs(TOPICS.deadletter, letter(request().model_dump_json())),  # payload holds the MRN
        LogStatus(True, "live"),
    )
    html = page_html(snapshot(view, at(60), CONSUMED), "v1")
    assert MRN not in html
    assert "ACC1" in html and short_uid(UID) in html and f'data-alert-id="{a.alert_id}"' in html
    assert 'class="ack-btn"' in html and 'class="replay-btn"' in html
    view = run(obs(TOPICS.audit, ack(a.alert_id, "Dr <b>X</b>", 61)), view=view)
    html = page_html(snapshot(view, at(62), CONSUMED), "v1")
    assert "Dr &lt;b&gt;X&lt;/b&gt;" in html and 'class="ack-btn"' not in html


def test_parse_ack_and_the_audit_event() -> None:
    req = parse_ack(b'{"alert_id": "1.2.3/ICH", "by": "  J.  Doe "}')
    assert (req.alert_id, req.by) == ("1.2.3/ICH", "J. Doe")
    row = run(obs(TOPICS.alert_topic("ich"), alert())).alerts[f"{UID}/ICH"]
    event = ack_event(row, req.by, at(70))
    assert (event.stage, event.decision, event.study_uid) == ("alert", "alert_acknowledged", UID)
    assert event.detail["alert_id"] == row.alert_id and event.detail["by"] == "J. Doe"
    assert event.detail["at"] == at(70).isoformat()
    # what the page publishes is what the fold reads back
    view = run(
        obs(TOPICS.alert_topic("ich"), alert()), obs(TOPICS.audit, AuditEvent.from_bytes(event.to_bytes()))
    )
    assert view.acks[row.alert_id].by == "J. Doe"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"by": "JD"}',
        b'{"alert_id": "", "by": "JD"}',
        b'{"alert_id": "a/ICH"}',
        b'{"alert_id": "a/ICH", "by": "   "}',
        b'{"alert_id": "a/ICH", "by": 7}',
        b'{"alert_id": "a/ICH", "by": "J\\u0000D"}',
        json.dumps({"alert_id": "a/ICH", "by": "x" * 65}).encode(),
    ],
)
def test_parse_ack_refuses_bad_bodies(body: bytes) -> None:
    with pytest.raises(ActionError) as err:
        parse_ack(body)
    assert err.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"topic": "t", "partition": -1, "offset": 0}',
        b'{"topic": "t", "partition": 0, "offset": "3"}',
        b'{"topic": "t", "partition": true, "offset": 3}',
        b'{"topic": 5, "partition": 0, "offset": 3}',
    ],
)
def test_parse_replay_refuses_bad_bodies(body: bytes) -> None:
    with pytest.raises(ActionError):
        parse_replay(body)
    assert parse_replay(b'{"topic": "t", "partition": 1, "offset": 3}') == Coordinates("t", 1, 3)


def test_replay_button_refuses_a_letter_the_ledger_has(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    settings.kafka.bootstrap_servers = "127.0.0.1:1"  # never reached: refused before any Kafka
    dl = obs(TOPICS.deadletter, letter(request().model_dump_json()))
    row = run(dl).letters[dl.coords]
    with locked_record(tmp_path / "replay" / "replayed.jsonl") as fh:
        append_record(fh, record_line(dl.coords, row.letter, Coordinates(TOPICS.requests_stat, 0, 1)))
    with pytest.raises(ActionError) as err:
        replay_letter(settings, row)
    assert err.value.status == 409 and "already replayed" in err.value.message
    hl7 = obs(TOPICS.deadletter, letter("file:///q.hl7", stage="hl7.mllp", source="hl7.mllp"))
    with pytest.raises(ActionError) as err:
        replay_letter(settings, run(hl7).letters[hl7.coords])
    assert err.value.status == 409 and "cannot be replayed" in err.value.message


def notified(decision: str, when: float, **detail: object) -> AuditEvent:
    return AuditEvent(
        study_uid=UID,
        stage="notify",
        decision=decision,
        detail={"alert_id": f"{UID}/ICH", "at": at(when).isoformat(), **detail},  # type: ignore[dict-item]
        at=at(when),
    )


def test_alerts_show_who_was_notified_and_are_highlighted_past_their_step() -> None:
    a = alert()
    view = run(
        obs(TOPICS.alert_topic("ich"), a),
        obs(TOPICS.audit, notified("notify_opened", 6, due_at=at(66).isoformat())),
        obs(
            TOPICS.audit,
            notified("notify_delivered", 6.1, recipient="resident", channel="webhook:pager", step=0),
        ),
        # The same delivery re-sent after a kill: shown once.
        obs(
            TOPICS.audit,
            notified("notify_delivered", 9, recipient="resident", channel="webhook:pager", step=0),
        ),
    )
    snap = snapshot(view, at(30), CONSUMED)
    assert [t.recipient for t in snap.notified[a.alert_id]] == ["resident"] and not snap.overdue
    late = snapshot(view, at(70), CONSUMED)
    assert late.overdue == {a.alert_id}
    html = sections(late)["alerts"]
    assert "Notified: resident via webhook:pager" in html and "overdue" in html
    view = run(
        obs(TOPICS.audit, notified("notify_step", 70, step=1, due_at=at(670).isoformat())),
        obs(
            TOPICS.audit,
            notified("notify_delivered", 70.1, recipient="attending", channel="email:a@h", step=1),
        ),
        view=view,
    )
    assert not snapshot(view, at(80), CONSUMED).overdue
    assert [t.step for t in snapshot(view, at(80), CONSUMED).notified[a.alert_id]] == [0, 1]
    acked = run(obs(TOPICS.audit, ack(a.alert_id, "Dr A", 700)), view=view)
    assert not snapshot(acked, at(800), CONSUMED).overdue
