"""The order-study join on a real Kafka with a real worker: orders and ADT set the lane,
whichever arrives first, and a late STAT order moves queued work to the stat lane."""

from __future__ import annotations

import signal
import time

import pytest
from kafka import KafkaProducer

from radtriage.settings import Settings
from schemas.encounters import EncounterEvent
from schemas.orders import OrderEvent
from tests.integration.harness import Worker, pixelless_series, release
from tests.support.kafka import Tail

pytestmark = pytest.mark.integration


def _send_head_ct(producer: KafkaProducer, topic: str, uid: str, accession: str, patient: str) -> None:
    for ev in pixelless_series(uid, accession_number=accession, patient_id=patient):
        producer.send(topic, key=uid.encode(), value=ev.to_bytes())
    producer.send(topic, key=uid.encode(), value=release(uid)).get(10)


def _stat_order(accession: str, patient: str) -> OrderEvent:
    return OrderEvent(
        accession_number=accession,
        message_type="ORM^O01",
        source="hl7",
        source_message_id=f"MSG-{accession}",
        placer_order_number=f"P-{accession}",
        patient_id=patient,
        procedure_code="CTHEADWO",
        priority="stat",
        priority_raw="S",
        priority_field="ORC-7",
        indication="code stroke",
        patient_class="emergency",
    )


def test_order_first_and_order_late_both_end_in_the_stat_lane(
    worker_env: tuple[dict[str, str], Settings],
) -> None:
    env, settings = worker_env
    t = settings.topics
    worker = Worker(env, settings.home)
    worker.start()
    tail = Tail(
        settings.kafka.bootstrap_servers,
        [t.requests_stat, t.requests_urgent, t.requests_routine, t.audit, t.deadletter],
    )
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    stamp = time.time_ns()
    first, late, ed = f"1.2.826.0.10.{stamp}", f"1.2.826.0.11.{stamp}", f"1.2.826.0.12.{stamp}"
    acc_first, acc_late, acc_ed = f"A{stamp}1", f"A{stamp}2", f"A{stamp}3"

    # 1. STAT code-stroke order first, then the images: routed straight to stat.
    producer.send(t.orders, key=acc_first.encode(), value=_stat_order(acc_first, "MRN-1").to_bytes()).get(10)
    _send_head_ct(producer, t.instances, first, acc_first, "MRN-1")

    # 2. The images first, for a patient ADT says is an outpatient: routine lane; then
    #    the STAT order arrives and the queued work moves up to stat.
    outpatient = EncounterEvent(patient_id="MRN-2", patient_class="outpatient", message_type="ADT^A04")
    producer.send(t.encounters, key=b"MRN-2", value=outpatient.to_bytes()).get(10)
    time.sleep(1.0)  # the ADT must be in the table before the study asks for it
    _send_head_ct(producer, t.instances, late, acc_late, "MRN-2")
    tail.until(lambda: bool(tail.of(t.requests_routine, study_uid=late)))
    producer.send(t.orders, key=acc_late.encode(), value=_stat_order(acc_late, "MRN-2").to_bytes()).get(10)

    # 3. An emergency patient's head CT with no order at all: stat (time-critical exam).
    emergency = EncounterEvent(patient_id="MRN-3", patient_class="emergency", message_type="ADT^A04")
    producer.send(t.encounters, key=b"MRN-3", value=emergency.to_bytes()).get(10)
    time.sleep(1.0)
    _send_head_ct(producer, t.instances, ed, acc_ed, "MRN-3")

    tail.until(
        lambda: (
            all(tail.of(t.requests_stat, study_uid=u) for u in (first, late, ed))
            and len(tail.of(t.audit, study_uid=late)) >= 2
        )
    )
    (req_first,) = tail.of(t.requests_stat, study_uid=first)
    assert "order priority STAT (ORC-7 = S)" in req_first["lane_reason"]
    assert req_first["upgraded_from"] is None

    (routine_late,) = tail.of(t.requests_routine, study_uid=late)
    (stat_late,) = tail.of(t.requests_stat, study_uid=late)
    assert stat_late["upgraded_from"] == "routine"
    assert stat_late["request_id"] == routine_late["request_id"]

    (req_ed,) = tail.of(t.requests_stat, study_uid=ed)
    assert "emergency patient" in req_ed["lane_reason"]
    assert not tail.of(t.requests_routine, study_uid=ed) and not tail.of(t.requests_urgent, study_uid=ed)

    # The audit trail says which lane, why, and which order it came from.
    (routed_first,) = tail.of(t.audit, study_uid=first, decision="routed")
    assert routed_first["detail"]["lane"] == "stat"
    assert routed_first["detail"]["order_message_id"] == f"MSG-{acc_first}"
    assert routed_first["detail"]["order_placer_order_number"] == f"P-{acc_first}"
    (routed_late,) = tail.of(t.audit, study_uid=late, decision="routed")
    assert routed_late["detail"]["lane"] == "routine"
    assert routed_late["detail"]["patient_class_source"] == "hl7 ADT^A04"
    (upgrade,) = tail.of(t.audit, study_uid=late, decision="lane_upgraded")
    assert upgrade["detail"]["lane"] == "stat" and upgrade["detail"]["upgraded_from"] == "routine"
    assert upgrade["detail"]["order_indication"] == "code stroke"

    # A poison order never blocks the join's partition.
    producer.send(t.orders, key=b"poison", value=b'{"accession_number": ""}').get(10)
    producer.send(t.encounters, key=b"poison", value=b"not json").get(10)
    tail.until(lambda: len(tail.of(t.deadletter, key="poison")) == 2)
    assert sorted(d["stage"] for d in tail.of(t.deadletter, key="poison")) == ["join.order", "join.patient"]
    worker.kill(signal.SIGTERM)
