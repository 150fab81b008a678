"""Publishing a routing decision: the request on its lane, the decision on `triage.audit`.

Shared by the route stage (a study with no ids to join on) and the join stages (the
patient's location, the order) — whichever decides a study's lane publishes it here.
"""

from __future__ import annotations

from opentelemetry import trace

from radtriage import metrics
from radtriage.telemetry import headers_for_current_span
from schemas.orders import OrderEvent, PatientClass
from streams.app import publish
from streams.join import Dispatch
from streams.stages.common import Detail, audit
from streams.stages.context import PipelineContext


def order_detail(order: OrderEvent) -> Detail:
    """The order a lane decision came from, for the audit trail: ids and codes, no PHI."""
    detail: Detail = {
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


async def dispatch(
    ctx: PipelineContext,
    decided: Dispatch,
    patient_class: PatientClass,
    patient_class_source: str,
    order: OrderEvent | None,
) -> None:
    """Publish one request on its lane and the decision on the audit topic."""
    req = decided.request
    span = trace.get_current_span()
    span.set_attribute("radtriage.rule", req.rule_id)
    span.set_attribute("radtriage.lane", req.lane)
    span.set_attribute("radtriage.lane_basis", decided.decision.basis)
    await publish(ctx.topics.lanes[req.lane], req.study_uid, req, headers_for_current_span())
    metrics.observe_routed(req.lane, req.model_name, decided.action, req.ready_at, req.routed_at)
    detail: Detail = {
        "rule": req.rule_id,
        "lane": req.lane,
        "lane_reason": decided.decision.reason,
        "lane_basis": decided.decision.basis,
        "model": req.model_name,
        "series_uid": req.series_uid,
        "instances": len(req.instance_uris),
        "request_id": req.request_id,
    }
    if req.amends_request_id:
        detail["amends_request_id"] = req.amends_request_id
    if req.upgraded_from:
        detail["upgraded_from"] = req.upgraded_from
    if patient_class != "unknown":
        detail["patient_class"] = patient_class
        detail["patient_class_source"] = patient_class_source
    if order is not None:
        detail.update(order_detail(order))
    await audit(ctx, req.study_uid, req.accession_number, "route", decided.action, detail)
