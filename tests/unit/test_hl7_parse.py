"""HL7 v2 → events: field mapping, precedences, versions 2.3–2.5.1, refusals with codes and locations."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.hl7.message import Header, Location, decode, read_header, split_segments, unescape
from connectors.hl7.parse import Accepted, Ignored, Outcome, Rejected, map_priority, oversized, parse_message
from schemas.encounters import EncounterEvent
from schemas.orders import INDICATION_MAX, OrderEvent
from tests.data.hl7 import samples
from tests.data.hl7.samples import drop_segment, load, set_field, text


def accepted(outcome: Outcome) -> tuple[Any, ...]:
    assert isinstance(outcome, Accepted), outcome
    return outcome.events


def order(message: str | bytes) -> OrderEvent:
    data = message.encode() if isinstance(message, str) else message
    events = accepted(parse_message(data))
    assert len(events) == 1
    assert isinstance(events[0], OrderEvent)
    return events[0]


def rejected(message: str | bytes) -> Rejected:
    data = message.encode() if isinstance(message, str) else message
    outcome = parse_message(data)
    assert isinstance(outcome, Rejected), outcome
    return outcome


ORM25 = text("orm_o01_v2.5.hl7")
OMI = text("omi_o23_v2.5.1.hl7")


# -- the sample messages, every version and segment terminator ---------------------------

EXPECTED: dict[str, list[dict[str, Any]]] = {
    "orm_o01_v2.3.hl7": [
        dict(
            accession_number="ACC-23-0001",
            message_type="ORM^O01",
            source_message_id="ORM23-0001",
            placer_order_number="PL-23-0001",
            filler_order_number="FL-23-0001",
            patient_id="MRN100231",
            procedure_code="CTHEADWO",
            procedure_text="CT head without contrast",
            procedure_coding_system="L",
            priority="stat",
            priority_raw="S",
            priority_field="ORC-7",
            indication="Code stroke; Left-sided weakness, onset 09:40",
            indication_codes=("I10|I63.9",),
            patient_class="emergency",
            status="active",
            study_uid="",
        )
    ],
    "orm_o01_v2.4.hl7": [
        dict(
            accession_number="FL-24-0001",  # no OBR-18: the filler order number ORC-3
            priority="asap",
            priority_field="ORC-7",
            patient_class="inpatient",
            indication="Fall, GCS 14",
            procedure_code="CTHEADWO",
        ),
        dict(
            accession_number="ACC-24-0002",
            priority="asap",
            priority_field="OBR-27",  # its ORC has no ORC-7
            procedure_code="CTANECK",
            indication="Rule out dissection",
            placer_order_number="PL-24-0002",
        ),
    ],
    "orm_o01_v2.5.hl7": [
        dict(
            accession_number="ACC-25-0001",
            priority="stat",
            priority_raw="S",
            priority_field="TQ1-9",  # TQ1-9 S beats ORC-7 R and OBR-27 R
            patient_class="outpatient",
            indication="Worsening headache",  # ORC-16 text
            study_uid="1.2.826.0.1.3680043.10.543.25001",  # ZDS-1
            procedure_code="MRBRAIN",
        )
    ],
    "omi_o23_v2.5.1.hl7": [
        dict(
            accession_number="ACC-251-0001",  # IPC-1 beats OBR-18
            message_type="OMI^O23",
            study_uid="1.2.826.0.1.3680043.10.543.251001",
            priority="asap",
            priority_field="TQ1-9",
            patient_class="inpatient",  # PV1-2 B (obstetrics)
            indication="Chest pain",
            indication_codes=("I10|R07.4",),
            procedure_code="CTCHEST",
        )
    ],
    "adt_a04_v2.3.hl7": [
        dict(
            patient_id="MRN500811", patient_class="outpatient", message_type="ADT^A04", visit_number="VN22005"
        )
    ],
    "adt_a01_v2.5.hl7": [
        dict(
            patient_id="MRN600922", patient_class="inpatient", message_type="ADT^A01", visit_number="VN33006"
        )
    ],
    "adt_a08_v2.5.1.hl7": [
        dict(
            patient_id="MRN700133",
            patient_class="emergency",
            message_type="ADT^A08",
            visit_number="VN44007",
            source_message_id="ADT251-0001",
        )
    ],
}


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
@pytest.mark.parametrize("name", samples.VALID)
def test_valid_samples_map_to_events(name: str, sep: str) -> None:
    events = accepted(parse_message(load(name, sep)))
    expected = EXPECTED[name]
    assert len(events) == len(expected)
    for event, fields in zip(events, expected, strict=True):
        assert isinstance(event, OrderEvent if name[:3] in ("orm", "omi") else EncounterEvent)
        assert event.source == "hl7"
        for key, value in fields.items():
            assert getattr(event, key) == value, key


@pytest.mark.parametrize("name", samples.all_names())
def test_no_event_carries_a_name_birth_date_or_address(name: str) -> None:
    outcome = parse_message(load(name))
    blob = "".join(e.model_dump_json() for e in getattr(outcome, "events", ()))
    blob += getattr(outcome, "reason", "")
    for value in samples.phi_values():
        assert value not in blob


@pytest.mark.parametrize(("name", "expected"), samples.INVALID.items())
def test_invalid_samples_are_refused_with_code_and_location(
    name: str, expected: tuple[str, int, str]
) -> None:
    ack, code, location = expected
    r = rejected(load(name))
    assert (r.ack, r.code, str(r.location)) == (ack, code, location)
    assert r.reason


def test_oru_is_ignored_politely() -> None:
    outcome = parse_message(load("oru_r01_v2.5.1.hl7"))
    assert isinstance(outcome, Ignored)
    assert "ORU^R01" in outcome.reason
    # Any ORU event: results are simply not an input of triage.
    other = set_field(text("oru_r01_v2.5.1.hl7"), "MSH", 9, "ORU^R30^ORU_R30")
    assert isinstance(parse_message(other.encode()), Ignored)


# -- accession precedence ----------------------------------------------------------------


def test_accession_ipc1_then_obr18_then_orc3_then_obr3() -> None:
    assert order(OMI).accession_number == "ACC-251-0001"
    no_ipc = drop_segment(OMI, "IPC")
    assert order(no_ipc).accession_number == "ACC-OBR-IGNORED"
    no_obr18 = set_field(no_ipc, "OBR", 18, "")
    assert order(no_obr18).accession_number == "FL-251-0001"
    no_orc3 = set_field(no_obr18, "ORC", 3, "")
    assert order(no_orc3).accession_number == "FL-251-0001"  # OBR-3 holds the same filler number
    only_obr3 = set_field(no_orc3, "OBR", 3, "OBR3-ONLY")
    assert order(only_obr3).accession_number == "OBR3-ONLY"
    none = set_field(only_obr3, "OBR", 3, "")
    r = rejected(none)
    assert (r.ack, r.code, str(r.location)) == ("AE", 101, "OBR-18")


def test_one_order_event_per_ipc() -> None:
    two = OMI.replace("IPC|ACC-251-0001|", "IPC|ACC-251-0002|RP2|1.2.826.0.1.9\rIPC|ACC-251-0001|")
    events = accepted(parse_message(two.encode()))
    assert [e.accession_number for e in events] == ["ACC-251-0002", "ACC-251-0001"]
    assert [e.study_uid for e in events] == ["1.2.826.0.1.9", "1.2.826.0.1.3680043.10.543.251001"]


def test_accession_longer_than_the_schema_allows_is_refused() -> None:
    r = rejected(set_field(ORM25, "OBR", 18, "A" * 65))
    assert (r.ack, r.code, str(r.location)) == ("AE", 104, "OBR-18")


def test_invalid_study_uid_is_left_out_not_fatal() -> None:
    assert order(set_field(OMI, "IPC", 3, "not-a-uid")).study_uid == ""


# -- priority ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("S", "stat"), ("A", "asap"), ("R", "routine"), ("P", "urgent"), ("C", "urgent"), ("T", "urgent"),
     ("T30", "urgent"), ("stat", "stat"), (" s ", "stat"), ("PRN", None), ("", None)],
)  # fmt: skip
def test_priority_codes(raw: str, expected: str | None) -> None:
    assert map_priority(raw) == expected


def test_priority_precedence_tq1_then_orc7_then_obr27() -> None:
    m = set_field(set_field(set_field(ORM25, "TQ1", 9, "A"), "ORC", 7, "^^^^^S"), "OBR", 27, "^^^^^R")
    assert (order(m).priority, order(m).priority_field, order(m).priority_raw) == ("asap", "TQ1-9", "A")
    no_tq1 = drop_segment(m, "TQ1")
    assert (order(no_tq1).priority, order(no_tq1).priority_field) == ("stat", "ORC-7")
    no_orc7 = set_field(no_tq1, "ORC", 7, "")
    assert (order(no_orc7).priority, order(no_orc7).priority_field) == ("routine", "OBR-27")
    nothing = set_field(no_orc7, "OBR", 27, "")
    assert (order(nothing).priority, order(nothing).priority_field, order(nothing).priority_raw) == (
        None,
        "",
        "",
    )


def test_unmapped_priority_falls_through_to_the_next_source() -> None:
    m = set_field(ORM25, "TQ1", 9, "PRN")
    assert (order(m).priority, order(m).priority_field) == ("routine", "ORC-7")
    only_unmapped = set_field(set_field(m, "ORC", 7, ""), "OBR", 27, "")
    o = order(only_unmapped)
    assert (o.priority, o.priority_raw, o.priority_field) == (None, "PRN", "TQ1-9")


def test_tq1_in_a_v24_message_is_still_read() -> None:
    m = set_field(ORM25, "MSH", 12, "2.4")
    assert order(m).priority_field == "TQ1-9"


# -- patient class, status, indication ---------------------------------------------------


@pytest.mark.parametrize(
    ("pv1_2", "expected"),
    [("E", "emergency"), ("I", "inpatient"), ("B", "inpatient"), ("O", "outpatient"), ("P", "outpatient"),
     ("R", "outpatient"), ("N", "unknown"), ("", "unknown")],
)  # fmt: skip
def test_patient_class(pv1_2: str, expected: str) -> None:
    assert order(set_field(ORM25, "PV1", 2, pv1_2)).patient_class == expected


def test_no_pv1_means_unknown_class() -> None:
    assert order(drop_segment(ORM25, "PV1")).patient_class == "unknown"


@pytest.mark.parametrize(
    ("orc_1", "orc_5", "expected"),
    [("NW", "", "active"), ("XO", "", "active"), ("SC", "", "active"), ("SC", "CM", "completed"),
     ("SC", "CA", "cancelled"), ("CA", "", "cancelled"), ("OC", "", "cancelled"), ("DC", "", "cancelled"),
     ("OD", "", "cancelled"), ("CM", "", "completed")],
)  # fmt: skip
def test_order_status(orc_1: str, orc_5: str, expected: str) -> None:
    m = set_field(set_field(ORM25, "ORC", 1, orc_1), "ORC", 5, orc_5)
    assert order(m).status == expected


def test_order_control_missing_or_unknown() -> None:
    r = rejected(set_field(ORM25, "ORC", 1, ""))
    assert (r.code, str(r.location)) == (101, "ORC-1")
    r = rejected(set_field(ORM25, "ORC", 1, "QQ"))
    assert (r.code, str(r.location)) == (103, "ORC-1")


def test_order_without_orc_uses_obr25() -> None:
    m = drop_segment(drop_segment(ORM25, "ORC"), "TQ1")
    assert order(m).status == "active"
    assert order(set_field(m, "OBR", 25, "F")).status == "completed"


def test_indication_joins_obr31_obr13_orc16_unescaped_and_truncated() -> None:
    m = set_field(ORM25, "OBR", 31, "I63.9^Code stroke^I10~^Trauma \\T\\ fall")
    m = set_field(m, "OBR", 13, "LKW 14:05 \\F\\ aphasia")
    o = order(m)
    assert o.indication == "Code stroke; Trauma & fall; LKW 14:05 | aphasia; Worsening headache"
    assert o.indication_codes == ("I10|I63.9",)
    long = order(set_field(ORM25, "OBR", 13, "x" * 1000))
    assert len(long.indication) == INDICATION_MAX


def test_procedure_falls_back_to_obr44_then_ipc6() -> None:
    m = set_field(set_field(OMI, "OBR", 4, ""), "OBR", 44, "P44^From OBR-44^C4")
    assert (order(m).procedure_code, order(m).procedure_coding_system) == ("P44", "C4")
    m = set_field(m, "OBR", 44, "")
    assert (order(m).procedure_code, order(m).procedure_text) == ("PROTO-PE", "PE protocol")


def test_patient_id_is_only_pid3_component_1() -> None:
    o = order(set_field(ORM25, "PID", 3, "MRN-9^^^GENHOSP&1.2.3&ISO^MR~OTHER^^^X"))
    assert o.patient_id == "MRN-9"


# -- ADT ---------------------------------------------------------------------------------


def test_adt_refusals() -> None:
    adt = text("adt_a01_v2.5.hl7")
    r = rejected(drop_segment(adt, "PID"))
    assert (r.ack, r.code, str(r.location)) == ("AE", 100, "PID")
    # Other ADT events of a hospital feed are acknowledged and ignored, never refused.
    ignored = parse_message(set_field(adt, "MSH", 9, "ADT^A03^ADT_A03").encode())
    assert isinstance(ignored, Ignored) and "A01/A04/A08" in ignored.reason
    no_pv1 = accepted(parse_message(drop_segment(adt, "PV1").encode()))[0]
    assert (no_pv1.patient_class, no_pv1.visit_number) == ("unknown", "")


# -- header, versions, message types -----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "ack", "code", "location"),
    [
        (9, "", "AR", 101, "MSH-9"),
        (10, "", "AR", 101, "MSH-10"),
        (12, "", "AR", 101, "MSH-12"),
        (12, "2.2", "AR", 203, "MSH-12"),
        (12, "2.6", "AR", 203, "MSH-12"),
        (12, "2.8.2", "AR", 203, "MSH-12"),
        (9, "ACK^O01", "AR", 200, "MSH-9.1"),
        (9, "OMI^O01", "AR", 201, "MSH-9.2"),
        (9, "ORM", "AR", 201, "MSH-9.2"),
    ],
)
def test_header_refusals(field: int, value: str, ack: str, code: int, location: str) -> None:
    r = rejected(set_field(ORM25, "MSH", field, value))
    assert (r.ack, r.code, str(r.location)) == (ack, code, location)


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
def test_every_supported_version(version: str) -> None:
    assert order(set_field(ORM25, "MSH", 12, version)).accession_number == "ACC-25-0001"
    assert order(set_field(OMI, "MSH", 12, version)).accession_number == "ACC-251-0001"


@pytest.mark.parametrize(
    ("data", "code", "control_id"),
    [
        (b"", 100, ""),
        (b"\x00\xff garbage \x01", 100, ""),
        (b"PID|1||X\rMSH|^~\\&|A|B|C|D|||ORM^O01|SALVAGED|P|2.5\r", 100, "SALVAGED"),
        (b"MSH", 102, ""),
        (b"MSH ^~\\&|A", 102, ""),
        (b"MSH|^~\\|A|B|C|D|||ORM^O01|CTRL7|P|2.5\r", 102, "CTRL7"),
        (b"MSH|^^\\&|A|B|C|D|||ORM^O01|CTRL8|P|2.5\r", 102, "CTRL8"),
        (b"MSH|abcd|A|B|C|D|||ORM^O01|CTRL9|P|2.5\r", 102, "CTRL9"),
    ],
)
def test_broken_msh_is_rejected_with_what_can_be_salvaged(data: bytes, code: int, control_id: str) -> None:
    r = rejected(data)
    assert (r.ack, r.code) == ("AR", code)
    assert r.header.control_id == control_id
    assert r.header.field_sep == "|" and r.header.encoding == "^~\\&"


def test_non_default_separators() -> None:
    m = ORM25.replace("|", "#").replace("^", "$").replace("MSH#$~\\&#", "MSH#$~\\&#")
    o = order(m)
    assert (o.accession_number, o.procedure_code, o.priority, o.patient_id) == (
        "ACC-25-0001",
        "MRBRAIN",
        "stat",
        "MRN300552",
    )


def test_line_break_inside_a_field_is_refused_with_its_position() -> None:
    m = set_field(ORM25, "OBR", 13, "first line\rsecond line")
    r = rejected(m)
    assert (r.ack, r.code, r.location) == ("AE", 100, Location("?", 7))


def test_other_segments_are_tolerated() -> None:
    m = ORM25.replace("\rPV1|", "\rNTE|1||free text \\E\\ more\rAL1|1||^PENICILLIN\rZPI|x|y\rPV1|")
    m = m.replace("\rZDS|", "\rDG1|1||I63.9^Stroke^I10\rOBX|1|TX|||note\rZDS|")
    assert order(m).accession_number == "ACC-25-0001"
    r = rejected(ORM25 + "MSH|^~\\&|A\r")
    assert (r.code, r.location) == (100, Location("MSH", 2))


# -- character sets ----------------------------------------------------------------------


def test_latin1_without_msh18_is_read() -> None:
    data = set_field(ORM25, "OBR", 13, "Sturz, Schädel").encode("latin-1")
    o = order(data)
    assert o.indication.startswith("Sturz, Schädel")
    assert decode(data)[1] == "latin-1"


def test_declared_charset_is_honoured() -> None:
    m = set_field(set_field(ORM25, "MSH", 18, "8859/15"), "OBR", 13, "Prix 5€")
    data = m.encode("iso8859-15")
    assert decode(data)[1] == "iso8859-15"
    assert order(data).indication.startswith("Prix 5€")
    utf8 = set_field(set_field(ORM25, "MSH", 18, "UNICODE UTF-8"), "OBR", 13, "Schädel").encode()
    assert order(utf8).indication.startswith("Schädel")


# -- small pieces ------------------------------------------------------------------------


def test_unescape_and_header_reading() -> None:
    header = read_header(split_segments(ORM25), "utf-8")
    assert isinstance(header, Header) and header.control_id == "ORM25-0001"
    assert unescape(r"a\F\b\S\c\T\d\R\e\E\f\.br\g\X41\h\H\i\N\j", header) == "a|b^c&d~e\\f gAhij"
    assert unescape("no escapes", header) == "no escapes"
    assert split_segments("\ufeffMSH|x\n\nPID|1\r\n") == ["MSH|x", "PID|1"]


def test_oversized_prefix_is_answered_from_its_header() -> None:
    r = oversized(load("orm_o01_v2.5.hl7")[:120], 100)
    assert (r.ack, r.code, r.header.control_id) == ("AR", 104, "ORM25-0001")
    assert isinstance(oversized(b"\x00" * 50, 10), Rejected)


def test_the_patient_ids_assigning_authority_is_kept_for_the_report() -> None:
    # PID-3.4 HD: namespace id, then an ISO universal id (an OID) -> urn:oid: system.
    with_oid = set_field(ORM25, "PID", 3, "MRN77^^^HOSP&1.2.840.114350.1&ISO^MR")
    event = order(with_oid)
    assert (event.patient_id, event.patient_id_authority) == ("MRN77", "HOSP")
    assert event.patient_id_system == "urn:oid:1.2.840.114350.1"
    # A namespace alone names no system: the report falls back to the configured one.
    local = order(set_field(ORM25, "PID", 3, "MRN77^^^HOSP^MR"))
    assert (local.patient_id_authority, local.patient_id_system) == ("HOSP", "")
    uri = order(set_field(ORM25, "PID", 3, "MRN77^^^&https://h.example/mrn&URI"))
    assert (uri.patient_id_authority, uri.patient_id_system) == ("", "https://h.example/mrn")
