"""Operator notifications, the pure parts: digests (a flood is a bounded number of
messages), stuck-study detection, who the operators are, and what registers when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from processors.notify import ops_message
from processors.notify.digest import (
    OTHER_CAUSES,
    Digests,
    covered_of,
    covered_text,
    deadletter_cause,
    deadletter_item,
)
from processors.notify.rota import operators_recipient
from processors.notify.stuck import StuckWatch, Watched, stuck_item
from radtriage.settings import NotifySettings, OperatorNotifySettings, Settings, WebhookTarget
from radtriage.status import notify_summary
from schemas.deadletter import DeadLetter
from schemas.oncall import Channel, Oncall, OncallError
from tests.support.pipeline import built_app

T0 = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)


def letter(error: str, stage: str = "infer-stat", study: str = "1.2.3") -> DeadLetter:
    return DeadLetter(source_topic="triage.requests.stat", stage=stage, error=error, study_uid=study)


def test_dead_letters_group_by_stage_and_reason_without_the_records_numbers() -> None:
    a = deadletter_cause(letter("TritonUnavailable: connect to 127.0.0.1:8001 failed"))
    b = deadletter_cause(letter("TritonUnavailable: timeout after 30 s"))
    assert a == b == "infer-stat: TritonUnavailable"
    c = deadletter_cause(letter("undeliverable to operators (step 3): webhook:ops: HTTP 503", stage="notify"))
    assert c == "notify: undeliverable to operators (step 3)"
    assert deadletter_cause(letter("study 1.2.840.113619.2.55 has no series")).startswith(
        "infer-stat: study # has no series"
    )
    assert deadletter_cause(letter("")) == "infer-stat: no reason given"


def test_a_flood_of_dead_letters_is_one_digest_per_cause_per_period() -> None:
    d = Digests(period_s=60, examples=3, max_causes=10)
    for i in range(1000):
        cause = "TritonUnavailable: down" if i % 2 else "EventDecodeError: bad json"
        d.add(deadletter_item(letter(cause, study=f"1.2.{i}"), T0 + timedelta(milliseconds=50 * i)))
    assert d.due(T0 + timedelta(seconds=59)) == []  # the period is not over
    out = d.due(T0 + timedelta(seconds=60))
    assert [(b.cause, b.count) for b in out] == [
        ("infer-stat: EventDecodeError", 500),
        ("infer-stat: TritonUnavailable", 500),
    ]
    assert [len(b.examples) for b in out] == [3, 3]
    assert out[0].first_at == T0 and out[1].last_at == T0 + timedelta(milliseconds=50 * 999)
    assert d.due(T0 + timedelta(seconds=3600)) == []  # taken out: sent once


def test_items_of_the_next_period_are_the_next_digest() -> None:
    d = Digests(period_s=10, examples=5, max_causes=10)
    d.add(deadletter_item(letter("X: a"), T0 + timedelta(seconds=9)))
    d.add(deadletter_item(letter("X: b"), T0 + timedelta(seconds=10)))
    first = d.due(T0 + timedelta(seconds=10))
    assert [b.count for b in first] == [1]
    second = d.due(T0 + timedelta(seconds=20))
    assert [b.count for b in second] == [1]
    assert first[0].key("0,1") != second[0].key("0,1")


def test_causes_beyond_the_limit_share_one_bucket() -> None:
    d = Digests(period_s=60, examples=1, max_causes=3)
    for i in range(50):
        d.add(deadletter_item(letter(f"Error{i}: x"), T0))
    out = d.due(T0 + timedelta(seconds=60))
    assert len(out) == 4
    other = next(b for b in out if b.cause == OTHER_CAUSES)
    assert other.count == 47


def test_a_digest_key_is_its_kind_cause_period_and_scope() -> None:
    d = Digests(period_s=60, examples=1, max_causes=3)
    b = d.add(deadletter_item(letter("X: y"), T0))
    assert b.key("0,1,2") == b.key("0,1,2")
    assert b.key("0,1,2") != b.key("0")


def watched(rid: str, lane: str, at: datetime, study: str = "1.2.3") -> Watched:
    return Watched(rid, study, "ACC1", lane, "ICH", at)


def test_a_request_without_a_finding_past_its_lane_limit_is_stuck_once() -> None:
    w = StuckWatch({"stat": 120.0, "routine": 3600.0}, cap=100)
    w.routed(watched("r1", "stat", T0))
    w.routed(watched("r2", "routine", T0))
    w.routed(watched("r3", "stat", T0))
    w.done("r3")
    assert w.stuck(T0 + timedelta(seconds=119)) == []
    late = w.stuck(T0 + timedelta(seconds=120))
    assert [x.request_id for x in late] == ["r1"]
    assert w.stuck(T0 + timedelta(seconds=200)) == []  # reported once
    assert [x.request_id for x in w.stuck(T0 + timedelta(seconds=3600))] == ["r2"]
    item = stuck_item(late[0], 120.0, T0 + timedelta(seconds=130))
    assert item.kind == "stuck" and item.cause == "stat lane: no finding within 120 s"
    assert "waiting 130 s" in item.detail


def test_an_upgrade_keeps_the_clock_and_takes_the_faster_limit() -> None:
    w = StuckWatch({"stat": 60.0, "routine": 3600.0}, cap=100)
    w.routed(watched("r1", "routine", T0))
    w.routed(watched("r1", "stat", T0 + timedelta(seconds=30)))
    assert [x.lane for x in w.stuck(T0 + timedelta(seconds=60))] == ["stat"]


def test_unwatched_lanes_finished_requests_and_the_bound() -> None:
    w = StuckWatch({"stat": 60.0}, cap=2)
    w.routed(watched("r0", "routine", T0))  # routine not watched
    w.done("r1")
    w.routed(watched("r1", "stat", T0))  # a copy read after its finding
    for i in range(2, 6):
        w.routed(watched(f"r{i}", "stat", T0))
    assert list(w.watched) == ["r4", "r5"] and w.dropped == 2
    w.done("", study_uid="1.2.3")  # a finding without request id: the study's requests
    assert w.stuck(T0 + timedelta(hours=1)) == []


def test_operators_are_an_oncall_recipient_and_or_named_channels() -> None:
    hooks = {"ops": WebhookTarget(name="ops", url="http://127.0.0.1:9/x")}
    assert operators_recipient(OperatorNotifySettings(), None, hooks) is None
    oncall = Oncall.parse(
        "recipients:\n  operators:\n    channels:\n      - email: ops@example.org\n"
        "fallback: {recipients: [operators]}\n"
    )
    ops = OperatorNotifySettings(
        recipient="operators", webhooks=["ops"], emails=["ops@example.org", "b@x.org"]
    )
    r = operators_recipient(ops, oncall, hooks)
    assert r is not None
    assert r.channels == (Channel(email="ops@example.org"), Channel(webhook="ops"), Channel(email="b@x.org"))
    with pytest.raises(OncallError, match=r"not in notify\.webhooks"):
        operators_recipient(OperatorNotifySettings(webhooks=["nope"]), None, hooks)
    with pytest.raises(OncallError, match="not a recipient"):
        operators_recipient(OperatorNotifySettings(recipient="nobody"), oncall, hooks)


def test_operator_settings_have_env_equivalents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADTRIAGE_NOTIFY__OPERATORS__WEBHOOKS", '["ops"]')
    monkeypatch.setenv("RADTRIAGE_NOTIFY__OPERATORS__DIGEST_S", "5")
    monkeypatch.setenv("RADTRIAGE_NOTIFY__OPERATORS__STUCK_AFTER_S", '{"stat": 30}')
    ops = Settings().notify.operators
    assert ops.webhooks == ["ops"] and ops.digest_s == 5.0 and ops.stuck_after_s == {"stat": 30.0}


def test_status_says_whether_operators_are_told() -> None:
    assert "operators not notified" in notify_summary(
        NotifySettings(webhooks=[WebhookTarget(name="a", url="http://x/")])
    )
    summary = notify_summary(NotifySettings(operators=OperatorNotifySettings(emails=["o@x.org"])))
    assert (
        summary.startswith("OFF") and "operators told of dead letters and stuck studies every 60 s" in summary
    )


def test_a_digest_message_names_the_cause_count_and_first_studies() -> None:
    d = Digests(period_s=60, examples=2, max_causes=3)
    for i in range(5):
        d.add(deadletter_item(letter("TritonUnavailable: down", study=f"1.2.{i}"), T0))
    (bucket,) = d.due(T0 + timedelta(minutes=1))
    n = ops_message.OpsNotice(bucket, bucket.key(""), "radtriage operators", "http://h/operator")
    body = ops_message.json_body(n)
    assert body["count"] == 5 and body["cause"] == "infer-stat: TritonUnavailable"
    assert [e["study_uid"] for e in body["examples"]] == ["1.2.0", "1.2.1"]
    text = ops_message.email(n, "r@x", "o@x").get_content()
    assert "5 dead letter(s)" in text and "... and 3 more" in text
    for fmt in ("teams", "slack"):
        assert "5 dead letter(s)" in str(ops_message.body(n, fmt))


def _agents(settings: Settings) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in built_app(settings).agents}


def test_nothing_configured_registers_no_notify_agent() -> None:
    assert not {"notify", "notify-ops"} & _agents(Settings())


def test_operators_alone_register_only_the_operators_agent() -> None:
    settings = Settings.model_validate({"notify": {"operators": {"emails": ["ops@example.org"]}}})
    agents = _agents(settings)
    assert "notify-ops" in agents and "notify" not in agents
    nothing_to_watch = Settings.model_validate(
        {"notify": {"operators": {"emails": ["o@x.org"], "deadletters": False, "stuck_after_s": {}}}}
    )
    assert "notify-ops" not in _agents(nothing_to_watch)


def test_the_notify_stream_decodes_only_acknowledgements_and_notify_records() -> None:
    from schemas.audit import ACK_DECISION, AuditEvent, AuditStage
    from streams.notify_state import relevant_audit

    def raw(stage: AuditStage, decision: str) -> bytes:
        return AuditEvent(
            study_uid="1.2", stage=stage, decision=decision, detail={"alert_id": "1.2/ICH"}
        ).to_bytes()

    assert relevant_audit(raw("alert", ACK_DECISION))
    assert relevant_audit(raw("notify", "notify_delivered"))
    assert not relevant_audit(raw("route", "routed"))
    assert not relevant_audit(raw("alert", "alert_sent"))
    assert not relevant_audit(None)


def test_a_told_digest_s_coverage_keeps_its_items_out_when_they_are_read_again() -> None:
    """After a kill, the next worker reads the partitions again: what a told digest covered
    (per cause and partition, the last offset; carried by its audit record as text) is not
    gathered again, what came after it is."""
    d = Digests(period_s=60, examples=2, max_causes=10)
    for offset in range(5):
        d.add(deadletter_item(letter("X: a"), T0, ("triage.deadletter", 1, offset)))
    d.add(deadletter_item(letter("Y: b"), T0, ("triage.deadletter", 1, 5)))
    told = [b for b in d.due(T0 + timedelta(seconds=60)) if b.cause == "infer-stat: X"]
    (bucket,) = told
    assert bucket.covered == {("infer-stat: X", "triage.deadletter", 1): 4}

    again = Digests(period_s=60, examples=2, max_causes=10)
    again.mark_told("deadletter", covered_of(covered_text(bucket.covered)))
    later = T0 + timedelta(seconds=90)
    for offset in range(5):
        assert again.add(deadletter_item(letter("X: a"), later, ("triage.deadletter", 1, offset))) is None
    # Another cause at an earlier offset, another partition, a later offset: all still gathered.
    assert again.add(deadletter_item(letter("Y: b"), later, ("triage.deadletter", 1, 5))) is not None
    assert again.add(deadletter_item(letter("X: a"), later, ("triage.deadletter", 2, 0))) is not None
    assert again.add(deadletter_item(letter("X: a"), later, ("triage.deadletter", 1, 6))) is not None
    out = again.due(T0 + timedelta(seconds=180))
    assert sorted((b.cause, b.count) for b in out) == [("infer-stat: X", 2), ("infer-stat: Y", 1)]
    assert covered_of("not json") == {} and covered_of(None) == {}
