"""The pipeline: every stage's agents on one Faust app (docs/ARCHITECTURE.md, Stages and
their topics).

assemble -> route -> join (patient, order) -> infer (one agent per lane) -> report (-> ehr-fhir,
when a FHIR server is configured) / escalate (-> notify) / ehr-hl7 / pacs-export, one module
each under `streams/stages/`. This module only builds what they share (the app, topics,
rules, blob store, published-output ledgers) and registers them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust

from radtriage import metrics
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import Settings
from schemas.routing_rules import RoutingRules
from streams.alert_first import AlertFirst
from streams.app import TriageTopics, create_app, declare_topics
from streams.published_ledger import PublishedLedger, alert_key, finding_key, report_key
from streams.stages import (
    assemble,
    ehr_fhir,
    ehr_hl7,
    escalate,
    infer,
    join,
    notify,
    notify_ops,
    pacs_export,
    report,
    route,
)
from streams.stages.context import PipelineContext

log = logging.getLogger(__name__)

# The stages in the order a study meets them; each registers its agents.
STAGES = (assemble, route, join, infer, report, escalate, notify, notify_ops, ehr_hl7, ehr_fhir, pacs_export)


@dataclass
class Pipeline:
    app: faust.App
    topics: TriageTopics
    settings: Settings
    # Start every lane's preprocessing processes and run every routed model once.
    warm: Callable[[], Awaitable[None]]


def _ledgers(
    settings: Settings, topics: TriageTopics
) -> tuple[PublishedLedger, PublishedLedger, PublishedLedger]:
    kafka, lookback = settings.kafka, settings.streams.ledger_lookback_s
    findings = PublishedLedger(
        "findings", kafka, [topics.findings.get_topic_name()], finding_key, lookback_s=lookback
    )
    reports = PublishedLedger(
        "reports", kafka, [topics.results_fhir.get_topic_name()], report_key, lookback_s=lookback
    )
    alerts = PublishedLedger("alerts", kafka, [t.get_topic_name() for t in topics.alerts.values()], alert_key)
    return findings, reports, alerts


def build_pipeline(settings: Settings) -> Pipeline:
    app = create_app(settings)
    topics = declare_topics(app, settings)
    rules = RoutingRules.load(settings.routing_rules)
    metrics.prepare_worker(r.model for r in rules.rules)
    metrics.start_process_metrics(settings)
    findings_ledger, reports_ledger, alerts_ledger = _ledgers(settings, topics)
    ctx = PipelineContext(
        app=app,
        topics=topics,
        settings=settings,
        rules=rules,
        blobs=LocalBlobStore(settings.blob_dir),
        findings_ledger=findings_ledger,
        reports_ledger=reports_ledger,
        alerts_ledger=alerts_ledger,
        alert_first=AlertFirst({r.model: r.alert != "none" for r in rules.rules}),
    )
    ledgers = (findings_ledger, reports_ledger, alerts_ledger)
    # The topics whose partition numbers say which output partitions this worker owns
    # (all co-partitioned with the outputs by study UID).
    ledger_inputs = {topics.findings.get_topic_name()} | {t.get_topic_name() for t in topics.lanes.values()}

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's stub wants a sync signature
    async def _forget_ledger(sender: Any, *args: Any, **kwargs: Any) -> None:
        for each in ledgers:
            each.forget_assignment()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _preload_ledger(sender: Any, assigned: Any = (), **kwargs: Any) -> None:
        partitions = sorted({tp.partition for tp in assigned if tp.topic in ledger_inputs})
        for each in ledgers:
            each.preload(partitions)

    assemble.register(ctx)
    route.register(ctx)
    join.register(ctx)
    lanes = infer.register(ctx)
    report.register(ctx)
    escalate.register(ctx)
    notify.register(ctx)
    notify_ops.register(ctx)
    ehr_hl7.register(ctx)
    ehr_fhir.register(ctx)  # only when ehr.fhir is configured
    pacs_export.register(ctx)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    def _stop_pools(sender: Any, **kwargs: Any) -> None:
        lanes.preprocess.shutdown()

    @app.task
    async def _log_start() -> None:
        log.info(
            "radtriage streams started (rules: %s, %d rule(s))", settings.routing_rules, len(rules.rules)
        )

    async def warm() -> None:
        await infer.warm(ctx, lanes)

    return Pipeline(app=app, topics=topics, settings=settings, warm=warm)
