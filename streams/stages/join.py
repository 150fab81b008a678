"""Join: what the hospital says about a study's patient and order decides its lane.

- `patient-context`: `imaging.encounters` (ADT) + `<app>-studies-by-patient` -> the
  patient's location class (table `patient-location`), then on to the order join;
- `join`: `imaging.orders` + `<app>-studies-by-accession` -> `triage.requests.<lane>`,
  with the order known so far (table `orders-by-accession`); an order arriving after its
  study moves that work up (`lane_upgraded`), never down.

The pure decisions are in streams/join.py and streams/priority.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT

from schemas.base import EventDecodeError
from schemas.encounters import EncounterEvent
from schemas.join import StudyContext
from schemas.orders import OrderEvent
from streams.app import dead_letter
from streams.join import AccessionState, PatientState, on_order, on_study
from streams.priority import LaneDecision
from streams.stages.common import Detail, audit, consumer_span, each
from streams.stages.context import PipelineContext
from streams.stages.dispatch import dispatch, order_detail
from streams.stages.route import forward_study


class Join:
    """The two agents' steps; `register` wires them to the app."""

    def __init__(self, ctx: PipelineContext, orders: Any, patients: Any) -> None:
        self.ctx, self.settings, self.topics = ctx, ctx.settings, ctx.topics
        self.orders, self.patients = orders, patients

    async def patient_context_one(self, event: EventT[Any]) -> None:
        if event.message.topic == self.settings.topics.encounters:
            try:
                enc = EncounterEvent.from_bytes(event.value)
            except EventDecodeError as exc:
                await dead_letter(self.topics, event, "join.patient", str(exc))
                return
            self.patients[enc.patient_id] = PatientState(
                patient_class=enc.patient_class, source=f"{enc.source} {enc.message_type}", at=enc.received_at
            ).model_dump(mode="json")
            return
        try:
            study_ctx = StudyContext.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(self.topics, event, "join.patient", str(exc))
            return
        with consumer_span(
            self.ctx, "join.patient", event, attrs={"radtriage.study_uid": study_ctx.study.study_uid}
        ) as span:
            raw = self.patients.get(study_ctx.study.patient_id)
            update: dict[str, object] = {"patient_checked": True}
            if raw:
                known = PatientState.model_validate(raw)
                update |= {"patient_class": known.patient_class, "patient_class_source": known.source}
                span.set_attribute("radtriage.patient_class", known.patient_class)
            await forward_study(self.ctx, study_ctx.model_copy(update=update), span)

    async def join_one(self, event: EventT[Any]) -> None:
        is_order = event.message.topic == self.settings.topics.orders
        try:
            incoming: OrderEvent | StudyContext = (
                OrderEvent.from_bytes(event.value) if is_order else StudyContext.from_bytes(event.value)
            )
        except EventDecodeError as exc:
            await dead_letter(self.topics, event, "join.order", str(exc))
            return
        key = (
            incoming.accession_number if isinstance(incoming, OrderEvent) else incoming.study.accession_number
        )
        raw = self.orders.get(key)
        state = AccessionState.model_validate(raw) if raw else None
        side = {"radtriage.side": "order" if is_order else "study", "radtriage.accession_number": key}
        with consumer_span(self.ctx, "join.order", event, attrs=side) as span:
            if isinstance(incoming, OrderEvent):
                new = await self.order_came(incoming, key, state, span)
            else:
                new = await self.study_came(incoming, state, span)
            self.orders[key] = new.model_dump(mode="json")

    async def order_came(
        self, order: OrderEvent, key: str, state: AccessionState | None, span: Any
    ) -> AccessionState:
        ctx, now = self.ctx, datetime.now(UTC)
        result = on_order(
            state, order, ctx.rules, ctx.stat_patterns, now, self.settings.orders.join_retention_s
        )
        span.set_attribute("radtriage.upgrades", len(result.dispatches))
        for decided in result.dispatches:
            joined = result.state.studies[decided.request.study_uid]
            await dispatch(
                ctx, decided, joined.patient_class, joined.patient_class_source, result.state.order
            )
        for study_uid, lane, decision in result.unchanged:
            await self.audit_unchanged(study_uid, key, lane, decision, result.state.order)
        return result.state

    async def study_came(
        self, incoming: StudyContext, state: AccessionState | None, span: Any
    ) -> AccessionState:
        ctx, now = self.ctx, datetime.now(UTC)
        span.set_attribute("radtriage.study_uid", incoming.study.study_uid)
        result = on_study(
            state, incoming, ctx.rules, ctx.stat_patterns, now, self.settings.orders.join_retention_s
        )
        for decided in result.dispatches:
            await dispatch(
                ctx, decided, incoming.patient_class, incoming.patient_class_source, result.state.order
            )
        return result.state

    async def audit_unchanged(
        self, study_uid: str, accession: str, lane: str, decision: LaneDecision, order: OrderEvent | None
    ) -> None:
        detail: Detail = {"lane": lane, "order_would_set": decision.lane, "lane_reason": decision.reason}
        if order is not None:
            detail.update(order_detail(order))
        await audit(self.ctx, study_uid, accession, "route", "lane_unchanged", detail)


def register(ctx: PipelineContext) -> None:
    orders = ctx.tables["orders-by-accession"] = ctx.app.Table("orders-by-accession", default=None)
    patients = ctx.tables["patient-location"] = ctx.app.Table("patient-location", default=None)
    stage = Join(ctx, orders, patients)

    @ctx.app.agent(ctx.topics.patient_side, name="patient-context")
    async def patient_context(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, "join.patient", stage.patient_context_one)

    @ctx.app.agent(ctx.topics.accession_side, name="join")
    async def join(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, "join.order", stage.join_one)

    _ = (patient_context, join)
