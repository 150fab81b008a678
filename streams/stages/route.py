"""Route: `imaging.studies` -> the join's repartition topics (or straight to a lane).

Which rules read which series of the study (streams/routing.py: series selection), and,
against what each rule already read of it (table `routed-series`), whether anything runs
at all: a study arrives again after every per-series association, and is read once per
rule or amended when a preferred series came later (docs/ARCHITECTURE.md, One decision
per study and rule). A study no rule takes is `unrouted` on `triage.audit`. What runs
goes on to the join stages (patient location, then order), or, with no ids to join on,
straight to its lane.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from faust.types import EventT
from opentelemetry import trace

from radtriage import metrics
from radtriage.telemetry import headers_for_current_span
from schemas.base import EventDecodeError
from schemas.join import StudyContext
from schemas.studies import StudyEvent
from streams.app import dead_letter, publish
from streams.join import route_with_context
from streams.routing import RoutedSeries, decide, request_id, route_study
from streams.stages.common import Detail, audit, consumer_span, each
from streams.stages.context import PipelineContext
from streams.stages.dispatch import dispatch

log = logging.getLogger("streams.agents")


async def forward_study(ctx: PipelineContext, study_ctx: StudyContext, span: trace.Span) -> None:
    """Send a routable study on to the next join stage its ids allow, or route it now.

    Patient id first (the ADT location table), then accession number (the order table);
    a study with neither is routed on what the rules say.
    """
    study, topics = study_ctx.study, ctx.topics
    if study.patient_id and not study_ctx.patient_checked:
        span.set_attribute("radtriage.join", "by_patient")
        await publish(topics.studies_by_patient, study.patient_id, study_ctx, headers_for_current_span())
    elif study.accession_number:
        span.set_attribute("radtriage.join", "by_accession")
        await publish(
            topics.studies_by_accession, study.accession_number, study_ctx, headers_for_current_span()
        )
    else:
        span.set_attribute("radtriage.join", "none")
        for decided in route_with_context(study_ctx, ctx.rules, None, ctx.stat_patterns):
            await dispatch(ctx, decided, study_ctx.patient_class, study_ctx.patient_class_source, None)


def register(ctx: PipelineContext) -> None:
    # Per study: what each rule last read (streams/routing.RoutedSeries).
    routed_series = ctx.tables["routed-series"] = ctx.app.Table("routed-series", default=None)

    async def route_one(event: EventT[Any]) -> None:
        try:
            study = StudyEvent.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(ctx.topics, event, "route", str(exc))
            return
        attrs = {"radtriage.study_uid": study.study_uid, "radtriage.accession_number": study.accession_number}
        with consumer_span(ctx, "route", event, attrs=attrs) as span:
            routes = route_study(study, ctx.rules)
            if not routes:
                metrics.STUDIES_UNROUTED.inc()
                span.set_attribute("radtriage.route", "unrouted")
                await audit_unrouted(study)
                return
            raw = routed_series.get(study.study_uid) or {}
            previous = {rule_id: RoutedSeries.model_validate(v) for rule_id, v in raw.items()}
            decision = decide(routes, previous)
            for rule_id in decision.unchanged:
                await audit_unchanged(study, rule_id, previous[rule_id])
            if not decision.run:
                span.set_attribute("radtriage.route", "unchanged")
                return
            await forward_study(ctx, StudyContext(study=study, run_rules=decision.run), span)
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

    async def audit_unrouted(study: StudyEvent) -> None:
        series = "; ".join(
            f"{s.modality}/{s.body_part or '-'}/{s.series_description or '-'}" for s in study.series
        )
        detail: Detail = {"reason": "no routing rule matches any series", "series": series}
        await audit(ctx, study.study_uid, study.accession_number, "route", "unrouted", detail)

    async def audit_unchanged(study: StudyEvent, rule_id: str, before: RoutedSeries) -> None:
        # Logged as well as audited: nothing runs for this arrival of the study.
        log.info(
            "study %s: rule %s already read series %s (%d images, %s); nothing to re-run",
            study.study_uid,
            rule_id,
            before.series_uid,
            before.instances,
            before.request_id,
        )
        detail: Detail = {
            "rule": rule_id,
            "series_uid": before.series_uid,
            "instances": before.instances,
            "request_id": before.request_id,
            "reason": "the series the rule prefers was already read; nothing to re-run",
        }
        await audit(ctx, study.study_uid, study.accession_number, "route", "series_unchanged", detail)

    @ctx.app.agent(ctx.topics.studies, name="route")
    async def route(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, "route", route_one)

    _ = route
