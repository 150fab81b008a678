"""The ORU^R01 builder (processors/hl7_oru.py), read back by hl7apy at strict validation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from processors.hl7_oru import Endpoint, build_oru, control_id, escape, read_ack, strict_parse
from tests.support.findings import FHIR_ORDER, HL7_ORDER, finding, gallery

NOW = datetime(2026, 11, 24, 12, 1, tzinfo=UTC)
RIS = Endpoint(receiving_application="RIS", receiving_facility="HOSP")


def segments(er7: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for seg in er7.split("\r"):
        fields = seg.split("|")
        out.setdefault(fields[0], []).append(fields)
    return out


def obx_values(er7: str) -> dict[str, tuple[str, str, str]]:
    """OBX-3 code -> (OBX-2, OBX-5, OBX-11), for OBX without a sub-id."""
    return {o[3].split("^")[0]: (o[2], o[5], o[11]) for o in segments(er7)["OBX"] if not o[4]}


@pytest.mark.parametrize("name", list(gallery()))
def test_every_report_shape_is_a_strictly_valid_oru_r01(name: str) -> None:
    er7 = build_oru(gallery()[name], RIS, NOW)
    message = strict_parse(er7)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert message.msh.msh_12.to_er7() == "2.5"


def test_order_numbers_accession_and_the_patient_with_its_assigning_authority() -> None:
    s = segments(build_oru(finding(), RIS, NOW))
    (msh,) = s["MSH"]
    assert msh[2:6] == ["RADTRIAGE", "RADTRIAGE", "RIS", "HOSP"]
    (pid,) = s["PID"]
    assert pid[3] == f"MRN42^^^HOSP&{HL7_ORDER.patient_id_system.removeprefix('urn:oid:')}&ISO^MR"
    assert pid[5] == '""'  # required, and radtriage carries no names
    (orc,) = s["ORC"]
    (obr,) = s["OBR"]
    assert (orc[1], orc[2], orc[3]) == ("RE", "PL-1001", "FL-2002")
    assert (obr[2], obr[3], obr[18]) == ("PL-1001", "FL-2002", "ACC42")
    assert (obr[4], obr[24], obr[25]) == ("18748-4^Diagnostic imaging study^LN", "RAD", "P")
    # A FHIR order's system is a URI: PID-3.4 names it as such.
    fhir = segments(build_oru(finding(order=FHIR_ORDER), RIS, NOW))
    assert fhir["PID"][0][3] == "MRN42^^^&https://hospital.example/mrn&URI^MR"
    assert (fhir["ORC"][0][2], fhir["ORC"][0][3]) == ("", "FL-77")


def test_the_finding_coded_its_probability_side_slices_and_conclusion() -> None:
    lvo = obx_values(build_oru(finding("LVO", 0.88, laterality="left", laterality_probability=0.9), RIS, NOW))
    assert lvo["LVO"] == ("CWE", "20059004^Occlusion of cerebral artery^SCT", "P")
    assert lvo["LVO-P"] == ("NM", "0.8800", "P")
    assert lvo["LVO-T"][:2] == ("NM", "0.5000")
    assert lvo["272741003"][:2] == ("CWE", "7771000^Left^SCT")
    assert lvo["19005-8"][0] == "TX" and "Suspected large-vessel occlusion" in lvo["19005-8"][1]
    negative = obx_values(build_oru(finding("ICH", 0.04), RIS, NOW))
    assert negative["ICH"][1] == "260385009^Negative^SCT"
    ich = obx_values(build_oru(gallery()["ich-positive-hl7-order"], RIS, NOW))
    assert (ich["SLICE-FIRST"][1], ich["SLICE-LAST"][1]) == ("14", "19")
    assert ich["SLICE-RANGE"][0] == "ST"
    nodules = [o for o in segments(build_oru(gallery()["nodules"], RIS, NOW))["OBX"] if o[4]]
    assert [(o[2], o[4], o[5]) for o in nodules if o[2] == "NM"] == [("NM", "1", "14.2"), ("NM", "2", "7.4")]


def test_an_amended_result_is_corrected_with_its_own_control_id() -> None:
    first = finding("ICH", 0.7)
    amended = finding("ICH", 0.81, request_id="later", amends_request_id=first.request_id)
    s = segments(build_oru(amended, RIS, NOW))
    assert s["OBR"][0][25] == "C" and {o[11] for o in s["OBX"]} == {"C"}
    assert control_id(first) != control_id(amended)
    # The same report replayed: the same MSH-10, so the receiver can tell it is a repeat.
    assert control_id(first) == control_id(finding("ICH", 0.7)) and len(control_id(first)) == 20


def test_text_is_escaped_and_long_text_is_split_into_lines() -> None:
    odd = finding(series_description="A|B^C&D~E\\F", accession_number="ACC|1")
    er7 = build_oru(odd, RIS, NOW)
    strict_parse(er7)
    assert "A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\F" in er7
    assert segments(er7)["OBR"][0][18] == "ACC\\F\\1"
    tx = obx_values(er7)["19005-8"][1].split("~")
    assert len(tx) > 1 and all(len(line) <= 199 for line in tx)
    assert escape("a\r\nb\x07") == "a\\.br\\b"


def test_acks_are_read_with_their_reason() -> None:
    aa = read_ack(b"MSH|^~\\&|RIS|HOSP|RADTRIAGE|RADTRIAGE|20261124||ACK^R01^ACK|A1|P|2.5\rMSA|AA|RT1")
    assert (aa.code, aa.control_id, aa.accepted) == ("AA", "RT1", True)
    ae = read_ack(b"MSH|^~\\&|RIS|HOSP|||20261124||ACK|A2|P|2.5\rMSA|AE|RT2|unknown patient\r")
    assert (ae.code, ae.reason, ae.accepted) == ("AE", "unknown patient", False)
    head = b"MSH|^~\\&|RIS|HOSP|||20261124||ACK|A3|P|2.5\r"
    err8 = read_ack(head + b"MSA|AR|RT3\rERR||PID^1^3|204^Unknown key^HL70357|E||||no such MRN")
    assert err8.reason == "no such MRN"
    err1 = read_ack(head + b"MSA|AE|RT4\rERR|PID^1^3^204&Unknown key identifier&HL70357")
    assert err1.reason == "Unknown key identifier"
    for bad in (b"", b"hello", b"MSH|^~\\&|RIS\rPID|1"):
        with pytest.raises(ValueError, match=r"MSH|MSA"):
            read_ack(bad)


def test_an_assigning_authority_too_long_for_hd_is_left_out_not_cut() -> None:
    long_order = HL7_ORDER.model_copy(
        update={"patient_id_authority": "N" * 21, "patient_id_system": "https://h.example/" + "s" * 190}
    )
    er7 = build_oru(finding(order=long_order), RIS, NOW)
    strict_parse(er7)
    assert segments(er7)["PID"][0][3] == "MRN42^^^^MR"
