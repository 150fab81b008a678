"""A finding as an HL7 v2.5 ORU^R01 for a RIS or EHR, and what its ACK said. Pure.

Built with hl7apy at strict validation, so what goes out is a valid ORU^R01 of v2.5:

- MSH: our application/facility (MSH-3/4), theirs (MSH-5/6), MSH-10 a control id derived
  from the report's identity (its request id and status), so a report sent again after a
  replay carries the same control id and the receiver can recognise it;
- PID: PID-3 the patient id with its assigning authority (PID-3.4 HD: namespace, and the
  universal id when the order's system is an OID or URI), PID-5 the explicit null `""`
  (a required field; radtriage never carries names);
- ORC/OBR: ORC-1 RE, placer (ORC-2/OBR-2) and filler (ORC-3/OBR-3) order numbers as the
  order gave them, the accession number in OBR-18 (the field radtriage reads it from in
  orders), OBR-4 LOINC 18748-4, OBR-24 RAD, OBR-25 P (preliminary) or C (corrected: a
  re-read that amends an earlier result);
- OBX, one per fact: the finding coded (CWE: SNOMED CT when positive, else SNOMED CT
  260385009 |Negative|), its probability and the alert threshold (NM, UCUM "1"), the side
  (CWE SNOMED CT), the slice range (NM instance numbers, ST in words), the BI-RADS category
  (CWE), each nodule (NM diameter, ST description), and the conclusion (TX, LOINC 19005-8).
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from processors.fhir_report import (
    BIRADS_CATEGORIES,
    LUNGS,
    SIDES,
    conclusion_text,
    meaning,
    slice_range_text,
)
from schemas.findings import Finding

VERSION = "2.5"
# Local coding system of radtriage's own codes (HL7 table 0396: 99zzz is local).
LOCAL = "99RDT"
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def escape(value: str) -> str:
    """A value as ER7 text with the standard encoding characters; line breaks as \\.br\\."""
    out = "".join(_ESCAPES.get(c, c) for c in value)
    out = out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")
    # Any other control character has no place in an ER7 field.
    return "".join(c for c in out if c.isprintable())


# OBX-5 repeats, one line of text each: hl7apy checks each against ST's 199 characters
# (it cannot know OBX-2 when it builds OBX-5), and receivers show TX line by line.
TX_LINE = 150


def tx(text: str) -> str:
    """Text as TX repetitions: a sentence per line, long sentences wrapped at words."""
    lines: list[str] = []
    for sentence in re.split(r"(?<=\.)\s+", text.strip()):
        lines += textwrap.wrap(sentence, TX_LINE) or [""]
    return "~".join(escape(line) for line in lines)


def cwe(code: str, text: str, system: str) -> str:
    return f"{escape(code)}^{escape(text)}^{escape(system)}"


def ts(at: datetime) -> str:
    """HL7 TS with its UTC offset (YYYYMMDDHHMMSS+ZZZZ)."""
    return at.strftime("%Y%m%d%H%M%S%z")


def result_status(finding: Finding) -> Literal["P", "C"]:
    """OBR-25 / OBX-11: P preliminary, C corrected (a re-read that replaces a result)."""
    return "C" if finding.amends_request_id else "P"


def control_id(finding: Finding) -> str:
    """MSH-10 (20 characters, v2.5's ST length): the same for the same report, whatever
    the replay, and different for its amendment (another request id)."""
    identity = f"{finding.request_id or finding.study_uid + '/' + finding.finding}/{result_status(finding)}"
    return "RT" + hashlib.sha256(identity.encode()).hexdigest()[:18].upper()


@dataclass(frozen=True)
class Endpoint:
    """MSH-3/4 (us) and MSH-5/6 (the receiver), HD namespace ids."""

    sending_application: str = "RADTRIAGE"
    sending_facility: str = "RADTRIAGE"
    receiving_application: str = ""
    receiving_facility: str = ""


@dataclass(frozen=True)
class Obx:
    value_type: str  # CWE, NM, ST, TX
    identifier: str  # OBX-3, ER7 (already escaped)
    value: str  # OBX-5, ER7 (already escaped)
    sub_id: str = ""  # OBX-4: which nodule
    units: str = ""  # OBX-6, ER7


PROBABILITY_UNIT = "1^^UCUM"
HD_NAMESPACE_MAX, HD_UNIVERSAL_MAX = 20, 199
MM = "mm^millimetre^UCUM"
SNOMED = "SCT"


def _probability(code: str, text: str, value: float) -> Obx:
    """A probability (or threshold) as a numeric OBX, local code, unit 1, four decimals."""
    return Obx("NM", cwe(code, text, LOCAL), f"{value:.4f}", units=PROBABILITY_UNIT)


def observations(finding: Finding) -> list[Obx]:
    """The OBX segments' content, in the order a reader wants them."""
    words, snomed = meaning(finding)
    code = finding.finding
    out: list[Obx] = []
    if finding.positive:
        value = cwe(*snomed, SNOMED) if snomed else cwe(code, f"{words} suspected", LOCAL)
    else:
        value = cwe("260385009", "Negative", SNOMED)
    out.append(Obx("CWE", cwe(code, f"AI triage: {words}", LOCAL), value))
    out.append(_probability(f"{code}-P", f"Probability of {words}", finding.probability))
    out.append(_probability(f"{code}-T", "Alert threshold", finding.threshold))
    if finding.laterality in SIDES and finding.laterality_probability is not None:
        side = finding.laterality
        out.append(
            Obx("CWE", cwe("272741003", "Laterality", SNOMED), cwe(SIDES[side][0], side.capitalize(), SNOMED))
        )
        out.append(
            _probability(f"{code}-SIDE-P", f"Probability of the {side} side", finding.laterality_probability)
        )
    r = finding.slice_range
    if finding.positive and r is not None:
        if r.first_instance_number is not None and r.last_instance_number is not None:
            out.append(
                Obx(
                    "NM",
                    cwe("SLICE-FIRST", "First affected image (Instance Number)", LOCAL),
                    str(r.first_instance_number),
                )
            )
            out.append(
                Obx(
                    "NM",
                    cwe("SLICE-LAST", "Last affected image (Instance Number)", LOCAL),
                    str(r.last_instance_number),
                )
            )
        out.append(Obx("ST", cwe("SLICE-RANGE", "Affected slices", LOCAL), escape(slice_range_text(r))))
    if finding.birads is not None:
        b = finding.birads
        _, snomed_code, display = BIRADS_CATEGORIES[b.category]
        out.append(
            Obx(
                "CWE",
                cwe("BIRADS", "BI-RADS assessment category (AI suggestion)", LOCAL),
                cwe(snomed_code, display, SNOMED),
            )
        )
    for rank, n in enumerate(finding.nodules or (), start=1):
        lung = LUNGS[n.lung][1]
        out.append(
            Obx("NM", cwe("81827009", "Diameter", SNOMED), f"{n.diameter_mm:.1f}", sub_id=str(rank), units=MM)
        )
        text = f"Nodule {rank}: {n.diameter_mm:.1f} mm, {lung.lower()}, probability {n.probability:.2f}"
        out.append(Obx("ST", cwe("786838002", "Pulmonary nodule", SNOMED), escape(text), sub_id=str(rank)))
    out.append(Obx("TX", cwe("19005-8", "Radiology Impression", "LN"), tx(conclusion_text(finding))))
    return out


def _patient_id(finding: Finding) -> str:
    """PID-3 CX: id ^^^ assigning authority (HD: namespace & universal id & type) ^ MR."""
    order = finding.order
    namespace = order.patient_id_authority if order is not None else ""
    system = order.patient_id_system if order is not None else ""
    universal, kind = "", ""
    if system.startswith("urn:oid:"):
        universal, kind = system.removeprefix("urn:oid:"), "ISO"
    elif system:
        universal, kind = system, "URI"
    # HD.1 is an IS of 20 characters, HD.2 an ST of 199: a longer one is left out rather
    # than cut (a cut authority names another one); the FHIR report carries it whole.
    namespace = namespace if len(escape(namespace)) <= HD_NAMESPACE_MAX else ""
    if len(escape(universal)) > HD_UNIVERSAL_MAX:
        universal, kind = "", ""
    hd = "&".join(escape(p) for p in (namespace, universal, kind)).rstrip("&")
    return f"{escape(finding.patient_id)}^^^{hd}^MR"


def build_oru(finding: Finding, endpoint: Endpoint, now: datetime) -> str:
    """The ORU^R01 (ER7, segments separated by CR) for one finding, valid at hl7apy's
    strict level; `now` is MSH-7. ValueError when hl7apy refuses what it was given."""
    status = result_status(finding)
    order = finding.order
    placer = escape(order.placer_order_number) if order is not None else ""
    filler = escape(order.filler_order_number) if order is not None else ""
    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msg.msh.msh_3 = escape(endpoint.sending_application)
    msg.msh.msh_4 = escape(endpoint.sending_facility)
    if endpoint.receiving_application:
        msg.msh.msh_5 = escape(endpoint.receiving_application)
    if endpoint.receiving_facility:
        msg.msh.msh_6 = escape(endpoint.receiving_facility)
    msg.msh.msh_7 = ts(now)
    msg.msh.msh_9 = "ORU^R01^ORU_R01"
    msg.msh.msh_10 = control_id(finding)
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = VERSION
    # Series descriptions and ids may be any Unicode: say how the bytes are encoded.
    msg.msh.msh_18 = "UNICODE UTF-8"
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    if finding.patient_id:
        patient.pid.pid_3 = _patient_id(finding)
    else:
        patient.pid.pid_3 = '""'
    patient.pid.pid_5 = '""'
    group = result.add_group("ORU_R01_ORDER_OBSERVATION")
    group.orc.orc_1 = "RE"
    if placer:
        group.orc.orc_2 = placer
    if filler:
        group.orc.orc_3 = filler
    obr = group.obr
    obr.obr_1 = "1"
    if placer:
        obr.obr_2 = placer
    if filler:
        obr.obr_3 = filler
    obr.obr_4 = cwe("18748-4", "Diagnostic imaging study", "LN")
    obr.obr_7 = ts(finding.ready_at)
    if finding.accession_number:
        obr.obr_18 = escape(finding.accession_number)
    obr.obr_22 = ts(finding.inferred_at)
    obr.obr_24 = "RAD"
    obr.obr_25 = status
    for index, o in enumerate(observations(finding), start=1):
        obx = group.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(index)
        obx.obx_2 = o.value_type
        obx.obx_3 = o.identifier
        if o.sub_id:
            obx.obx_4 = o.sub_id
        # Escaped values hold no raw "~": each one is a repetition (TX lines).
        for repetition in o.value.split("~"):
            obx.add_field("OBX_5").value = repetition
        if o.units:
            obx.obx_6 = o.units
        if index == 1:
            # HL7 table 0078: A abnormal, N normal; the model that made the finding (OBX-17).
            obx.obx_8 = "A" if finding.positive else "N"
        obx.obx_11 = status
        obx.obx_14 = ts(finding.inferred_at)
        if index == 1:
            obx.obx_17 = cwe(
                finding.model_name, f"{finding.model_name} version {finding.model_version}", LOCAL
            )
    er7: str = msg.to_er7()
    return er7


# -- the answer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AckAnswer:
    code: str  # MSA-1
    control_id: str  # MSA-2: the control id it acknowledges
    reason: str  # MSA-3, else ERR-8, else the ERR-1 text; "" for an acceptance

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def read_ack(raw: bytes) -> AckAnswer:
    """MSA (and ERR) of an ACK. ValueError when it is not an ACK one can read."""
    text = raw.decode("utf-8", errors="replace").strip("\r\n")
    if not text.startswith("MSH") or len(text) < 8:
        raise ValueError("the answer is not an HL7 message (no MSH)")
    field, comp, sub = text[3], text[4], text[7] if len(text) > 7 else "&"
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    msa = next((s.split(field) for s in segments if s.startswith("MSA" + field)), None)
    if msa is None or len(msa) < 2 or not msa[1]:
        raise ValueError("the answer has no MSA-1 acknowledgment code")
    reason = msa[3] if len(msa) > 3 else ""
    if not reason:
        for seg in segments:
            if not seg.startswith("ERR" + field):
                continue
            parts = seg.split(field)
            # v2.5+: ERR-8 user message, then ERR-3's text; v2.3/2.4: ERR-1's code&text.
            if len(parts) > 8 and parts[8]:
                reason = parts[8]
            elif len(parts) > 3 and parts[3]:
                reason = parts[3].split(comp)[1] if comp in parts[3] else parts[3]
            elif len(parts) > 1 and parts[1]:
                pieces = parts[1].split(comp)
                reason = pieces[3].split(sub)[1] if len(pieces) > 3 and sub in pieces[3] else parts[1]
            if reason:
                break
    return AckAnswer(code=msa[1].strip().upper(), control_id=msa[2] if len(msa) > 2 else "", reason=reason)


def strict_parse(er7: str) -> Message:
    """The message parsed back by hl7apy at strict validation (for tests and receivers)."""
    message: Message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    return message
