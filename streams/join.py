"""The order-study join: what is known per accession number, and what changes when more arrives.

Orders (`imaging.orders`) and studies meet in one Faust table keyed by accession
number, whichever comes first:
- a study arriving after its order is routed at once on the lane the order sets;
- a study arriving first is routed on what is known (patient location, the rule's
  default lane) and remembered with its requests, so that an order arriving later
  can still move that work up to a faster lane (never down).

Everything here is pure: `on_study` and `on_order` take the table's state and return
the new state plus what to publish; `streams/agents.py` does the publishing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from schemas.join import StudyContext
from schemas.orders import OrderEvent, PatientClass
from schemas.requests import Lane, OrderRef, TriageRequest
from schemas.routing_rules import RoutingRules
from streams.priority import LaneDecision, decide_lane, higher, merge_order
from streams.routing import Route, build_request, request_id, route_study


class JoinedStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_uid: str
    patient_class: PatientClass = "unknown"
    patient_class_source: str = ""
    # The requests issued for this study, per rule, on their current lane.
    requests: dict[str, TriageRequest] = Field(default_factory=dict)
    joined_at: datetime


class AccessionState(BaseModel):
    """One row of the join table."""

    model_config = ConfigDict(extra="forbid")

    accession_number: str
    order: OrderEvent | None = None
    # How many order-side events were merged into `order`.
    order_events: int = 0
    studies: dict[str, JoinedStudy] = Field(default_factory=dict)


class PatientState(BaseModel):
    """One row of the patient-location table (from ADT), keyed by patient id."""

    model_config = ConfigDict(extra="forbid")

    patient_class: PatientClass
    source: str
    at: datetime


@dataclass(frozen=True)
class Dispatch:
    """A request to publish on its lane, with the decision that put it there."""

    request: TriageRequest
    decision: LaneDecision
    # "routed" for a study's first routing, "reread_better_series" when a series the rule
    # prefers arrived after it was read, "lane_upgraded" when a late order moved it.
    action: str


@dataclass
class JoinResult:
    state: AccessionState
    dispatches: list[Dispatch] = field(default_factory=list)
    # Studies whose lane a late order confirmed but did not change (for the audit trail).
    unchanged: list[tuple[str, str, LaneDecision]] = field(default_factory=list)


def _working_copy(
    state: AccessionState | None, accession_number: str, now: datetime, retention_s: float
) -> AccessionState:
    """A copy to change (the caller's state stays as it was), or a new accession's state,
    without the studies joined longer than `retention_s` ago."""
    state = (
        state.model_copy(deep=True)
        if state is not None
        else AccessionState(accession_number=accession_number)
    )
    cutoff = now - timedelta(seconds=retention_s)
    for uid in [u for u, s in state.studies.items() if s.joined_at < cutoff]:
        del state.studies[uid]
    return state


def decide_for_route(
    route: Route,
    order: OrderEvent | None,
    patient_class: PatientClass,
    patient_class_source: str,
    stat_patterns: Sequence[str],
) -> LaneDecision:
    return decide_lane(
        rule_lane=route.rule.lane,
        time_critical=route.rule.time_critical,
        order=order,
        patient_class=patient_class,
        patient_class_source=patient_class_source,
        stat_patterns=stat_patterns,
    )


def patient_class_of(known: PatientClass, order: OrderEvent | None) -> PatientClass:
    """Where the patient is, for the request (and so the alert): ADT's, else the order's."""
    if known == "unknown" and order is not None:
        return order.patient_class
    return known


def route_with_context(
    ctx: StudyContext,
    rules: RoutingRules,
    order: OrderEvent | None,
    stat_patterns: Sequence[str],
) -> list[Dispatch]:
    """Route a study and set each route's lane from its order and the patient's location."""
    dispatches = []
    for route in route_study(ctx.study, rules):
        if ctx.run_rules is not None and route.rule.id not in ctx.run_rules:
            continue  # this series was already read for the rule (streams/routing.decide)
        amends = ctx.run_rules.get(route.rule.id, "") if ctx.run_rules is not None else ""
        decision = decide_for_route(route, order, ctx.patient_class, ctx.patient_class_source, stat_patterns)
        request = build_request(ctx.study, Route(rule=route.rule, series=route.series, lane=decision.lane))
        request = request.model_copy(
            update={
                "request_id": request_id(ctx.study.study_uid, route.rule.id, ctx.study.ready_at),
                "lane_reason": decision.reason,
                "amends_request_id": amends,
                "order": OrderRef.of(order) if order is not None else None,
                "patient_class": patient_class_of(ctx.patient_class, order),
            }
        )
        dispatches.append(Dispatch(request, decision, "reread_better_series" if amends else "routed"))
    return dispatches


def on_study(
    state: AccessionState | None,
    ctx: StudyContext,
    rules: RoutingRules,
    stat_patterns: Sequence[str],
    now: datetime,
    retention_s: float,
) -> JoinResult:
    """A study arrived for this accession: route it with the order known so far, remember it."""
    state = _working_copy(state, ctx.study.accession_number, now, retention_s)
    dispatches = route_with_context(ctx, rules, state.order, stat_patterns)
    if dispatches:
        # A study read again on a better series keeps the other rules' requests: a late
        # order must still be able to move those up.
        before = state.studies.get(ctx.study.study_uid)
        state.studies[ctx.study.study_uid] = JoinedStudy(
            study_uid=ctx.study.study_uid,
            patient_class=ctx.patient_class,
            patient_class_source=ctx.patient_class_source,
            requests=(before.requests if before else {}) | {d.request.rule_id: d.request for d in dispatches},
            joined_at=now,
        )
    return JoinResult(state, dispatches)


def on_order(
    state: AccessionState | None,
    order: OrderEvent,
    rules: RoutingRules,
    stat_patterns: Sequence[str],
    now: datetime,
    retention_s: float,
) -> JoinResult:
    """An order-side event arrived: merge it, and move already-routed work up if it now deserves it."""
    state = _working_copy(state, order.accession_number, now, retention_s)
    state.order = merge_order(state.order, order)
    state.order_events += 1
    result = JoinResult(state)
    by_id = {r.id: r for r in rules.rules}
    for study in state.studies.values():
        for rule_id, request in list(study.requests.items()):
            rule = by_id.get(rule_id)
            if rule is None:  # the rules changed since; leave that work where it is
                continue
            decision = decide_lane(
                rule_lane=rule.lane,
                time_critical=rule.time_critical,
                order=state.order,
                patient_class=study.patient_class,
                patient_class_source=study.patient_class_source,
                stat_patterns=stat_patterns,
            )
            if higher(decision.lane, request.lane):
                upgraded = request.model_copy(
                    update={
                        "lane": decision.lane,
                        "lane_reason": decision.reason,
                        "upgraded_from": request.lane,
                        "routed_at": now,
                        "order": OrderRef.of(state.order),
                        "patient_class": patient_class_of(study.patient_class, state.order),
                    }
                )
                study.requests[rule_id] = upgraded
                result.dispatches.append(Dispatch(upgraded, decision, "lane_upgraded"))
            else:
                result.unchanged.append((study.study_uid, request.lane, decision))
    return result


def lane_of(dispatch: Dispatch) -> Lane:
    return dispatch.request.lane
