"""Synthetic HL7 v2 sample messages (no real patient) and helpers to vary them in tests.

The `.hl7` files are stored one segment per line (LF) for reading; `load()` returns
them with the segment terminator a test asks for (CR by default, as on the wire).
"""

from __future__ import annotations

import itertools
from pathlib import Path

DATA = Path(__file__).parent

VALID = (
    "orm_o01_v2.3.hl7",
    "orm_o01_v2.4.hl7",
    "orm_o01_v2.5.hl7",
    "omi_o23_v2.5.1.hl7",
    "adt_a04_v2.3.hl7",
    "adt_a01_v2.5.hl7",
    "adt_a08_v2.5.1.hl7",
)
IGNORED = ("oru_r01_v2.5.1.hl7",)
# file → (MSA-1, table 0357 code, ERR location)
INVALID: dict[str, tuple[str, int, str]] = {
    "invalid_orm_no_accession_v2.4.hl7": ("AE", 101, "OBR-18"),
    "invalid_adt_no_patient_id_v2.5.hl7": ("AE", 101, "PID-3.1"),
    "invalid_orc_control_v2.5.hl7": ("AE", 103, "ORC-1"),
    "invalid_siu_s12_v2.5.hl7": ("AR", 200, "MSH-9.1"),
    "invalid_orm_o02_v2.4.hl7": ("AR", 201, "MSH-9.2"),
    "invalid_orm_v2.7.hl7": ("AR", 203, "MSH-12"),
    "invalid_no_msh.hl7": ("AR", 100, "MSH"),
    "invalid_bad_encoding_chars.hl7": ("AR", 102, "MSH-2"),
}

_counter = itertools.count(1)


def text(name: str, sep: str = "\r") -> str:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return sep.join(lines) + sep


def load(name: str, sep: str = "\r") -> bytes:
    return text(name, sep).encode("utf-8")


def all_names() -> list[str]:
    return [*VALID, *IGNORED, *INVALID]


def set_field(message: str, segment: str, field: int, value: str, occurrence: int = 1) -> str:
    """`message` (CR-separated) with field `field` of the `occurrence`-th `segment` set to `value`."""
    segments = message.rstrip("\r").split("\r")
    seen = 0
    for i, seg in enumerate(segments):
        if seg[:3] != segment:
            continue
        seen += 1
        if seen != occurrence:
            continue
        parts = seg.split("|")
        # MSH-1 is the separator itself: MSH-n is parts[n - 1]; for others, parts[n].
        index = field - 1 if segment == "MSH" else field
        parts += [""] * (index + 1 - len(parts))
        parts[index] = value
        segments[i] = "|".join(parts).rstrip("|") if value == "" else "|".join(parts)
        return "\r".join(segments) + "\r"
    raise KeyError(f"no {segment} #{occurrence}")


def drop_segment(message: str, segment: str) -> str:
    segments = message.rstrip("\r").split("\r")
    return "\r".join(s for s in segments if s[:3] != segment) + "\r"


def phi_values() -> list[str]:
    """The synthetic names, birth dates and addresses of every sample (PID-5, -7, -11):
    none of them may ever reach a log line, a span or a Kafka topic."""
    out: set[str] = set()
    for name in all_names():
        for seg in text(name).split("\r"):
            if not seg.startswith("PID|"):
                continue
            fields = seg.split("|") + [""] * 12
            out.update(p for p in fields[5].split("^") if len(p) >= 4)  # names
            out.add(fields[7])  # birth date
            address = [*fields[11].split("^"), "", "", ""]
            out.update((address[0], address[2]))  # street, city (not the bare zip code)
    return sorted(v for v in out if v)


def unique_orm(accession: str | None = None, control_id: str | None = None, priority: str = "S") -> bytes:
    """A valid v2.5 ORM^O01 (from orm_o01_v2.5.hl7) with its own accession and control id."""
    n = next(_counter)
    accession = accession or f"ACC-T{n:07d}"
    control_id = control_id or f"C{n:09d}"
    message = text("orm_o01_v2.5.hl7")
    message = set_field(message, "MSH", 10, control_id)
    message = set_field(message, "OBR", 18, accession)
    message = set_field(message, "TQ1", 9, priority)
    return message.encode("utf-8")
