"""Infer, one agent per lane: `triage.requests.<lane>` -> `triage.findings`.

Load and preprocess the series in the lane's process pool (processors/preprocess_pool.py),
run the model in Triton with the lane's priority (streams/triton_retry.py), build the
finding (processors/finding.py) and publish it once: an upgraded copy on a faster lane,
a request replayed after a kill, or an older read a better series overtook is skipped
with an audit event instead. An unreadable series or a Triton that never answers is a
dead letter with the cause. A localising model's map (for the PACS's SEG) is named by
the finding and written after it (streams/stages/infer_maps.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import faust
from faust.types import EventT
from opentelemetry.trace import Span, Status, StatusCode

from processors.finding import build_finding
from processors.preprocess_pool import LanePools
from processors.triton_client import InferenceError, TritonModelClient
from radtriage import metrics
from radtriage.settings import LANES
from radtriage.telemetry import headers_for_current_span
from schemas.base import EventDecodeError
from schemas.findings import Finding
from schemas.requests import TriageRequest
from streams.app import dead_letter, publish
from streams.stages.common import Detail, audit, consumer_span, each, tracer
from streams.stages.context import PipelineContext
from streams.stages.infer_maps import LocalisationMaps, PendingMap
from streams.triton_retry import GaveUp, LaneRetryGate, infer_with_retry

log = logging.getLogger("streams.agents")


class LatestReads:
    """Per (study, rule): the ready time of the newest request this worker has taken.

    A study read again on a better series (streams/routing.decide) must not have its
    amended finding overtaken by the older read finishing later. In memory: after a
    restart the worst case is one extra, older report, which the amended one follows.
    """

    LIMIT = 10_000

    def __init__(self) -> None:
        self._newest: dict[tuple[str, str], datetime] = {}

    def note(self, req: TriageRequest) -> None:
        key = (req.study_uid, req.rule_id)
        if key not in self._newest or self._newest[key] < req.ready_at:
            self._newest[key] = req.ready_at
        if len(self._newest) > self.LIMIT:  # bounded: the oldest studies are long finished
            for old in sorted(self._newest, key=self._newest.__getitem__)[: self.LIMIT // 10]:
                del self._newest[old]

    def superseded(self, req: TriageRequest) -> bool:
        newest = self._newest.get((req.study_uid, req.rule_id))
        return newest is not None and newest > req.ready_at


@dataclass
class Lanes:
    """What the lanes share with the worker: warmed before it says ready, stopped with it."""

    preprocess: LanePools
    triton: TritonModelClient


class Infer:
    """One worker's lanes: the state they share and the steps of one request."""

    def __init__(self, ctx: PipelineContext) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.triton = TritonModelClient(
            settings.triton.grpc_url, settings.triton.timeout_s, settings.triton.grpc_auth_headers()
        )
        self.gate = LaneRetryGate(settings.triton.lane_priority)
        streams = settings.streams
        self.preprocess = LanePools(
            streams.lane_concurrency, streams.preprocess_niceness, streams.preprocess_memory_budget_bytes
        )
        self.latest = LatestReads()
        # Request ids whose finding is being published right now (this worker owns every lane
        # partition of a study: the lane topics are co-partitioned by study UID).
        self.finishing: set[str] = set()
        self.maps = LocalisationMaps(settings, ctx.blobs)

    async def already_done(self, req: TriageRequest, partition: int) -> bool:
        # An upgraded copy of work on a faster lane and the original, or a request replayed
        # after a kill, run the model once between them: the findings topic says which ran.
        ledger = self.ctx.findings_ledger
        return bool(req.request_id) and await ledger.already_sent(req.request_id, partition)

    async def skip(self, req: TriageRequest, lane: str, decision: str = "skipped_already_done") -> None:
        # Logged as well as audited: this request publishes no finding.
        log.info("request %s on the %s lane: %s", req.request_id, lane, decision)
        detail: Detail = {"request_id": req.request_id, "lane": lane, "rule": req.rule_id}
        await audit(self.ctx, req.study_uid, req.accession_number, "infer", decision, detail)

    async def one(self, event: EventT[Any], lane: str) -> None:
        try:
            req = TriageRequest.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(self.ctx.topics, event, f"infer.{lane}", str(exc))
            return
        if await self.already_done(req, event.message.partition):
            await self.restore_map(event, lane, req)
            await self.skip(req, lane)
            return
        self.latest.note(req)
        if self.latest.superseded(req):
            await self.skip(req, lane, "skipped_superseded")
            return
        priority, attrs = self.span_attrs(req, lane)
        with consumer_span(self.ctx, "infer", event, attrs=attrs) as span:
            ran = await self.run_model(event, lane, req, priority, span)
            if ran is None:
                return
            finding, pending = ran
            if pending is not None and req.request_id:
                self.maps.writing.add(req.request_id)
            try:
                published = await self.publish_once(req, lane, finding, event.message.partition)
                # After the finding, off the alert's path; written whether or not this copy
                # published: another copy's finding names the same map (docs/ARCHITECTURE.md,
                # "Results to the PACS").
                if pending is not None:
                    await self.maps.write(req, pending)
            finally:
                self.maps.writing.discard(req.request_id)
            if published:
                detail: Detail = {
                    "model": finding.model_name,
                    "model_version": finding.model_version,
                    "probability": finding.probability,
                    "threshold": finding.threshold,
                    "lane": lane,
                    "inference_ms": round(finding.inference_ms, 1),
                }
                decision = "positive" if finding.positive else "negative"
                await audit(self.ctx, req.study_uid, req.accession_number, "infer", decision, detail)

    def span_attrs(self, req: TriageRequest, lane: str) -> tuple[int, dict[str, Any]]:
        """The request's Triton priority and the attributes of the span its model run is in."""
        priority = self.ctx.settings.triton.lane_priority[req.lane]
        attrs = {
            "radtriage.study_uid": req.study_uid,
            "radtriage.lane": lane,
            "radtriage.rule": req.rule_id,
            "radtriage.model": req.model_name,
            "triton.priority": priority,
        }
        return priority, attrs

    async def run_model(
        self, event: EventT[Any], lane: str, req: TriageRequest, priority: int, span: Span
    ) -> tuple[Finding, PendingMap | None] | None:
        """Preprocess, infer, build the finding (and its localisation map, to be written after
        it is published); None (and a dead letter) when it cannot."""
        topics, triton = self.ctx.topics, self.ctx.settings.triton
        try:
            prep_attrs: dict[str, Any] = {
                "radtriage.model": req.model_name,
                "radtriage.instances": len(req.instance_uris),
            }
            with tracer.start_as_current_span("preprocess", attributes=prep_attrs):
                started = time.monotonic()
                paths = [self.ctx.blobs.path_of(uri) for uri in req.instance_uris]
                # Admitted by the series' decoded size (processors/preprocess_pool.py): two
                # thin-slice studies at once must wait for memory, not exhaust it.
                tensor, geometry = await self.preprocess.prepare(lane, req.model_name, paths, req.pixel_bytes)
                metrics.observe_preprocess(lane, req.model_name, time.monotonic() - started)
        except Exception as exc:  # unreadable series: retrying will not help
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            cause = f"{type(exc).__name__}: {exc}"
            stage = f"infer.{lane}.preprocess"
            await dead_letter(topics, event, stage, cause, req.study_uid, headers_for_current_span())
            return None
        try:
            result = await infer_with_retry(
                self.triton, self.gate, lane, req, tensor, priority, triton.timeout_s, triton.grpc_url
            )
        except GaveUp as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc.__cause__)))
            stage = f"infer.{lane}.triton"
            await dead_letter(topics, event, stage, str(exc), req.study_uid, headers_for_current_span())
            return None
        finding, pending = self.maps.plan(req, build_finding(req, result, geometry), result, geometry)
        span.set_attribute("radtriage.probability", finding.probability)
        span.set_attribute("radtriage.positive", finding.positive)
        return finding, pending

    async def restore_map(self, event: EventT[Any], lane: str, req: TriageRequest) -> None:
        """Run the model again for the map alone when a published finding may be owed one
        (`LocalisationMaps.owed`): deterministic, so the same map under the same URI. Rare (a kill in that
        window, or a negative finding of a localising model replayed: nothing to write)."""
        if not self.maps.owed(req):
            return
        priority, attrs = self.span_attrs(req, lane)
        with consumer_span(self.ctx, "infer.restore_map", event, attrs=attrs) as span:
            ran = await self.run_model(event, lane, req, priority, span)
        if ran is None or ran[1] is None:
            return
        await self.maps.write(req, ran[1])
        detail: Detail = {
            "request_id": req.request_id,
            "lane": lane,
            "map_uri": ran[0].localisation_map_uri or "",
        }
        await audit(self.ctx, req.study_uid, req.accession_number, "infer", "map_restored", detail)

    async def publish_once(self, req: TriageRequest, lane: str, finding: Finding, partition: int) -> bool:
        """Publish the finding unless another copy of the request, or a newer read of the
        study, got there first; True when it was published."""
        # The other lane's copy of this request may have finished while we inferred:
        # claim first (no await before it), then check, so only one finding goes out.
        if req.request_id in self.finishing:
            await self.skip(req, lane)
            return False
        if self.latest.superseded(req):  # a better series of this study was taken meanwhile
            await self.skip(req, lane, "skipped_superseded")
            return False
        if req.request_id:
            self.finishing.add(req.request_id)
        try:
            if await self.already_done(req, partition):
                await self.skip(req, lane)
                return False
            await publish(self.ctx.topics.findings, req.study_uid, finding, headers_for_current_span())
            self.ctx.crash_if("crash_after_finding", req.request_id)
            metrics.observe_finding(lane, req, finding)
            if req.request_id:
                self.ctx.findings_ledger.record(req.request_id)
            return True
        finally:
            self.finishing.discard(req.request_id)


def register(ctx: PipelineContext) -> Lanes:
    """Register the three lane agents."""
    stage = Infer(ctx)

    def lane_agent(lane: str) -> None:
        async def infer_lane(stream: faust.StreamT[Any]) -> None:
            await each(
                ctx,
                stream,
                f"infer.{lane}",
                lambda event: stage.one(event, lane),
                guard=metrics.REQUESTS_IN_FLIGHT.labels(lane).track_inprogress,
            )

        concurrency = ctx.settings.streams.lane_concurrency[lane]
        ctx.app.agent(ctx.topics.lanes[lane], name=f"infer-{lane}", concurrency=concurrency)(infer_lane)

    for lane in LANES:
        lane_agent(lane)
    return Lanes(stage.preprocess, stage.triton)


async def warm(ctx: PipelineContext, lanes: Lanes) -> None:
    """Every lane able to serve at once: its preprocessing processes started (torch and
    MONAI imported) and every routed model run once in Triton. The worker reports ready
    only after this (radtriage/worker.py), so the first study is as fast as the tenth. A
    model Triton cannot serve yet is logged, not fatal: the lanes retry it."""
    settings = ctx.settings
    started = time.monotonic()
    await asyncio.gather(*(lanes.preprocess.warm(lane) for lane in settings.streams.lane_concurrency))
    for rule in {(r.model, r.model_version): r for r in ctx.rules.rules}.values():
        try:
            ms = await lanes.triton.warm(
                rule.model, rule.model_version, settings.triton.lane_priority["stat"]
            )
            log.info("model %s v%s warmed in %.0f ms", rule.model, rule.model_version or "latest", ms)
        except InferenceError as exc:
            log.warning("model %s not warmed: %s", rule.model, exc)
    log.info("lanes warm in %.1f s", time.monotonic() - started)
