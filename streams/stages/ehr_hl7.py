"""Results to the EHR as HL7 v2: `triage.findings` -> `<app>-ehr-hl7-outbox` -> ORU^R01 over
MLLP to `ehr.hl7`.

Reads the findings, not the FHIR results: the ORU is built from the finding's typed
fields (processors/hl7_oru.py), not read back out of a FHIR Bundle, and it goes out as
soon as the finding exists. Every outcome is on `triage.audit` (stage "ehr"); a refusal
(AE/AR, with the receiver's reason) or no answer until `deadline_s` is dead-lettered.

At-least-once like every stage: after a worker kill between the ACK and the offset
commit the same ORU is sent again with the same MSH-10 (processors/hl7_oru.control_id
is derived from the report's identity), so the receiver can recognise the repeat; no
ledger is kept here (docs/ARCHITECTURE.md "Results to the EHR"). The agent reads an
outbox topic of its own (streams/stages/outbox.py), so an EHR that is down holds this
agent only, never the report and alert agents. With no `ehr.hl7` configured there is no
agent at all.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT

from processors.hl7_oru import Endpoint, build_oru, control_id, result_status
from radtriage import metrics
from radtriage.settings import EhrHl7Settings
from radtriage.tls import client_context
from schemas.findings import Finding
from streams.app import dead_letter
from streams.hl7_sender import Delivered, Peer, Refused, deliver, exchange
from streams.retry import Retry
from streams.stages.common import Detail, audit, consumer_span, each
from streams.stages.context import PipelineContext
from streams.stages.outbox import outbox

STAGE = "ehr.hl7"
log = logging.getLogger(__name__)


def _peer(config: EhrHl7Settings) -> Peer:
    # Built at registration, so a bad CA or key file stops the worker's start, not a send.
    tls = client_context(config.tls, "ehr.hl7.tls") if config.tls.enabled else None
    return Peer(config.host, config.port, tls, config.tls.server_hostname)


def register(ctx: PipelineContext) -> None:
    config = ctx.settings.ehr.hl7
    if config is None:
        return  # no HL7 endpoint configured: no agent
    peer = _peer(config)

    async def send_one(event: EventT[Any]) -> None:
        finding = Finding.from_bytes(event.value)
        endpoint = Endpoint(
            config.sending_application,
            config.sending_facility,
            config.receiving_application,
            config.receiving_facility,
        )
        cid = control_id(finding)
        attrs = {"radtriage.study_uid": finding.study_uid, "radtriage.hl7_control_id": cid}
        with consumer_span(ctx, STAGE, event, attrs=attrs) as span:
            await ctx.alert_first.before_delivering(finding)
            try:
                payload = build_oru(finding, endpoint, datetime.now(UTC)).encode("utf-8")
            except Exception as exc:  # hl7apy's own exception types; the message names the field
                why = f"ORU {cid} cannot be built: {type(exc).__name__}: {exc}"
                log.warning("%s (study %s)", why, finding.study_uid)
                await dead_letter(ctx.topics, event, STAGE, why, finding.study_uid)
                metrics.observe_ehr_hl7("unbuildable")
                await audit(
                    ctx,
                    finding.study_uid,
                    finding.accession_number,
                    "ehr",
                    "oru_unbuildable",
                    {"reason": why},
                )
                return
            retry = Retry(config.deadline_s, config.retry_initial_s, config.retry_max_s)
            outcome = await deliver(lambda: exchange(peer, payload, cid, config.ack_timeout_s), retry)
            detail: Detail = {
                "receiver": f"{config.host}:{config.port}",
                "control_id": cid,
                "result_status": result_status(finding),
                "attempts": outcome.attempts,
                "finding": finding.finding,
            }
            if finding.request_id:
                detail["request_id"] = finding.request_id
            if finding.order is not None and finding.order.placer_order_number:
                detail["placer_order_number"] = finding.order.placer_order_number
            if finding.order is not None and finding.order.filler_order_number:
                detail["filler_order_number"] = finding.order.filler_order_number
            if isinstance(outcome, Delivered):
                decision = "oru_acknowledged"
                detail["ack_code"] = outcome.ack.code
            elif isinstance(outcome, Refused):
                decision = "oru_refused"
                detail |= {"ack_code": outcome.ack.code, "reason": outcome.ack.reason}
                why = f"ORU {cid} refused by {detail['receiver']}: {outcome.ack.code} {outcome.ack.reason}"
                await dead_letter(ctx.topics, event, STAGE, why.strip(), finding.study_uid)
            else:
                decision = "oru_undelivered"
                detail["reason"] = outcome.reason
                why = f"ORU {cid} undelivered to {detail['receiver']}: {outcome.reason}"
                await dead_letter(ctx.topics, event, STAGE, why, finding.study_uid)
            span.set_attribute("radtriage.ehr_outcome", decision)
            metrics.observe_ehr_hl7(decision.removeprefix("oru_"))
            await audit(ctx, finding.study_uid, finding.accession_number, "ehr", decision, detail)

    # Every finding has an ORU: the forwarder takes them all.
    @ctx.app.agent(outbox(ctx, "ehr-hl7", lambda finding: True), name="ehr-hl7")
    async def ehr_hl7(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, STAGE, send_one)

    _ = ehr_hl7
