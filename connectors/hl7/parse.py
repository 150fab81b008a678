"""HL7 v2.3–2.5.1 message → the events routing needs, or a reasoned rejection. Pure functions.

`parse_message(bytes)` never raises; it returns one of
- `Accepted`: one `OrderEvent` per ordered procedure (ORM^O01, OMI^O23), or one
  `EncounterEvent` (ADT^A01/A04/A08);
- `Ignored`: a message we take politely and publish nothing for (ORU: results are
  not an input of triage);
- `Rejected`: AE (the content is wrong: fix and resend) or AR (we cannot take this
  message at all: header, type, version) with the HL7 table 0357 error code, the
  location (segment/field) and a reason in plain words.

Field mapping (orders), first non-empty wins:
- accession number: IPC-1 (OMI, one event per IPC), then OBR-18 (IHE scheduled
  workflow's ORM convention), then the filler order number ORC-3, then OBR-3.
  The RIS's accession is what the modality writes into the DICOM header, so the
  fields that carry it explicitly come before the filler number that usually equals it.
- placer ORC-2 / OBR-2; filler ORC-3 / OBR-3; patient id PID-3, first repetition,
  component 1 only (never names or any other PID field).
- procedure: OBR-4, then OBR-44, then IPC-6 (protocol code); code, text, coding system.
- study UID: IPC-3, else ZDS-1 (IHE), only if it is a valid DICOM UID.
- priority: TQ1-9 > ORC-7.6 > OBR-27.6 (the first that maps); S stat, A asap, R routine,
  P/C/T urgent. `priority_raw` / `priority_field` record what the sender wrote, where.
- indication: OBR-31 (text; codes as "system|code" in `indication_codes`), OBR-13,
  ORC-16, joined with "; " and cut to INDICATION_MAX.
- patient class: PV1-2: E emergency; I and B (obstetrics: an admitted patient)
  inpatient; O, P (pre-admit) and R (recurring) outpatient; else unknown.
- status: ORC-1: NW/XO/SC/OK/XR active, CA/OC/DC/OD/CR/DR cancelled, CM completed;
  SC (status changed) follows ORC-5 (CM completed, CA/DC cancelled); no ORC: OBR-25 F/C
  completed, else active.

Segments are parsed by hl7apy (tolerant validation) against the 2.5.1 structures:
field positions never move between 2.3 and 2.5.1 (fields are only ever appended), so
one reference reads them all and a 2.4 sender's TQ1 or IPC is still understood. Only
the segments routing reads are parsed; every segment id is checked for shape, so a
line break inside a field (a common sender bug) is refused with its location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_segment
from pydantic import ValidationError

from connectors.hl7.message import (
    SUPPORTED_VERSIONS,
    Header,
    HeaderError,
    Location,
    decode,
    read_header,
    split_segments,
    unescape,
    valid_segment_id,
    version_token,
)
from radtriage.blobstore import valid_uid
from schemas.encounters import EncounterEvent
from schemas.orders import INDICATION_MAX, OrderEvent, OrderStatus, PatientClass, Priority

Event = OrderEvent | EncounterEvent
_E = TypeVar("_E", OrderEvent, EncounterEvent)

# The hl7apy structure library every segment is read with (see the module docstring).
_REFERENCE_VERSION = "2.5.1"
# The fields routing reads, per segment; every other segment is checked for shape only.
# hl7apy is handed only these fields (positions kept, the rest emptied): names, birth
# dates and addresses never even become objects in this process, and a message parses
# about three times faster than whole.
_READ: dict[str, frozenset[int]] = {
    "PID": frozenset({3}),
    "PV1": frozenset({2, 19}),
    "ORC": frozenset({1, 2, 3, 5, 7, 16}),
    "OBR": frozenset({2, 3, 4, 13, 18, 25, 27, 31, 44}),
    "TQ1": frozenset({9}),
    "IPC": frozenset({1, 3, 6}),
    "ZDS": frozenset({1}),
}
# Ids (accession, patient id) become Kafka keys and join keys: the schemas' limit.
_ID_MAX = 64

_ORDER_TYPES = {"ORM": "O01", "OMI": "O23"}
_ADT_EVENTS = frozenset({"A01", "A04", "A08"})
_KNOWN_CODES = frozenset({"ORM", "OMI", "ADT", "ORU"})

_PRIORITY: dict[str, Priority] = {
    "S": "stat",
    "STAT": "stat",
    "A": "asap",
    "ASAP": "asap",
    "R": "routine",
    "ROUTINE": "routine",
    "P": "urgent",  # preoperative
    "C": "urgent",  # callback
    "T": "urgent",  # timing critical
    "URGENT": "urgent",
}
_TIMING_CRITICAL = re.compile(r"^T\d+$")  # HL7 table 0485 "Tn": timing critical within n

_PATIENT_CLASS: dict[str, PatientClass] = {
    "E": "emergency",
    "I": "inpatient",
    "B": "inpatient",
    "O": "outpatient",
    "P": "outpatient",
    "R": "outpatient",
}

_ORDER_CONTROL: dict[str, OrderStatus] = {
    "NW": "active",
    "XO": "active",
    "SC": "active",
    "OK": "active",
    "XR": "active",
    "CA": "cancelled",
    "OC": "cancelled",
    "DC": "cancelled",
    "OD": "cancelled",
    "CR": "cancelled",
    "DR": "cancelled",
    "CM": "completed",
}
_ORDER_STATUS: dict[str, OrderStatus] = {"CM": "completed", "CA": "cancelled", "DC": "cancelled"}


# -- outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    header: Header
    events: tuple[Event, ...]
    segment_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ignored:
    header: Header
    reason: str
    segment_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejected:
    header: Header
    ack: Literal["AE", "AR"]
    code: int
    reason: str
    location: Location | None = None
    segment_ids: tuple[str, ...] = ()


Outcome = Accepted | Ignored | Rejected


class _Refusal(Exception):
    """Raised inside the mapping, turned into a `Rejected` at the top."""

    def __init__(self, code: int, reason: str, location: Location | None = None, ack: str = "AE") -> None:
        super().__init__(reason)
        self.code, self.reason, self.location = code, reason, location
        self.ack: Literal["AE", "AR"] = "AR" if ack == "AR" else "AE"


# -- segments ----------------------------------------------------------------------------


@dataclass
class _Seg:
    """One parsed segment: raw ER7 repetitions by field number, read through `header`."""

    name: str
    sequence: int
    header: Header
    fields: dict[int, list[str]]

    def reps(self, n: int) -> list[str]:
        return self.fields.get(n, [])

    def comp(self, n: int, component: int = 1, rep: int = 0) -> str:
        """Component `component` (1-based) of repetition `rep` of field `n`, unescaped;
        its first subcomponent if it has several."""
        return self.sub(n, component, 1, rep)

    def sub(self, n: int, component: int, subcomponent: int, rep: int = 0) -> str:
        """Subcomponent `subcomponent` (1-based) of a component, unescaped."""
        reps = self.reps(n)
        if rep >= len(reps):
            return ""
        parts = reps[rep].split(self.header.component_sep)
        if component > len(parts):
            return ""
        subs = parts[component - 1].split(self.header.subcomponent_sep)
        return unescape(subs[subcomponent - 1], self.header).strip() if subcomponent <= len(subs) else ""

    def loc(self, n: int, component: int | None = None) -> Location:
        return Location(self.name, self.sequence, n, component)


def _encoding_chars(header: Header) -> dict[str, str]:
    return {
        "FIELD": header.field_sep,
        "COMPONENT": header.component_sep,
        "REPETITION": header.repetition_sep,
        "ESCAPE": header.escape_char,
        "SUBCOMPONENT": header.subcomponent_sep,
        "SEGMENT": "\r",
        "GROUP": "\r",
    }


def _project(text: str, fields: frozenset[int], sep: str) -> str:
    """`text` with only `fields` kept, every other field emptied (positions unchanged)."""
    parts = text.split(sep)
    return sep.join(p if i == 0 or i in fields else "" for i, p in enumerate(parts)).rstrip(sep)


def _parse_segment(text: str, name: str, sequence: int, header: Header) -> _Seg:
    enc = _encoding_chars(header)
    text = _project(text, _READ[name], header.field_sep)
    try:
        parsed = parse_segment(
            text, version=_REFERENCE_VERSION, encoding_chars=enc, validation_level=VALIDATION_LEVEL.TOLERANT
        )
    except Exception as exc:  # hl7apy raises a zoo of types; the class name is the only safe detail
        reason = f"{name} segment {sequence} could not be parsed ({type(exc).__name__})"
        raise _Refusal(102, reason, Location(name, sequence)) from exc
    fields: dict[int, list[str]] = {}
    prefix = f"{name}_"
    for f in parsed.children:
        fname = f.name or ""
        if fname.startswith(prefix) and fname[len(prefix) :].isdigit():
            fields.setdefault(int(fname[len(prefix) :]), []).append(f.to_er7(encoding_chars=enc))
    return _Seg(name, sequence, header, fields)


def _segments(lines: list[str], header: Header) -> tuple[list[_Seg], tuple[str, ...]]:
    """Check every segment id; parse the ones routing reads."""
    ids: list[str] = []
    parsed: list[_Seg] = []
    counts: dict[str, int] = {"MSH": 1}
    for index, line in enumerate(lines[1:], start=2):
        name = line[:3]
        if not valid_segment_id(name) or (len(line) > 3 and line[3] != header.field_sep):
            raise _Refusal(
                100,
                f"segment {index} has no valid segment id (a line break inside a field?)",
                Location("?", index),
            )
        ids.append(name)
        counts[name] = counts.get(name, 0) + 1
        if name == "MSH":
            raise _Refusal(100, f"a second MSH segment at position {index}", Location("MSH", counts[name]))
        if name in _READ:
            parsed.append(_parse_segment(line, name, counts[name], header))
    return parsed, tuple(ids)


def _segment_ids(lines: list[str], field_sep: str) -> tuple[str, ...]:
    """Segment ids for a summary: only well-shaped ids, anything else as "?"."""
    out = []
    for line in lines:
        name = line[:3]
        ok = valid_segment_id(name) and (len(line) == 3 or line[3] == field_sep or name == "MSH")
        out.append(name if ok else "?")
    return tuple(out)


# -- orders ------------------------------------------------------------------------------


@dataclass
class _Order:
    orc: _Seg | None = None
    obr: _Seg | None = None
    tq1: list[_Seg] = field(default_factory=list)
    ipc: list[_Seg] = field(default_factory=list)
    zds: _Seg | None = None


def _group_orders(segs: list[_Seg]) -> list[_Order]:
    """ORC starts an order; OBR, TQ1, IPC and ZDS belong to the order before them. An
    OBR without its own ORC (a second OBR after one ORC) starts an order of its own."""
    orders: list[_Order] = []
    for s in segs:
        if s.name == "ORC":
            orders.append(_Order(orc=s))
            continue
        if s.name not in ("OBR", "TQ1", "IPC", "ZDS"):
            continue
        if not orders or (s.name == "OBR" and orders[-1].obr is not None):
            orders.append(_Order())
        current = orders[-1]
        if s.name == "OBR":
            current.obr = s
        elif s.name == "TQ1":
            current.tq1.append(s)
        elif s.name == "IPC":
            current.ipc.append(s)
        else:
            current.zds = s
    return orders


def _first(*candidates: tuple[_Seg | None, int, int]) -> str:
    for seg, n, c in candidates:
        if seg is not None:
            value = seg.comp(n, c)
            if value:
                return value
    return ""


def map_priority(raw: str) -> Priority | None:
    value = raw.strip().upper()
    if value in _PRIORITY:
        return _PRIORITY[value]
    if _TIMING_CRITICAL.match(value):
        return "urgent"
    return None


def _priority(order: _Order) -> tuple[Priority | None, str, str]:
    """(priority, raw value, field): the first source whose value maps; if none maps,
    the first stated value, unmapped (priority None: the order does not say)."""
    sources: list[tuple[str, str]] = []
    for tq1 in order.tq1:
        sources.append(("TQ1-9", tq1.comp(9, 1)))
    if order.orc is not None:
        sources.append(("ORC-7", order.orc.comp(7, 6)))
    if order.obr is not None:
        sources.append(("OBR-27", order.obr.comp(27, 6)))
    stated = [(where, raw) for where, raw in sources if raw]
    for where, raw in stated:
        mapped = map_priority(raw)
        if mapped is not None:
            return mapped, raw, where
    if stated:
        return None, stated[0][1], stated[0][0]
    return None, "", ""


def _indication(order: _Order) -> tuple[str, tuple[str, ...]]:
    texts: list[str] = []
    codes: list[str] = []
    obr, orc = order.obr, order.orc
    if obr is not None:
        for rep in range(len(obr.reps(31))):
            code, text, system = obr.comp(31, 1, rep), obr.comp(31, 2, rep), obr.comp(31, 3, rep)
            if code:
                codes.append(f"{system}|{code}" if system else code)
            if text or code:
                texts.append(text or code)
        texts.append(obr.comp(13, 1))
    if orc is not None:
        texts.append(orc.comp(16, 2) or orc.comp(16, 1))
    unique = list(dict.fromkeys(t for t in texts if t))
    return "; ".join(unique)[:INDICATION_MAX], tuple(dict.fromkeys(codes))


def _status(order: _Order) -> OrderStatus:
    orc, obr = order.orc, order.obr
    if orc is None:
        result = obr.comp(25, 1).upper() if obr is not None else ""
        return "completed" if result in ("F", "C") else "active"
    control = orc.comp(1, 1).upper()
    if not control:
        raise _Refusal(101, "ORC-1 order control missing", orc.loc(1))
    if control not in _ORDER_CONTROL:
        safe = control if re.fullmatch(r"[A-Z]{2}", control) else "?"
        raise _Refusal(103, f"ORC-1 order control {safe} not supported", orc.loc(1))
    if control == "SC":
        return _ORDER_STATUS.get(orc.comp(5, 1).upper(), "active")
    return _ORDER_CONTROL[control]


def _check_id(value: str, what: str, loc: Location) -> str:
    if len(value) > _ID_MAX:
        raise _Refusal(104, f"{what} longer than {_ID_MAX} characters", loc)
    if not value.isprintable():
        raise _Refusal(102, f"{what} contains control characters", loc)
    return value


def _procedure(order: _Order) -> tuple[str, str, str]:
    candidates: list[tuple[_Seg, int]] = []
    if order.obr is not None:
        candidates += [(order.obr, 4), (order.obr, 44)]
    candidates += [(ipc, 6) for ipc in order.ipc]
    for seg, n in candidates:
        code, text = seg.comp(n, 1), seg.comp(n, 2)
        if code or text:
            return code, text, seg.comp(n, 3)
    return "", "", ""


def _study_uid(ipc: _Seg | None, zds: _Seg | None) -> str:
    uid = _first((ipc, 3, 1), (zds, 1, 1))
    # Only a real DICOM UID can join a study; anything else would never match one.
    return uid if valid_uid(uid) else ""


def _accessions(order: _Order, index: int) -> list[tuple[str, _Seg | None, Location]]:
    """(accession, the IPC it came from, where) for one order: one per IPC, else one."""
    if order.ipc:
        out: list[tuple[str, _Seg | None, Location]] = []
        for ipc in order.ipc:
            acc = ipc.comp(1, 1)
            if acc:
                out.append((acc, ipc, ipc.loc(1)))
        if out:
            return out
    obr, orc = order.obr, order.orc
    for seg, n in ((obr, 18), (orc, 3), (obr, 3)):
        if seg is not None and seg.comp(n, 1):
            return [(seg.comp(n, 1), None, seg.loc(n))]
    where = obr.loc(18) if obr is not None else orc.loc(3) if orc is not None else Location("OBR")
    raise _Refusal(
        101, f"order {index}: no accession number (IPC-1, OBR-18, ORC-3 and OBR-3 are all empty)", where
    )


def _patient_class(segs: list[_Seg]) -> PatientClass:
    pv1 = next((s for s in segs if s.name == "PV1"), None)
    return _PATIENT_CLASS.get(pv1.comp(2, 1).upper(), "unknown") if pv1 is not None else "unknown"


# HD universal id types (HL7 table 0301) whose id is, or names, a URI.
_UNIVERSAL_ID_URI = {"ISO": "urn:oid:{}", "URI": "{}", "URL": "{}", "UUID": "urn:uuid:{}"}


def _assigning_authority(pid: _Seg | None) -> tuple[str, str]:
    """PID-3.4 (HD) of the patient id: its namespace id, and its universal id as a URI
    when its type says what it is ("" otherwise: a local namespace is not a system)."""
    if pid is None:
        return "", ""
    namespace = pid.sub(3, 4, 1)[:64]
    universal, kind = pid.sub(3, 4, 2), pid.sub(3, 4, 3).upper()
    system = _UNIVERSAL_ID_URI[kind].format(universal) if universal and kind in _UNIVERSAL_ID_URI else ""
    return namespace, system[:256]


def _orders(header: Header, segs: list[_Seg]) -> tuple[OrderEvent, ...]:
    orders = [o for o in _group_orders(segs) if o.obr is not None or o.orc is not None]
    if not orders:
        raise _Refusal(100, "no ORC/OBR order segments", Location("OBR"))
    pid = next((s for s in segs if s.name == "PID"), None)
    patient_id = _check_id(pid.comp(3, 1), "PID-3 patient id", pid.loc(3, 1)) if pid is not None else ""
    authority, id_system = _assigning_authority(pid)
    patient_class = _patient_class(segs)
    events: list[OrderEvent] = []
    for index, order in enumerate(orders, start=1):
        status = _status(order)
        priority, raw, where = _priority(order)
        indication, codes = _indication(order)
        code, text, system = _procedure(order)
        placer = _first((order.orc, 2, 1), (order.obr, 2, 1))
        filler = _first((order.orc, 3, 1), (order.obr, 3, 1))
        for accession, ipc, loc in _accessions(order, index):
            events.append(
                _build(
                    OrderEvent,
                    loc,
                    accession_number=_check_id(accession, "accession number", loc),
                    message_type=f"{header.message_code}^{header.trigger_event}",
                    source="hl7",
                    source_message_id=header.control_id,
                    placer_order_number=placer,
                    filler_order_number=filler,
                    patient_id=patient_id,
                    patient_id_authority=authority,
                    patient_id_system=id_system,
                    study_uid=_study_uid(ipc, order.zds),
                    procedure_code=code,
                    procedure_coding_system=system,
                    procedure_text=text,
                    priority=priority,
                    priority_raw=raw,
                    priority_field=where,
                    indication=indication,
                    indication_codes=codes,
                    patient_class=patient_class,
                    status=status,
                )
            )
    return tuple(events)


def _build(cls: type[_E], loc: Location, **values: object) -> _E:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        # pydantic's message quotes the input value: only the field name is reported.
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        raise _Refusal(102, f"{name} is not valid ({first['type']})", loc) from exc


# -- ADT ---------------------------------------------------------------------------------


def _encounter(header: Header, segs: list[_Seg]) -> EncounterEvent:
    pid = next((s for s in segs if s.name == "PID"), None)
    if pid is None:
        raise _Refusal(100, "PID segment missing", Location("PID"))
    patient_id = pid.comp(3, 1)
    if not patient_id:
        raise _Refusal(101, "PID-3 patient id missing", pid.loc(3, 1))
    pv1 = next((s for s in segs if s.name == "PV1"), None)
    return _build(
        EncounterEvent,
        pid.loc(3, 1),
        patient_id=_check_id(patient_id, "PID-3 patient id", pid.loc(3, 1)),
        patient_class=_patient_class(segs),
        message_type=f"ADT^{header.trigger_event}",
        source="hl7",
        source_message_id=header.control_id,
        visit_number=pv1.comp(19, 1) if pv1 is not None else "",
    )


# -- the message -------------------------------------------------------------------------


def _check_header(header: Header) -> None:
    """MSH fields every message needs before its body is worth reading (AR if not)."""
    if not header.message_code:
        raise _Refusal(101, "MSH-9 message type missing", Location("MSH", field=9), ack="AR")
    if not header.control_id:
        raise _Refusal(101, "MSH-10 message control id missing", Location("MSH", field=10), ack="AR")
    if not header.version:
        raise _Refusal(101, "MSH-12 version id missing", Location("MSH", field=12), ack="AR")
    if header.version not in SUPPORTED_VERSIONS:
        shown = version_token(header.version) or "?"
        raise _Refusal(
            203,
            f"version {shown} not supported (2.3 to 2.5.1)",
            Location("MSH", field=12),
            ack="AR",
        )
    code, event = header.message_code, header.trigger_event
    shown = header.message_type or "?"
    if code not in _KNOWN_CODES:
        where = Location("MSH", field=9, component=1)
        raise _Refusal(200, f"message type {shown} not supported", where, ack="AR")
    wrong_order = code in _ORDER_TYPES and event != _ORDER_TYPES[code]
    if wrong_order:
        where = Location("MSH", field=9, component=2)
        raise _Refusal(201, f"event {shown} not supported", where, ack="AR")


def _dispatch(header: Header, lines: list[str]) -> Outcome:
    _check_header(header)
    if header.message_code == "ORU":
        return Ignored(header, f"{header.message_type} ignored: radtriage takes orders and ADT, not results")
    if header.message_code == "ADT" and header.trigger_event not in _ADT_EVENTS:
        # A hospital ADT feed sends every event (A02, A03, A11...); refusing them would make
        # the interface engine retry or stall the feed. Taken, and nothing published.
        return Ignored(
            header, f"{header.message_type} ignored: radtriage uses ADT A01/A04/A08 for patient location"
        )
    segs, ids = _segments(lines, header)
    all_ids = ("MSH", *ids)
    if header.message_code == "ADT":
        return Accepted(header, (_encounter(header, segs),), all_ids)
    return Accepted(header, _orders(header, segs), all_ids)


def parse_message(data: bytes) -> Outcome:
    """Read one HL7 message (the bytes inside an MLLP frame). Never raises."""
    text, codec = decode(data)
    lines = split_segments(text)
    header = read_header(lines, codec)
    if isinstance(header, HeaderError):
        return Rejected(
            header.header, "AR", header.code, header.reason, header.location, _segment_ids(lines, "|")
        )
    ids = _segment_ids(lines, header.field_sep)
    try:
        outcome = _dispatch(header, lines)
    except _Refusal as r:
        return Rejected(header, r.ack, r.code, r.reason, r.location, ids)
    except Exception as exc:  # a bug of ours must not cost the sender its message: AE, quarantined
        reason = f"internal error reading the message ({type(exc).__name__})"
        return Rejected(header, "AE", 207, reason, None, ids)
    if isinstance(outcome, Ignored):
        return Ignored(outcome.header, outcome.reason, ids)
    return outcome


def oversized(prefix: bytes, limit: int) -> Rejected:
    """The outcome for a frame larger than `limit` bytes: AR, answered from its MSH if readable."""
    text, codec = decode(prefix)
    lines = split_segments(text)
    read = read_header(lines, codec)
    header = read.header if isinstance(read, HeaderError) else read
    reason = f"message larger than {limit} bytes; not read, connection closed"
    return Rejected(header, "AR", 104, reason, None, _segment_ids(lines[:1], header.field_sep))
