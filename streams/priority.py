"""Priority decisions: which lane a study's work takes, from its order and the patient's location.

Pure functions (ARCHITECTURE.md, "Priority"):
- stat: the order says STAT, or its indication is a code stroke / trauma activation,
  or a time-critical exam (a non-contrast head CT) of an emergency patient whose order
  has not arrived yet;
- urgent: ASAP/urgent orders, emergency-department and inpatient work;
- routine: everything else;
- nothing known yet (no order, no patient location): the routing rule's own lane, so a
  head CT from an unknown source is screened as stat rather than risk a late bleed.

Lanes only ever go up once work is queued: a later order can upgrade a study's lane,
never downgrade it (the work is already waiting in the faster lane).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from schemas.orders import OrderEvent, PatientClass
from schemas.requests import Lane

LANE_RANK: dict[str, int] = {"routine": 0, "urgent": 1, "stat": 2}

# Message types that are orders proper; an ImagingStudy only links a study to one.
ORDER_MESSAGE_TYPES = frozenset({"ORM^O01", "OMI^O23", "ServiceRequest"})


def higher(a: Lane, b: Lane) -> bool:
    """True if lane `a` is faster than lane `b`."""
    return LANE_RANK[a] > LANE_RANK[b]


@dataclass(frozen=True)
class LaneDecision:
    lane: Lane
    # Plain words for the audit trail and the operator: why this lane.
    reason: str
    # What the decision rested on: "order", "indication", "patient_class", "rule_default".
    basis: str


@lru_cache(maxsize=32)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def stat_indication(text: str, patterns: Sequence[str]) -> str:
    """The part of an indication that makes a study stat ("code stroke"), or ""."""
    for pattern in _compiled(tuple(patterns)):
        m = pattern.search(text)
        if m:
            return m.group(0)
    return ""


def merge_order(current: OrderEvent | None, update: OrderEvent) -> OrderEvent:
    """Fold a newer order-side event into what is known about an accession.

    Fields the update states win; fields it leaves unstated (empty, `priority=None`,
    patient class "unknown") keep what earlier events said. Only an order message can
    change the order's status: an ImagingStudy posted after a cancellation does not
    revive the order.
    """
    if current is None:
        return update
    merged = current.model_dump()
    for name, value in update.model_dump().items():
        if name in {"schema_version", "accession_number"}:
            continue
        if name == "status":
            if update.message_type in ORDER_MESSAGE_TYPES:
                merged[name] = value
            continue
        if name == "patient_class" and value == "unknown":
            continue
        if value in ("", None, ()):
            continue
        merged[name] = value
    # The order's identity stays the order message's, not a later ImagingStudy's.
    if update.message_type not in ORDER_MESSAGE_TYPES and current.message_type in ORDER_MESSAGE_TYPES:
        for name in ("message_type", "source", "source_message_id"):
            merged[name] = getattr(current, name)
    return OrderEvent.model_validate(merged)


def decide_lane(
    *,
    rule_lane: Lane,
    time_critical: bool,
    order: OrderEvent | None,
    patient_class: PatientClass = "unknown",
    patient_class_source: str = "",
    stat_patterns: Sequence[str] = (),
) -> LaneDecision:
    """The lane for one routed series, given everything known about its study right now."""
    active = order if order is not None and order.status != "cancelled" else None
    if active is not None:
        where = f"{active.source} {active.message_type}"
        if active.priority == "stat":
            raw = f" ({active.priority_field} = {active.priority_raw})" if active.priority_field else ""
            return LaneDecision("stat", f"order priority STAT{raw}, {where}", "order")
        hit = stat_indication(active.indication, stat_patterns)
        if hit:
            return LaneDecision("stat", f"indication '{hit}', {where}", "indication")
        if active.priority in ("asap", "urgent"):
            return LaneDecision("urgent", f"order priority {active.priority.upper()}, {where}", "order")
        pclass = active.patient_class if active.patient_class != "unknown" else patient_class
        if pclass in ("emergency", "inpatient"):
            return LaneDecision("urgent", f"{pclass} patient, order {where}", "patient_class")
        if active.priority == "routine" or pclass == "outpatient":
            who = "" if pclass == "unknown" else f" for an {pclass}"
            return LaneDecision("routine", f"routine order{who}, {where}", "order")
        # An order-side event without a priority (an ImagingStudy alone) says too little.
    if patient_class == "emergency" and time_critical:
        return LaneDecision(
            "stat",
            f"emergency patient ({patient_class_source or 'location'}), no order yet: time-critical exam",
            "patient_class",
        )
    if patient_class in ("emergency", "inpatient"):
        return LaneDecision(
            "urgent",
            f"{patient_class} patient ({patient_class_source or 'location'}), no order yet",
            "patient_class",
        )
    if patient_class == "outpatient":
        return LaneDecision(
            "routine", f"outpatient ({patient_class_source or 'location'}), no order yet", "patient_class"
        )
    if order is not None and order.status == "cancelled":
        return LaneDecision(rule_lane, "order cancelled; routing rule's default lane", "rule_default")
    return LaneDecision(
        rule_lane, "no order or patient location yet; routing rule's default lane", "rule_default"
    )
