"""PACS export: `triage.findings` -> `<app>-pacs-export-outbox` -> the PACS (C-STORE or
STOW-RS), `triage.audit`, `triage.deadletter`.

For every destination of `dispatch.destinations` whose rules take the finding (its
findings, positive only or not), the finding's result objects it asks for (the TID 1500
SR, processors/dicom_results.py; for a positive finding a key image and its KOS,
processors/key_images.py) are built from the headers of the series it was read on
(the blob store) and C-STOREd (streams/dicom_send.py, in a thread) or STOWed
(streams/stow_send.py). A destination that is down or out of resources is retried with
exponential backoff until `dispatch.retry_deadline_s` (the first retry of an object is on
`triage.audit` as `<object>_retrying`); then, or at once for a final refusal, the finding
is dead-lettered naming the destination and its status (`radtriage replay --stage
pacs-export` puts it back on the outbox). Every object sent, or given up on, is on
`triage.audit` (stage "export") with the destination's status. See docs/ARCHITECTURE.md,
"Results to the PACS".

The agent reads an outbox topic of its own, fed by a forwarder that takes off the
findings only what some destination wants (streams/stages/outbox.py): a PACS down for
minutes holds this agent, never the report and alert agents. A finding replayed after a
kill is sent again under the same SOP Instance UID: the PACS keeps one instance.
Nothing configured: no agent at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, Protocol

import faust
import pydicom
from faust.types import EventT
from pydicom.dataset import Dataset

from processors.dicom_results import ResultError, build_sr, read_headers
from processors.dicom_seg import SegError, build_seg, nothing_to_segment
from processors.key_images import build_key_image, build_kos, key_slice
from processors.localisation_map import StoredMap, from_bytes
from radtriage import metrics
from radtriage.settings import (
    RESULT_OBJECTS,
    DicomDestination,
    DispatchSettings,
    ResultObject,
    StowDestination,
)
from schemas.findings import Finding
from streams.app import dead_letter
from streams.dicom_send import c_store
from streams.stages.common import Detail, audit, consumer_span, each
from streams.stages.context import PipelineContext
from streams.stages.outbox import outbox
from streams.stow_send import stow

log = logging.getLogger(__name__)
STAGE = "pacs-export"


def _software_version() -> str:
    try:
        return f"radtriage {metadata.version('radtriage')}"
    except metadata.PackageNotFoundError:
        return "radtriage"


def backoff_delays(settings: DispatchSettings) -> list[float]:
    """The waits between tries, in order, whose sum stays within the deadline (pure)."""
    delays: list[float] = []
    delay, total = settings.retry_initial_s, 0.0
    while total < settings.retry_deadline_s:
        wait = min(delay, settings.retry_max_s, settings.retry_deadline_s - total)
        delays.append(wait)
        total += wait
        delay *= 2
    return delays


class Outcome(Protocol):
    """One try's outcome, C-STORE (streams/dicom_send.StoreOutcome) or STOW-RS
    (streams/stow_send.StowOutcome)."""

    @property
    def stored(self) -> bool: ...
    @property
    def retryable(self) -> bool: ...
    @property
    def status_text(self) -> str: ...
    @property
    def detail(self) -> str: ...


def sender(
    destination: DicomDestination | StowDestination, ds: Dataset, timeout_s: float
) -> Callable[[], Awaitable[Outcome]]:
    """One try of sending `ds` to `destination`, by its kind."""
    if isinstance(destination, StowDestination):
        return lambda: stow(destination, ds, timeout_s)
    return lambda: asyncio.to_thread(c_store, destination, ds, timeout_s)


async def send_until_deadline(
    destination: DicomDestination | StowDestination,
    ds: Dataset,
    settings: DispatchSettings,
    what: str,
    on_first_retry: Callable[[Outcome], Awaitable[None]] | None = None,
) -> tuple[Outcome, int]:
    """Send `ds`, retrying what may succeed later; the last outcome and the tries made."""
    waits = iter(backoff_delays(settings))
    send = sender(destination, ds, settings.timeout_s)
    tries = 0
    while True:
        tries += 1
        outcome = await send()
        if outcome.stored or not outcome.retryable:
            return outcome, tries
        wait = next(waits, None)
        if wait is None:
            return outcome, tries
        metrics.PACS_EXPORTS.labels(destination.name, what, "retried").inc()
        log.warning(
            "%s to %s: %s %s; try %d again in %.1f s",
            what,
            destination.name,
            outcome.status_text,
            outcome.detail,
            tries + 1,
            wait,
        )
        if tries == 1 and on_first_retry is not None:
            await on_first_retry(outcome)
        await asyncio.sleep(wait)


def register(ctx: PipelineContext) -> None:
    dispatch = ctx.settings.dispatch
    if not dispatch.destinations:
        return  # nothing configured: no agent, no outbox read
    version = _software_version()

    def build(finding: Finding, wanted: set[ResultObject]) -> dict[ResultObject, Dataset]:
        """The objects wanted by some destination, in sending order. File reads and
        highdicom's work: called off the event loop."""
        sources = read_headers(ctx.blobs.series_paths(finding.study_uid, finding.series_uid))
        objects: dict[ResultObject, Dataset] = {}
        if "sr" in wanted:
            objects["sr"] = build_sr(finding, sources, software_version=version)
        if finding.positive and wanted & {"key_image", "kos"}:
            # Only a positive finding has something to show. A slice that cannot be drawn
            # (a multi-frame or colour source) costs the key image, never the SR.
            try:
                source = pydicom.dcmread(key_slice(finding, sources).filename)
                objects["key_image"] = build_key_image(finding, source)
            except (ValueError, OSError) as exc:
                log.warning("no key image for %s: %s", finding.study_uid, exc)
            else:
                if "kos" in wanted:
                    objects["kos"] = build_kos(finding, [objects["key_image"]])
        if "seg" in wanted:
            # What a model localises (its localisation map, nodules); a SEG that cannot be built
            # costs the SEG, never the other objects.
            cell_map: StoredMap | None = None
            try:
                if finding.positive and finding.localisation_map_uri:
                    cell_map = from_bytes(ctx.blobs.read(finding.localisation_map_uri))
            except (ValueError, OSError) as exc:  # BlobStoreError, MapError: ValueErrors
                metrics.RESULTS_NOT_BUILT.labels("seg", "map_unreadable").inc()
                log.warning("no SEG for %s: localisation map unreadable: %s", finding.study_uid, exc)
            why_not = nothing_to_segment(finding, cell_map)
            if why_not is not None:
                log.debug("no SEG for %s (%s): %s", finding.study_uid, finding.finding, why_not)
            else:
                try:
                    objects["seg"] = build_seg(finding, sources, cell_map, software_version=version)
                except SegError as exc:
                    metrics.RESULTS_NOT_BUILT.labels("seg", "no_geometry").inc()
                    log.warning("no SEG for %s: %s", finding.study_uid, exc)
        return {what: objects[what] for what in RESULT_OBJECTS if what in objects}

    async def export_one(event: EventT[Any]) -> None:
        finding = Finding.from_bytes(event.value)
        targets = [d for d in dispatch.destinations if d.wants(finding.finding, finding.positive)]
        if not targets:
            return
        attrs = {
            "radtriage.study_uid": finding.study_uid,
            "radtriage.finding": finding.finding,
            "radtriage.model": finding.model_name,
        }
        with consumer_span(ctx, STAGE, event, attrs=attrs) as span:
            wanted = {what for d in targets for what in d.objects}
            try:
                objects = await asyncio.to_thread(build, finding, wanted)
            except ResultError as exc:
                # Nothing to reference (the series is not in the blob store): the finding
                # goes to the dead letters with its study, for a replay once it is there.
                await dead_letter(ctx.topics, event, STAGE, f"not built: {exc}", study_uid=finding.study_uid)
                return
            span.set_attribute("radtriage.objects", ",".join(objects))
            for destination in targets:
                for what, ds in objects.items():
                    if what not in destination.objects:
                        continue
                    started = time.monotonic()
                    base: Detail = {
                        "destination": destination.name,
                        "kind": destination.kind,
                        "where": destination.where,
                        "object": what,
                        "sop_instance_uid": str(ds.SOPInstanceUID),
                        "request_id": finding.request_id,
                    }
                    if isinstance(destination, DicomDestination):
                        base["ae_title"] = destination.ae_title

                    async def retrying(first: Outcome, base: Detail = base, what: str = what) -> None:
                        # Once per object: the operator sees the PACS is not answering now,
                        # not only when the deadline is past.
                        detail = base | {"status": first.status_text, "status_detail": first.detail}
                        decision = f"{what}_retrying"
                        await audit(
                            ctx, finding.study_uid, finding.accession_number, "export", decision, detail
                        )

                    outcome, tries = await send_until_deadline(destination, ds, dispatch, what, retrying)
                    result = "stored" if outcome.stored else "failed"
                    metrics.PACS_EXPORTS.labels(destination.name, what, result).inc()
                    detail: Detail = {
                        **base,
                        "series_uid": str(ds.SeriesInstanceUID),
                        "status": outcome.status_text,
                        "status_detail": outcome.detail,
                        "tries": tries,
                        "seconds": round(time.monotonic() - started, 3),
                    }
                    if finding.amends_request_id:
                        detail["amends_request_id"] = finding.amends_request_id
                    await audit(
                        ctx,
                        finding.study_uid,
                        finding.accession_number,
                        "export",
                        f"{what}_{result}",
                        detail,
                    )
                    if not outcome.stored:
                        await dead_letter(
                            ctx.topics,
                            event,
                            STAGE,
                            f"destination {destination.name} ({destination.where}): {what} not stored "
                            f"after {tries} tries, {'STOW' if destination.kind == 'stow' else 'DICOM'} "
                            f"status {outcome.status_text}: {outcome.detail}",
                            study_uid=finding.study_uid,
                        )
                        # Its other objects would meet the same PACS: the replay sends them all.
                        break

    def for_some_destination(finding: Finding) -> bool:
        return any(d.wants(finding.finding, finding.positive) for d in dispatch.destinations)

    @ctx.app.agent(outbox(ctx, STAGE, for_some_destination), name=STAGE)
    async def pacs_export(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, STAGE, export_one)

    _ = pacs_export
