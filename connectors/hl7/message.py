"""ER7 basics shared by `parse` and `ack`: bytes → text, segments, the MSH header, escaping.

The MSH is read here by hand rather than by hl7apy, because an ACK has to be built
even for a message hl7apy refuses outright: a missing or mangled MSH-2, an unknown
version, a header that is not first. Whatever can be salvaged (the control id above
all, so the sender can match the ACK) is kept in `Header`, together with whether it
was readable enough to trust.

Nothing here logs, and nothing that might be PHI leaves through `token()`: the
message type, control id and version that go into logs, spans and dead letters are
whitelisted shapes, never arbitrary field content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

# The versions whose message structures we map (fields are only ever appended between
# them, so one set of field positions reads all five).
SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")

DEFAULT_FIELD_SEP = "|"
DEFAULT_ENCODING = "^~\\&"

# HL7 table 0357 (message error condition codes), the subset an intake can raise.
ERROR_TEXT: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

# MSH-18 (HL7 table 0211) → Python codec, for the character sets a RIS actually sends.
_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}

_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_TOKEN = re.compile(r"^[\x21-\x7e]{1,64}$")
_TYPE_PART = re.compile(r"^[A-Z0-9_]{1,7}$")
_VERSION = re.compile(r"^[0-9]{1,2}(\.[0-9]{1,2}){0,2}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Location:
    """Where an error is: segment id, its occurrence (1-based), field, component (ERR-2 / ERR-1)."""

    segment: str
    sequence: int = 1
    field: int | None = None
    component: int | None = None

    def __str__(self) -> str:
        where = self.segment if self.sequence == 1 else f"{self.segment}[{self.sequence}]"
        if self.field is not None:
            where += f"-{self.field}"
            if self.component is not None:
                where += f".{self.component}"
        return where


@dataclass(frozen=True)
class Header:
    """What the MSH says, as far as it could be read. Raw ER7 values (still escaped)."""

    field_sep: str = DEFAULT_FIELD_SEP
    encoding: str = DEFAULT_ENCODING  # MSH-2: component, repetition, escape, subcomponent
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_code: str = ""  # MSH-9.1, e.g. ORM
    trigger_event: str = ""  # MSH-9.2, e.g. O01
    control_id: str = ""  # MSH-10
    processing_id: str = ""  # MSH-11
    version: str = ""  # MSH-12.1
    accept_ack_type: str = ""  # MSH-15
    application_ack_type: str = ""  # MSH-16
    charset: str = ""  # MSH-18
    # The text codec the message was decoded with; the ACK is encoded with it too.
    codec: str = "utf-8"
    # False when the separators could not be trusted: fields were salvaged with defaults.
    readable: bool = True

    @property
    def component_sep(self) -> str:
        return self.encoding[0]

    @property
    def repetition_sep(self) -> str:
        return self.encoding[1]

    @property
    def escape_char(self) -> str:
        return self.encoding[2]

    @property
    def subcomponent_sep(self) -> str:
        return self.encoding[3]

    @property
    def message_type(self) -> str:
        """The type as "ORM^O01", whitelisted: safe for logs, spans and dead letters."""
        code, event = token_part(self.message_code), token_part(self.trigger_event)
        if not code:
            return ""
        return f"{code}^{event}" if event else code


@dataclass(frozen=True)
class HeaderError:
    """The MSH could not be trusted: the message is rejected (AR) with this reason."""

    code: int
    reason: str
    location: Location
    header: Header


def token(value: str) -> str:
    """`value` if it is a short run of printable ASCII (an id), else "": for logs and dead letters."""
    return value if _TOKEN.match(value) else ""


def token_part(value: str) -> str:
    return value if _TYPE_PART.match(value) else ""


def version_token(value: str) -> str:
    return value if _VERSION.match(value) else ""


def valid_segment_id(name: str) -> bool:
    return bool(_SEGMENT_ID.match(name))


# -- bytes → text → segments -------------------------------------------------------------


def _first_line(data: bytes) -> bytes:
    end = len(data)
    for sep in (b"\r", b"\n"):
        i = data.find(sep)
        if 0 <= i < end:
            end = i
    return data[:end]


def declared_charset(data: bytes) -> str:
    """MSH-18 read from the raw bytes (the MSH itself is ASCII in every character set we decode)."""
    line = _first_line(data).decode("latin-1")
    if not line.startswith("MSH") or len(line) < 8:
        return ""
    fields = line.split(line[3])
    if len(fields) < 18:
        return ""
    return fields[17].split(fields[1][:1] or "^")[0].strip().upper()


def decode(data: bytes) -> tuple[str, str]:
    """The message as text, and the codec used.

    The declared MSH-18 charset if we know it, else UTF-8, else Latin-1: 8-bit senders
    that never fill MSH-18 are common, and Latin-1 maps every byte, so ids and codes
    (ASCII in practice) always come through and nothing is refused for its encoding alone.
    """
    declared = _CHARSETS.get(declared_charset(data), "")
    for codec in (declared, "utf-8"):
        if not codec:
            continue
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def split_segments(text: str) -> list[str]:
    """Segments, accepting CR, LF or CRLF as terminators; blank lines dropped."""
    text = text.lstrip("\ufeff \t\x00")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [s.rstrip() for s in text.split("\r") if s.strip()]


# -- MSH ---------------------------------------------------------------------------------


def _plausible_separator(ch: str) -> bool:
    return len(ch) == 1 and 0x21 <= ord(ch) <= 0x7E and not ch.isalnum()


def _valid_encoding(field_sep: str, enc: str) -> bool:
    # 4 characters; a 5th (truncation, v2.7+) is tolerated so the version can be read
    # and answered with "unsupported version" rather than "garbled header".
    if len(enc) not in (4, 5):
        return False
    if len(set(enc)) != len(enc) or field_sep in enc:
        return False
    return all(_plausible_separator(c) for c in enc)


def _clean(value: str, field_sep: str, limit: int = 180) -> str:
    """A raw field fit to echo into our ACK: no separators of the ACK's own structure."""
    value = _CONTROL.sub("", value).replace(field_sep, "")
    return value[:limit]


def _header_from_fields(
    fields: list[str], field_sep: str, encoding: str, codec: str, readable: bool
) -> Header:
    def f(n: int) -> str:
        # fields[0] is "MSH", fields[1] is MSH-2: MSH-n is fields[n - 1].
        return _clean(fields[n - 1], field_sep) if len(fields) >= n else ""

    comp = encoding[0]
    msh9 = f(9).split(comp)
    return Header(
        field_sep=field_sep,
        encoding=encoding,
        sending_application=f(3),
        sending_facility=f(4),
        receiving_application=f(5),
        receiving_facility=f(6),
        message_code=msh9[0].strip().upper(),
        trigger_event=msh9[1].strip().upper() if len(msh9) > 1 else "",
        control_id=f(10).strip(),
        processing_id=f(11).split(comp)[0].strip(),
        version=f(12).split(comp)[0].strip(),
        accept_ack_type=f(15).strip().upper(),
        application_ack_type=f(16).strip().upper(),
        charset=f(18).split(comp)[0].strip(),
        codec=codec,
        readable=readable,
    )


def salvage_header(segments: list[str], codec: str) -> Header:
    """Whatever an untrustworthy MSH still tells (for MSA-2 above all), with default separators."""
    msh = next((s for s in segments if s.startswith("MSH")), "")
    if len(msh) < 4:
        return Header(codec=codec, readable=False)
    sep = msh[3] if _plausible_separator(msh[3]) else DEFAULT_FIELD_SEP
    fields = msh.split(sep)
    enc = fields[1] if len(fields) > 1 and _valid_encoding(sep, fields[1]) else DEFAULT_ENCODING
    salvaged = _header_from_fields(fields, sep, enc[:4], codec, readable=False)
    # Answer in the default separators: ours are known to be valid.
    return replace(
        salvaged,
        field_sep=DEFAULT_FIELD_SEP,
        encoding=DEFAULT_ENCODING,
        sending_application=_clean(salvaged.sending_application, DEFAULT_FIELD_SEP),
        sending_facility=_clean(salvaged.sending_facility, DEFAULT_FIELD_SEP),
        receiving_application=_clean(salvaged.receiving_application, DEFAULT_FIELD_SEP),
        receiving_facility=_clean(salvaged.receiving_facility, DEFAULT_FIELD_SEP),
        control_id=_clean(salvaged.control_id, DEFAULT_FIELD_SEP),
    )


def read_header(segments: list[str], codec: str) -> Header | HeaderError:
    """The MSH of a message, or why it cannot be trusted (an AR with what could be salvaged)."""
    if not segments or not segments[0].startswith("MSH"):
        reason = "the message does not start with an MSH segment"
        return HeaderError(100, reason, Location("MSH"), salvage_header(segments, codec))
    msh = segments[0]
    if len(msh) < 4 or not _plausible_separator(msh[3]):
        reason = "MSH-1 field separator missing or invalid"
        return HeaderError(102, reason, Location("MSH", field=1), salvage_header(segments, codec))
    sep = msh[3]
    fields = msh.split(sep)
    if len(fields) < 2 or not _valid_encoding(sep, fields[1]):
        return HeaderError(
            102,
            "MSH-2 encoding characters missing or invalid",
            Location("MSH", field=2),
            salvage_header(segments, codec),
        )
    return _header_from_fields(fields, sep, fields[1][:4], codec, readable=True)


# -- escaping ----------------------------------------------------------------------------


def escape(text: str, header: Header) -> str:
    """`text` as an ER7 value under `header`'s separators (HL7 2.7 §2.7 escape sequences)."""
    e = header.escape_char
    out = text.replace(e, f"{e}E{e}")
    for ch, code in (
        (header.field_sep, "F"),
        (header.component_sep, "S"),
        (header.subcomponent_sep, "T"),
        (header.repetition_sep, "R"),
    ):
        out = out.replace(ch, f"{e}{code}{e}")
    return _CONTROL.sub(" ", out)


def unescape(value: str, header: Header) -> str:
    """An ER7 value as plain text: separators restored, formatting escapes turned into spaces."""
    e = header.escape_char
    if e not in value:
        return value
    known = {
        "F": header.field_sep,
        "S": header.component_sep,
        "T": header.subcomponent_sep,
        "R": header.repetition_sep,
        "E": e,
        ".br": " ",
    }

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code in known:
            return known[code]
        if code.startswith("X") and re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", code):
            return bytes.fromhex(code[1:]).decode("latin-1")
        return ""  # highlighting, character-set switches: formatting only

    pattern = re.escape(e) + r"([^" + re.escape(e) + r"]{1,32})" + re.escape(e)
    return _CONTROL.sub(" ", re.sub(pattern, one, value))
