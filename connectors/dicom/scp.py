"""DICOM C-STORE SCP: store each instance, publish it to Kafka, and only then answer success.

For every C-STORE: decode and validate (a refusal is a standard failure status with
the reason in ErrorComment), write the Part 10 bytes to the blob store, publish an
`InstanceEvent` keyed by StudyInstanceUID and wait for acks=all; only then 0x0000.

The rest of the listener, each in its own module: who may associate and which
presentation contexts are refused (connectors/dicom/negotiation.py), the open
associations and the end-of-transfer marker a release sends
(connectors/dicom/associations.py), the servers, TLS and stopping
(connectors/dicom/listener.py). `StoreSCP.handlers` ties them to pynetdicom's events.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.events import EventHandlerType

from connectors.dicom import negotiation
from connectors.dicom import validation as v
from connectors.dicom.associations import Association, Associations
from connectors.dicom.part10 import part10_header
from connectors.dicom.received_study import ReceivedStudy
from connectors.publisher import EventPublisher, PublishError
from processors.result_marker import is_radtriage_result
from radtriage import metrics
from radtriage.blobstore import BlobStoreError, LocalBlobStore, valid_uid
from radtriage.settings import Settings
from schemas.instances import InstanceEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


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
        self.associations = Associations(self.publisher, settings.topics.instances)

    # -- C-STORE -------------------------------------------------------------------------

    def _refuse(
        self, assoc: Association, span: Span, sop_uid: str, refusal: v.Refusal, cause: str = ""
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
        assoc = self.associations.of(event)
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
        study = self.associations.study(assoc, instance)
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
        self.associations.stored(study)
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
        header = part10_header(
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

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, lambda event: negotiation.on_requested(self.settings, event)),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.associations.released),
            (evt.EVT_ABORTED, self.associations.aborted),
            (evt.EVT_CONN_CLOSE, self.associations.connection_closed),
            # Metrics only (radtriage/metrics.py); notification events take several handlers.
            (evt.EVT_ACCEPTED, negotiation.on_accepted),
            (evt.EVT_REJECTED, negotiation.on_rejected),
            (evt.EVT_CONN_OPEN, lambda _event: metrics.DICOM_OPEN_ASSOCIATIONS.inc()),
            (evt.EVT_CONN_CLOSE, lambda _event: metrics.DICOM_OPEN_ASSOCIATIONS.dec()),
        ]
