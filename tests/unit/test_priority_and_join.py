"""Lane decisions from orders and patient location, and the order-study join's state (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from radtriage.settings import REPO_ROOT, OrderSettings
from schemas.join import StudyContext
from schemas.orders import OrderEvent
from schemas.routing_rules import RoutingRules
from schemas.studies import SeriesRef, StudyEvent
from streams.join import AccessionState, on_order, on_study
from streams.priority import decide_lane, merge_order, stat_indication

RULES = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")
PATTERNS = tuple(OrderSettings().stat_indications)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def order(**kw: object) -> OrderEvent:
    base: dict[str, object] = {
        "accession_number": "ACC1",
        "message_type": "ORM^O01",
        "source": "hl7",
        "source_message_id": "MSG1",
    }
    return OrderEvent.model_validate(base | kw)


def head_ct(uid: str = "1.2.3", accession: str = "ACC1", ready: datetime = NOW) -> StudyContext:
    series = SeriesRef(
        series_uid=uid + ".1",
        modality="CT",
        body_part="HEAD",
        series_description="CT HEAD WO CONTRAST",
        instance_uris=tuple(f"file:///b/{i}.dcm" for i in range(20)),
    )
    study = StudyEvent(
        study_uid=uid,
        accession_number=accession,
        patient_id="MRN1",
        series=(series,),
        received_at=ready,
        ready_at=ready,
        ready_reason="transfer_complete",
    )
    return StudyContext(study=study, patient_checked=True)


def lane(**kw: object) -> str:
    args: dict[str, object] = {"rule_lane": "routine", "time_critical": False, "order": None}
    return decide_lane(**(args | kw), stat_patterns=PATTERNS).lane  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "hit"),
    [
        ("CODE STROKE, LKW 14:05", "CODE STROKE"),
        ("code-stroke", "code-stroke"),
        ("Stroke alert: left weakness", "Stroke alert"),
        ("trauma activation level 1", "trauma activation"),
        ("Level 1 trauma, MVC", "Level 1 trauma"),
        ("history of stroke, follow-up", ""),
        ("headache", ""),
    ],
)
def test_stat_indications(text: str, hit: str) -> None:
    assert stat_indication(text, PATTERNS) == hit


def test_order_priority_sets_the_lane() -> None:
    assert lane(order=order(priority="stat")) == "stat"
    assert lane(order=order(priority="asap")) == "urgent"
    assert lane(order=order(priority="urgent")) == "urgent"
    assert lane(order=order(priority="routine"), rule_lane="stat") == "routine"


def test_code_stroke_indication_makes_a_routine_order_stat() -> None:
    assert lane(order=order(priority="routine", indication="R/O bleed - code stroke")) == "stat"


def test_emergency_and_inpatient_work_is_urgent() -> None:
    assert lane(order=order(priority="routine", patient_class="emergency")) == "urgent"
    assert lane(order=order(priority="routine", patient_class="inpatient")) == "urgent"
    # The order does not say where the patient is; ADT does.
    assert lane(order=order(priority="routine"), patient_class="inpatient") == "urgent"
    assert lane(order=order(priority="routine", patient_class="outpatient")) == "routine"


def test_emergency_head_ct_without_an_order_is_stat() -> None:
    assert lane(time_critical=True, patient_class="emergency") == "stat"
    assert lane(time_critical=False, patient_class="emergency") == "urgent"
    assert lane(time_critical=True, patient_class="outpatient", rule_lane="stat") == "routine"


def test_nothing_known_falls_back_to_the_rule() -> None:
    assert lane(rule_lane="stat", time_critical=True) == "stat"
    assert lane(rule_lane="routine") == "routine"


def test_cancelled_orders_do_not_set_priority() -> None:
    assert lane(order=order(priority="stat", status="cancelled"), rule_lane="routine") == "routine"


def test_merge_keeps_stated_fields_and_ignores_unstated_ones() -> None:
    first = order(
        priority="stat", indication="code stroke", patient_class="emergency", placer_order_number="P1"
    )
    study_link = order(message_type="ImagingStudy", source="fhir", priority=None, study_uid="1.2.3")
    merged = merge_order(first, study_link)
    assert (merged.priority, merged.indication, merged.patient_class) == ("stat", "code stroke", "emergency")
    assert merged.study_uid == "1.2.3" and merged.message_type == "ORM^O01"
    changed = merge_order(merged, order(priority="routine", source_message_id="MSG2"))
    assert changed.priority == "routine" and changed.placer_order_number == "P1"
    # An ImagingStudy never revives a cancelled order.
    cancelled = merge_order(first, order(status="cancelled"))
    assert merge_order(cancelled, study_link).status == "cancelled"


def test_order_first_then_study_routes_on_the_orders_lane() -> None:
    res = on_order(None, order(priority="routine", patient_class="outpatient"), RULES, PATTERNS, NOW, 3600)
    assert res.dispatches == []
    res = on_study(res.state, head_ct(), RULES, PATTERNS, NOW, 3600)
    (d,) = res.dispatches
    assert (d.request.lane, d.action, d.decision.basis) == ("routine", "routed", "order")
    assert d.request.request_id.startswith("1.2.3/ct-head-noncontrast-ich/")


def test_late_stat_order_upgrades_work_already_routed() -> None:
    outpatient = head_ct().model_copy(
        update={"patient_class": "outpatient", "patient_class_source": "hl7 ADT^A04"}
    )
    first = on_study(None, outpatient, RULES, PATTERNS, NOW, 3600)
    (routed,) = first.dispatches
    assert routed.request.lane == "routine"
    late = on_order(
        first.state,
        order(priority="stat", priority_field="ORC-7", priority_raw="S"),
        RULES,
        PATTERNS,
        NOW,
        3600,
    )
    (up,) = late.dispatches
    assert (up.action, up.request.lane, up.request.upgraded_from) == ("lane_upgraded", "stat", "routine")
    # Same decision, same identity: the lanes run it once between them.
    assert up.request.request_id == routed.request.request_id
    assert "ORC-7 = S" in up.decision.reason
    # A later routine update never moves it back down.
    again = on_order(late.state, order(priority="routine"), RULES, PATTERNS, NOW, 3600)
    assert again.dispatches == [] and [(u, ln) for u, ln, _ in again.unchanged] == [("1.2.3", "stat")]


def test_unroutable_studies_are_not_remembered_and_old_ones_expire() -> None:
    state = AccessionState(accession_number="ACC1")
    res = on_study(state, head_ct(), RULES, PATTERNS, NOW, 3600)
    assert "1.2.3" in res.state.studies
    later = on_order(res.state, order(priority="stat"), RULES, PATTERNS, NOW + timedelta(hours=2), 3600)
    assert later.state.studies == {} and later.dispatches == []


def test_the_order_known_at_routing_travels_with_the_request() -> None:
    known = order(
        placer_order_number="PL1",
        filler_order_number="FL1",
        patient_id_system="urn:oid:1.2.3",
        patient_id_authority="H",
    )
    res = on_order(None, known, RULES, PATTERNS, NOW, 3600)
    (d,) = on_study(res.state, head_ct(), RULES, PATTERNS, NOW, 3600).dispatches
    assert d.request.order is not None
    assert (d.request.order.placer_order_number, d.request.order.filler_order_number) == ("PL1", "FL1")
    assert (d.request.order.patient_id_system, d.request.order.patient_id_authority) == ("urn:oid:1.2.3", "H")
    # A study routed before its order has none; a late order that moves it up brings it.
    outpatient = head_ct().model_copy(update={"patient_class": "outpatient"})
    first = on_study(None, outpatient, RULES, PATTERNS, NOW, 3600)
    assert first.dispatches[0].request.order is None
    late = on_order(first.state, known.model_copy(update={"priority": "stat"}), RULES, PATTERNS, NOW, 3600)
    (up,) = late.dispatches
    assert up.request.order is not None and up.request.order.placer_order_number == "PL1"
