"""`radtriage worker`: run the Faust stream processors (assembly, routing, lanes, results, alerts)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from radtriage.telemetry import setup_tracing

log = logging.getLogger(__name__)


def ready_file(settings: Settings) -> Path:
    name = settings.streams.instance_name
    return settings.home / "run" / (f"worker-{name}.ready" if name else "worker.ready")


def run_worker(settings: Settings) -> None:
    from faust.worker import Worker

    from streams.agents import build_pipeline

    setup_tracing(settings, "streams")
    ensure_topics(
        settings.kafka,
        dict.fromkeys(settings.topics.all() + settings.streams.internal_topics(), settings.kafka.partitions),
    )
    marker = ready_file(settings)
    marker.unlink(missing_ok=True)
    pipeline = build_pipeline(settings)

    @pipeline.app.on_rebalance_complete.connect  # type: ignore[arg-type]  # mode's stub wants a sync signature
    async def _ready(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        # `radtriage up` and the tests wait for this before they report the stack ready.
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("ready\n")
        log.info("partitions assigned; worker ready")

    Worker(pipeline.app, loglevel="INFO", quiet=True).execute_from_commandline()
