"""DICOMweb STOW-RS: `POST /dicomweb/studies[/{study}]` with multipart/related DICOM parts.

Parts are read one at a time (a series never has to fit in memory at once). Each part
goes the C-STORE path's way: decode and validate (parts.py, reusing
connectors/dicom/validation.py), write to the blob store, publish an InstanceEvent
(source "dicomweb", association_id = this request's id) keyed by StudyInstanceUID
with acks=all. After the last part, one `transfer_complete` marker per study, as the
SCP sends on association release; a request cut short (too large, malformed, client
gone) gets no marker, like an aborted association, and its studies complete after the
stream's quiet period. Decoding, fsync and publishing run on worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from connectors.dicom import validation as v
from connectors.dicom.received_study import ReceivedStudy
from connectors.dicomweb.parts import Identity, Part, read_part
from connectors.dicomweb.response import (
    DICOM_JSON,
    RETRY_AFTER_S,
    Failed,
    Stored,
    http_status,
    stow_response,
)
from connectors.http.body import BodyTooLarge
from connectors.http.events import AsyncPublisher, PublishError
from connectors.http.middleware import HttpError
from connectors.http.state import BLOBS, PUBLISHER, SETTINGS, base_url
from processors.result_marker import is_radtriage_result
from radtriage import metrics
from radtriage.blobstore import BlobStoreError, valid_uid
from schemas.instances import InstanceEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

CHUNK = 1 << 16

# LocalBlobStore.put_instance: (study, series, sop, Part 10 bytes) -> file:// URI.
BlobPut = Callable[[str, str, str, bytes], str]


@dataclass
class StowRequest:
    """One STOW-RS request's state: what was stored and refused, per-study spans."""

    request_id: str
    target_study: str | None
    topic: str
    publisher: AsyncPublisher
    stored: list[Stored] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    studies: dict[str, ReceivedStudy] = field(default_factory=dict)
    # Once Kafka failed in this request, later parts are refused at once: the sender will
    # retry them anyway, and waiting a produce timeout per part would stall it for minutes.
    kafka_failed: bool = False

    def _study(self, instance: InstanceEvent) -> ReceivedStudy:
        study = self.studies.get(instance.study_uid)
        if study is None:
            study = ReceivedStudy.start(
                "dicomweb.receive_study",
                {
                    "radtriage.study_uid": instance.study_uid,
                    "radtriage.association_id": self.request_id,
                    "dicom.modality": instance.modality,
                },
            )
            self.studies[instance.study_uid] = study
        return study

    def refuse(self, part: Part, refusal: v.Refusal, cause: str = "") -> None:
        # No PHI: UIDs, the status and our own reason; an infrastructure failure's cause.
        log.warning(
            "STOW-RS part %s (request %s) refused 0x%04X: %s%s",
            part.identity.sop_instance_uid or "<unknown>",
            self.request_id[:8],
            refusal.status,
            refusal.reason,
            f" ({cause})" if cause else "",
        )
        self.failed.append(
            Failed(
                part.identity.sop_class_uid, part.identity.sop_instance_uid, refusal.status, refusal.reason
            )
        )

    async def store(self, part: Part, blobs_put: BlobPut) -> None:
        """Store one decoded part: blob, then the event; or a refusal."""
        if part.refusal is not None or part.dataset is None:
            self.refuse(part, part.refusal or v.Refusal(v.CANNOT_DECODE, "dataset cannot be decoded"))
            return
        ds = part.dataset
        instance = v.instance_event(ds, blob_uri="", calling_ae="", association_id=self.request_id)
        instance = instance.model_copy(update={"source": "dicomweb"})
        if self.target_study is not None and instance.study_uid != self.target_study:
            self.refuse(
                part, v.Refusal(v.DATASET_MISMATCH, "StudyInstanceUID differs from the study in the URL")
            )
            return
        if is_radtriage_result(ds):
            # radtriage's own result, sent back by a PACS: answered as stored (no retry), never
            # stored or published (no export loop; processors/result_marker.py).
            log.info("STOW-RS of %s: radtriage's own result, not ingested", instance.sop_instance_uid)
            metrics.DICOM_OWN_RESULTS_IGNORED.inc()
            self.stored.append(
                Stored(
                    instance.study_uid, instance.series_uid, instance.sop_class_uid, instance.sop_instance_uid
                )
            )
            return
        if self.kafka_failed:
            self.refuse(part, v.Refusal(v.OUT_OF_RESOURCES_KAFKA, "event log unavailable, retry later"))
            return
        study = self._study(instance)
        attributes = {
            "dicom.sop_instance_uid": instance.sop_instance_uid,
            "dicom.sop_class_uid": instance.sop_class_uid,
            "dicom.series_uid": instance.series_uid,
            "radtriage.study_uid": instance.study_uid,
        }
        with tracer.start_as_current_span(
            "dicomweb.store_instance", context=study.context, attributes=attributes
        ) as span:
            try:
                uri = await asyncio.to_thread(
                    blobs_put, instance.study_uid, instance.series_uid, instance.sop_instance_uid, part.part10
                )
            except (OSError, BlobStoreError) as exc:
                cause = f"blob store: {type(exc).__name__} {getattr(exc, 'errno', '') or ''}".strip()
                refusal = v.Refusal(v.OUT_OF_RESOURCES_STORAGE, "storage unavailable, retry later")
                span.set_status(Status(StatusCode.ERROR, refusal.reason))
                self.refuse(part, refusal, cause)
                return
            try:
                await self.publisher.publish(
                    self.topic,
                    instance.study_uid,
                    instance.model_copy(update={"blob_uri": uri}),
                    study.traceparent(),
                )
            except PublishError as exc:
                self.kafka_failed = True
                refusal = v.Refusal(v.OUT_OF_RESOURCES_KAFKA, "event log unavailable, retry later")
                span.set_status(Status(StatusCode.ERROR, refusal.reason))
                self.refuse(part, refusal, str(exc))
                return
            span.set_attribute("dicom.status", v.SUCCESS)
        study.count += 1
        self.stored.append(
            Stored(instance.study_uid, instance.series_uid, instance.sop_class_uid, instance.sop_instance_uid)
        )

    async def finish(self, completed: bool) -> None:
        """End the request: on a complete request, one marker per study that stored anything."""
        metrics.count_stow_instances(len(self.stored), (f.status for f in self.failed))
        for study_uid, study in self.studies.items():
            if completed and study.count > 0:
                marker = study.marker(study_uid, self.request_id, "dicomweb")
                try:
                    await self.publisher.publish(self.topic, study_uid, marker, study.traceparent())
                except PublishError as exc:
                    # The study still completes after the quiet period; nothing is lost.
                    log.warning("transfer-complete marker for %s not published (%s)", study_uid, exc)
            study.end("" if completed else "request incomplete")


def _check_content_type(request: web.Request) -> None:
    mime = parse_mimetype(request.headers.get(hdrs.CONTENT_TYPE, ""))
    media = f"{mime.type}/{mime.subtype}".lower()
    part_type = str(mime.parameters.get("type", "")).lower()
    if media != "multipart/related" or part_type != "application/dicom":
        raise HttpError(
            415, 'Content-Type must be multipart/related; type="application/dicom" (one DICOM file per part)'
        )
    if not mime.parameters.get("boundary"):
        raise HttpError(400, "multipart/related Content-Type without a boundary")


async def _read_part(part: BodyPartReader, budget: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data.extend(chunk)
        if len(data) > budget:
            raise BodyTooLarge(budget)
    return bytes(part.decode(data))


def _part_media_type(part: BodyPartReader) -> str:
    mime = parse_mimetype(part.headers.get(hdrs.CONTENT_TYPE, "application/dicom"))
    return f"{mime.type}/{mime.subtype}".lower()


async def store_instances(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    target = request.match_info.get("study")
    if target is not None and not valid_uid(target):
        raise HttpError(400, "the study in the URL is not a DICOM UID")
    _check_content_type(request)
    stow = StowRequest(uuid.uuid4().hex, target, settings.topics.instances, request.app[PUBLISHER])
    put = request.app[BLOBS].put_instance
    budget = settings.http.max_stow_bytes
    completed = False
    try:
        reader = await request.multipart()
        while True:
            try:
                part = await reader.next()
            except Exception as exc:  # aiohttp raises ValueError and others on a broken body
                raise HttpError(400, f"malformed multipart body ({type(exc).__name__})") from None
            if part is None:
                break
            if isinstance(part, MultipartReader) or _part_media_type(part) != "application/dicom":
                await part.release()
                stow.refuse(Part(Identity()), v.Refusal(v.CANNOT_DECODE, "part is not application/dicom"))
                continue
            try:
                data = await _read_part(part, budget)
            except BodyTooLarge:
                raise
            except Exception as exc:
                raise HttpError(400, f"malformed multipart body ({type(exc).__name__})") from None
            budget -= len(data)
            decoded = await asyncio.to_thread(read_part, data)
            await stow.store(decoded, put)
        completed = True
    finally:
        await stow.finish(completed)
    if not stow.stored and not stow.failed:
        raise HttpError(400, "no DICOM instances in the request")
    status = http_status(stow.stored, stow.failed)
    body = stow_response(stow.stored, stow.failed, base_url=base_url(request), target_study=target)
    log.info(
        "STOW-RS request %s: %d stored, %d failed -> %d",
        stow.request_id[:8],
        len(stow.stored),
        len(stow.failed),
        status,
    )
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type=DICOM_JSON, headers=headers
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/dicomweb/studies", store_instances)
    app.router.add_post("/dicomweb/studies/{study}", store_instances)
