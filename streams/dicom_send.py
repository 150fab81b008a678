"""C-STORE of one object to one PACS (pynetdicom SCU), and what its answer means for a retry.

Blocking (pynetdicom's association runs on threads of its own): the pacs-export stage
calls it through `asyncio.to_thread`. One association per object: results are a few
objects per finding, and a fresh association is what survives a PACS restart.

Status classes (PS3.4 B.2.3, PS3.7 C): success 0x0000 and the warnings 0xB000, 0xB006,
0xB007 store the object; Out of Resources (0xA7xx) and every failure to associate or to
get an answer (connection refused, association rejected or aborted, timeout) are worth
retrying; any other failure (0xA9xx data set does not match, 0xCxxx cannot understand,
0x0122 SOP class not supported) would fail again, and is final.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from radtriage.settings import DestinationTls, DicomDestination

log = logging.getLogger(__name__)

_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class StoreOutcome:
    # The C-STORE response status; None when no response came (no association, abort, timeout).
    status: int | None
    # What happened, for the audit trail and a dead letter: the PACS's own ErrorComment
    # when it sent one.
    detail: str

    @property
    def stored(self) -> bool:
        return self.status == 0x0000 or self.status in _WARNINGS

    @property
    def retryable(self) -> bool:
        return not self.stored and (self.status is None or (self.status & 0xFF00) == 0xA700)

    @property
    def status_text(self) -> str:
        return "no response" if self.status is None else f"0x{self.status:04X}"


def outcome_of(status: Dataset | None) -> StoreOutcome:
    """The outcome of one C-STORE response (an empty Dataset: pynetdicom got none)."""
    if status is None or "Status" not in status:
        return StoreOutcome(None, "no C-STORE response (association aborted or timed out)")
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "").strip()
    if code == 0x0000:
        return StoreOutcome(code, "stored")
    if code in _WARNINGS:
        return StoreOutcome(code, f"stored with warning{': ' + comment if comment else ''}")
    return StoreOutcome(code, f"refused{': ' + comment if comment else ''}")


def client_context(tls: DestinationTls) -> ssl.SSLContext:
    """The TLS context of a destination: TLS 1.2+, the PACS verified against `ca_file` (its
    certificate must name `host`), radtriage's own certificate if one is configured."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def c_store(destination: DicomDestination, ds: Dataset, timeout_s: float) -> StoreOutcome:
    """Send `ds` to `destination` in one association; never raises for a network failure."""
    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (client_context(destination.tls), destination.host)
        except (OSError, ValueError) as exc:  # a missing or unreadable certificate: fix, then replay
            return StoreOutcome(None, f"TLS configuration: {type(exc).__name__}: {exc}")
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
    except OSError as exc:  # pynetdicom reports most failures on the association; belt and braces
        return StoreOutcome(None, f"cannot connect: {type(exc).__name__}")
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        return StoreOutcome(
            None, f"association {how} ({destination.host}:{destination.port} {destination.ae_title})"
        )
    if not assoc.accepted_contexts:
        assoc.release()
        # The PACS does not take this SOP class at all: as final as its 0x0122 would be.
        return StoreOutcome(SOP_CLASS_NOT_SUPPORTED, "no presentation context accepted for the SOP class")
    try:
        outcome = outcome_of(assoc.send_c_store(ds))
    except (RuntimeError, ValueError, OSError) as exc:
        # No accepted context for the SOP class, or the dataset cannot be encoded in it.
        outcome = StoreOutcome(None, f"not sent: {type(exc).__name__}: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome
