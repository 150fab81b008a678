"""The Faust agents: assemble → route → infer (one agent per lane) → report / escalate.

Each agent is a thin loop: decode the event with its schema, call the pure logic
(`streams/assembly.py`, `streams/routing.py`, `processors/`), publish what it
returns with the trace context in the headers. Anything that cannot be processed is
published to `triage.deadletter` with the reason, and the loop goes on: one bad
message never stops a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from connectors.blobstore import LocalBlobStore
from processors.birads import birads_of
from processors.fhir_report import build_result_bundle
from processors.laterality import side_of
from processors.localisation import localise
from processors.nodules import nodules_of
from processors.preprocess_pool import LanePools
from processors.triton_client import InferenceError, TritonModelClient
from radtriage import metrics
from radtriage.settings import Settings
from radtriage.telemetry import (
    consumer_attributes,
    context_from_headers,
    current_trace_id,
    headers_for_current_span,
    trace_carrier,
)
from schemas.alerts import Alert, alert_id
from schemas.audit import AuditEvent
from schemas.base import EventDecodeError
from schemas.encounters import EncounterEvent
from schemas.findings import Finding
from schemas.instances import InstanceEvent
from schemas.join import StudyContext
from schemas.orders import OrderEvent, PatientClass
from schemas.requests import TriageRequest
from schemas.results import FhirResult
from schemas.routing_rules import RoutingRules
from schemas.studies import StudyEvent
from streams import assembly
from streams.app import TriageTopics, create_app, dead_letter, declare_topics, publish
from streams.join import AccessionState, Dispatch, PatientState, on_order, on_study, route_with_context
from streams.priority import LaneDecision
from streams.published_ledger import PublishedLedger, alert_key, finding_key, report_key
from streams.routing import RoutedSeries, decide, request_id, route_study

log = logging.getLogger(__name__)
tracer = trace.get_tracer("radtriage.streams")

# Backoff between Triton attempts; the last value repeats until the deadline.
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


class LaneRetryGate:
    """Keeps a lane off Triton while a more urgent lane has requests retrying.

    Each lane retries on its own backoff, so when Triton comes back after an outage the
    first backoff to end wins — as often routine as stat — and a routine request reaching
    an idle server runs at once: Triton's priority levels only order requests that queue
    together. So before every Triton call a lane waits while any lane with a higher
    Triton priority (smaller number) has a request between a failed attempt and its
    success or dead letter; the stat lane never waits.
    """

    def __init__(self, lane_priority: dict[str, int]) -> None:
        self._priority = dict(lane_priority)
        self._retrying = dict.fromkeys(lane_priority, 0)
        self._changed = asyncio.Event()

    def blocked(self, lane: str) -> bool:
        mine = self._priority[lane]
        return any(n > 0 and self._priority[other] < mine for other, n in self._retrying.items())

    def _notify(self) -> None:
        # Wake every waiter on the old event; later waiters wait on a fresh one.
        self._changed.set()
        self._changed = asyncio.Event()

    def retrying(self, lane: str, delta: int) -> None:
        """Count a request of `lane` into (+1) or out of (-1) retry; synchronous, so it is
        safe in a `finally` of a cancelled task."""
        self._retrying[lane] += delta
        self._notify()

    async def wait_turn(self, lane: str) -> None:
        while self.blocked(lane):
            await self._changed.wait()


@dataclass
class Pipeline:
    app: faust.App
    topics: TriageTopics
    settings: Settings
    # Start every lane's preprocessing processes and run every routed model once.
    warm: Callable[[], Awaitable[None]]


def _span_attrs(**attrs: Any) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v not in (None, "")}


def _consumed(event: EventT, group: str, **attrs: Any) -> dict[str, Any]:
    """A CONSUMER span's attributes: where the record came from (messaging conventions) + ours."""
    message = event.message
    return consumer_attributes(message.topic, message.partition, message.offset, group) | _span_attrs(**attrs)


def build_pipeline(settings: Settings) -> Pipeline:
    app = create_app(settings)
    topics = declare_topics(app, settings)
    rules = RoutingRules.load(settings.routing_rules)
    blobs = LocalBlobStore(settings.blob_dir)
    alert_for_model = {r.model: r.alert for r in rules.rules}
    metrics.prepare_worker(r.model for r in rules.rules)
    metrics.start_process_metrics(settings)
    # Faust's consumer group is the app id.
    group = settings.streams.app_id

    def _crash_if(point: str, what: str) -> None:
        if settings.streams.fault_injection == point:
            # Fault tests only: die in the worst place, after the output is in Kafka and
            # before anything else (ledger, audit, offset commit) happened.
            log.critical("fault injection: %s (%s)", point, what)
            os._exit(70)

    # Per-study assembly state, changelogged in Kafka so a restarted worker recovers it.
    assembling = app.Table("assembly", default=None)
    # What is already published, read back from the output topics themselves (see
    # streams/published_ledger.py for why not a table written after the output).
    kafka = settings.kafka
    lookback = settings.streams.ledger_lookback_s
    findings_ledger = PublishedLedger(
        "findings", kafka, [topics.findings.get_topic_name()], finding_key, lookback_s=lookback
    )
    reports_ledger = PublishedLedger(
        "reports", kafka, [topics.results_fhir.get_topic_name()], report_key, lookback_s=lookback
    )
    ledger = PublishedLedger("alerts", kafka, [t.get_topic_name() for t in topics.alerts.values()], alert_key)
    ledgers = (findings_ledger, reports_ledger, ledger)
    # The topics whose partition numbers say which output partitions this worker owns
    # (all co-partitioned with the outputs by study UID).
    ledger_inputs = {topics.findings.get_topic_name()} | {t.get_topic_name() for t in topics.lanes.values()}

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's stub wants a sync signature
    async def _forget_ledger(sender: Any, *args: Any, **kwargs: Any) -> None:
        for each in ledgers:
            each.forget_assignment()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _preload_ledger(sender: Any, assigned: Any = (), **kwargs: Any) -> None:
        partitions = sorted({tp.partition for tp in assigned if tp.topic in ledger_inputs})
        for each in ledgers:
            each.preload(partitions)

    # The order-study join: latest order + routed studies per accession number, and
    # each patient's location class from ADT (streams/join.py).
    orders = app.Table("orders-by-accession", default=None)
    # Per study: what each rule last read (streams/routing.RoutedSeries), so a study that
    # arrives again (one association per series) is read once per rule, or amended.
    routed_series = app.Table("routed-series", default=None)
    patients = app.Table("patient-location", default=None)
    stat_patterns = tuple(settings.orders.stat_indications)
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
        if state is not None and state.emitted_at is not None:
            if assembly.expired(state, datetime.now(UTC)):
                del assembling[inst.study_uid]  # no late instance is expected any more
                nudged.pop(inst.study_uid, None)
            # Already emitted (a duplicate marker, or a nudge that raced the release).
            return
        if state is None:
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
            attributes=_consumed(
                event,
                group,
                **{
                    "radtriage.study_uid": inst.study_uid,
                    "radtriage.ready_reason": reason,
                    "radtriage.series_count": len(state.series),
                },
            ),
        ):
            # Ready at the completing event's own time (the sender's release, or the nudge),
            # not at processing time: a worker killed after publishing the study but before its
            # table update reached the changelog replays this event and emits the study again,
            # and the same ready time gives the same request ids, which the published ledgers
            # then recognise (a processing-time stamp made it new work: the cluster fault test
            # saw a doubled finding and report that way).
            study = assembly.complete_study(state, reason, now=inst.received_at)  # type: ignore[arg-type]
            await publish(topics.studies, study.study_uid, study, headers_for_current_span())
            metrics.observe_study_ready(study.ready_reason, study.received_at, study.ready_at)
        # Kept, marked emitted, to catch late instances (assembly.AssemblyState.emitted_at).
        assembling[inst.study_uid] = assembly.mark_emitted(state, study.ready_at).model_dump(mode="json")
        nudged.pop(inst.study_uid, None)

    @app.timer(interval=settings.streams.assembly_scan_interval_s)
    async def quiet_period_scan() -> None:
        """Nudge studies that went quiet; the nudge is handled in `assemble` (table writes
        must happen in the partition's own stream)."""
        now = datetime.now(UTC)
        metrics.STUDIES_ASSEMBLING.set(
            sum(1 for raw in assembling.values() if raw and not raw.get("emitted_at"))
        )
        for key, raw in list(assembling.items()):
            if not raw:
                continue
            state = assembly.AssemblyState.model_validate(raw)
            if assembly.expired(state, now):
                # Table writes happen in the partition's stream: a nudge there drops it.
                if nudged.get(state.study_uid) != "expired":
                    nudged[state.study_uid] = "expired"
                    nudge = InstanceEvent(kind="quiet_period", study_uid=state.study_uid)
                    await publish(topics.instances, str(key), nudge)
                continue
            if state.emitted_at is not None:
                continue
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
            attributes=_consumed(
                event,
                group,
                **{
                    "radtriage.study_uid": study.study_uid,
                    "radtriage.accession_number": study.accession_number,
                },
            ),
        ) as span:
            routes = route_study(study, rules)
            if not routes:
                metrics.STUDIES_UNROUTED.inc()
                span.set_attribute("radtriage.route", "unrouted")
                await _publish_unrouted(study)
                return
            raw = routed_series.get(study.study_uid) or {}
            previous = {rule_id: RoutedSeries.model_validate(v) for rule_id, v in raw.items()}
            decision = decide(routes, previous)
            for rule_id in decision.unchanged:
                await _audit_series_unchanged(study, rule_id, previous[rule_id])
            if not decision.run:
                span.set_attribute("radtriage.route", "unchanged")
                return
            await _forward_study(StudyContext(study=study, run_rules=decision.run), span)
            # Recorded after the forward: a worker killed in between routes the study again
            # on restart, and the request ids (from the ready time) let the ledgers drop the copy.
            for route in routes:
                if route.rule.id in decision.run:
                    raw[route.rule.id] = RoutedSeries(
                        series_uid=route.series.series_uid,
                        instances=len(route.series.instance_uris),
                        request_id=request_id(study.study_uid, route.rule.id, study.ready_at),
                        at=study.ready_at,
                    ).model_dump(mode="json")
            routed_series[study.study_uid] = raw

    async def _audit_series_unchanged(study: StudyEvent, rule_id: str, before: RoutedSeries) -> None:
        await publish(
            topics.audit,
            study.study_uid,
            AuditEvent(
                study_uid=study.study_uid,
                accession_number=study.accession_number,
                stage="route",
                decision="series_unchanged",
                detail={
                    "rule": rule_id,
                    "series_uid": before.series_uid,
                    "instances": before.instances,
                    "request_id": before.request_id,
                    "reason": "the series the rule prefers was already read; nothing to re-run",
                },
            ),
            headers_for_current_span(),
        )

    async def _forward_study(ctx: StudyContext, span: trace.Span) -> None:
        """Send a routable study on to the next join stage its ids allow, or route it now.

        Patient id first (the ADT location table), then accession number (the order
        table); a study with neither is routed on what the rules say.
        """
        study = ctx.study
        if study.patient_id and not ctx.patient_checked:
            span.set_attribute("radtriage.join", "by_patient")
            await publish(topics.studies_by_patient, study.patient_id, ctx, headers_for_current_span())
        elif study.accession_number:
            span.set_attribute("radtriage.join", "by_accession")
            await publish(
                topics.studies_by_accession, study.accession_number, ctx, headers_for_current_span()
            )
        else:
            span.set_attribute("radtriage.join", "none")
            for dispatch in route_with_context(ctx, rules, None, stat_patterns):
                await _dispatch(dispatch, ctx.patient_class, ctx.patient_class_source, None)

    async def _publish_unrouted(study: StudyEvent) -> None:
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

    async def _dispatch(
        dispatch: Dispatch, patient_class: PatientClass, patient_class_source: str, order: OrderEvent | None
    ) -> None:
        """Publish one request on its lane and the decision on the audit topic."""
        req = dispatch.request
        span = trace.get_current_span()
        span.set_attribute("radtriage.rule", req.rule_id)
        span.set_attribute("radtriage.lane", req.lane)
        span.set_attribute("radtriage.lane_basis", dispatch.decision.basis)
        headers = headers_for_current_span()
        await publish(topics.lanes[req.lane], req.study_uid, req, headers)
        metrics.observe_routed(req.lane, req.model_name, dispatch.action, req.ready_at, req.routed_at)
        detail: dict[str, str | float | int | bool] = {
            "rule": req.rule_id,
            "lane": req.lane,
            "lane_reason": dispatch.decision.reason,
            "lane_basis": dispatch.decision.basis,
            "model": req.model_name,
            "series_uid": req.series_uid,
            "instances": len(req.instance_uris),
            "request_id": req.request_id,
        }
        if req.upgraded_from:
            detail["upgraded_from"] = req.upgraded_from
        if patient_class != "unknown":
            detail["patient_class"] = patient_class
            detail["patient_class_source"] = patient_class_source
        if order is not None:
            detail.update(_order_detail(order))
        await publish(
            topics.audit,
            req.study_uid,
            AuditEvent(
                study_uid=req.study_uid,
                accession_number=req.accession_number,
                stage="route",
                decision=dispatch.action,
                detail=detail,
            ),
            headers,
        )

    # -- the order-study join --------------------------------------------------------------

    @app.agent(topics.patient_side, name="patient-context")
    async def patient_context(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await _patient_context_one(event)
            except Exception as exc:
                log.exception("patient context failed")
                await dead_letter(topics, event, "join.patient", f"{type(exc).__name__}: {exc}")

    async def _patient_context_one(event: EventT) -> None:
        if event.message.topic == settings.topics.encounters:
            try:
                enc = EncounterEvent.from_bytes(event.value)
            except EventDecodeError as exc:
                await dead_letter(topics, event, "join.patient", str(exc))
                return
            patients[enc.patient_id] = PatientState(
                patient_class=enc.patient_class,
                source=f"{enc.source} {enc.message_type}",
                at=enc.received_at,
            ).model_dump(mode="json")
            return
        try:
            ctx = StudyContext.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(topics, event, "join.patient", str(exc))
            return
        with tracer.start_as_current_span(
            "join.patient",
            context=context_from_headers(event.headers),
            kind=SpanKind.CONSUMER,
            attributes=_consumed(event, group, **{"radtriage.study_uid": ctx.study.study_uid}),
        ) as span:
            raw = patients.get(ctx.study.patient_id)
            update: dict[str, object] = {"patient_checked": True}
            if raw:
                known = PatientState.model_validate(raw)
                update |= {"patient_class": known.patient_class, "patient_class_source": known.source}
                span.set_attribute("radtriage.patient_class", known.patient_class)
            await _forward_study(ctx.model_copy(update=update), span)

    @app.agent(topics.accession_side, name="join")
    async def join(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await _join_one(event)
            except Exception as exc:
                log.exception("order-study join failed")
                await dead_letter(topics, event, "join.order", f"{type(exc).__name__}: {exc}")

    async def _join_one(event: EventT) -> None:
        is_order = event.message.topic == settings.topics.orders
        try:
            incoming: OrderEvent | StudyContext = (
                OrderEvent.from_bytes(event.value) if is_order else StudyContext.from_bytes(event.value)
            )
        except EventDecodeError as exc:
            await dead_letter(topics, event, "join.order", str(exc))
            return
        key = (
            incoming.accession_number if isinstance(incoming, OrderEvent) else incoming.study.accession_number
        )
        raw = orders.get(key)
        state = AccessionState.model_validate(raw) if raw else None
        now = datetime.now(UTC)
        retention = settings.orders.join_retention_s
        with tracer.start_as_current_span(
            "join.order",
            context=context_from_headers(event.headers),
            kind=SpanKind.CONSUMER,
            attributes=_consumed(
                event,
                group,
                **{"radtriage.side": "order" if is_order else "study", "radtriage.accession_number": key},
            ),
        ) as span:
            if isinstance(incoming, OrderEvent):
                result = on_order(state, incoming, rules, stat_patterns, now, retention)
                span.set_attribute("radtriage.upgrades", len(result.dispatches))
                for dispatch in result.dispatches:
                    joined = result.state.studies[dispatch.request.study_uid]
                    await _dispatch(
                        dispatch, joined.patient_class, joined.patient_class_source, result.state.order
                    )
                for study_uid, lane, decision in result.unchanged:
                    await _audit_unchanged(study_uid, key, lane, decision, result.state.order)
            else:
                span.set_attribute("radtriage.study_uid", incoming.study.study_uid)
                result = on_study(state, incoming, rules, stat_patterns, now, retention)
                for dispatch in result.dispatches:
                    await _dispatch(
                        dispatch, incoming.patient_class, incoming.patient_class_source, result.state.order
                    )
            orders[key] = result.state.model_dump(mode="json")

    async def _audit_unchanged(
        study_uid: str, accession: str, lane: str, decision: LaneDecision, order: OrderEvent | None
    ) -> None:
        detail: dict[str, str | float | int | bool] = {
            "lane": lane,
            "order_would_set": decision.lane,
            "lane_reason": decision.reason,
        }
        if order is not None:
            detail.update(_order_detail(order))
        await publish(
            topics.audit,
            study_uid,
            AuditEvent(
                study_uid=study_uid,
                accession_number=accession,
                stage="route",
                decision="lane_unchanged",
                detail=detail,
            ),
            headers_for_current_span(),
        )

    triton = TritonModelClient(
        settings.triton.grpc_url, settings.triton.timeout_s, settings.triton.grpc_auth_headers()
    )
    gate = LaneRetryGate(settings.triton.lane_priority)
    # Request ids whose finding is being published right now (this worker owns every lane
    # partition of a study: the lane topics are co-partitioned by study UID).
    finishing: set[str] = set()

    async def _already_done(req: TriageRequest, partition: int) -> bool:
        # An upgraded copy of work on a faster lane and the original, or a request replayed
        # after a kill, run the model once between them: the findings topic says which ran.
        return bool(req.request_id) and await findings_ledger.already_sent(req.request_id, partition)

    # Per (study, rule): the ready time of the newest request this worker has taken. A study
    # read again on a better series (streams/routing.decide) must not have its amended
    # finding overtaken by the older read finishing later. In memory: after a restart the
    # worst case is one extra, older report, which the amended one follows.
    latest_read: dict[tuple[str, str], datetime] = {}

    def _note_latest(req: TriageRequest) -> None:
        key = (req.study_uid, req.rule_id)
        if key not in latest_read or latest_read[key] < req.ready_at:
            latest_read[key] = req.ready_at
        if len(latest_read) > 10_000:  # bounded: the oldest studies are long finished
            for old in sorted(latest_read, key=latest_read.__getitem__)[:1_000]:
                del latest_read[old]

    def _superseded(req: TriageRequest) -> bool:
        newest = latest_read.get((req.study_uid, req.rule_id))
        return newest is not None and newest > req.ready_at

    async def _audit_skip(req: TriageRequest, lane: str, decision: str = "skipped_already_done") -> None:
        await publish(
            topics.audit,
            req.study_uid,
            AuditEvent(
                study_uid=req.study_uid,
                accession_number=req.accession_number,
                stage="infer",
                decision=decision,
                detail={"request_id": req.request_id, "lane": lane, "rule": req.rule_id},
            ),
            headers_for_current_span(),
        )

    async def _infer_one(event: EventT, lane: str) -> None:
        try:
            req = TriageRequest.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(topics, event, f"infer.{lane}", str(exc))
            return
        if await _already_done(req, event.message.partition):
            await _audit_skip(req, lane)
            return
        _note_latest(req)
        if _superseded(req):
            await _audit_skip(req, lane, "skipped_superseded")
            return
        priority = settings.triton.lane_priority[req.lane]
        with tracer.start_as_current_span(
            "infer",
            context=context_from_headers(event.headers),
            kind=SpanKind.CONSUMER,
            attributes=_consumed(
                event,
                group,
                **{
                    "radtriage.study_uid": req.study_uid,
                    "radtriage.lane": lane,
                    "radtriage.rule": req.rule_id,
                    "radtriage.model": req.model_name,
                    "triton.priority": priority,
                },
            ),
        ) as span:
            try:
                with tracer.start_as_current_span(
                    "preprocess",
                    attributes={
                        "radtriage.model": req.model_name,
                        "radtriage.instances": len(req.instance_uris),
                    },
                ):
                    prep_started = time.monotonic()
                    paths = [blobs.path_of(uri) for uri in req.instance_uris]
                    tensor, geometry = await preprocess.prepare(lane, req.model_name, paths)
                    metrics.observe_preprocess(lane, req.model_name, time.monotonic() - prep_started)
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
            try:
                while True:
                    # Bounded by our own deadline: a lane starved by a long stat outage
                    # still makes its last attempt and dead-letters in bounded time.
                    if gate.blocked(lane):
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(gate.wait_turn(lane), max(deadline - time.monotonic(), 0))
                    try:
                        with tracer.start_as_current_span(
                            "triton.infer",
                            kind=SpanKind.CLIENT,
                            attributes={
                                "attempt": attempt,
                                "radtriage.model": req.model_name,
                                "triton.model_name": req.model_name,
                                "triton.priority": priority,
                                "server.address": settings.triton.grpc_url,
                            },
                        ) as triton_span:
                            result = await triton.infer_probability(
                                req.model_name, tensor, priority, trace_carrier(), req.model_version
                            )
                            # Triton returns no per-request queue/compute time (only cumulative
                            # statistics); the client-side round trip is what we have.
                            triton_span.set_attribute("triton.model_version", result.model_version)
                            triton_span.set_attribute("triton.client_ms", round(result.elapsed_ms, 3))
                            metrics.observe_triton(lane, req.model_name, result.elapsed_ms / 1000.0)
                        break
                    except InferenceError as exc:
                        metrics.count_triton_failure(lane, req.model_name)
                        delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                        attempt += 1
                        if attempt == 1:
                            gate.retrying(lane, +1)
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
                        log.warning(
                            "Triton attempt %d for %s failed (%s); retrying", attempt, req.study_uid, exc
                        )
                        await asyncio.sleep(delay)
            finally:
                if attempt:
                    gate.retrying(lane, -1)
            positive = result.probability >= req.threshold
            side = side_of(result.outputs, positive)
            try:
                slices = localise(result.maps, geometry, positive, req.localisation_threshold)
            except ValueError as exc:  # a malformed map costs the finding its range, not the study
                log.warning("no slice range for %s: %s", req.study_uid, exc)
                slices = None
            try:
                birads = birads_of(result.maps, req.threshold, positive)
            except ValueError as exc:  # likewise: the probability stands without a category
                log.warning("no BI-RADS category for %s: %s", req.study_uid, exc)
                birads = None
            try:
                nodules = nodules_of(result.maps, geometry, req.threshold, positive)
            except ValueError as exc:  # likewise: the probability stands without the list
                log.warning("no nodule list for %s: %s", req.study_uid, exc)
                nodules = None
            finding = Finding(
                study_uid=req.study_uid,
                accession_number=req.accession_number,
                patient_id=req.patient_id,
                series_uid=req.series_uid,
                finding=req.finding,
                probability=result.probability,
                threshold=req.threshold,
                positive=positive,
                model_name=req.model_name,
                model_version=result.model_version,
                lane=req.lane,
                rule_id=req.rule_id,
                received_at=req.received_at,
                ready_at=req.ready_at,
                inference_ms=result.elapsed_ms,
                request_id=req.request_id,
                laterality=side.laterality,
                laterality_probability=side.probability,
                slice_range=slices,
                birads=birads,
                nodules=nodules,
                series_number=req.series_number,
                series_description=req.series_description,
                amends_request_id=req.amends_request_id,
            )
            span.set_attribute("radtriage.probability", finding.probability)
            span.set_attribute("radtriage.positive", finding.positive)
            # The other lane's copy of this request may have finished while we inferred:
            # claim first (no await before it), then check, so only one finding goes out.
            if req.request_id in finishing:
                await _audit_skip(req, lane)
                return
            if _superseded(req):
                # A better series of this study was taken while this one ran.
                await _audit_skip(req, lane, "skipped_superseded")
                return
            if req.request_id:
                finishing.add(req.request_id)
            headers = headers_for_current_span()
            try:
                if await _already_done(req, event.message.partition):
                    await _audit_skip(req, lane)
                    return
                await publish(topics.findings, req.study_uid, finding, headers)
                _crash_if("crash_after_finding", req.request_id)
                metrics.observe_finding(lane, req, finding)
                if req.request_id:
                    findings_ledger.record(req.request_id)
            finally:
                finishing.discard(req.request_id)
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
                    with metrics.REQUESTS_IN_FLIGHT.labels(lane).track_inprogress():
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
                    attributes=_consumed(
                        event,
                        group,
                        **{
                            "radtriage.study_uid": finding.study_uid,
                            "radtriage.finding": finding.finding,
                            "radtriage.model": finding.model_name,
                        },
                    ),
                ) as span:
                    if finding.request_id and await reports_ledger.already_sent(
                        finding.request_id, event.message.partition
                    ):
                        # Replayed after a kill: its report is already on the results topic.
                        span.set_attribute("radtriage.duplicate", True)
                        continue
                    result = FhirResult(
                        study_uid=finding.study_uid,
                        accession_number=finding.accession_number,
                        finding=finding.finding,
                        bundle=build_result_bundle(finding),
                        request_id=finding.request_id,
                    )
                    await publish(topics.results_fhir, finding.study_uid, result, headers_for_current_span())
                    _crash_if("crash_after_report", finding.request_id)
                    if finding.request_id:
                        reports_ledger.record(finding.request_id)
                    metrics.observe_report(finding, result)
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
            # Processing a finding record; the alert's own PRODUCER span is its child.
            kind=SpanKind.CONSUMER,
            attributes=_consumed(
                event,
                group,
                **{
                    "radtriage.study_uid": finding.study_uid,
                    "radtriage.finding": finding.finding,
                    "radtriage.lane": finding.lane,
                    "radtriage.model": finding.model_name,
                    "radtriage.probability": finding.probability,
                },
            ),
        ) as span:
            if await ledger.already_sent(key, event.message.partition):
                span.set_attribute("radtriage.duplicate", True)
                decision = "alert_suppressed_duplicate"
                metrics.ALERTS_SUPPRESSED.labels(finding.finding).inc()
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
                    laterality=finding.laterality,
                    laterality_probability=finding.laterality_probability,
                    slice_range=finding.slice_range,
                )
                await publish(topics.alerts[channel], finding.study_uid, alert, headers_for_current_span())
                _crash_if("crash_after_alert", key)
                ledger.record(key)
                decision = "alert_sent"
                metrics.observe_alert(alert)
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

    preprocess = LanePools(settings.streams.lane_concurrency, settings.streams.preprocess_niceness)

    async def warm() -> None:
        """Every lane able to serve at once: its preprocessing processes started (torch and
        MONAI imported) and every routed model run once in Triton. The worker reports
        ready only after this (radtriage/worker.py), so the first study is as fast as the
        tenth. A model Triton cannot serve yet is logged, not fatal: the lanes retry it."""
        started = time.monotonic()
        await asyncio.gather(*(preprocess.warm(lane) for lane in settings.streams.lane_concurrency))
        for rule in {(r.model, r.model_version): r for r in rules.rules}.values():
            try:
                ms = await triton.warm(rule.model, rule.model_version, settings.triton.lane_priority["stat"])
                log.info("model %s v%s warmed in %.0f ms", rule.model, rule.model_version or "latest", ms)
            except InferenceError as exc:
                log.warning("model %s not warmed: %s", rule.model, exc)
        log.info("lanes warm in %.1f s", time.monotonic() - started)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    def _stop_pools(sender: Any, **kwargs: Any) -> None:
        preprocess.shutdown()

    @app.task
    async def _log_start() -> None:
        log.info(
            "radtriage streams started (rules: %s, %d rule(s))", settings.routing_rules, len(rules.rules)
        )

    _ = (assemble, route, patient_context, join, report, escalate, quiet_period_scan)
    return Pipeline(app=app, topics=topics, settings=settings, warm=warm)


def _order_detail(order: OrderEvent) -> dict[str, str | float | int | bool]:
    """The order a lane decision came from, for the audit trail: ids and codes, no PHI."""
    detail: dict[str, str | float | int | bool] = {
        "order_source": order.source,
        "order_message_type": order.message_type,
        "order_message_id": order.source_message_id,
        "order_status": order.status,
        "order_priority": order.priority or "unstated",
    }
    for name in ("placer_order_number", "filler_order_number", "procedure_code", "priority_field"):
        value = getattr(order, name)
        if value:
            detail[f"order_{name}" if not name.startswith("order") else name] = value
    if order.indication:
        detail["order_indication"] = order.indication
    return detail


def _traceparent(headers: Any) -> str:
    if not headers:
        return ""
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if str(k).lower() == "traceparent":
            return v.decode() if isinstance(v, bytes | bytearray) else str(v)
    return ""
