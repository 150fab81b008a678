"""The notify stage's pure parts: the on-call file, the rota, signing, messages, the
retry/fallback policy and the escalation state (issue 19)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from processors.notify import message
from processors.notify.channels import ChannelError, webhook_headers, webhook_payload
from processors.notify.deliver import Try, deliver
from processors.notify.rota import Subject, active_windows, recipients_for, usable_channels, webhooks_only
from processors.notify.signing import (
    AckClaim,
    AckTokenError,
    SignatureError,
    idempotency_key,
    make_ack_token,
    read_ack_token,
    verify_webhook,
)
from radtriage.settings import REPO_ROOT, NotifySettings, Settings, WebhookTarget
from radtriage.status import notify_summary
from schemas.alerts import Alert
from schemas.audit import ACK_DECISION, AuditEvent
from schemas.findings import SliceRange
from schemas.oncall import Channel, Oncall, OncallError
from streams import notify_state as ns

ONCALL = """\
version: 1
timezone: Europe/Berlin
windows:
  day: {days: [mon, tue, wed, thu, fri], start: "08:00", end: "20:00"}
  night: {days: [mon, tue, wed, thu, fri], start: "20:00", end: "08:00"}
  weekend: {days: [sat, sun], start: "00:00", end: "24:00"}
recipients:
  day-doc: {channels: [{webhook: hook}]}
  night-doc: {channels: [{email: night@h.example}]}
  boss: {display: Attending, channels: [{webhook: hook}, {email: boss@h.example}]}
  ops: {channels: [{webhook: ops}]}
rules:
  - findings: [ICH]
    windows: [day]
    chain:
      - {recipients: [day-doc], timeout_s: 60}
      - {recipients: [boss], timeout_s: 120}
  - findings: [ICH]
    windows: [night, weekend]
    chain:
      - {recipients: [night-doc], timeout_s: 60}
fallback: {recipients: [ops]}
"""

BERLIN_WINTER = timedelta(hours=1)  # CET in December


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """December 2026 in Berlin wall time (the 7th is a Monday), as UTC."""
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC) - BERLIN_WINTER


def alert(**fields: object) -> Alert:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "alert_id": "1.2.3/ICH",
        "study_uid": "1.2.3",
        "accession_number": "ACC1",
        "finding": "ICH",
        "probability": 0.93,
        "threshold": 0.5,
        "model_name": "ich_classifier",
        "model_version": "1",
        "lane": "stat",
        "received_at": now - timedelta(minutes=3),
        "ready_at": now - timedelta(minutes=2),
    }
    values.update(fields)
    return Alert.model_validate(values)


# -- the on-call file -------------------------------------------------------------------------


def test_the_shipped_example_is_valid() -> None:
    oncall = Oncall.load(REPO_ROOT / "deploy" / "notify" / "oncall.yaml")
    assert oncall.fallback is not None and oncall.rules


@pytest.mark.parametrize(
    ("change", "line", "says"),
    [
        ("timeout_s: 120}", 17, "timeout_s"),
        ('start: "20:00"', 5, "start"),
        ("{email: night@h.example}", 9, "email"),
        ("[ICH]\n    windows: [night", 19, "no window named"),
        ("recipients: [ops]", 22, "no recipient"),
    ],
)
def test_errors_name_the_line(change: str, line: int, says: str) -> None:
    broken = {
        "timeout_s: 120}": ONCALL.replace("timeout_s: 120}", "timeout_s: -1}"),
        'start: "20:00"': ONCALL.replace('start: "20:00"', 'start: "25:00"'),
        "{email: night@h.example}": ONCALL.replace("{email: night@h.example}", "{email: not-an-address}"),
        "[ICH]\n    windows: [night": ONCALL.replace("[night, weekend]", "[night, holidays]"),
        "recipients: [ops]": ONCALL.replace("recipients: [ops]", "recipients: [nobody]"),
    }[change]
    with pytest.raises(OncallError) as err:
        Oncall.parse(broken, "oncall.yaml")
    assert f"oncall.yaml:{line}:" in str(err.value) and says in str(err.value), str(err.value)


def test_not_yaml_and_not_a_mapping_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(OncallError, match=r"oncall.yaml:3: not YAML"):
        Oncall.parse("version: 1\nrecipients:\n\ta: b\n", "oncall.yaml")
    with pytest.raises(OncallError, match=r":1: the on-call file must be a mapping"):
        Oncall.parse("- a list\n", "x.yaml")
    with pytest.raises(OncallError, match="cannot read"):
        Oncall.load(tmp_path / "missing.yaml")


def test_a_channel_is_a_webhook_or_an_address_not_both() -> None:
    with pytest.raises(ValueError, match="either"):
        Channel(webhook="a", email="a@b")
    with pytest.raises(ValueError, match="either"):
        Channel()


# -- the rota ---------------------------------------------------------------------------------


def test_windows_by_wall_clock_including_nights_across_midnight_and_the_weekend() -> None:
    oncall = Oncall.parse(ONCALL)
    assert active_windows(oncall, at(7, 9)) == {"day"}  # Monday morning
    assert active_windows(oncall, at(7, 20)) == {"night"}  # Monday 20:00: night starts
    assert active_windows(oncall, at(8, 3)) == {"night"}  # Tuesday 03:00: Monday's night
    assert active_windows(oncall, at(8, 8)) == {"day"}  # Tuesday 08:00: night ended
    # Friday's night runs into Saturday, which is also the weekend.
    assert active_windows(oncall, at(12, 7, 59)) == {"night", "weekend"}
    assert active_windows(oncall, at(12, 8)) == {"weekend"}
    # Sunday night is the weekend's, not a weekday night (no sun in night's days)...
    assert active_windows(oncall, at(13, 23)) == {"weekend"}
    # ...and Monday 03:00 belongs to no window: Sunday's night is not on the rota.
    assert active_windows(oncall, at(14, 3)) == set()


def test_recipients_for_the_first_matching_rule_then_the_fallback() -> None:
    oncall = Oncall.parse(ONCALL)
    day = recipients_for(Subject("ICH"), oncall, at(7, 10))
    assert [(s.recipients, s.timeout_s, s.fallback) for s in day] == [
        (("day-doc",), 60, False),
        (("boss",), 120, False),
        (("ops",), None, True),
    ]
    night = recipients_for(Subject("ICH"), oncall, at(12, 23))  # Friday night
    assert [s.recipients for s in night] == [("night-doc",), ("ops",)]
    # No rule for LVO, and nobody on the rota at Monday 03:00: the fallback alone.
    assert [s.recipients for s in recipients_for(Subject("LVO"), oncall, at(7, 10))] == [("ops",)]
    assert [s.recipients for s in recipients_for(Subject("ICH"), oncall, at(14, 3))] == [("ops",)]
    assert [s.index for s in day] == [0, 1, 2]


def test_rules_naming_sites_or_locations_do_not_match_an_alert_without_them() -> None:
    text = ONCALL.replace(
        "  - findings: [ICH]\n    windows: [day]", "  - findings: [ICH]\n    locations: [ED]"
    )
    oncall = Oncall.parse(text)
    assert next(s.recipients for s in recipients_for(Subject("ICH"), oncall, at(7, 10))) == ("ops",)
    assert recipients_for(Subject("ICH", location="ed"), oncall, at(7, 10))[0].recipients == ("day-doc",)


def test_usable_channels_follow_the_webhooks_findings_and_smtp() -> None:
    oncall = Oncall.parse(ONCALL)
    hooks = {"hook": WebhookTarget(url="http://x", findings=["LVO"]), "ops": WebhookTarget(url="http://y")}
    boss = oncall.recipients["boss"]
    assert [c.label for c in usable_channels(boss, "LVO", hooks, email=True)] == [
        "webhook:hook",
        "email:boss@h.example",
    ]
    assert [c.label for c in usable_channels(boss, "ICH", hooks, email=True)] == ["email:boss@h.example"]
    assert usable_channels(boss, "ICH", hooks, email=False) == ()


def test_webhooks_alone_are_one_step_to_every_webhook() -> None:
    assert webhooks_only({}) is None
    oncall = webhooks_only({"a": WebhookTarget(url="http://a"), "b": WebhookTarget(url="http://b")})
    assert oncall is not None
    (step,) = recipients_for(Subject("LVO"), oncall, at(7, 3))
    assert step.recipients == ("a", "b") and not step.fallback


# -- signing ----------------------------------------------------------------------------------


def test_webhook_signature_verifies_and_refuses_tampering_and_replays() -> None:
    target = WebhookTarget(url="http://x", secret="s3cret")  # type: ignore[arg-type]
    body = b'{"a":1}'
    headers = webhook_headers(target, body, "key", 1_000_000)
    ts, sig = headers["X-Radtriage-Timestamp"], headers["X-Radtriage-Signature"]
    assert headers["Idempotency-Key"] == "key" and sig.startswith("sha256=")
    verify_webhook("s3cret", body, ts, sig, now=1_000_100)
    with pytest.raises(SignatureError, match="does not match"):
        verify_webhook("s3cret", b'{"a":2}', ts, sig, now=1_000_100)
    with pytest.raises(SignatureError, match="does not match"):
        verify_webhook("other", body, ts, sig, now=1_000_100)
    with pytest.raises(SignatureError, match="replay window"):
        verify_webhook("s3cret", body, ts, sig, now=1_000_301)
    with pytest.raises(SignatureError, match="missing"):
        verify_webhook("s3cret", body, None, sig, now=1_000_000)
    # No secret: no signature headers (Teams and Slack verify nothing).
    assert "X-Radtriage-Signature" not in webhook_headers(WebhookTarget(url="http://x"), body, "k", 1)


def test_ack_token_round_trip_expiry_and_forgery() -> None:
    claim = AckClaim("1.2.3/ICH", "1.2.3", "ACC1", "ICH", "day-doc", 0, expires=2000)
    token = make_ack_token("k", claim)
    assert read_ack_token("k", token, now=1999) == claim
    with pytest.raises(AckTokenError) as err:
        read_ack_token("k", token, now=2001)
    assert err.value.problem == "expired"
    with pytest.raises(AckTokenError) as err:
        read_ack_token("other", token, now=1999)
    assert err.value.problem == "bad_signature"
    _payload, _, mac = token.partition(".")
    forged = make_ack_token("k", AckClaim("9/ICH", "9", "", "ICH", "x", 0, 2000)).partition(".")[0]
    with pytest.raises(AckTokenError) as err:
        read_ack_token("k", f"{forged}.{mac}", now=1999)
    assert err.value.problem == "bad_signature"
    for junk in ("", "nodot", ".x", "x.", "a.!!!"):
        with pytest.raises(AckTokenError):
            read_ack_token("k", junk, now=0)


def test_idempotency_key_is_per_alert_recipient_and_step() -> None:
    keys = {idempotency_key(a, r, s) for a in ("x/ICH", "y/ICH") for r in ("a", "b") for s in (0, 1)}
    assert len(keys) == 8 and idempotency_key("x/ICH", "a", 0) == idempotency_key("x/ICH", "a", 0)


# -- messages ---------------------------------------------------------------------------------


def notice(**fields: object) -> message.Notice:
    a = alert(
        slice_range=SliceRange(
            first_instance_number=12,
            last_instance_number=20,
            first_position_mm=1,
            last_position_mm=9,
            slices=9,
        ),
        **fields,
    )
    return message.Notice(
        alert=a,
        step=1,
        recipient="boss",
        recipient_display="Attending",
        key="k1",
        study_url=message.study_url("https://rt.example/", a.study_uid),
        ack_url="https://rt.example/notify/ack?t=tok",
    )


def test_every_format_says_what_a_clinician_needs_and_nothing_of_the_patient() -> None:
    n = notice()
    now = datetime.now(UTC)
    for fmt in ("json", "teams", "slack"):
        body = webhook_payload(WebhookTarget(url="http://x", format=fmt), n, now).decode()  # type: ignore[arg-type]
        for needed in ("ICH", "0.93", "stat", "ACC1", "12-20", "https://rt.example/operator/studies/1.2.3"):
            if fmt == "json" and needed == "12-20":
                needed = '"first_instance_number":12'
            assert needed in body, (fmt, needed)
        assert "notify/ack?t=tok" in body
        assert "patient_name" not in body.lower() and "birth" not in body.lower()
    mail = message.email(n, now, "rt@h.example", "boss@h.example")
    text = mail.get_content()
    assert mail["Message-ID"] == "<k1@radtriage>" and "UNACKNOWLEDGED" in mail["Subject"]
    assert "Since scan: 3 min" in text and "Acknowledge: https://rt.example/notify/ack?t=tok" in text
    data = json.loads(webhook_payload(WebhookTarget(url="http://x"), n, now))
    assert data["idempotency_key"] == "k1" and data["patient_location"] is None
    lvo = message.facts(notice(finding="LVO", alert_id="1.2.3/LVO", laterality="left"), now)
    assert ("Side", "left") in lvo


# -- retries and fallback ---------------------------------------------------------------------


def test_deliver_retries_with_backoff_then_falls_back_to_the_next_channel() -> None:
    hook, mail = Channel(webhook="hook"), Channel(email="a@b.example")
    failures = {"webhook:hook": [True, True, True], "email:a@b.example": [True, False]}
    sleeps: list[float] = []
    tries: list[Try] = []

    async def send(channel: Channel) -> None:
        if failures[channel.label].pop(0):
            raise ChannelError("HTTP 503", retryable=True)

    async def record(t: Try) -> None:
        tries.append(t)

    async def sleep(s: float) -> None:
        sleeps.append(s)

    took = asyncio.run(deliver([hook, mail], send, record, attempts=3, backoff_s=0.5, sleep=sleep))
    assert took == "email:a@b.example"
    assert [(t.channel, t.attempt, bool(t.error)) for t in tries] == [
        ("webhook:hook", 1, True),
        ("webhook:hook", 2, True),
        ("webhook:hook", 3, True),
        ("email:a@b.example", 1, True),
        ("email:a@b.example", 2, False),
    ]
    assert sleeps == [0.5, 1.0, 0.5]


def test_deliver_does_not_retry_a_permanent_failure_and_says_when_nothing_took_it() -> None:
    calls: list[str] = []

    async def send(channel: Channel) -> None:
        calls.append(channel.label)
        raise ChannelError("HTTP 404", retryable=False)

    async def record(t: Try) -> None:
        return None

    took = asyncio.run(
        deliver([Channel(webhook="a"), Channel(webhook="b")], send, record, attempts=5, backoff_s=0)
    )
    assert took is None and calls == ["webhook:a", "webhook:b"]


# -- escalation state -------------------------------------------------------------------------


def record(decision: str, t: datetime, stage: str = "notify", **detail: object) -> AuditEvent:
    return AuditEvent(
        study_uid="1.2.3",
        stage=stage,  # type: ignore[arg-type]
        decision=decision,
        detail={"alert_id": "1.2.3/ICH", "at": t.isoformat(), **detail},  # type: ignore[dict-item]
        at=t,
    )


def test_escalation_steps_at_the_timeout_stops_on_ack_and_folds_idempotently() -> None:
    oncall = Oncall.parse(ONCALL)
    t0 = at(7, 10)
    chain = recipients_for(Subject("ICH"), oncall, t0)
    state = ns.NotifyState()
    state.add_alert(alert(alerted_at=t0))
    state.apply(record(ns.OPENED, t0))
    esc = state.escalations["1.2.3/ICH"]
    assert ns.next_action(esc, chain, t0) == ns.Send("1.2.3/ICH", chain[0], ("day-doc",))
    delivered = record(ns.DELIVERED, t0, key=idempotency_key("1.2.3/ICH", "day-doc", 0))
    for _ in range(2):  # read twice (own write, then the stream): the same state
        state.apply(delivered)
    assert ns.next_action(esc, chain, t0 + timedelta(seconds=59)) is None
    assert ns.next_action(esc, chain, t0 + timedelta(seconds=60)) == ns.Escalate("1.2.3/ICH", 1)
    state.apply(record(ns.STEP, t0 + timedelta(seconds=61), step=1))
    assert ns.next_action(esc, chain, t0 + timedelta(seconds=62)) == ns.Send("1.2.3/ICH", chain[1], ("boss",))
    state.apply(record(ACK_DECISION, t0 + timedelta(seconds=70), stage="alert", by="Dr A"))
    assert esc.acked_by == "Dr A"
    assert ns.next_action(esc, chain, t0 + timedelta(seconds=71)) == ns.Stop("1.2.3/ICH", "acknowledged")
    state.apply(record(ns.STOPPED, t0 + timedelta(seconds=71), reason="acknowledged"))
    assert list(ns.due(state, lambda e: chain, t0 + timedelta(hours=1))) == []


def test_after_the_last_step_the_fallback_then_the_end() -> None:
    oncall = Oncall.parse(ONCALL)
    t0 = at(12, 23)  # Friday night: night-doc, then the fallback
    chain = recipients_for(Subject("ICH"), oncall, t0)
    state = ns.NotifyState()
    state.apply(record(ns.OPENED, t0))
    esc = state.escalations["1.2.3/ICH"]
    state.apply(record(ns.UNDELIVERABLE, t0, key=idempotency_key("1.2.3/ICH", "night-doc", 0)))
    assert esc.undeliverable and ns.next_action(esc, chain, t0 + timedelta(seconds=60)) == ns.Escalate(
        "1.2.3/ICH", 1
    )
    state.apply(record(ns.STEP, t0 + timedelta(seconds=60), step=1))
    state.apply(record(ns.DELIVERED, t0, key=idempotency_key("1.2.3/ICH", "ops", 1)))
    assert ns.next_action(esc, chain, t0 + timedelta(days=1)) == ns.Stop("1.2.3/ICH", "exhausted")


def test_an_ack_read_before_the_open_still_counts_and_old_state_is_pruned() -> None:
    t0 = at(7, 10)
    state = ns.NotifyState()
    state.apply(record(ACK_DECISION, t0 + timedelta(seconds=5), stage="alert", by="Dr B"))
    state.apply(record(ns.OPENED, t0))
    assert state.escalations["1.2.3/ICH"].acked_by == "Dr B"
    state.add_alert(alert(alerted_at=t0))
    state.prune(t0 + timedelta(hours=2), keep_s=3600)
    assert not state.escalations and not state.alerts


def test_status_says_when_nothing_is_configured() -> None:
    assert notify_summary(NotifySettings()).startswith("OFF: nothing configured")
    n = Settings().notify.model_copy(
        update={"webhooks": [WebhookTarget(url="http://x")], "oncall_file": Path("/etc/oncall.yaml")}
    )
    summary = notify_summary(n)
    assert "1 webhook(s)" in summary and "no e-mail" in summary and "/etc/oncall.yaml" in summary


def test_a_hospital_can_leave_out_more_than_the_minimum() -> None:
    n = notice()
    lean = message.Notice(**{**n.__dict__, "omit": frozenset({"accession", "probability", "since_scan"})})
    now = datetime.now(UTC)
    for fmt in ("json", "teams", "slack"):
        body = webhook_payload(WebhookTarget(url="http://x", format=fmt), lean, now).decode()  # type: ignore[arg-type]
        assert "ACC1" not in body and "0.93" not in body and "ICH" in body and "/operator/studies/" in body
    data = json.loads(webhook_payload(WebhookTarget(url="http://x"), lean, now))
    assert data["accession_number"] is None and data["received_at"] is None and data["finding"] == "ICH"
    text = message.email(lean, now, "a@b", "c@d").get_content()
    assert "Accession" not in text and "Since scan" not in text and "Slices: images 12-20" in text


def test_the_patient_class_travels_to_the_alert_and_is_the_rules_location() -> None:
    from schemas.orders import OrderEvent
    from streams.join import patient_class_of
    from streams.stages.notify import subject

    order = OrderEvent.model_validate(
        {"accession_number": "A", "patient_class": "emergency", "source": "hl7", "message_type": "ORM^O01"}
    )
    assert patient_class_of("unknown", order) == "emergency"
    assert patient_class_of("inpatient", order) == "inpatient"
    assert patient_class_of("unknown", None) == "unknown"
    text = ONCALL.replace(
        "  - findings: [ICH]\n    windows: [day]", "  - findings: [ICH]\n    locations: [emergency]"
    )
    oncall = Oncall.parse(text)
    ed = subject(alert(patient_class="emergency"))
    assert ed.location == "emergency" and subject(alert()).location == ""
    assert recipients_for(ed, oncall, at(14, 3))[0].recipients == ("day-doc",)
    assert recipients_for(subject(alert()), oncall, at(14, 3))[0].recipients == ("ops",)


def test_a_worker_with_a_broken_oncall_file_does_not_start_and_names_the_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    broken = tmp_path / "oncall.yaml"
    broken.write_text(ONCALL.replace("recipients: [ops]", "recipients: [nobody]"))
    env = {
        **os.environ,
        "RADTRIAGE_HOME": str(tmp_path / "home"),
        "RADTRIAGE_NOTIFY__ONCALL_FILE": str(broken),
        # Checked before Kafka is touched: no broker is needed to be told.
        "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    env.pop("RADTRIAGE_SETTINGS_JSON", None)
    done = subprocess.run(
        [sys.executable, "-m", "radtriage.cli", "worker"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{broken}:22: fallback.recipients.0: no recipient 'nobody'" in done.stderr


def test_alerts_read_back_without_an_open_or_skip_record_are_the_unopened() -> None:
    """A takeover finds the alerts whose open record never reached Kafka; a skipped alert
    (too old when read) is not one of them, and the skip survives the fold and is pruned."""
    t0 = datetime.now(UTC)
    state = ns.NotifyState()
    state.add_alert(alert(alerted_at=t0))
    state.add_alert(alert(alert_id="1.2.4/ICH", study_uid="1.2.4", alerted_at=t0))
    state.add_alert(alert(alert_id="1.2.5/ICH", study_uid="1.2.5", alerted_at=t0))
    assert sorted(a.alert_id for a in state.unopened()) == ["1.2.3/ICH", "1.2.4/ICH", "1.2.5/ICH"]
    state.apply(record(ns.OPENED, t0))
    skip = record(ns.SKIPPED, t0, reason="too_old")
    state.apply(skip.model_copy(update={"detail": {**skip.detail, "alert_id": "1.2.4/ICH"}}))
    assert [a.alert_id for a in state.unopened()] == ["1.2.5/ICH"]
    assert "1.2.4/ICH" not in state.escalations
    state.prune(t0 + timedelta(days=2), 3600)
    assert state.skipped == {} and state.unopened() == []
