from __future__ import annotations

import pytest

from schemas.base import EventDecodeError
from schemas.instances import InstanceEvent


def test_round_trip() -> None:
    e = InstanceEvent(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4", blob_uri="file:///x")
    assert InstanceEvent.from_bytes(e.to_bytes()) == e


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "invalid"),
        (b"{}", "study_uid"),
        (b'{"study_uid": "1", "kind": "bogus"}', "kind"),
        (b'{"study_uid": "1", "unexpected": 1}', "unexpected"),
        (b'{"study_uid": "1", "schema_version": 99}', "schema_version 99"),
        (None, "empty"),
    ],
)
def test_unreadable_messages_raise_one_error_type_with_the_reason(
    payload: bytes | None, fragment: str
) -> None:
    with pytest.raises(EventDecodeError, match=fragment):
        InstanceEvent.from_bytes(payload)


def _finding_json(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "study_uid": "1.2",
        "series_uid": "1.2.3",
        "finding": "ICH",
        "probability": 0.9,
        "threshold": 0.05,
        "positive": True,
        "model_name": "ich_classifier",
        "model_version": "1",
        "lane": "stat",
        "rule_id": "r",
        "received_at": "2026-12-02T12:00:00Z",
        "ready_at": "2026-12-02T12:00:01Z",
        "inference_ms": 10.0,
    }
    return {**base, **extra}


_SLICE_RANGE: dict[str, object] = {
    "first_instance_number": 12,
    "last_instance_number": 15,
    "first_position_mm": -10.0,
    "last_position_mm": 5.0,
    "slices": 4,
}


def test_findings_carry_an_optional_slice_range_compatibly() -> None:
    import json

    from schemas.findings import Finding, SliceRange

    # A finding written before the field existed still reads, with no range.
    old = Finding.from_bytes(json.dumps(_finding_json()).encode())
    assert old.slice_range is None and old.schema_version == 1
    r = dict(_SLICE_RANGE)
    new = Finding.from_bytes(json.dumps(_finding_json(slice_range=r)).encode())
    assert new.slice_range == SliceRange(**r)  # type: ignore[arg-type]
    assert Finding.from_bytes(new.to_bytes()) == new


def test_findings_carry_an_optional_localisation_map_reference_compatibly() -> None:
    import json

    from schemas.findings import Finding

    old = Finding.from_bytes(json.dumps(_finding_json()).encode())
    assert old.localisation_map_uri is None and old.schema_version == 1
    uri = "file:///var/lib/radtriage/blobs/1.2.3/localisation-maps/" + "0" * 64 + ".json"
    new = Finding.from_bytes(json.dumps(_finding_json(localisation_map_uri=uri)).encode())
    assert new.localisation_map_uri == uri and new.schema_version == 1
    assert Finding.from_bytes(new.to_bytes()) == new


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"first_position_mm": 6.0}, "above"),
        ({"last_instance_number": None}, "together"),
        ({"slices": 0}, "slices"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_malformed_slice_range_is_refused(changes: dict[str, object], fragment: str) -> None:
    import json

    from schemas.findings import Finding

    r = {**_SLICE_RANGE, **changes}
    with pytest.raises(EventDecodeError, match=fragment):
        Finding.from_bytes(json.dumps(_finding_json(slice_range=r)).encode())


def test_alerts_carry_the_findings_slice_range_compatibly() -> None:
    import json
    from datetime import UTC, datetime

    from schemas.alerts import Alert
    from schemas.findings import SliceRange

    now = datetime(2026, 12, 2, 20, 0, tzinfo=UTC).isoformat()
    old = {
        "alert_id": "1.2.3/ICH", "study_uid": "1.2.3", "finding": "ICH", "probability": 0.9,
        "threshold": 0.05, "model_name": "ich_classifier", "model_version": "1", "lane": "stat",
        "received_at": now, "ready_at": now,
    }  # fmt: skip
    assert Alert.from_bytes(json.dumps(old).encode()).slice_range is None
    new = Alert.from_bytes(json.dumps({**old, "slice_range": _SLICE_RANGE}).encode())
    assert new.slice_range == SliceRange(**_SLICE_RANGE)  # type: ignore[arg-type]
    assert Alert.from_bytes(new.to_bytes()) == new
    with pytest.raises(EventDecodeError, match="above"):
        bad = {**_SLICE_RANGE, "first_position_mm": 6.0}
        Alert.from_bytes(json.dumps({**old, "slice_range": bad}).encode())
