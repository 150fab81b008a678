from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.instances import InstanceEvent
from streams.assembly import add_instance, complete_study, is_quiet

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
        received_at=at,
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
