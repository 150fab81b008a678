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
