"""`ehr` settings: the HL7 endpoint from RADTRIAGE_EHR__HL7 (JSON), nothing when unset."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from radtriage.settings import Settings


def test_no_endpoint_by_default_so_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADTRIAGE_EHR__HL7", raising=False)
    assert Settings().ehr.hl7 is None


def test_the_endpoint_is_read_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RADTRIAGE_EHR__HL7",
        '{"host": "ris.example", "port": 2575, "receiving_application": "RIS", "tls": {"enabled": true}}',
    )
    hl7 = Settings().ehr.hl7
    assert hl7 is not None
    assert (hl7.host, hl7.port, hl7.receiving_application, hl7.tls.enabled) == (
        "ris.example",
        2575,
        "RIS",
        True,
    )
    assert (hl7.sending_application, hl7.ack_timeout_s, hl7.deadline_s) == ("RADTRIAGE", 10.0, 600.0)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"port": 2575}', "host"),
        ('{"host": "h", "port": 0}', "port"),
        ('{"host": "h", "port": 1, "receiving_facility": "' + "F" * 21 + '"}', "receiving_facility"),
        ('{"host": "h", "port": 1, "tls": {"cert_file": "/c.pem"}}', "together"),
    ],
)
def test_a_bad_endpoint_stops_the_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("RADTRIAGE_EHR__HL7", value)
    with pytest.raises(ValidationError, match=says):
        Settings()
