"""DICOM C-STORE SCP: store each instance, publish it to Kafka, and only then answer success.

For every C-STORE: decode and validate (a refusal is a standard failure status with
the reason in ErrorComment), write the Part 10 bytes to the blob store, publish an
`InstanceEvent` keyed by StudyInstanceUID and wait for acks=all; only then 0x0000.
When the sender releases the association, one `transfer_complete` marker per study
follows that study's instances on the same partition; an aborted (or dropped)
association gets no marker and the stream's quiet period finishes its studies.

Threads: pynetdicom runs every association in its own thread, and the C-STOREs of one
association one after another on it. Association state (the studies seen and their
trace spans) lives in `_Association`; the registry of associations is guarded by a
lock, and whichever end-of-association path pops the state first (release, abort,
lost connection, listener stop) is the only one that finishes it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from connectors.blobstore import BlobStoreError, LocalBlobStore, valid_uid
from connectors.dicom import validation as v
from connectors.publisher import EventPublisher, PublishError
from radtriage import metrics
from radtriage.settings import Settings
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
class _Study:
    span: Span
    context: Context
    count: int = 0


@dataclass
class _Association:
    id: str
    calling_ae: str
    studies: dict[str, _Study] = field(default_factory=dict)


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


def _traceparent(ctx: Context) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


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

    def _study(self, assoc: _Association, instance: InstanceEvent) -> _Study:
        """The study's state in this association; its span starts with its first instance."""
        with self._lock:
            study = assoc.studies.get(instance.study_uid)
            if study is None:
                span = tracer.start_span(
                    "dicom.receive_study",
                    kind=SpanKind.SERVER,
                    attributes={
                        "radtriage.study_uid": instance.study_uid,
                        "radtriage.association_id": assoc.id,
                        "dicom.calling_ae": assoc.calling_ae,
                        "dicom.modality": instance.modality,
                    },
                )
                study = _Study(span=span, context=trace.set_span_in_context(span))
                assoc.studies[instance.study_uid] = study
            return study

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
        refusal: v.Refusal | None
        try:
            # pynetdicom decodes lazily: a corrupt byte stream raises here, or (element by
            # element) in fully_decode; nothing undecodable reaches the store.
            ds = event.dataset
        except Exception as exc:  # pydicom raises many types on a corrupt byte stream
            refusal = v.undecodable(exc)
        else:
            refusal = v.fully_decode(ds) or v.check_instance(
                ds, request_sop_class=request_class, request_sop_instance=request_sop
            )
        base_attrs: dict[str, str | int] = {
            "dicom.sop_instance_uid": sop_uid,
            "dicom.sop_class_uid": _safe_uid(request_class),
            "dicom.calling_ae": assoc.calling_ae,
            "radtriage.association_id": assoc.id,
        }
        if refusal is not None:
            # Not part of any study's trace: a refused object does not belong to the study
            # we will announce (and may not even have a readable study UID).
            with tracer.start_as_current_span("dicom.c_store", attributes=base_attrs) as span:
                return self._refuse(assoc, span, sop_uid, refusal)

        instance = v.instance_event(ds, blob_uri="", calling_ae=assoc.calling_ae, association_id=assoc.id)
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
            try:
                # The bytes as received, behind a file meta header: a valid Part 10 file
                # without re-encoding the dataset.
                uri = self.blobs.put_instance(
                    instance.study_uid,
                    instance.series_uid,
                    instance.sop_instance_uid,
                    event.encoded_dataset(),
                )
            except (OSError, BlobStoreError) as exc:
                # The exception's type and errno only: its message holds a path of UIDs at
                # most, but nothing is gained by risking more.
                cause = f"blob store: {type(exc).__name__} {getattr(exc, 'errno', '') or ''}".strip()
                refusal = v.Refusal(v.OUT_OF_RESOURCES_STORAGE, "storage unavailable, retry later")
                return self._refuse(assoc, span, sop_uid, refusal, cause)
            try:
                self.publisher.publish(
                    self.settings.topics.instances,
                    instance.study_uid,
                    instance.model_copy(update={"blob_uri": uri}),
                    _traceparent(study.context),
                )
            except PublishError as exc:
                # Out of Resources, never success: the sender keeps the object and retries.
                refusal = v.Refusal(v.OUT_OF_RESOURCES_KAFKA, "event log unavailable, retry later")
                return self._refuse(assoc, span, sop_uid, refusal, str(exc))
            span.set_attribute("dicom.status", v.SUCCESS)
        with self._lock:
            study.count += 1
        metrics.count_c_store(v.SUCCESS)
        return v.SUCCESS

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
                marker = InstanceEvent(
                    kind="transfer_complete",
                    study_uid=study_uid,
                    instance_count=study.count,
                    association_id=assoc.id,
                    calling_ae=assoc.calling_ae,
                )
                try:
                    self.publisher.publish(
                        self.settings.topics.instances, study_uid, marker, _traceparent(study.context)
                    )
                except PublishError as exc:
                    # The study still completes after the quiet period; nothing is lost.
                    log.warning("transfer-complete marker for %s not published (%s)", study_uid, exc)
            study.span.set_attribute("dicom.instances", study.count)
            study.span.set_attribute("dicom.association_end", ending)
            if ending != "released":
                study.span.set_status(Status(StatusCode.ERROR, f"association {ending}"))
            study.span.end()
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
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
            # Metrics only (radtriage/metrics.py); notification events take several handlers.
            (evt.EVT_ACCEPTED, lambda _event: metrics.DICOM_ASSOCIATIONS.labels("accepted").inc()),
            (evt.EVT_REJECTED, lambda _event: metrics.DICOM_ASSOCIATIONS.labels("rejected").inc()),
            (evt.EVT_CONN_OPEN, lambda _event: metrics.DICOM_OPEN_ASSOCIATIONS.inc()),
            (evt.EVT_CONN_CLOSE, lambda _event: metrics.DICOM_OPEN_ASSOCIATIONS.dec()),
        ]


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = settings.dicom.max_pdu
    # Every storage SOP class is accepted at association time, so a non-image object gets
    # a C-STORE failure status with a reason (validation.py) rather than an unexplained
    # rejected presentation context. Transfer syntaxes: pynetdicom's uncompressed
    # defaults, which every sender can fall back to and the pixel loader reads.
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
    ae.add_supported_context(Verification)  # C-ECHO, answered by pynetdicom's default handler
    return ae


def start_scp(
    settings: Settings, publisher: EventPublisher | None = None
) -> tuple[ThreadedAssociationServer, Callable[[], None]]:
    """Start listening without blocking; returns the server and a `stop()` function.

    `stop()` stops accepting, lets open associations finish for a short grace (at most
    5 s), aborts the rest (their senders retry), ends their spans and closes the
    publisher if this listener created it (a publisher passed in is the caller's).
    """
    # Left at its default (WARN), pydicom logs some invalid values verbatim while decoding
    # (a malformed UI, for one) — dataset bytes in our log. The listener's refusals carry
    # its own reasons instead. Process-wide, which is what `radtriage dicom-scp` is.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    scp = StoreSCP(settings, publisher)
    server = build_ae(settings).start_server(
        (settings.dicom.bind_address, settings.dicom.port), block=False, evt_handlers=scp.handlers()
    )
    assert server is not None  # block=False always returns the running server
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        server.shutdown()
        # A short grace for associations in flight (a small study finishes, a C-STORE gets
        # its answer); the rest are aborted and their senders retry. Bounded so that the
        # whole stop stays well inside a supervisor's SIGTERM-to-SIGKILL window.
        deadline = time.monotonic() + min(settings.kafka.produce_timeout_s, _STOP_GRACE_S)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        scp.finish_all()
        if scp.owns_publisher:
            scp.publisher.close()

    return server, stop


def run_scp(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let open associations finish."""
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    metrics.start_process_metrics(settings)
    _server, stop = start_scp(settings)
    log.info(
        "DICOM C-STORE SCP %s listening on %s:%d",
        settings.dicom.ae_title,
        settings.dicom.bind_address,
        settings.dicom.port,
    )
    try:
        stop_requested.wait()
    finally:
        stop()
