"""The FHIR read/search view: `topics.results_fhir` read from the beginning into a
`ResultsIndex`, kept up to date while the HTTP process runs.

A kafka-python consumer on a thread of its own (its calls block), every partition
assigned by hand, no consumer group and no committed offsets: like the operator page's
reader, the view is rebuilt from the log by every process that starts, so two HTTP
servers (or a restarted one) answer the same. Partitions that appear later (the worker
creates the topic) are picked up on the next refresh.

`ready` turns true once the reader reached the ends the partitions had when it first
saw them: until then a read or search would miss results that exist, so the routes
answer 503 (connectors/fhir/read.py). Kafka down after that: the view keeps serving
what it holds (it says so in the log) and reconnects, continuing from where it was.
Searches and the consumer share the index under a lock, taken by the consumer for one
record at a time; reads and searches take it on a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from kafka import KafkaConsumer, TopicPartition

from connectors.fhir.result_record import UnreadableResult, decode_result
from connectors.fhir.results_index import ResultsIndex
from radtriage import metrics
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import Settings

log = logging.getLogger(__name__)

REFRESH_S = 5.0
POLL_MS = 200
MAX_RECORDS = 2000
REQUEST_TIMEOUT_MS = 10_000

T = TypeVar("T")


class ResultsView:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.topic = settings.topics.results_fhir
        self.index = ResultsIndex(settings.fhir_search.max_resources)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Next offset per partition, kept across reconnects.
        self._positions: dict[TopicPartition, int] = {}
        # The ends the partitions had when first seen: `ready` once reached.
        self._targets: dict[TopicPartition, int] = {}
        self._ready = threading.Event()
        self._available: bool | None = None
        self.records = 0

    # -- what the routes use ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def loading_progress(self) -> tuple[int, int]:
        """(records read, records to read before ready): for the 503's diagnostics."""
        with self._lock:
            return self.records, sum(self._targets.values())

    def locked(self, fn: Callable[[ResultsIndex], T]) -> T:
        """`fn(index)` with the consumer held off (keep it short: it is a search or a read)."""
        with self._lock:
            return fn(self.index)

    # -- the reader ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fhir-results-view", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _status(self, available: bool, detail: str) -> None:
        if available != self._available:  # the changes, not every retry
            if available:
                log.info("FHIR results view: reading %s", self.topic)
            else:
                log.warning(
                    "FHIR results view: %s; serving what it holds, retrying every %gs",
                    detail,
                    self._settings.fhir_search.retry_s,
                )
            self._available = available

    def _run(self) -> None:
        while not self._stop.is_set():
            consumer: Any = None
            try:
                consumer = KafkaConsumer(
                    **kafka_python_kwargs(self._settings.kafka),
                    client_id="radtriage-fhir-view",
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=REQUEST_TIMEOUT_MS,
                    bootstrap_timeout_ms=REQUEST_TIMEOUT_MS,
                )
                self._tail(consumer)
            except Exception as exc:  # every Kafka error: say so, reconnect
                self._status(False, f"event log unavailable: {type(exc).__name__}: {exc}")
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:  # a broken client may fail to close; it is dropped anyway
                        log.debug("closing the results view's consumer failed", exc_info=True)
            self._stop.wait(self._settings.fhir_search.retry_s)

    def _tail(self, consumer: Any) -> None:
        assigned: set[TopicPartition] = set()
        next_refresh = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_refresh:
                self._refresh(consumer, assigned)
                next_refresh = time.monotonic() + REFRESH_S
            if not assigned:
                self._stop.wait(0.5)
                continue
            batch = consumer.poll(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
            for tp, records in batch.items():
                for record in records:
                    # One record at a time under the lock: a search waits for one apply
                    # (well under a millisecond), never for a whole poll's worth.
                    with self._lock:
                        self._apply(record)
                if records:
                    self._positions[tp] = records[-1].offset + 1
            self._check_ready(consumer, assigned)

    def _refresh(self, consumer: Any, assigned: set[TopicPartition]) -> None:
        """New partitions assigned from their first offset (or where this view was)."""
        partitions = consumer.partitions_for_topic(self.topic)
        if partitions is None:
            # No such topic yet (nothing reported yet): an empty view is complete.
            partitions = set()
        found = {TopicPartition(self.topic, p) for p in partitions}
        if not assigned and not found:
            self._ready.set()
            metrics.FHIR_VIEW_READY.set(1.0)
        new = found - assigned
        if new:
            assigned |= new
            consumer.assign(sorted(assigned, key=lambda tp: tp.partition))
            for tp in assigned:
                if tp in self._positions:
                    consumer.seek(tp, self._positions[tp])
            fresh = [tp for tp in new if tp not in self._positions]
            if fresh:
                consumer.seek_to_beginning(*fresh)
                ends = consumer.end_offsets(fresh)
                begins = consumer.beginning_offsets(fresh)
                with self._lock:
                    for tp in fresh:
                        self._positions[tp] = int(begins[tp])
                        self._targets.setdefault(tp, int(ends[tp]))
        self._status(True, "live")

    def _check_ready(self, consumer: Any, assigned: set[TopicPartition]) -> None:
        if self._ready.is_set():
            return
        # The consumer's position, not the last record's offset + 1: it also steps over
        # control records (transaction markers) that are never delivered.
        if all(consumer.position(tp) >= end for tp, end in self._targets.items() if tp in assigned):
            log.info(
                "FHIR results view ready: %d record(s) read, %d resource(s) held",
                self.records,
                len(self.index),
            )
            self._ready.set()
            metrics.FHIR_VIEW_READY.set(1.0)

    def _apply(self, record: Any) -> None:
        self.records += 1
        try:
            decoded = decode_result(record.value, tuple(record.headers or ()), record.timestamp)
            applied = self.index.apply(decoded.bundle, decoded.produced_at)
        except (UnreadableResult, ValueError) as exc:
            # Logged with where it is (to look at it with `radtriage replay` or a console
            # consumer), never with its content: it may carry PHI.
            log.warning(
                "FHIR results view: skipped %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            metrics.observe_fhir_view("unreadable", {}, self.index.counts(), self.ready)
            return
        outcome = "applied" if applied.stored else "unchanged"
        metrics.observe_fhir_view(outcome, applied.evicted, self.index.counts(), self.ready)


# Where the HTTP app keeps its view (absent: read/search turned off).
RESULTS_VIEW = web.AppKey("fhir_results_view", ResultsView)
