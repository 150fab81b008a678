"""Escalate: `triage.findings` -> `triage.alerts.<channel>`.

A positive finding of a rule that alerts becomes one alert, on the topic of the channel
its model's spec names (models/<name>/spec.py; the rule's `alert` says whether), per study
and finding, whatever fails and restarts, and whatever series is read again: the alert id is
(study, finding), and the alert ledger reads the alert topics back before sending
(streams/published_ledger.py). Every decision, sent or suppressed, is on `triage.audit`.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import EventT

from radtriage import metrics
from radtriage.telemetry import current_trace_id, headers_for_current_span
from schemas.alerts import Alert, alert_id
from schemas.findings import Finding
from streams.alert_first import alert_channel
from streams.app import key_partition, publish
from streams.stages.common import audit, consumer_span, each
from streams.stages.context import PipelineContext

# What an alert repeats of its finding: every Alert field the Finding has, by name.
_FROM_FINDING = (set(Alert.model_fields) & set(Finding.model_fields)) - {"schema_version"}


def alert_of(finding: Finding, key: str, trace_id: str) -> Alert:
    return Alert(alert_id=key, trace_id=trace_id, **{k: getattr(finding, k) for k in _FROM_FINDING})


__all__ = ["alert_channel", "alert_of", "register"]


def register(ctx: PipelineContext) -> None:
    async def escalate_one(event: EventT[Any]) -> None:
        finding = Finding.from_bytes(event.value)
        channel = ctx.alert_first.channel(finding)
        if channel is None:
            return
        key = alert_id(finding.study_uid, finding.finding)
        topic = ctx.topics.alerts[channel]
        attrs = {
            "radtriage.study_uid": finding.study_uid,
            "radtriage.finding": finding.finding,
            "radtriage.lane": finding.lane,
            "radtriage.model": finding.model_name,
            "radtriage.probability": finding.probability,
        }
        # Processing a finding record; the alert's own PRODUCER span is its child.
        with consumer_span(ctx, "alert", event, attrs=attrs) as span:
            if await ctx.alerts_ledger.already_sent(key, event.message.partition):
                span.set_attribute("radtriage.duplicate", True)
                decision = "alert_suppressed_duplicate"
                metrics.ALERTS_SUPPRESSED.labels(finding.finding).inc()
                ctx.alert_first.release(key)
            else:
                alert = alert_of(finding, key, current_trace_id())
                # Told while it is written: the partition is fixed first, so that the worker
                # handing it over is the one whose notify stage would read it back.
                going_to = key_partition(topic, finding.study_uid)
                handed = ctx.alert_first.sending(alert, going_to)
                partition = await publish(
                    topic, finding.study_uid, alert, headers_for_current_span(), partition=going_to
                )
                ctx.alert_first.published(alert, partition, handed=handed)
                ctx.crash_if("crash_after_alert", key)
                ctx.alerts_ledger.record(key)
                decision = "alert_sent"
                metrics.observe_alert(alert)
            detail = {"alert_id": key, "topic": topic.get_topic_name()}
            await audit(ctx, finding.study_uid, finding.accession_number, "alert", decision, detail)

    @ctx.app.agent(ctx.topics.findings, name="escalate")
    async def escalate(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, "escalate", escalate_one)

    _ = escalate
