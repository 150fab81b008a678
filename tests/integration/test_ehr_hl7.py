"""Results into the RIS as HL7 v2 (issue 20), through a real worker, Kafka and Triton: a
bleed head CT with its HL7 order (an ORM^O01 parsed by radtriage's own HL7 intake, PID-3
with its assigning authority) comes out as an ORU^R01 over MLLP to a receiver of our own,
carrying the order's placer and filler numbers and the accession, valid for hl7apy at
strict level; its FHIR report points to the order and passes the HAPI validator. A second
study the receiver refuses (AE) is dead-lettered with the receiver's reason."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from connectors.hl7.parse import Accepted, parse_message
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.hl7_oru import strict_parse
from radtriage.settings import Settings
from schemas.orders import OrderEvent
from tests.data.hl7.samples import set_field, text
from tests.integration.harness import Worker
from tests.support.fhir_validator import validate
from tests.support.kafka import Tail
from tests.support.mllp_receiver import MllpReceiver
from tests.support.series import THICK, send_series

pytestmark = pytest.mark.integration

AUTHORITY_OID = "1.2.840.114350.1.13.99"
REFUSAL = "PID-3 MRN unknown to this RIS"


def _order(stamp: int, suffix: str, study: str) -> OrderEvent:
    """The RIS's ORM^O01 for the study, through radtriage's HL7 parser (as the listener would)."""
    orm = text("orm_o01_v2.5.hl7")
    orm = set_field(orm, "PID", 3, f"MRN{stamp}{suffix}^^^GENHOSP&{AUTHORITY_OID}&ISO^MR")
    for seg in ("ORC", "OBR"):
        orm = set_field(orm, seg, 2, f"PL{stamp}{suffix}")
        orm = set_field(orm, seg, 3, f"FL{stamp}{suffix}")
    orm = set_field(orm, "OBR", 18, f"ACC{stamp}{suffix}")
    orm = set_field(orm, "ZDS", 1, f"{study}^RIS^Application^DICOM")
    outcome = parse_message(orm.encode())
    assert isinstance(outcome, Accepted), outcome
    (event,) = outcome.events
    assert isinstance(event, OrderEvent)
    return event


def _field(message: str, segment: str, n: int) -> str:
    seg = next(s for s in message.split("\r") if s.startswith(segment + "|"))
    # MSH-1 is the field separator itself, so MSH's fields sit one place to the left.
    return seg.split("|")[n - 1 if segment == "MSH" else n]


def test_a_bleed_study_with_its_order_reaches_the_ris_as_an_oru_and_a_refusal_is_dead_lettered(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str, tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    stamp = time.time_ns()
    accepted_study, refused_study = f"1.2.826.0.20.{stamp}", f"1.2.826.0.21.{stamp}"
    ok, ae = _order(stamp, "A", accepted_study), _order(stamp, "E", refused_study)

    def policy(message: str) -> tuple[str, str]:
        return ("AE", REFUSAL) if _field(message, "OBR", 18) == ae.accession_number else ("AA", "")

    rng = np.random.default_rng(2020)
    bleed = head_ct_phantom(rng, bleed=True, min_bleed_ml=5.0)
    other = head_ct_phantom(rng, bleed=False)
    files = {
        study: write_ct_series(
            head.hu, head.spacing_zyx, tmp_path / name, study_uid=study, series_uid=study + ".2"
        )
        for study, head, name in ((accepted_study, bleed, "a"), (refused_study, other, "e"))
    }
    with MllpReceiver(policy) as ris:
        env = {
            **env,
            "RADTRIAGE_TRITON__GRPC_URL": triton_grpc_url,
            "RADTRIAGE_TRITON__TIMEOUT_S": "30",
            "RADTRIAGE_EHR__HL7": json.dumps(
                {
                    "host": "127.0.0.1",
                    "port": ris.port,
                    "receiving_application": "RIS",
                    "receiving_facility": "GENHOSP",
                    "ack_timeout_s": 10,
                    "deadline_s": 60,
                }
            ),
        }
        worker = Worker(env, settings.home)
        worker.start()
        tail = Tail(settings.kafka.bootstrap_servers, [t.findings, t.results_fhir, t.audit, t.deadletter])
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        # The orders first (as a RIS sends them before the scan), then the images.
        for order in (ok, ae):
            producer.send(t.orders, key=order.accession_number.encode(), value=order.to_bytes()).get(10)
        time.sleep(1.0)  # the orders must be in the join table before the studies ask for them
        for study, order in ((accepted_study, ok), (refused_study, ae)):
            send_series(
                producer,
                settings,
                files[study],
                study,
                THICK,
                5.0,
                accession_number=order.accession_number,
                patient_id=order.patient_id,
            )

        def ehr_decisions(study: str) -> list[str]:
            return [a["decision"] for a in tail.of(t.audit, study_uid=study) if a["stage"] == "ehr"]

        tail.until(lambda: ehr_decisions(accepted_study) and ehr_decisions(refused_study), timeout=240)
        tail.drain(2.0)
        worker.kill(signal.SIGTERM)
        received = ris.received()

    # The accepted study: one ORU, acknowledged, carrying the order it answers.
    assert ehr_decisions(accepted_study) == ["oru_acknowledged"]
    (finding,) = tail.of(t.findings, study_uid=accepted_study)
    assert finding["positive"], "the bleed phantom should be called"
    assert finding["order"]["placer_order_number"] == ok.placer_order_number
    (oru,) = [m for m in received if _field(m, "OBR", 18) == ok.accession_number]
    strict_parse(oru)
    assert (_field(oru, "ORC", 2), _field(oru, "ORC", 3)) == (ok.placer_order_number, ok.filler_order_number)
    assert (_field(oru, "OBR", 2), _field(oru, "OBR", 3)) == (ok.placer_order_number, ok.filler_order_number)
    assert _field(oru, "PID", 3) == f"{ok.patient_id}^^^GENHOSP&{AUTHORITY_OID}&ISO^MR"
    assert _field(oru, "OBR", 25) == "P" and _field(oru, "MSH", 5) == "RIS"
    obx = [s.split("|") for s in oru.split("\r") if s.startswith("OBX|")]
    assert obx[0][5] == "1386000^Intracranial hemorrhage^SCT" and obx[0][8] == "A"
    (acknowledged,) = [a for a in tail.of(t.audit, study_uid=accepted_study) if a["stage"] == "ehr"]
    assert acknowledged["detail"]["ack_code"] == "AA"
    assert acknowledged["detail"]["control_id"] == _field(oru, "MSH", 10)
    assert not tail.of(t.deadletter, study_uid=accepted_study)

    # Its FHIR report points to the same order and is valid for the HAPI validator.
    (result,) = tail.of(t.results_fhir, study_uid=accepted_study)
    report = result["bundle"]["entry"][0]["resource"]
    assert report["basedOn"][0]["identifier"]["value"] == ok.placer_order_number
    assert report["subject"]["identifier"]["system"] == f"urn:oid:{AUTHORITY_OID}"
    errors = [m for m in validate([result["bundle"]]) if m.severity in ("error", "fatal")]
    assert errors == []

    # The refused study: dead-lettered with the receiver's reason, sent once (not retried).
    assert ehr_decisions(refused_study) == ["oru_refused"]
    (letter,) = [d for d in tail.of(t.deadletter, study_uid=refused_study) if d["stage"] == "ehr.hl7"]
    assert REFUSAL in letter["error"] and "AE" in letter["error"]
    assert len([m for m in received if _field(m, "OBR", 18) == ae.accession_number]) == 1
