"""What every stage is built from: the app, its topics, settings, rules and shared state.

Built once per worker by `streams/agents.build_pipeline`; a stage's `register(ctx)` adds
its agents to `ctx.app`. Nothing here runs on its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import faust

from radtriage.blobstore import LocalBlobStore
from radtriage.settings import Settings
from schemas.routing_rules import RoutingRules
from streams.alert_first import AlertFirst
from streams.app import TriageTopics
from streams.published_ledger import PublishedLedger

log = logging.getLogger(__name__)


@dataclass
class PipelineContext:
    app: faust.App
    topics: TriageTopics
    settings: Settings
    rules: RoutingRules
    blobs: LocalBlobStore
    # What is already published, read back from the output topics themselves
    # (streams/published_ledger.py): findings and reports by request id, alerts by alert id.
    findings_ledger: PublishedLedger
    reports_ledger: PublishedLedger
    alerts_ledger: PublishedLedger
    # Which findings alert, and the gates that let their alert out first (streams/alert_first.py).
    alert_first: AlertFirst
    # Faust tables by name, created by the stage that writes them.
    tables: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Faust's consumer group is the app id."""
        return self.settings.streams.app_id

    @property
    def stat_patterns(self) -> tuple[str, ...]:
        return tuple(self.settings.orders.stat_indications)

    def crash_if(self, point: str, what: str) -> None:
        """Fault tests only: die in the worst place, after the output is in Kafka and
        before anything else (ledger, audit, offset commit) happened."""
        if self.settings.streams.fault_injection == point:
            log.critical("fault injection: %s (%s)", point, what)
            os._exit(70)
