"""The ACK for a received message: pure, built from whatever of its MSH could be read.

Modes (HL7 v2.5 §2.9): with MSH-15 and MSH-16 both empty the sender uses original
mode and gets AA / AE / AR. When either is valued, enhanced mode is in effect:
- MSH-15 (accept acknowledgment) AL, SU or ER: the answer is the accept (commit)
  acknowledgment, CA / CE / CR. "Commit" here means what the standard means: the
  message is safely stored — in Kafka with acks=all, or, for a refused message, in the
  local quarantine. We validate synchronously, so the commit ACK already carries the
  content outcome (CE with the reason) and no separate application ACK is ever sent:
  MSH-16 is treated as NE.
- MSH-15 NE (or empty) with MSH-16 AL/SU/ER: the sender asked only for the application
  acknowledgment, and we can give it on the same connection: AA / AE / AR.
- Both NE: strictly no answer is wanted, but an MLLP sender may still be reading the
  socket, and an unexpected ACK costs it nothing while a missing one can stall it until
  its timeout; so it gets the commit ACK (CA / CE / CR) all the same. Likewise SU with
  an error and ER with a success are answered: silence on one TCP connection is never
  safer than a well-formed ACK.

ERR segment: for v2.5 and later ERR-2 (location), ERR-3 (table 0357 code), ERR-4
(severity E / W / I) and ERR-8 (the reason); for 2.3 / 2.4 the ERR-1 composite
(segment^sequence^field^code&text&HL70357). MSA-3 carries the reason in every version
(cut to its 80 characters), since many engines show only that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from connectors.hl7.message import ERROR_TEXT, Header, Location, escape, version_token
from connectors.hl7.parse import Accepted, Ignored, Outcome

Kind = Literal["accept", "error", "reject"]
Severity = Literal["E", "W", "I"]

# Our MSH-3 when the sender did not name us in MSH-5.
OUR_APPLICATION = "RADTRIAGE"
# A version answered when the received one is unreadable.
_FALLBACK_VERSION = "2.5"
_MSA3_MAX = 80
_REASON_MAX = 250
_ACK_CODES = {"original": {"accept": "AA", "error": "AE", "reject": "AR"},
              "commit": {"accept": "CA", "error": "CE", "reject": "CR"}}  # fmt: skip
_CONDITIONS = frozenset({"AL", "SU", "ER", "NE"})


@dataclass(frozen=True)
class AckError:
    code: int  # HL7 table 0357
    reason: str
    severity: Severity = "E"
    location: Location | None = None


def ack_mode(header: Header) -> Literal["original", "commit"]:
    """Which family of codes answers this message (see the module docstring)."""
    accept = header.accept_ack_type if header.accept_ack_type in _CONDITIONS else ""
    application = header.application_ack_type if header.application_ack_type in _CONDITIONS else ""
    if not accept and not application:
        return "original"
    if accept in ("AL", "SU", "ER"):
        return "commit"
    if application in ("AL", "SU", "ER"):
        return "original"
    return "commit"


def ack_code(header: Header, kind: Kind) -> str:
    return _ACK_CODES[ack_mode(header)][kind]


def outcome_ack(outcome: Outcome) -> tuple[Kind, AckError | None]:
    """What to answer for a parse outcome (before any publishing failure changes it)."""
    if isinstance(outcome, Accepted):
        return "accept", None
    if isinstance(outcome, Ignored):
        return "accept", AckError(0, outcome.reason, "I")
    kind: Kind = "reject" if outcome.ack == "AR" else "error"
    return kind, AckError(outcome.code, outcome.reason, "E", outcome.location)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if version else ()


def ack_version(header: Header) -> str:
    """The received version if it reads as one, so the sender parses its ACK as it expects."""
    return version_token(header.version) or _FALLBACK_VERSION


def _err_segment(header: Header, version: str, error: AckError) -> str:
    sep, comp, sub = header.field_sep, header.component_sep, header.subcomponent_sep
    reason = escape(error.reason[:_REASON_MAX], header)
    code_text = ERROR_TEXT.get(error.code, "")
    loc = error.location
    if _version_tuple(version) >= (2, 5):
        location = ""
        if loc is not None:
            parts = [escape(loc.segment, header), str(loc.sequence)]
            if loc.field is not None:
                parts += [str(loc.field), "1"]
                if loc.component is not None:
                    parts.append(str(loc.component))
            location = comp.join(parts)
        code = comp.join([str(error.code), code_text, "HL70357"])
        # ERR-1 (deprecated) empty, ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 user message.
        return sep.join(["ERR", "", location, code, error.severity, "", "", "", reason])
    # 2.3 / 2.4: ERR-1 ELD = segment ^ sequence ^ field ^ code&text&HL70357.
    segment = escape(loc.segment, header) if loc is not None else ""
    sequence = str(loc.sequence) if loc is not None else ""
    field = str(loc.field) if loc is not None and loc.field is not None else ""
    code = sub.join([str(error.code), code_text, "HL70357"])
    return sep.join(["ERR", comp.join([segment, sequence, field, code])])


def _msh9(header: Header, version: str) -> str:
    comp = header.component_sep
    event = re.sub(r"[^A-Z0-9]", "", header.trigger_event)[:3]
    # The message structure component exists from v2.3.1 on.
    if _version_tuple(version) >= (2, 3, 1):
        return comp.join(["ACK", event, "ACK"])
    return comp.join(["ACK", event]) if event else "ACK"


def build_ack(header: Header, kind: Kind, error: AckError | None, *, now: datetime, control_id: str) -> str:
    """The ACK message as ER7 text (segments terminated by CR), in `header`'s separators."""
    sep = header.field_sep
    version = ack_version(header)
    mode = ack_mode(header)
    code = _ACK_CODES[mode][kind]
    # An enhanced-mode ACK asks for no acknowledgment of itself (no ACK ping-pong).
    no_ack = "NE" if mode == "commit" or header.accept_ack_type or header.application_ack_type else ""
    msh = [
        "MSH",
        header.encoding,
        header.receiving_application or OUR_APPLICATION,
        header.receiving_facility,
        header.sending_application,
        header.sending_facility,
        now.strftime("%Y%m%d%H%M%S"),
        "",
        _msh9(header, version),
        escape(control_id, header),
        re.sub(r"[^A-Z]", "", header.processing_id.upper())[:1] or "P",
        version,
        "",
        "",
        no_ack,
        no_ack,
        "",
        escape(header.charset, header) if header.charset else "",
    ]
    segments = [sep.join(msh).rstrip(sep)]
    text = escape(error.reason[:_MSA3_MAX], header) if error is not None else ""
    segments.append(sep.join(["MSA", code, header.control_id, text]).rstrip(sep))
    if error is not None:
        segments.append(_err_segment(header, version, error))
    return "\r".join(segments) + "\r"
