"""An outbox topic for a slow delivery stage: `triage.findings` -> `<app>-<stage>-outbox`.

A stage that delivers to a peer outside Kafka (the PACS, the EHR's MLLP endpoint) may
hold a finding for minutes while the peer is down (retries until its deadline). Read
straight off `triage.findings`, that agent's stream buffer fills, and Faust pauses the
findings partitions for every agent of the worker, report and escalate included: the
alerts stall behind the PACS. So such a stage reads a topic of its own: a light
forwarding agent (`<stage>-outbox`) on the findings republishes only the findings the
stage's configuration wants to the outbox topic, keyed by study as on the findings topic
(so co-partitioned, in the same order per study), and the slow agent reads the outbox.
Faust pauses a full buffer's partitions only, so a peer that is down now pauses only the
outbox's partitions (docs/ARCHITECTURE.md, "Results to the PACS").

At-least-once like every stage: the forward is acknowledged by Kafka (acks=all) before
the finding's offset is committed (radtriage/faust_transport.py), so a worker killed in
between forwards it again and the stage delivers it twice; the deliveries are
idempotent at the peer (the same SOP Instance UIDs, the same MSH-10). A dead letter of
the delivery names the outbox as its source topic: `radtriage replay --stage <stage>`
puts it back there, for that stage alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
from faust.types import EventT, TopicT

from radtriage import metrics
from radtriage.telemetry import headers_for_current_span
from schemas.findings import Finding
from streams.app import publish
from streams.stages.common import consumer_span, each
from streams.stages.context import PipelineContext


def forwarder_name(stage: str) -> str:
    """The forwarding agent's name (and its dead letters' stage)."""
    return f"{stage}-outbox"


def outbox(
    ctx: PipelineContext, stage: str, wants: Callable[[Finding], bool], source: TopicT | None = None
) -> TopicT:
    """Register the agent forwarding what `wants` takes from `source` (the findings) to
    the stage's outbox topic, and return that topic for the stage's own agent to read."""
    topic = ctx.app.topic(
        ctx.settings.streams.outbox_topic(stage),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    name = forwarder_name(stage)

    async def forward_one(event: EventT[Any]) -> None:
        finding = Finding.from_bytes(event.value)
        if not wants(finding):
            metrics.OUTBOX_FINDINGS.labels(stage, "skipped").inc()
            return
        attrs = {"radtriage.study_uid": finding.study_uid, "radtriage.finding": finding.finding}
        with consumer_span(ctx, name, event, attrs=attrs):
            # Waits for the broker's ack: the finding's offset is committed only after it.
            await publish(topic, finding.study_uid, finding, headers_for_current_span())
        metrics.OUTBOX_FINDINGS.labels(stage, "forwarded").inc()

    async def forward(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, name, forward_one)

    ctx.app.agent(source if source is not None else ctx.topics.findings, name=name)(forward)
    return topic
