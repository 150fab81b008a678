"""DICOM C-STORE SCP: store each instance, publish it to Kafka, and only then answer success.

For every C-STORE: decode and validate (a refusal is a standard failure status with
the reason in ErrorComment), write the Part 10 bytes to the blob store, publish an
`InstanceEvent` keyed by StudyInstanceUID and wait for acks=all; only then 0x0000.
When the sender releases the association, one `transfer_complete` marker per study
follows that study's instances on the same partition; an aborted (or dropped)
association gets no marker and the stream's quiet period finishes its studies.

Who may associate (connectors/dicom/callers.py): an A-ASSOCIATE-RQ from a calling AE
title or source address `dicom.allowed_callers` does not list, or to another called AE
title, is answered A-ASSOCIATE-RJ before any presentation context is negotiated, logged
(AE titles, address, reason) and counted. TLS (`dicom.tls`) is a second listener on
`dicom.tls_port`; its handshakes run on each connection's own thread, bounded in time.

Threads: pynetdicom runs every association in its own thread, and the C-STOREs of one
association one after another on it. Association state (the studies seen and their
trace spans) lives in `_Association`; the registry of associations is guarded by a
lock, and whichever end-of-association path pops the state first (release, abort,
lost connection, listener stop) is the only one that finishes it.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from connectors.dicom import validation as v
from connectors.dicom.callers import (
    NO_REASON_GIVEN,
    REJECTED_PERMANENT,
    SERVICE_USER,
    Refusal,
    check_association,
)
from connectors.dicom.received_study import ReceivedStudy
from connectors.publisher import EventPublisher, PublishError
from processors.result_marker import is_radtriage_result
from radtriage import metrics
from radtriage.blobstore import BlobStoreError, LocalBlobStore, valid_uid
from radtriage.settings import Settings
from radtriage.tls import server_context
from schemas.instances import InstanceEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# After the connection closes, how long the release/abort handlers get to claim the
# association before it is finished as "lost" (a dropped TCP connection fires neither).
_LOST_ASSOCIATION_GRACE_S = 5.0

# How long stop() lets open associations finish before aborting them.
_STOP_GRACE_S = 5.0

Ending = Literal["released", "aborted", "lost", "stopped"]


@dataclass
class _Association:
    id: str
    calling_ae: str
    studies: dict[str, ReceivedStudy] = field(default_factory=dict)


def _decode_and_check(event: Any, request_class: str, request_sop: str) -> Dataset | v.Refusal:
    """The C-STORE's dataset, fully decoded, or why it is refused."""
    try:
        # pynetdicom decodes lazily: a corrupt byte stream raises here, or (element by
        # element) in fully_decode; nothing undecodable reaches the store.
        ds = event.dataset
    except Exception as exc:  # pydicom raises many types on a corrupt byte stream
        return v.undecodable(exc)
    refusal = v.fully_decode(ds) or v.check_instance(
        ds, request_sop_class=request_class, request_sop_instance=request_sop
    )
    return ds if refusal is None else refusal


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[: v.MAX_COMMENT]
    return ds


def _safe_uid(value: object) -> str:
    """A UID fit for logs and spans: only if it is a DICOM UID (digits and dots)."""
    uid = str(value or "").strip()
    return uid if valid_uid(uid) else "<invalid UID>"


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


class StoreSCP:
    """The event handlers of the listener, and the per-association state they share."""

    def __init__(self, settings: Settings, publisher: EventPublisher | None = None) -> None:
        self.settings = settings
        self.blobs = LocalBlobStore(settings.blob_dir)
        self.owns_publisher = publisher is None
        self.publisher = publisher or EventPublisher(
            settings.kafka,
            timeout_s=settings.kafka.produce_timeout_s,
            client_id="radtriage-dicom",
        )
        # Keyed by the pynetdicom Association object itself (identity-hashed), not id():
        # an id can be reused by a new association once the old one is collected.
        self._assocs: dict[Any, _Association] = {}
        self._lock = threading.Lock()

    # -- association state -------------------------------------------------------------

    def _assoc(self, event: Any) -> _Association:
        with self._lock:
            state = self._assocs.get(event.assoc)
            if state is None:
                calling = event.assoc.requestor.ae_title
                calling = calling.decode(errors="replace") if isinstance(calling, bytes) else str(calling)
                state = _Association(id=uuid.uuid4().hex, calling_ae=calling.strip())
                self._assocs[event.assoc] = state
            return state

    def _pop(self, assoc: Any) -> _Association | None:
        with self._lock:
            return self._assocs.pop(assoc, None)

    def _study(self, assoc: _Association, instance: InstanceEvent) -> ReceivedStudy:
        """The study's state in this association; its span starts with its first instance."""
        with self._lock:
            study = assoc.studies.get(instance.study_uid)
            if study is None:
                study = ReceivedStudy.start(
                    "dicom.receive_study",
                    {
                        "radtriage.study_uid": instance.study_uid,
                        "radtriage.association_id": assoc.id,
                        "dicom.calling_ae": assoc.calling_ae,
                        "dicom.modality": instance.modality,
                    },
                    kind=SpanKind.SERVER,
                )
                assoc.studies[instance.study_uid] = study
            return study

    # -- association request: who may call -------------------------------------------------

    def handle_requested(self, event: Any) -> None:
        """Reject an A-ASSOCIATE-RQ from a caller the allow-list does not admit.

        pynetdicom's documented hook for this: a handler of EVT_REQUESTED may send the
        A-ASSOCIATE-RJ itself (`assoc.acse.send_reject`); negotiation is then skipped
        because the association `is_rejected` (pynetdicom issue #408, since 1.5). Its own
        `require_calling_aet` knows AE titles but not addresses, so it is only the second
        line (set in build_ae): a notification handler's exception is logged and
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
                self.settings.dicom,
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

    def handle_rejected(self, event: Any) -> None:
        """pynetdicom's own A-ASSOCIATE-RJ, after ours (handle_requested) let it through:
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

    def handle_accepted(self, event: Any) -> None:
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

    # -- C-STORE -------------------------------------------------------------------------

    def _refuse(
        self, assoc: _Association, span: Span, sop_uid: str, refusal: v.Refusal, cause: str = ""
    ) -> Dataset:
        # No PHI: the SOP Instance UID, the calling AE, the status, our own reason and, for
        # an infrastructure failure, its cause (Kafka's or the file system's error).
        log.warning(
            "C-STORE of %s from %s refused 0x%04X: %s%s",
            sop_uid,
            assoc.calling_ae,
            refusal.status,
            refusal.reason,
            f" ({cause})" if cause else "",
        )
        span.set_attribute("dicom.status", refusal.status)
        span.set_attribute("dicom.error_comment", refusal.comment)
        metrics.count_c_store(refusal.status)
        span.set_status(Status(StatusCode.ERROR, refusal.reason))
        return _status(refusal.status, refusal.comment)

    def handle_store(self, event: Any) -> Dataset | int:
        assoc = self._assoc(event)
        request = event.request
        request_class = str(request.AffectedSOPClassUID or "")
        request_sop = str(request.AffectedSOPInstanceUID or "")
        sop_uid = _safe_uid(request_sop)
        ds = _decode_and_check(event, request_class, request_sop)
        base_attrs: dict[str, str | int] = {
            "dicom.sop_instance_uid": sop_uid,
            "dicom.sop_class_uid": _safe_uid(request_class),
            "dicom.calling_ae": assoc.calling_ae,
            "radtriage.association_id": assoc.id,
        }
        if isinstance(ds, v.Refusal):
            # Not part of any study's trace: a refused object does not belong to the study
            # we will announce (and may not even have a readable study UID).
            with tracer.start_as_current_span("dicom.c_store", attributes=base_attrs) as span:
                return self._refuse(assoc, span, sop_uid, ds)
        if is_radtriage_result(ds):
            # radtriage's own result, forwarded back by a PACS: success, so the PACS does not
            # retry, and nothing stored or published, so it is never assembled, routed or
            # exported again (no export loop; processors/result_marker.py).
            log.info("C-STORE of %s from %s: radtriage's own result, not ingested", sop_uid, assoc.calling_ae)
            metrics.DICOM_OWN_RESULTS_IGNORED.inc()
            metrics.count_c_store(v.SUCCESS)
            return v.SUCCESS

        instance = v.instance_event(
            ds,
            blob_uri="",
            calling_ae=assoc.calling_ae,
            association_id=assoc.id,
            transfer_syntax=str(event.context.transfer_syntax),
        )
        study = self._study(assoc, instance)
        with tracer.start_as_current_span(
            "dicom.c_store",
            context=study.context,
            attributes={
                **base_attrs,
                "radtriage.study_uid": instance.study_uid,
                "dicom.series_uid": instance.series_uid,
                "dicom.modality": instance.modality,
            },
        ) as span:
            refused = self._store(event, instance, study)
            if refused is not None:
                return self._refuse(assoc, span, sop_uid, *refused)
            span.set_attribute("dicom.status", v.SUCCESS)
        with self._lock:
            study.count += 1
        metrics.count_c_store(v.SUCCESS)
        return v.SUCCESS

    def _store(
        self, event: Any, instance: InstanceEvent, study: ReceivedStudy
    ) -> tuple[v.Refusal, str] | None:
        """Publish the instance's event and write its bytes; None once both are done.

        The event goes out first and the instance is written while it travels: Kafka's
        round trip (acks=all) and the two fsyncs overlap instead of adding up. Success is
        still answered only once both are done. If the write fails, the event may be
        acknowledged all the same, naming a blob that is not there: the sender is told to
        retry (0xA701), and its retry writes the blob and publishes again (consumers take
        instances at-least-once, keyed by SOP Instance UID).
        """
        try:
            uri = self.blobs.uri_of(instance.study_uid, instance.series_uid, instance.sop_instance_uid)
            with self.publisher.publishing(
                self.settings.topics.instances,
                instance.study_uid,
                instance.model_copy(update={"blob_uri": uri}),
                study.traceparent(),
            ) as pending:
                try:
                    self._write_blob(event, instance)
                except (OSError, BlobStoreError) as exc:
                    # The exception's type and errno only: its message holds a path of
                    # UIDs at most, but nothing is gained by risking more.
                    cause = f"blob store: {type(exc).__name__} {getattr(exc, 'errno', '') or ''}".strip()
                    return v.Refusal(v.OUT_OF_RESOURCES_STORAGE, "storage unavailable, retry later"), cause
                pending.wait()
        except BlobStoreError as exc:  # uri_of: the UIDs were validated already; belt and braces
            refusal = v.Refusal(v.OUT_OF_RESOURCES_STORAGE, "storage unavailable, retry later")
            return refusal, f"blob store: {type(exc).__name__}"
        except PublishError as exc:
            # Out of Resources, never success: the sender keeps the object and retries.
            return v.Refusal(v.OUT_OF_RESOURCES_KAFKA, "event log unavailable, retry later"), str(exc)
        return None

    def _write_blob(self, event: Any, instance: InstanceEvent) -> None:
        # The bytes as received, behind a file meta header: a valid Part 10 file in the
        # negotiated transfer syntax, never re-encoded. The header is pynetdicom's
        # `encoded_dataset()` one, written directly.
        request = event.request
        header = v.part10_header(
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax),
            PYNETDICOM_IMPLEMENTATION_UID,
            PYNETDICOM_IMPLEMENTATION_VERSION,
        )
        self.blobs.put_instance(
            instance.study_uid,
            instance.series_uid,
            instance.sop_instance_uid,
            header + event.encoded_dataset(include_meta=False),
        )

    # -- end of association --------------------------------------------------------------

    def _finish(self, assoc: _Association, ending: Ending) -> None:
        """Announce (on release only) and close the association's studies."""
        # A snapshot: when the listener stops, this runs on another thread than a C-STORE
        # that may still be adding a study.
        with self._lock:
            studies = list(assoc.studies.items())
        for study_uid, study in studies:
            # A study none of whose instances was stored gets no marker: it would complete
            # (empty) a study another association may be sending right now.
            if ending == "released" and study.count > 0:
                marker = study.marker(study_uid, assoc.id, "dicom", calling_ae=assoc.calling_ae)
                try:
                    topic = self.settings.topics.instances
                    self.publisher.publish(topic, study_uid, marker, study.traceparent())
                except PublishError as exc:
                    # The study still completes after the quiet period; nothing is lost.
                    log.warning("transfer-complete marker for %s not published (%s)", study_uid, exc)
            error = "" if ending == "released" else f"association {ending}"
            study.end(error, **{"dicom.association_end": ending})
        summary = ", ".join(f"{uid} ({s.count} instances)" for uid, s in studies)
        level = logging.INFO if ending == "released" else logging.WARNING
        log.log(
            level,
            "association %s from %s %s: %s%s",
            assoc.id[:8],
            assoc.calling_ae,
            ending,
            summary or "no studies",
            "" if ending == "released" or not summary else "; they complete after the quiet period",
        )

    def handle_released(self, event: Any) -> None:
        # pynetdicom fires this after the A-RELEASE-RP went out: the markers' publishing
        # does not hold up the sender.
        assoc = self._pop(event.assoc)
        if assoc is not None:
            self._finish(assoc, "released")

    def handle_aborted(self, event: Any) -> None:
        assoc = self._pop(event.assoc)
        if assoc is not None:
            self._finish(assoc, "aborted")

    def handle_conn_close(self, event: Any) -> None:
        # A connection that just drops fires neither EVT_RELEASED nor EVT_ABORTED; and on
        # a normal release this event can race EVT_RELEASED (it fires on the transport
        # thread). So give release/abort a grace period to claim the state first. Usually
        # they already have (or the association stored nothing): then no timer at all.
        with self._lock:
            if event.assoc not in self._assocs:
                return

        def sweep() -> None:
            assoc = self._pop(event.assoc)
            if assoc is not None:
                self._finish(assoc, "lost")

        timer = threading.Timer(_LOST_ASSOCIATION_GRACE_S, sweep)
        timer.daemon = True
        timer.start()

    def finish_all(self) -> None:
        """End every open association's spans (the listener is stopping); no markers."""
        with self._lock:
            states, self._assocs = list(self._assocs.values()), {}
        for assoc in states:
            self._finish(assoc, "stopped")

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
            # Metrics only (radtriage/metrics.py); notification events take several handlers.
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_CONN_OPEN, lambda _event: metrics.DICOM_OPEN_ASSOCIATIONS.inc()),
            (evt.EVT_CONN_CLOSE, lambda _event: metrics.DICOM_OPEN_ASSOCIATIONS.dec()),
        ]


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake on each connection's own thread.

    pynetdicom wraps an accepted socket in `get_request`, on the single thread that accepts
    every connection, with a blocking handshake: one peer that opens a TCP connection to the
    TLS port and sends nothing would stop every other sender from connecting. Here
    `get_request` only accepts; the handshake runs in `process_request_thread` (the
    connection's thread) and gives up after `handshake_timeout_s`. Used through
    `AE.make_server(server_class=...)`, pynetdicom's documented way to a custom server.
    """

    def __init__(self, *args: Any, handshake_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshake_timeout_s = handshake_timeout_s

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        # A C-STORE response is one small PDU: with Nagle on, it waits for the sender's
        # delayed ACK (~40 ms on Linux) whenever the previous segment is unacknowledged,
        # which caps one association at a few dozen instances a second.
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            request = self._handshake(self.ssl_context, request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(
        self, context: ssl.SSLContext, raw: socket.socket, client_address: Any
    ) -> ssl.SSLSocket | None:
        address = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            raw.settimeout(self.handshake_timeout_s)
            tls = context.wrap_socket(raw, server_side=True)
            tls.settimeout(None)  # as pynetdicom has it: blocking; the ACSE/network timeouts apply
            return tls
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("DICOM TLS connection from %s refused: handshake failed (%s)", address, reason)
            metrics.DICOM_ASSOCIATION_REFUSALS.labels("tls_handshake_failed").inc()
            self.shutdown_request(raw)
            return None


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = settings.dicom.max_pdu
    # Every storage SOP class, in every transfer syntax radtriage stores and decodes
    # (validation.TRANSFER_SYNTAXES, in order of preference): the instance is stored as
    # received. pynetdicom's 128-context limit is the requestor's; as acceptor any number
    # of supported contexts is fine.
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, list(v.TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)  # C-ECHO, answered by pynetdicom's default handler
    # The second line behind StoreSCP.handle_requested, which decides first (and logs why).
    ae.require_calling_aet = sorted({caller.ae_title for caller in settings.dicom.allowed_callers})
    ae.require_called_aet = settings.dicom.called_ae_title_required
    return ae


def _serve(
    ae: AE, address: tuple[str, int], scp: StoreSCP, context: ssl.SSLContext | None, settings: Settings
) -> AssociationServer:
    """One listening server on its own thread, as `AE.start_server(block=False)` starts it."""
    server = cast(
        AssociationServer,
        ae.make_server(
            address,
            ssl_context=context,
            evt_handlers=scp.handlers(),
            server_class=AssociationServer,
            handshake_timeout_s=settings.dicom.tls.handshake_timeout_s,
        ),
    )
    # start_server registers its servers with the AE the same way; `shutdown()` removes it.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True).start()
    return server


def start_scp(
    settings: Settings, publisher: EventPublisher | None = None
) -> tuple[list[AssociationServer], Callable[[], None]]:
    """Start listening without blocking; returns the servers (plain on `dicom.port`, TLS on
    `dicom.tls_port`, each if enabled) and a `stop()` function.

    `stop()` stops accepting, lets open associations finish for a short grace (at most
    5 s), aborts the rest (their senders retry), ends their spans and closes the
    publisher if this listener created it (a publisher passed in is the caller's).
    A TLS configuration that cannot be used raises `TlsConfigError` before anything listens.
    """
    dicom = settings.dicom
    context = server_context(dicom.tls, "dicom.tls") if dicom.tls.enabled else None
    # Left at its default (WARN), pydicom logs some invalid values verbatim while decoding
    # (a malformed UI, for one) — dataset bytes in our log. The listener's refusals carry
    # its own reasons instead. Process-wide, which is what `radtriage dicom-scp` is.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    scp = StoreSCP(settings, publisher)
    ae = build_ae(settings)
    servers: list[AssociationServer] = []
    try:
        if dicom.plain_enabled:
            servers.append(_serve(ae, (dicom.bind_address, dicom.port), scp, None, settings))
        if context is not None:
            servers.append(_serve(ae, (dicom.bind_address, dicom.tls_port), scp, context, settings))
    except BaseException:
        for server in servers:
            server.shutdown()
        if scp.owns_publisher:
            scp.publisher.close()
        raise
    stopped = threading.Event()

    def active() -> list[Any]:
        return [assoc for server in servers for assoc in server.active_associations]

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        for server in servers:
            server.shutdown()
        # A short grace for associations in flight (a small study finishes, a C-STORE gets
        # its answer); the rest are aborted and their senders retry. Bounded so that the
        # whole stop stays well inside a supervisor's SIGTERM-to-SIGKILL window.
        deadline = time.monotonic() + min(settings.kafka.produce_timeout_s, _STOP_GRACE_S)
        while active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in active():
            assoc.abort()
        scp.finish_all()
        if scp.owns_publisher:
            scp.publisher.close()

    return servers, stop


def run_scp(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let open associations finish."""
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    metrics.start_process_metrics(settings)
    servers, stop = start_scp(settings)
    dicom = settings.dicom
    log.info(
        "DICOM C-STORE SCP %s listening on %s (%s)",
        dicom.ae_title,
        ", ".join(
            f"{dicom.bind_address}:{server.server_address[1]}{' TLS' if server.ssl_context else ''}"
            for server in servers
        ),
        f"{len({c.ae_title for c in dicom.allowed_callers})} allowed calling AE titles"
        if dicom.allowed_callers
        else "any caller",
    )
    try:
        stop_requested.wait()
    finally:
        stop()
