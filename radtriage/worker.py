"""`radtriage worker`: run the Faust stream processors (assembly, routing, lanes, results, alerts)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from radtriage.tracing_sdk import setup_tracing

log = logging.getLogger(__name__)


def ready_file(settings: Settings) -> Path:
    name = settings.streams.instance_name
    return settings.home / "run" / (f"worker-{name}.ready" if name else "worker.ready")


# Exit status of a stop that overran streams.shutdown_timeout_s (EX_TEMPFAIL: try again).
EXIT_SHUTDOWN_OVERRUN = 75


def arm_shutdown_deadline(timeout_s: float) -> threading.Timer:
    """Exit the process hard if it is still alive `timeout_s` from now (a daemon timer)."""

    def overrun() -> None:
        log.error("worker still stopping after %.0f s; exiting without a clean stop", timeout_s)
        logging.shutdown()
        os._exit(EXIT_SHUTDOWN_OVERRUN)

    timer = threading.Timer(timeout_s, overrun)
    timer.daemon = True
    timer.start()
    return timer


def run_worker(settings: Settings) -> None:
    from faust.worker import Worker as FaustWorker

    class Worker(FaustWorker):
        def _schedule_shutdown(self, signum: signal.Signals) -> None:
            if not self._signal_stop_time:
                arm_shutdown_deadline(settings.streams.shutdown_timeout_s)
            super()._schedule_shutdown(signum)

    if settings.streams.gil_switch_interval_s > 0:
        sys.setswitchinterval(settings.streams.gil_switch_interval_s)
    from processors.notify.rota import operators_recipient
    from schemas.oncall import OncallError
    from streams.agents import build_pipeline
    from streams.stages.notify_oncall import load_oncall

    try:
        # Before anything starts: a broken on-call file is the operator's to fix, named by line.
        oncall = load_oncall(settings.notify)
        operators_recipient(settings.notify.operators, oncall, settings.notify.named_webhooks())
    except OncallError as exc:
        log.error("worker not started: %s", exc)
        raise SystemExit(2) from None

    setup_tracing(settings, "streams")
    ensure_topics(
        settings.kafka,
        dict.fromkeys(settings.topics.all() + settings.streams.internal_topics(), settings.kafka.partitions),
    )
    marker = ready_file(settings)
    marker.unlink(missing_ok=True)
    pipeline = build_pipeline(settings)

    # Ready = partitions assigned AND every lane warm (streams/agents.py `warm`): `radtriage
    # up` and the tests wait for the marker, and the first study must be as fast as the tenth.
    progress = {"assigned": False, "warm": False}

    def _mark_if_ready() -> None:
        if all(progress.values()) and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("ready\n")
            log.info("partitions assigned and lanes warm; worker ready")

    @pipeline.app.on_rebalance_complete.connect  # type: ignore[arg-type]  # mode's stub wants a sync signature
    async def _ready(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        progress["assigned"] = True
        _mark_if_ready()

    @pipeline.app.task
    async def _warm() -> None:
        try:
            await pipeline.warm()
        except Exception:  # a cold lane is slower, not broken: serve anyway
            log.exception("warm-up failed; the first studies pay for it")
        if settings.streams.gc_freeze_after_warm:
            gc.collect()
            gc.freeze()
            log.info("%d objects frozen out of garbage collection after the warm-up", gc.get_freeze_count())
        progress["warm"] = True
        _mark_if_ready()

    Worker(pipeline.app, loglevel="INFO", quiet=True).execute_from_commandline()
