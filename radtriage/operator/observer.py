"""The operator page's own Kafka reader: every partition of the output topics, from a
lookback window, no consumer group.

Manual assignment and no committed offsets: the page is a view, not a worker, so two
servers (or a restarted one) each rebuild the same picture from the log — partitions are
positioned with `offsets_for_times(now - operator.lookback_s)`. Topics and partitions
that appear later (a worker creates them on start) are picked up on the next refresh.

Kafka down must not break the page: while the broker does not answer, the reader says
so (`LogStatus(available=False)`) and keeps retrying; positions reached are kept, so
what was already folded is not read twice when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from radtriage.kafka_clients import aiokafka_kwargs
from radtriage.operator.decode import Kind, Observed, Record, Unreadable, decode, topic_kinds
from radtriage.operator.view import Fact, LogStatus
from radtriage.settings import Settings
from schemas.base import utcnow

log = logging.getLogger(__name__)

# How often partitions are looked for again, and Kafka's liveness asked.
REFRESH_S = 3.0
# Each Kafka request the reader makes is bounded by this; past it the log is "unavailable".
REQUEST_TIMEOUT_S = 5.0
MAX_RECORDS = 500


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class Observer:
    """Feeds `on_facts` with what the output topics say, until `stop`."""

    def __init__(self, settings: Settings, on_facts: Callable[[Sequence[Fact]], None]) -> None:
        self._settings = settings
        self._on_facts = on_facts
        self._kinds: dict[str, Kind] = topic_kinds(settings.topics)
        # Next offset per partition, across reconnects.
        self._positions: dict[TopicPartition, int] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._available: bool | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="operator-observer")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _status(self, available: bool, detail: str) -> None:
        if available != self._available:  # log the changes, not every retry
            if available:
                log.info("operator page: reading the event log")
            else:
                log.warning("operator page: %s; retrying every %gs", detail, self._settings.operator.retry_s)
            self._available = available
        self._on_facts([LogStatus(available, detail, utcnow())])

    async def _run(self) -> None:
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                **aiokafka_kwargs(self._settings.kafka),
                client_id="radtriage-operator-page",
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=int(REQUEST_TIMEOUT_S * 1000),
                retry_backoff_ms=200,
                connections_max_idle_ms=60_000,
            )
            try:
                await asyncio.wait_for(consumer.start(), REQUEST_TIMEOUT_S * 2)
                await self._tail(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every Kafka error: say so, retry
                self._status(False, f"event log unavailable: {_describe(exc)}")
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), REQUEST_TIMEOUT_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._settings.operator.retry_s)

    async def _tail(self, consumer: AIOKafkaConsumer) -> None:
        assigned: set[TopicPartition] = set()
        next_refresh = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_refresh:
                await self._refresh(consumer, assigned)
                next_refresh = time.monotonic() + REFRESH_S
            if not assigned:
                await asyncio.sleep(0.5)
                continue
            batch = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS)
            facts: list[Observed | Unreadable] = []
            for tp, records in batch.items():
                for r in records:
                    facts.append(
                        decode(
                            Record(r.topic, r.partition, r.offset, r.value, tuple(r.headers or ())),
                            self._kinds,
                        )
                    )
                if records:
                    self._positions[tp] = records[-1].offset + 1
            if facts:
                self._on_facts(facts)

    async def _refresh(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        """Find new partitions, position them, and check Kafka answers (raises if not)."""
        # A metadata request for every topic: also the liveness probe. The public
        # `topics()` gives names only; the cluster it fetched has the partitions.
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), REQUEST_TIMEOUT_S)
        found = {
            TopicPartition(topic, p)
            for topic in self._kinds
            for p in (cluster.partitions_for_topic(topic) or ())
        }
        new = found - assigned
        if new:
            assigned |= new
            consumer.assign(sorted(assigned))
            await self._position(consumer, new)
        self._status(True, "live")

    async def _position(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        lookback_ms = int((time.time() - self._settings.operator.lookback_s) * 1000)
        unknown = {tp for tp in partitions if tp not in self._positions}
        for tp in partitions - unknown:
            consumer.seek(tp, self._positions[tp])
        if not unknown:
            return
        offsets = await asyncio.wait_for(
            consumer.offsets_for_times(dict.fromkeys(unknown, max(lookback_ms, 0))), REQUEST_TIMEOUT_S
        )
        for tp in unknown:
            found = offsets.get(tp)
            if found is not None:
                consumer.seek(tp, found.offset)
            else:  # nothing that recent: only what comes from now on
                await asyncio.wait_for(consumer.seek_to_end(tp), REQUEST_TIMEOUT_S)
