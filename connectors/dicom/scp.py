"""DICOM C-STORE SCP: store each instance, publish it to Kafka, and only then answer success.

pynetdicom runs every association in its own thread; per-association state (the
studies seen and their trace spans) lives in `_Association`, guarded by a lock.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from connectors.blobstore import BlobStoreError, LocalBlobStore, valid_uid
from connectors.dicom import validation as v
from connectors.publisher import EventPublisher, PublishError
from radtriage.settings import Settings
from schemas.instances import InstanceEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer("radtriage.connectors.dicom")


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


def _loggable_uid(ds: Dataset) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return uid if valid_uid(uid) else "<no valid SOPInstanceUID>"


def _traceparent(ctx: Context) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


class StoreSCP:
    def __init__(self, settings: Settings, publisher: EventPublisher | None = None) -> None:
        self.settings = settings
        self.blobs = LocalBlobStore(settings.blob_dir)
        self.publisher = publisher or EventPublisher(
            settings.kafka.bootstrap_servers,
            timeout_s=settings.kafka.produce_timeout_s,
            client_id="radtriage-dicom",
        )
        self._assocs: dict[int, _Association] = {}
        self._lock = threading.Lock()

    def _assoc(self, event: Any) -> _Association:
        key = id(event.assoc)
        with self._lock:
            state = self._assocs.get(key)
            if state is None:
                calling = event.assoc.requestor.ae_title
                calling = calling.decode(errors="replace") if isinstance(calling, bytes) else str(calling)
                state = _Association(id=uuid.uuid4().hex, calling_ae=calling.strip())
                self._assocs[key] = state
            return state

    def _pop_assoc(self, event: Any) -> _Association | None:
        with self._lock:
            return self._assocs.pop(id(event.assoc), None)

    def handle_store(self, event: Any) -> Dataset | int:
        assoc = self._assoc(event)
        try:
            # pynetdicom decodes lazily; validation and metadata extraction touch every
            # element we use, so a corrupt byte stream fails here and nowhere later.
            ds = event.dataset
            ds.file_meta = event.file_meta
            refusal = v.check_instance(ds)
            instance = (
                None
                if refusal
                else v.instance_event(ds, blob_uri="", calling_ae=assoc.calling_ae, association_id=assoc.id)
            )
        except Exception as exc:  # pydicom raises many types on a corrupt byte stream
            log.warning(
                "C-STORE from %s refused 0x%04X: undecodable dataset (%s)",
                assoc.calling_ae,
                v.CANNOT_DECODE,
                type(exc).__name__,
            )
            return _status(v.CANNOT_DECODE, "dataset cannot be decoded")
        if refusal is not None:
            log.warning(
                "C-STORE of %s from %s refused 0x%04X: %s",
                _loggable_uid(ds),
                assoc.calling_ae,
                refusal.status,
                refusal.reason,
            )
            return _status(refusal.status, refusal.comment)
        assert instance is not None
        study_uid = str(ds.StudyInstanceUID)
        with self._lock:
            study = assoc.studies.get(study_uid)
            if study is None:
                span = tracer.start_span(
                    "dicom.receive_study",
                    kind=SpanKind.SERVER,
                    attributes={
                        "radtriage.study_uid": study_uid,
                        "dicom.calling_ae": assoc.calling_ae,
                        "dicom.modality": str(ds.get("Modality", "")),
                        "radtriage.association_id": assoc.id,
                    },
                )
                study = _Study(span=span, context=trace.set_span_in_context(span))
                assoc.studies[study_uid] = study
        with tracer.start_as_current_span(
            "dicom.c_store",
            context=study.context,
            attributes={"dicom.sop_instance_uid": str(ds.SOPInstanceUID)},
        ) as span:
            try:
                uri = self.blobs.put_instance(
                    study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), event.encoded_dataset()
                )
            except (OSError, BlobStoreError) as exc:
                log.error("blob store write failed for %s: %s", ds.SOPInstanceUID, exc)
                span.set_status(Status(StatusCode.ERROR, "storage"))
                return _status(v.OUT_OF_RESOURCES_STORAGE, "storage unavailable, retry later")
            instance = instance.model_copy(update={"blob_uri": uri})
            try:
                self.publisher.publish(
                    self.settings.topics.instances, study_uid, instance, _traceparent(study.context)
                )
            except PublishError as exc:
                log.error("C-STORE of %s answered Out of Resources: %s", ds.SOPInstanceUID, exc)
                span.set_status(Status(StatusCode.ERROR, "kafka"))
                return _status(v.OUT_OF_RESOURCES_KAFKA, "event store unavailable, retry later")
            span.set_attribute("dicom.status", v.SUCCESS)
        with self._lock:
            study.count += 1
        return v.SUCCESS

    def handle_released(self, event: Any) -> None:
        assoc = self._pop_assoc(event)
        if assoc is None:
            return
        for study_uid, study in assoc.studies.items():
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
            study.span.end()
        log.info(
            "association %s from %s released: %s",
            assoc.id[:8],
            assoc.calling_ae,
            ", ".join(f"{uid} ({s.count} instances)" for uid, s in assoc.studies.items()) or "no studies",
        )

    def handle_aborted(self, event: Any) -> None:
        assoc = self._pop_assoc(event)
        if assoc is None:
            return
        for study in assoc.studies.values():
            study.span.set_status(Status(StatusCode.ERROR, "association aborted"))
            study.span.end()
        log.warning(
            "association %s from %s aborted; its studies complete after the quiet period",
            assoc.id[:8],
            assoc.calling_ae,
        )

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
        ]


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = settings.dicom.max_pdu
    # Every storage SOP class is accepted at association time, so a non-image object gets
    # a C-STORE failure status with a reason rather than an unexplained rejected context.
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
    ae.add_supported_context(Verification)
    return ae


def start_scp(settings: Settings, publisher: EventPublisher | None = None) -> tuple[Any, StoreSCP]:
    """Non-blocking: returns the running server (call `.shutdown()`) and its handler object."""
    scp = StoreSCP(settings, publisher)
    server = build_ae(settings).start_server(
        (settings.dicom.bind_address, settings.dicom.port), block=False, evt_handlers=scp.handlers()
    )
    return server, scp


def run_scp(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let open associations finish."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, scp = start_scp(settings)
    log.info(
        "DICOM C-STORE SCP %s listening on %s:%d",
        settings.dicom.ae_title,
        settings.dicom.bind_address,
        settings.dicom.port,
    )
    try:
        stop.wait()
    finally:
        server.shutdown()
        scp.publisher.close()
