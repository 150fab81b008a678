"""Association negotiation: who may call the DICOM listener, and what of theirs it refuses.

Before any C-STORE (connectors/dicom/scp.py): an A-ASSOCIATE-RQ from a calling AE title
or source address `dicom.allowed_callers` does not list, or to another called AE title,
is answered A-ASSOCIATE-RJ before any presentation context is negotiated
(connectors/dicom/callers.py decides); pynetdicom's own rejections (too many
associations, a user identity) and every presentation context rejected in an accepted
association are logged with the reason and counted. No PHI exists yet at this point: AE
titles, the address and our reason.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.uid import UID

from connectors.dicom import validation as v
from connectors.dicom.callers import (
    NO_REASON_GIVEN,
    REJECTED_PERMANENT,
    SERVICE_USER,
    Refusal,
    check_association,
)
from radtriage import metrics
from radtriage.blobstore import valid_uid
from radtriage.settings import Settings

log = logging.getLogger(__name__)


def _printable(value: object, limit: int = 16) -> str:
    """A peer-supplied AE title fit for a log line: printable ASCII only, at most `limit`."""
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else str(value or "")
    return "".join(c if " " <= c <= "~" else "?" for c in text.strip()[:limit])


# PS3.8 9.3.3.2 presentation context results, as the rejection metric's reason label.
CONTEXT_REJECTION_REASONS: dict[int, str] = {
    0x01: "user_rejection",
    0x02: "no_reason",
    0x03: "abstract_syntax_not_supported",
    0x04: "transfer_syntaxes_not_supported",
}


def _syntax_name(uid: object) -> str:
    text = str(uid or "")
    name = UID(text).name if valid_uid(text) else ""
    return f"{name} ({text})" if name and name != text else text or "?"


def on_requested(settings: Settings, event: Any) -> None:
    """Reject an A-ASSOCIATE-RQ from a caller the allow-list does not admit.

    pynetdicom's documented hook for this: a handler of EVT_REQUESTED may send the
    A-ASSOCIATE-RJ itself (`assoc.acse.send_reject`); negotiation is then skipped
    because the association `is_rejected` (pynetdicom issue #408, since 1.5). Its own
    `require_calling_aet` knows AE titles but not addresses, so it is only the second
    line (set in connectors/dicom/listener.build_ae): a notification handler's exception is logged and
    swallowed by pynetdicom, which would let the request through, so any error here
    rejects too.
    """
    assoc = event.assoc
    calling = called = address = "?"
    try:
        request = assoc.requestor.primitive
        calling = _printable(request.calling_ae_title)
        called = _printable(request.called_ae_title)
        address = str(assoc.requestor.address)
        refusal = check_association(
            settings.dicom,
            str(request.calling_ae_title or ""),
            str(request.called_ae_title or ""),
            address,
        )
    except Exception as exc:  # fail closed (see above)
        log.error(
            "DICOM association request from %s: internal error %s: rejected", address, type(exc).__name__
        )
        refusal = Refusal("internal_error", NO_REASON_GIVEN, f"internal error {type(exc).__name__}")
    if refusal is None:
        return
    # No PHI exists yet at this point: AE titles, the address and our reason.
    log.warning(
        "DICOM association from %s at %s to %s rejected (%s): %s",
        calling,
        address,
        called,
        refusal.reason,
        refusal.text,
    )
    metrics.DICOM_ASSOCIATIONS.labels("rejected").inc()
    metrics.DICOM_ASSOCIATION_REFUSALS.labels(refusal.reason).inc()
    assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, refusal.diagnostic)
    # As pynetdicom does after its own rejections: stop the DUL; the reactor then
    # closes the connection once the A-ASSOCIATE-RJ is out.
    assoc.kill()


def on_rejected(event: Any) -> None:
    """pynetdicom's own A-ASSOCIATE-RJ, after ours (on_requested) let it through:
    too many associations, a user identity it could not verify."""
    assoc = event.assoc
    calling = _printable(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
    acceptors = [a for a in assoc.ae.active_associations if a.is_acceptor]
    if len(acceptors) > assoc.ae.maximum_associations:
        reason, text = (
            "too_many_associations",
            f"more than {assoc.ae.maximum_associations} associations open",
        )
    elif assoc.requestor.user_identity is not None:
        reason, text = "user_identity_failed", "user identity not verified"
    else:
        reason, text = "other", "rejected during negotiation"
    log.warning(
        "DICOM association from %s at %s rejected (%s): %s",
        calling,
        assoc.requestor.address,
        reason,
        text,
    )
    metrics.DICOM_ASSOCIATIONS.labels("rejected").inc()
    metrics.DICOM_ASSOCIATION_REFUSALS.labels(reason).inc()


def on_accepted(event: Any) -> None:
    """Count the association, and log and count every presentation context rejected in it.

    A rejected context is the sender's object never reaching us: dcmtk's storescu
    skips the file ("no presentation context") or ends in failure, and only our log
    says why (an abstract syntax we do not know, or none of its transfer syntaxes).
    """
    metrics.DICOM_ASSOCIATIONS.labels("accepted").inc()
    assoc = event.assoc
    rejected = list(assoc.rejected_contexts)
    if not rejected:
        return
    calling = _printable(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
    # The rejected context keeps only the first proposed syntax; the request has them all.
    proposed = {
        cx.context_id: cx.transfer_syntax
        for cx in (assoc.requestor.primitive.presentation_context_definition_list or [])
    }
    for cx in rejected:
        reason = CONTEXT_REJECTION_REASONS.get(int(cx.result or 0), "other")
        syntaxes = proposed.get(cx.context_id) or cx.transfer_syntax
        log.warning(
            "DICOM presentation context %s from %s rejected (%s): %s proposed in %s",
            cx.context_id,
            calling,
            reason,
            v.sop_class_name(str(cx.abstract_syntax or "")),
            ", ".join(_syntax_name(ts) for ts in syntaxes) or "no transfer syntax",
        )
        metrics.DICOM_REJECTED_CONTEXTS.labels(reason).inc()
