"""Report: `triage.findings` -> `triage.results.fhir`.

Each finding becomes a FHIR R4 Bundle (DiagnosticReport + Observations,
processors/fhir_report.py), once per request id: a finding replayed after a kill finds
its report already on the results topic (streams/published_ledger.py).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import EventT

from processors.fhir_report import build_result_bundle
from radtriage import metrics
from radtriage.telemetry import headers_for_current_span
from schemas.findings import Finding
from schemas.results import ResultHeaders, result_record
from streams.app import publish_value
from streams.stages.common import consumer_span, each
from streams.stages.context import PipelineContext


def register(ctx: PipelineContext) -> None:
    async def report_one(event: EventT[Any]) -> None:
        finding = Finding.from_bytes(event.value)
        attrs = {
            "radtriage.study_uid": finding.study_uid,
            "radtriage.finding": finding.finding,
            "radtriage.model": finding.model_name,
        }
        with consumer_span(ctx, "report", event, attrs=attrs) as span:
            if finding.request_id and await ctx.reports_ledger.already_sent(
                finding.request_id, event.message.partition
            ):
                # Replayed after a kill: its report is already on the results topic.
                span.set_attribute("radtriage.duplicate", True)
                return
            await ctx.alert_first.before_delivering(finding)
            meta = ResultHeaders(
                study_uid=finding.study_uid,
                accession_number=finding.accession_number,
                finding=finding.finding,
                request_id=finding.request_id,
            )
            # The plain Bundle as the value, radtriage's metadata in headers (schemas/results.py).
            value, headers = result_record(
                build_result_bundle(finding, ctx.settings.ehr.patient_id_system), meta
            )
            await publish_value(
                ctx.topics.results_fhir,
                finding.study_uid,
                value,
                [*headers, *headers_for_current_span()],
                about=meta,
            )
            ctx.crash_if("crash_after_report", finding.request_id)
            if finding.request_id:
                ctx.reports_ledger.record(finding.request_id)
            metrics.observe_report(finding, meta)

    @ctx.app.agent(ctx.topics.findings, name="report")
    async def report(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, "report", report_one)

    _ = report
