"""ACKs: original and enhanced mode, ERR in 2.3/2.4 and 2.5+ style, answers to unreadable headers."""

from __future__ import annotations

from datetime import UTC, datetime

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as hl7apy_parse

from connectors.hl7.ack import AckError, Kind, ack_code, ack_mode, build_ack, outcome_ack
from connectors.hl7.message import Header, Location
from connectors.hl7.parse import Outcome, parse_message
from tests.data.hl7 import samples
from tests.data.hl7.samples import load, set_field, text

NOW = datetime(2024, 3, 5, 10, 15, 0, tzinfo=UTC)


def ack_for(outcome: Outcome, kind: Kind | None = None, error: AckError | None = None) -> str:
    k, e = outcome_ack(outcome)
    return build_ack(outcome.header, kind or k, error or e, now=NOW, control_id="RT0001")


def segments(ack: str) -> dict[str, list[str]]:
    assert ack.endswith("\r") and "\n" not in ack
    return {s[:3]: s.split("|") for s in ack.rstrip("\r").split("\r")}


@pytest.mark.parametrize("name", samples.all_names())
def test_every_sample_gets_a_well_formed_ack(name: str) -> None:
    outcome = parse_message(load(name))
    ack = ack_for(outcome)
    # Both HL7 libraries the ecosystem uses can read it back.
    parsed = hl7.parse(ack)
    assert str(parsed.segment("MSA")[1]) in ("AA", "AE", "AR", "CA", "CE", "CR")
    msg = hl7apy_parse(ack, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    assert msg.msh.msh_9.to_er7().startswith("ACK")
    seg = segments(ack)
    assert seg["MSA"][2] == outcome.header.control_id
    if name in samples.INVALID:
        expected_ack, code, _ = samples.INVALID[name]
        assert seg["MSA"][1] == expected_ack
        # ERR-3 (2.5+) or ERR-1 (2.3/2.4) carries the table 0357 code.
        assert f"{code}^" in "|".join(seg["ERR"]) or f"^{code}&" in "|".join(seg["ERR"])


def test_original_mode_accept_swaps_sender_and_receiver() -> None:
    seg = segments(ack_for(parse_message(load("orm_o01_v2.5.hl7"))))
    msh = seg["MSH"]
    # MSH-3..6 of the ACK are MSH-5, -6, -3, -4 of the message.
    assert msh[2:6] == ["RADTRIAGE", "GENHOSP", "RIS", "GENHOSP"]
    assert msh[6] == "20240305101500"
    assert msh[8] == "ACK^O01^ACK"
    assert msh[9] == "RT0001"
    assert msh[10:12] == ["P", "2.5"]
    assert seg["MSA"] == ["MSA", "AA", "ORM25-0001"]
    assert "ERR" not in seg


def test_v23_ack_has_no_message_structure_component() -> None:
    seg = segments(ack_for(parse_message(load("orm_o01_v2.3.hl7"))))
    assert seg["MSH"][8] == "ACK^O01"
    assert seg["MSH"][11] == "2.3"


def test_v25_err_has_location_code_severity_and_message() -> None:
    seg = segments(ack_for(parse_message(load("invalid_adt_no_patient_id_v2.5.hl7"))))
    assert seg["MSA"] == ["MSA", "AE", "BAD-NOPID-1", "PID-3 patient id missing"]
    err = seg["ERR"]
    assert err[1] == ""  # ERR-1 is deprecated from 2.5 on
    assert err[2] == "PID^1^3^1^1"  # ERR-2: segment^sequence^field^repetition^component
    assert err[3] == "101^Required field missing^HL70357"
    assert err[4] == "E"
    assert err[8] == "PID-3 patient id missing"


def test_v24_err_uses_err1() -> None:
    seg = segments(ack_for(parse_message(load("invalid_orm_no_accession_v2.4.hl7"))))
    assert seg["MSA"][1] == "AE"
    assert seg["ERR"] == ["ERR", "OBR^1^18^101&Required field missing&HL70357"]


def test_ignored_oru_is_aa_with_an_informational_err() -> None:
    seg = segments(ack_for(parse_message(load("oru_r01_v2.5.1.hl7"))))
    assert seg["MSA"][1] == "AA"
    assert "ignored" in seg["MSA"][3]
    assert seg["ERR"][3] == "0^Message accepted^HL70357"
    assert seg["ERR"][4] == "I"


@pytest.mark.parametrize(
    ("msh15", "msh16", "mode"),
    [
        ("", "", "original"),
        ("AL", "NE", "commit"),
        ("AL", "AL", "commit"),
        ("SU", "", "commit"),
        ("ER", "", "commit"),
        ("NE", "AL", "original"),  # only the application ACK was asked for: AA/AE/AR
        ("", "ER", "original"),
        ("NE", "NE", "commit"),  # nothing asked for; answered anyway (the sender may be waiting)
        ("XX", "", "original"),  # not table 0155: as if empty
    ],
)
def test_ack_mode(msh15: str, msh16: str, mode: str) -> None:
    header = Header(accept_ack_type=msh15, application_ack_type=msh16)
    assert ack_mode(header) == mode
    codes = [ack_code(header, k) for k in ("accept", "error", "reject")]
    assert codes == (["CA", "CE", "CR"] if mode == "commit" else ["AA", "AE", "AR"])


def test_enhanced_mode_over_the_samples() -> None:
    omi = parse_message(load("omi_o23_v2.5.1.hl7"))  # MSH-15 AL, MSH-16 NE
    seg = segments(ack_for(omi))
    assert seg["MSA"][:3] == ["MSA", "CA", "OMI251-0001"]
    assert seg["MSH"][14:16] == ["NE", "NE"]  # the ACK itself wants no acknowledgment
    broken = set_field(text("invalid_orm_no_accession_v2.4.hl7"), "MSH", 15, "ER")
    assert segments(ack_for(parse_message(broken.encode())))["MSA"][1] == "CE"
    rejected = set_field(text("invalid_orm_v2.7.hl7"), "MSH", 15, "AL")
    assert segments(ack_for(parse_message(rejected.encode())))["MSA"][1] == "CR"


def test_retry_later_is_ar_207() -> None:
    outcome = parse_message(load("orm_o01_v2.5.hl7"))
    ack = ack_for(outcome, "reject", AckError(207, "event log unavailable, retry later"))
    seg = segments(ack)
    assert seg["MSA"] == ["MSA", "AR", "ORM25-0001", "event log unavailable, retry later"]
    assert seg["ERR"][3] == "207^Application internal error^HL70357"


def test_reason_is_escaped_and_msa3_bounded() -> None:
    outcome = parse_message(load("orm_o01_v2.5.hl7"))
    ack = ack_for(
        outcome, "error", AckError(102, "a|b^c~d&e\\f\rg" + "x" * 300, location=Location("OBR", 2, 4))
    )
    seg = segments(ack)
    assert seg["MSA"][3].startswith(r"a\F\b\S\c\R\d\T\e\E\f g")
    assert len(seg["MSA"][3]) <= 80 + 12  # 80 characters, a few of them escaped
    assert seg["ERR"][2] == "OBR^2^4^1"
    assert len(seg) == 3


def test_unreadable_message_still_gets_a_valid_ar() -> None:
    for data in (b"", b"\xff\xfe garbage", b"MSH|^^\\&|A|B|C|D|||ORM^O01|KEEP-ME|P|2.5\r"):
        outcome = parse_message(data)
        ack = ack_for(outcome)
        seg = segments(ack)
        assert seg["MSH"][1] == "^~\\&"
        assert seg["MSA"][1] == "AR"
        assert str(hl7.parse(ack).segment("MSA")[1]) == "AR"
    assert segments(ack_for(parse_message(data)))["MSA"][2] == "KEEP-ME"


def test_ack_uses_the_senders_separators() -> None:
    m = text("orm_o01_v2.5.hl7").replace("|", "#").replace("^", "$")
    outcome = parse_message(m.encode())
    ack = ack_for(outcome, "error", AckError(101, "x#y", location=Location("PID", 1, 3)))
    assert ack.startswith("MSH#$~\\&#RADTRIAGE#")
    assert "MSA#AE#ORM25-0001#x\\F\\y" in ack
    assert "ERR##PID$1$3$1#101$Required field missing$HL70357#E####x\\F\\y" in ack


def test_unreadable_version_answers_in_25() -> None:
    outcome = parse_message(set_field(text("orm_o01_v2.5.hl7"), "MSH", 12, "v2;x").encode())
    seg = segments(ack_for(outcome))
    assert seg["MSH"][11] == "2.5"
    assert seg["MSA"][1] == "AR"
