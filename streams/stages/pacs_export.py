"""PACS export: `triage.findings` -> `<app>-pacs-export-outbox` -> the PACS (C-STORE or
STOW-RS), `triage.audit`, `triage.deadletter`.

For every destination of `dispatch.destinations` whose rules take the finding (its
findings, positive only or not), the finding's result objects it asks for (the TID 1500
SR, processors/dicom_results.py; for a positive finding a key image and its KOS,
processors/key_images.py) are built from the headers of the series it was read on
(the blob store) and sent (streams/pacs_send.py): C-STOREd (streams/dicom_send.py) or
STOWed (streams/stow_send.py). A destination that is down or out of resources is retried with
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
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any

import faust
from faust.types import EventT

from radtriage import metrics
from radtriage.settings import DicomDestination, ResultObject, StowDestination
from schemas.findings import Finding
from streams.app import dead_letter
from streams.pacs_send import Outcome, send_until_deadline
from streams.stages.common import Detail, audit, consumer_span, each
from streams.stages.context import PipelineContext
from streams.stages.outbox import outbox

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from processors.result_objects import BuildPool, ThreadBuilder

log = logging.getLogger(__name__)
STAGE = "pacs-export"
Destination = DicomDestination | StowDestination


def _software_version() -> str:
    try:
        return f"radtriage {metadata.version('radtriage')}"
    except metadata.PackageNotFoundError:
        return "radtriage"


async def arrives(there: Callable[[], bool], wait_s: float, first_s: float = 0.02) -> bool:
    """Whether `there()` is true within `wait_s`, looking again after 20 ms, 40 ms, … (at
    most 1 s apart). The infer stage writes a finding's localisation map just after it
    publishes the finding (docs/ARCHITECTURE.md, "Results to the PACS"): this stage may read
    the finding first."""
    deadline = time.monotonic() + wait_s
    pause = first_s
    while not there():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 1.0)
    return True


class Export:
    """One worker's export: the steps of one finding, from its objects built to each sent."""

    def __init__(
        self, ctx: PipelineContext, pool: ThreadBuilder | BuildPool, result_error: type[Exception]
    ) -> None:
        self.ctx = ctx
        self.dispatch = ctx.settings.dispatch
        # processors/result_objects, handed in when the stage registers (highdicom).
        self.pool, self.result_error = pool, result_error

    def map_there(self, uri: str) -> bool:
        try:
            return self.ctx.blobs.path_of(uri).is_file()
        except ValueError:  # not a URI of this store: reading it says why (map_unreadable)
            return True

    async def with_map(self, finding: Finding, wanted: set[ResultObject]) -> bool:
        """Whether the SEG reads the finding's localisation map; False when it has not arrived
        within `dispatch.map_wait_s` (the SEG is built without it: audited, counted)."""
        uri, wait_s = finding.localisation_map_uri, self.dispatch.map_wait_s
        if "seg" not in wanted or not finding.positive or not uri:
            return True
        if await arrives(lambda: self.map_there(uri), wait_s):
            return True
        metrics.RESULTS_NOT_BUILT.labels("seg", "map_missing").inc()
        log.warning(
            "no localisation map for %s after %.0f s (%s): its SEG goes without it",
            finding.study_uid,
            wait_s,
            uri,
        )
        detail: Detail = {
            "object": "seg",
            "reason": "map_missing",
            "map_uri": uri,
            "waited_s": wait_s,
            "request_id": finding.request_id,
        }
        await audit(
            self.ctx, finding.study_uid, finding.accession_number, "export", "seg_map_missing", detail
        )
        return False

    async def one(self, event: EventT[Any]) -> None:
        finding = Finding.from_bytes(event.value)
        targets = [d for d in self.dispatch.destinations if d.wants(finding.finding, finding.positive)]
        if not targets:
            return
        attrs = {
            "radtriage.study_uid": finding.study_uid,
            "radtriage.finding": finding.finding,
            "radtriage.model": finding.model_name,
        }
        with consumer_span(self.ctx, STAGE, event, attrs=attrs) as span:
            wanted = {what for d in targets for what in d.objects}
            with_map = await self.with_map(finding, wanted)
            await self.ctx.alert_first.before_delivering(finding)
            try:
                built = await self.pool.build(finding, wanted, with_map)
            except self.result_error as exc:
                # Nothing to reference (the series is not in the blob store): the finding
                # goes to the dead letters with its study, for a replay once it is there.
                await dead_letter(
                    self.ctx.topics, event, STAGE, f"not built: {exc}", study_uid=finding.study_uid
                )
                return
            for missed in built.not_built:
                metrics.RESULTS_NOT_BUILT.labels(missed.object, missed.reason).inc()
                log.warning("no %s for %s: %s", missed.object, finding.study_uid, missed.message)
            span.set_attribute("radtriage.objects", ",".join(built.objects))
            for destination in targets:
                for what, ds in built.objects.items():
                    if what in destination.objects and not await self.send(
                        event, finding, destination, what, ds
                    ):
                        break  # its other objects would meet the same PACS: the replay sends them all

    async def send(
        self, event: EventT[Any], finding: Finding, destination: Destination, what: ResultObject, ds: Dataset
    ) -> bool:
        """One object to one destination until stored or given up on (dead-lettered naming the
        destination and its status); every try's outcome audited. True when stored."""
        ctx = self.ctx
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

        async def retrying(first: Outcome) -> None:
            # Once per object: the operator sees the PACS is not answering now, not only
            # when the deadline is past.
            detail = base | {"status": first.status_text, "status_detail": first.detail}
            await audit(
                ctx, finding.study_uid, finding.accession_number, "export", f"{what}_retrying", detail
            )

        outcome, tries = await send_until_deadline(destination, ds, self.dispatch, what, retrying)
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
        await audit(ctx, finding.study_uid, finding.accession_number, "export", f"{what}_{result}", detail)
        if not outcome.stored:
            protocol = "STOW" if destination.kind == "stow" else "DICOM"
            cause = (
                f"destination {destination.name} ({destination.where}): {what} not stored "
                f"after {tries} tries, {protocol} status {outcome.status_text}: {outcome.detail}"
            )
            await dead_letter(ctx.topics, event, STAGE, cause, study_uid=finding.study_uid)
        return outcome.stored


def register(ctx: PipelineContext) -> None:
    dispatch = ctx.settings.dispatch
    if not dispatch.destinations:
        return  # nothing configured: no agent, no outbox read
    # highdicom (~0.2 s to import) only where results are built: never at every worker's start.
    from processors.result_objects import ResultError, builder

    pool = builder(ctx.blobs, _software_version(), dispatch.build_in, dispatch.build_niceness)
    stage = Export(ctx, pool, ResultError)

    @ctx.app.task
    async def _warm_build() -> None:
        try:
            await pool.warm()
        except Exception:  # the first finding starts it again and says why if it cannot
            log.exception("the result objects' build process did not start")

    @ctx.app.on_before_shutdown.connect  # type: ignore[arg-type]
    def _stop_build(sender: Any, **kwargs: Any) -> None:
        pool.shutdown()

    def for_some_destination(finding: Finding) -> bool:
        return any(d.wants(finding.finding, finding.positive) for d in dispatch.destinations)

    @ctx.app.agent(outbox(ctx, STAGE, for_some_destination), name=STAGE)
    async def pacs_export(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, STAGE, stage.one)

    _ = (pacs_export, _warm_build, _stop_build)
