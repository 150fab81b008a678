from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.instances import InstanceEvent
from streams.assembly import (
    add_instance,
    complete_study,
    completion_key,
    expired,
    is_quiet,
    mark_emitted,
    missing_instances,
    shortfall,
)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def inst(sop: str, series: str = "1.2.1", at: datetime = T0, **kw: str) -> InstanceEvent:
    return InstanceEvent(
        study_uid="1.2",
        series_uid=series,
        sop_instance_uid=sop,
        modality="CT",
        body_part="HEAD",
        series_description="CT HEAD",
        accession_number=kw.get("accession", "A1"),
        patient_id="MRN1",
        blob_uri=f"file:///b/{series}/{sop}.dcm",
        association_id=kw.get("association", "assoc-1"),
        received_at=at,
    )


def released(count: int, association: str = "assoc-1") -> InstanceEvent:
    return InstanceEvent(
        kind="transfer_complete", study_uid="1.2", association_id=association, instance_count=count
    )


def test_instances_fold_into_series_and_first_trace_is_kept() -> None:
    s = add_instance(None, inst("1", at=T0 + timedelta(seconds=2)), "tp-first")
    s = add_instance(s, inst("2", at=T0), "tp-second")
    s = add_instance(s, inst("9", series="1.2.2", at=T0 + timedelta(seconds=5)), "tp-third")
    assert s.traceparent == "tp-first"
    assert s.received_at == T0  # earliest instance starts the clock, whatever the arrival order
    assert s.last_instance_at == T0 + timedelta(seconds=5)
    assert {k: len(v.instances) for k, v in s.series.items()} == {"1.2.1": 2, "1.2.2": 1}


def test_resent_instance_does_not_double() -> None:
    s = add_instance(None, inst("1"), "")
    s = add_instance(s, inst("1"), "")
    assert len(s.series["1.2.1"].instances) == 1


def test_add_instance_leaves_previous_state_untouched() -> None:
    s1 = add_instance(None, inst("1"), "")
    s2 = add_instance(s1, inst("2"), "")
    assert len(s1.series["1.2.1"].instances) == 1 and len(s2.series["1.2.1"].instances) == 2


def test_quiet_period() -> None:
    s = add_instance(None, inst("1"), "")
    assert not is_quiet(s, T0 + timedelta(seconds=9.9), 10)
    assert is_quiet(s, T0 + timedelta(seconds=10), 10)


def test_complete_study_lists_every_series_and_instance() -> None:
    s = add_instance(None, inst("1"), "")
    s = add_instance(s, inst("2"), "")
    s = add_instance(s, inst("3", series="1.2.0"), "")
    study = complete_study(s, "transfer_complete", now=T0 + timedelta(seconds=1))
    assert [x.series_uid for x in study.series] == ["1.2.0", "1.2.1"]
    assert len(study.series[1].instance_uris) == 2
    assert study.accession_number == "A1" and study.patient_id == "MRN1"
    assert study.ready_reason == "transfer_complete" and study.received_at == T0


def test_a_late_instance_reopens_an_emitted_study_and_the_next_emission_has_all_of_it() -> None:
    # The sender stalled longer than the quiet period (a Kafka failover): the first slice
    # went out alone; the rest must not become a study of its own missing that slice.
    first = add_instance(None, inst("1"), "")
    early = complete_study(first, "quiet_period", now=T0 + timedelta(seconds=10))
    assert sum(len(s.instance_uris) for s in early.series) == 1
    emitted = mark_emitted(first, early.ready_at)
    assert not is_quiet(emitted, T0 + timedelta(hours=1), 10)  # no second nudge of its own
    state = emitted
    for sop in ("2", "3"):
        state = add_instance(state, inst(sop, at=T0 + timedelta(seconds=12)), "")
    assert state.emitted_at is None
    full = complete_study(state, "transfer_complete", now=T0 + timedelta(seconds=13))
    assert sorted(u.rsplit("/", 1)[1] for s in full.series for u in s.instance_uris) == [
        "1.dcm",
        "2.dcm",
        "3.dcm",
    ]
    assert full.ready_at != early.ready_at  # new work: new request ids


def test_the_same_instance_again_does_not_reopen_an_emitted_study() -> None:
    state = mark_emitted(add_instance(None, inst("1"), ""), T0)
    assert add_instance(state, inst("1"), "").emitted_at == T0


def test_emitted_state_expires_after_its_retention() -> None:
    state = mark_emitted(add_instance(None, inst("1"), ""), T0)
    assert not expired(state, T0 + timedelta(minutes=59))
    assert expired(state, T0 + timedelta(hours=1))
    assert not expired(add_instance(None, inst("1"), ""), T0 + timedelta(days=1))  # never emitted


def nudge(at: datetime) -> InstanceEvent:
    return InstanceEvent(kind="quiet_period", study_uid="1.2", received_at=at)


def marker(at: datetime) -> InstanceEvent:
    return InstanceEvent(kind="transfer_complete", study_uid="1.2", association_id="a1", received_at=at)


def test_a_later_emission_is_readier_even_when_its_event_is_stamped_earlier() -> None:
    # A nudge stamped at +20 s went through first; the release marker, stamped at +15 s,
    # reached Kafka after it. The full study must not look older than the partial one, or
    # the infer stage drops the full read as superseded.
    state = add_instance(None, inst("1"), "")
    early_key = completion_key(nudge(T0 + timedelta(seconds=20)))
    early = complete_study(state, "quiet_period", now=T0 + timedelta(seconds=20), key=early_key)
    state = mark_emitted(state, early.ready_at, early_key)
    state = add_instance(state, inst("2", at=T0 + timedelta(seconds=14)), "")
    full_key = completion_key(marker(T0 + timedelta(seconds=15)))
    full = complete_study(state, "transfer_complete", now=T0 + timedelta(seconds=15), key=full_key)
    assert full.ready_at > early.ready_at


def test_a_replayed_completion_is_ready_at_the_same_time_as_the_first_time() -> None:
    # A worker that takes over may restore the table ahead of the offsets it replays: the
    # emission replayed must carry the same ready time (hence the same request ids).
    state = add_instance(None, inst("1"), "")
    key = completion_key(marker(T0 + timedelta(seconds=3)))
    first = complete_study(state, "transfer_complete", now=T0 + timedelta(seconds=3), key=key)
    ahead = add_instance(
        mark_emitted(state, first.ready_at, key), inst("2", at=T0 + timedelta(seconds=4)), ""
    )
    again = complete_study(ahead, "transfer_complete", now=T0 + timedelta(seconds=3), key=key)
    assert again.ready_at == first.ready_at


def test_a_nudge_is_judged_at_the_time_it_was_sent_not_when_a_lagging_worker_reads_it() -> None:
    # Instances 2 s apart, a nudge sent 2 s after the last one: read an hour later by a
    # worker catching up, the study was still not quiet when the nudge was sent.
    state = add_instance(None, inst("1", at=T0), "")
    state = add_instance(state, inst("2", at=T0 + timedelta(seconds=2)), "")
    assert not is_quiet(state, nudge(T0 + timedelta(seconds=4)).received_at, 10)
    assert is_quiet(state, nudge(T0 + timedelta(seconds=12)).received_at, 10)


def test_a_marker_is_checked_against_the_instances_its_own_association_delivered() -> None:
    # One series per association, as scanners send: each marker counts its own.
    s = add_instance(None, inst("1", association="a"), "")
    s = add_instance(s, inst("2", association="a"), "")
    s = add_instance(s, inst("9", series="1.2.2", association="b"), "")
    assert s.delivered == {"a": 2, "b": 1}
    assert shortfall(s, released(2, "a")) == 0
    assert shortfall(s, released(1, "b")) == 0
    assert shortfall(s, released(3, "a")) == 1  # the table lost one of a's instances
    assert shortfall(None, released(4, "c")) == 4  # lost the whole state
    # A re-folded instance (a replay after a crash) is not counted twice.
    assert add_instance(s, inst("1", association="a"), "").delivered == {"a": 2, "b": 1}


def test_nudges_and_markers_without_an_association_are_not_checked() -> None:
    s = add_instance(None, inst("1"), "")
    assert shortfall(s, InstanceEvent(kind="quiet_period", study_uid="1.2")) == 0
    assert shortfall(s, released(5, association="")) == 0


def test_a_resend_counts_for_the_association_that_delivered_first_and_the_log_settles_it() -> None:
    s = add_instance(None, inst("1", association="first"), "")
    s = add_instance(s, inst("2", association="first"), "")
    for sop in ("1", "2", "3"):
        s = add_instance(s, inst(sop, association="resend"), "")
    assert shortfall(s, released(3, "resend")) == 2  # only "3" was new in it
    read_back = [inst(sop, association="resend") for sop in ("1", "2", "3")]
    assert missing_instances(s, read_back) == []


def test_missing_instances_are_those_the_state_lacks_once_each() -> None:
    s = add_instance(None, inst("1"), "")
    read_back = [inst("1"), inst("2"), inst("2"), inst("7", series="1.2.9")]
    assert [e.sop_instance_uid for e in missing_instances(s, read_back)] == ["2", "7"]
    assert [e.sop_instance_uid for e in missing_instances(None, read_back)] == ["1", "2", "7"]
    marker = released(1)
    assert missing_instances(s, [marker]) == []
