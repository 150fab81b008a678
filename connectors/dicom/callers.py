"""Which DICOM peers may associate: the calling AE title + source address allow-list.

`check_association` is the pure decision; scp.py applies it when an A-ASSOCIATE-RQ
arrives and answers a refusal with A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1
"rejected-permanent", source 1 "DICOM UL service-user", reason 3 "calling-AE-title-not-
recognized" (an unknown AE title, or a known one from an address not listed for it, as
archives such as dcm4chee do for a caller at the wrong host) or 7 "called-AE-title-not-
recognized". Permanent: resending the same request will not help until the
configuration changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from connectors.allowlist import address_in
from radtriage.settings import DicomSettings

# "internal_error": the check itself failed, and the request is rejected all the same.
Reason = Literal["calling_ae_unknown", "address_not_allowed", "called_ae_mismatch", "internal_error"]
# Every value the refusal metric's `reason` label can take: these, the listener's own
# "tls_handshake_failed", and pynetdicom's own rejections after ours passed (negotiation.py
# on_rejected): more associations than `maximum_associations`, a failed user
# identity, or anything else.
REASONS: tuple[str, ...] = (
    *Reason.__args__,  # type: ignore[attr-defined]
    "tls_handshake_failed",
    "too_many_associations",
    "user_identity_failed",
    "other",
)
NO_REASON_GIVEN = 0x01

REJECTED_PERMANENT = 0x01
SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    diagnostic: int  # A-ASSOCIATE-RJ reason/diag. (source: service-user)
    text: str  # for the log: says what to fix, names no patient data


def check_association(dicom: DicomSettings, calling_ae: str, called_ae: str, address: str) -> Refusal | None:
    """None if this association request may proceed, else why not.

    AE titles compare exactly after trimming spaces (PS3.5: AE titles are case-sensitive,
    leading and trailing spaces are not significant)."""
    calling, called = calling_ae.strip(), called_ae.strip()
    if dicom.allowed_callers:
        entries = [c for c in dicom.allowed_callers if c.ae_title == calling]
        if not entries:
            return Refusal(
                "calling_ae_unknown",
                CALLING_AE_NOT_RECOGNISED,
                "calling AE title not in dicom.allowed_callers",
            )
        if not any(address_in(address, c.hosts) for c in entries):
            return Refusal(
                "address_not_allowed",
                CALLING_AE_NOT_RECOGNISED,
                "source address not in the hosts dicom.allowed_callers lists for this AE title",
            )
    if dicom.called_ae_title_required and called != dicom.ae_title:
        return Refusal(
            "called_ae_mismatch", CALLED_AE_NOT_RECOGNISED, f"called AE title is not {dicom.ae_title}"
        )
    return None
