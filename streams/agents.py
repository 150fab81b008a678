"""The Faust agents: assemble → route → infer (one agent per lane) → report / escalate.

Each agent is a thin loop: decode the event with its schema, call the pure logic
(`streams/assembly.py`, `streams/routing.py`, `processors/`), publish what it
returns with the trace context in the headers. Anything that cannot be processed is
published to `triage.deadletter` with the reason, and the loop goes on: one bad
message never stops a partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from connectors.blobstore import LocalBlobStore
from processors.fhir_report import build_result_bundle
from processors.model_inputs import prepare_model_input
from processors.triton_client import InferenceError, TritonModelClient
from radtriage.settings import Settings
from radtriage.telemetry import context_from_headers, current_trace_id, headers_for_current_span
from schemas.alerts import Alert, alert_id
from schemas.audit import AuditEvent
from schemas.base import EventDecodeError
from schemas.findings import Finding
from schemas.instances import InstanceEvent
from schemas.requests import TriageRequest
from schemas.results import FhirResult
from schemas.routing_rules import RoutingRules
from schemas.studies import StudyEvent
from streams import assembly
from streams.app import TriageTopics, create_app, dead_letter, declare_topics, publish
from streams.routing import build_request, route_study

log = logging.getLogger(__name__)
tracer = trace.get_tracer("radtriage.streams")

# Backoff between Triton attempts; the last value repeats until the deadline.
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


@dataclass
class Pipeline:
    app: faust.App
    topics: TriageTopics
    settings: Settings


def _span_attrs(**attrs: Any) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v not in (None, "")}


def build_pipeline(settings: Settings) -> Pipeline:
    app = create_app(settings)
    topics = declare_topics(app, settings)
    rules = RoutingRules.load(settings.routing_rules)
    blobs = LocalBlobStore(settings.blob_dir)
    alert_for_model = {r.model: r.alert for r in rules.rules}

    # Per-study assembly state and the alerts already sent; both changelogged in Kafka
    # so a restarted worker recovers them.
    assembling = app.Table("assembly", default=None)
    alerts_sent = app.Table("alerts-sent", default=None)
    # Studies already nudged for the quiet period, with the last_instance_at they were nudged at.
    nudged: dict[str, str] = {}

    @app.agent(topics.instances, name="assemble")
    async def assemble(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await _assemble_one(event)

    async def _assemble_one(event: EventT) -> None:
        ctx = context_from_headers(event.headers)
        try:
            inst = InstanceEvent.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(topics, event, "assemble", str(exc))
            return
        raw = assembling.get(inst.study_uid)
        state = assembly.AssemblyState.model_validate(raw) if raw else None
        if inst.kind == "instance":
            traceparent = _traceparent(event.headers)
            assembling[inst.study_uid] = assembly.add_instance(state, inst, traceparent).model_dump(
                mode="json"
            )
            return
        if state is None:
            # Already emitted (a duplicate marker, or a nudge that raced the release).
            return
        if inst.kind == "quiet_period" and not assembly.is_quiet(
            state, datetime.now(UTC), settings.streams.assembly_quiet_s
        ):
            return  # more instances arrived after the nudge was sent
        reason = "transfer_complete" if inst.kind == "transfer_complete" else "quiet_period"
        study_ctx = context_from_headers({"traceparent": state.traceparent}) if state.traceparent else ctx
        with tracer.start_as_current_span(
            "assemble",
            context=study_ctx,
            kind=SpanKind.CONSUMER,
            attributes=_span_attrs(
                **{
                    "radtriage.study_uid": inst.study_uid,
                    "radtriage.ready_reason": reason,
                    "radtriage.series_count": len(state.series),
                    "messaging.system": "kafka",
                    "messaging.destination.name": event.message.topic,
                }
            ),
        ):
            study = assembly.complete_study(state, reason)  # type: ignore[arg-type]
            await publish(topics.studies, study.study_uid, study, headers_for_current_span())
        del assembling[inst.study_uid]
        nudged.pop(inst.study_uid, None)

    @app.timer(interval=settings.streams.assembly_scan_interval_s)
    async def quiet_period_scan() -> None:
        """Nudge studies that went quiet; the nudge is handled in `assemble` (table writes
        must happen in the partition's own stream)."""
        now = datetime.now(UTC)
        for key, raw in list(assembling.items()):
            if not raw:
                continue
            state = assembly.AssemblyState.model_validate(raw)
            stamp = state.last_instance_at.isoformat()
            if nudged.get(state.study_uid) == stamp:
                continue
            if assembly.is_quiet(state, now, settings.streams.assembly_quiet_s):
                nudged[state.study_uid] = stamp
                nudge = InstanceEvent(kind="quiet_period", study_uid=state.study_uid)
                await publish(topics.instances, str(key), nudge)

    @app.agent(topics.studies, name="route")
    async def route(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await _route_one(event)
            except Exception as exc:  # the partition must keep moving
                log.exception("routing failed")
                await dead_letter(topics, event, "route", f"{type(exc).__name__}: {exc}")

    async def _route_one(event: EventT) -> None:
        try:
            study = StudyEvent.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(topics, event, "route", str(exc))
            return
        with tracer.start_as_current_span(
            "route",
            context=context_from_headers(event.headers),
            kind=SpanKind.CONSUMER,
            attributes={"radtriage.study_uid": study.study_uid},
        ) as span:
            routes = route_study(study, rules)
            if not routes:
                span.set_attribute("radtriage.route", "unrouted")
                await publish(
                    topics.audit,
                    study.study_uid,
                    AuditEvent(
                        study_uid=study.study_uid,
                        accession_number=study.accession_number,
                        stage="route",
                        decision="unrouted",
                        detail={
                            "reason": "no routing rule matches any series",
                            "series": "; ".join(
                                f"{s.modality}/{s.body_part or '-'}/{s.series_description or '-'}"
                                for s in study.series
                            ),
                        },
                    ),
                    headers_for_current_span(),
                )
                return
            for r in routes:
                span.set_attribute("radtriage.rule", r.rule.id)
                span.set_attribute("radtriage.lane", r.lane)
                request = build_request(study, r)
                headers = headers_for_current_span()
                await publish(topics.lanes[r.lane], study.study_uid, request, headers)
                await publish(
                    topics.audit,
                    study.study_uid,
                    AuditEvent(
                        study_uid=study.study_uid,
                        accession_number=study.accession_number,
                        stage="route",
                        decision="routed",
                        detail={
                            "rule": r.rule.id,
                            "lane": r.lane,
                            "model": r.rule.model,
                            "series_uid": r.series.series_uid,
                            "instances": len(r.series.instance_uris),
                        },
                    ),
                    headers,
                )

    triton = TritonModelClient(settings.triton.grpc_url, settings.triton.timeout_s)

    async def _infer_one(event: EventT, lane: str) -> None:
        try:
            req = TriageRequest.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(topics, event, f"infer.{lane}", str(exc))
            return
        priority = settings.triton.lane_priority[req.lane]
        with tracer.start_as_current_span(
            "infer",
            context=context_from_headers(event.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "radtriage.study_uid": req.study_uid,
                "radtriage.lane": lane,
                "radtriage.model": req.model_name,
                "triton.priority": priority,
                "messaging.system": "kafka",
                "messaging.destination.name": event.message.topic,
                "messaging.kafka.partition": event.message.partition,
                "messaging.kafka.offset": event.message.offset,
            },
        ) as span:
            try:
                with tracer.start_as_current_span("preprocess"):
                    paths = [blobs.path_of(uri) for uri in req.instance_uris]
                    tensor, _volume = await asyncio.to_thread(prepare_model_input, req.model_name, paths)
            except Exception as exc:  # unreadable series: retrying will not help
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await dead_letter(
                    topics,
                    event,
                    f"infer.{lane}.preprocess",
                    f"{type(exc).__name__}: {exc}",
                    req.study_uid,
                    headers_for_current_span(),
                )
                return
            deadline = time.monotonic() + settings.triton.timeout_s * 3
            attempt = 0
            while True:
                try:
                    with tracer.start_as_current_span("triton.infer", attributes={"attempt": attempt}):
                        result = await triton.infer_probability(req.model_name, tensor, priority)
                    break
                except InferenceError as exc:
                    delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                    attempt += 1
                    if time.monotonic() + delay > deadline:
                        span.set_status(Status(StatusCode.ERROR, str(exc)))
                        await dead_letter(
                            topics,
                            event,
                            f"infer.{lane}.triton",
                            f"gave up after {attempt} attempt(s): {exc}",
                            req.study_uid,
                            headers_for_current_span(),
                        )
                        return
                    log.warning("Triton attempt %d for %s failed (%s); retrying", attempt, req.study_uid, exc)
                    await asyncio.sleep(delay)
            finding = Finding(
                study_uid=req.study_uid,
                accession_number=req.accession_number,
                patient_id=req.patient_id,
                series_uid=req.series_uid,
                finding=req.finding,
                probability=result.probability,
                threshold=req.threshold,
                positive=result.probability >= req.threshold,
                model_name=req.model_name,
                model_version=result.model_version,
                lane=req.lane,
                rule_id=req.rule_id,
                received_at=req.received_at,
                ready_at=req.ready_at,
                inference_ms=result.elapsed_ms,
            )
            span.set_attribute("radtriage.probability", finding.probability)
            span.set_attribute("radtriage.positive", finding.positive)
            headers = headers_for_current_span()
            await publish(topics.findings, req.study_uid, finding, headers)
            await publish(
                topics.audit,
                req.study_uid,
                AuditEvent(
                    study_uid=req.study_uid,
                    accession_number=req.accession_number,
                    stage="infer",
                    decision="positive" if finding.positive else "negative",
                    detail={
                        "model": finding.model_name,
                        "model_version": finding.model_version,
                        "probability": finding.probability,
                        "threshold": finding.threshold,
                        "lane": lane,
                        "inference_ms": round(finding.inference_ms, 1),
                    },
                ),
                headers,
            )

    def _lane_agent(lane: str) -> None:
        async def infer_lane(stream: faust.StreamT) -> None:
            async for event in stream.events():
                try:
                    await _infer_one(event, lane)
                except Exception as exc:
                    log.exception("inference on lane %s failed", lane)
                    await dead_letter(topics, event, f"infer.{lane}", f"{type(exc).__name__}: {exc}")

        app.agent(
            topics.lanes[lane],
            name=f"infer-{lane}",
            concurrency=settings.streams.lane_concurrency[lane],
        )(infer_lane)

    for lane in ("stat", "urgent", "routine"):
        _lane_agent(lane)

    @app.agent(topics.findings, name="report")
    async def report(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                finding = Finding.from_bytes(event.value)
                with tracer.start_as_current_span(
                    "report",
                    context=context_from_headers(event.headers),
                    kind=SpanKind.CONSUMER,
                    attributes={
                        "radtriage.study_uid": finding.study_uid,
                        "radtriage.finding": finding.finding,
                    },
                ):
                    result = FhirResult(
                        study_uid=finding.study_uid,
                        accession_number=finding.accession_number,
                        finding=finding.finding,
                        bundle=build_result_bundle(finding),
                    )
                    await publish(topics.results_fhir, finding.study_uid, result, headers_for_current_span())
            except Exception as exc:
                log.exception("report failed")
                await dead_letter(topics, event, "report", f"{type(exc).__name__}: {exc}")

    @app.agent(topics.findings, name="escalate")
    async def escalate(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await _escalate_one(event)
            except Exception as exc:
                log.exception("escalation failed")
                await dead_letter(topics, event, "escalate", f"{type(exc).__name__}: {exc}")

    async def _escalate_one(event: EventT) -> None:
        finding = Finding.from_bytes(event.value)
        channel = alert_for_model.get(finding.model_name, "none")
        if not finding.positive or channel == "none":
            return
        key = alert_id(finding.study_uid, finding.finding)
        with tracer.start_as_current_span(
            "alert",
            context=context_from_headers(event.headers),
            kind=SpanKind.PRODUCER,
            attributes={"radtriage.study_uid": finding.study_uid, "radtriage.finding": finding.finding},
        ) as span:
            if alerts_sent.get(key):
                span.set_attribute("radtriage.duplicate", True)
                decision = "alert_suppressed_duplicate"
            else:
                alert = Alert(
                    alert_id=key,
                    study_uid=finding.study_uid,
                    accession_number=finding.accession_number,
                    finding=finding.finding,
                    probability=finding.probability,
                    threshold=finding.threshold,
                    model_name=finding.model_name,
                    model_version=finding.model_version,
                    lane=finding.lane,
                    received_at=finding.received_at,
                    ready_at=finding.ready_at,
                    trace_id=current_trace_id(),
                )
                await publish(topics.alerts[channel], finding.study_uid, alert, headers_for_current_span())
                alerts_sent[key] = alert.alerted_at.isoformat()
                decision = "alert_sent"
            await publish(
                topics.audit,
                finding.study_uid,
                AuditEvent(
                    study_uid=finding.study_uid,
                    accession_number=finding.accession_number,
                    stage="alert",
                    decision=decision,
                    detail={"alert_id": key, "topic": topics.alerts[channel].get_topic_name()},
                ),
                headers_for_current_span(),
            )

    @app.task
    async def _log_start() -> None:
        log.info(
            "radtriage streams started (rules: %s, %d rule(s))", settings.routing_rules, len(rules.rules)
        )

    _ = (assemble, route, report, escalate, quiet_period_scan)
    return Pipeline(app=app, topics=topics, settings=settings)


def _traceparent(headers: Any) -> str:
    if not headers:
        return ""
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if str(k).lower() == "traceparent":
            return v.decode() if isinstance(v, bytes | bytearray) else str(v)
    return ""
