"""The alert ledger: which alerts are already on the alert topics, read from those topics themselves.

Exactly one alert per study and finding, whatever fails and restarts. A dedup table
written *after* the alert leaves a window: a worker killed between producing the alert
and writing its table entry reprocesses the finding (its offset was never committed)
and alerts again. Writing the table *before* the alert would instead lose the alert in
that window. So the record of what was sent is the alert topic itself: an alert is
"sent" once Kafka acknowledged it (acks=all), and a worker that takes over a partition
first reads that partition of every alert topic (`triage.alerts.*` are co-partitioned
with `triage.findings`: same key, the StudyInstanceUID, same partition count), so a
finding replayed after a crash finds its alert already there.

Faust's own `processing_guarantee="exactly_once"` (Kafka transactions) was the other
choice; faust-streaming's issue tracker reports duplicates with it after a kill
(#517) and crashes on rebalance (#323), and every consumer of the alert topics would
need `isolation_level=read_committed`, so it was not adopted.

The cost is one read of the alert partitions per partition assignment (alerts are
rare: a few hundred bytes each), started when the partitions are assigned so that the
first alert does not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from radtriage.kafka_clients import aiokafka_kwargs
from radtriage.settings import KafkaSettings, load_settings
from schemas.alerts import Alert
from schemas.base import EventDecodeError

log = logging.getLogger(__name__)


class AlertLedger:
    def __init__(
        self, bootstrap_servers: str, alert_topics: Iterable[str], *, kafka: KafkaSettings | None = None
    ) -> None:
        # The connection (security included): `kafka`, or this process's settings on
        # `bootstrap_servers` when the caller passes only the address.
        if kafka is None:
            kafka = load_settings().kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
        self._kafka = kafka
        self._bootstrap = bootstrap_servers
        self._topics = tuple(alert_topics)
        self._sent: set[str] = set()
        # Per partition, the read of the alert topics (started at assignment, awaited by the
        # first finding that needs it, so a stat alert does not pay for the consumer's start).
        self._loads: dict[int, asyncio.Task[None]] = {}
        # For the README's cost figure: milliseconds spent per partition load.
        self.load_ms: list[float] = []

    def forget_assignment(self) -> None:
        """A rebalance started: partitions may move, so every partition is re-read on next use."""
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()

    def preload(self, partitions: Iterable[int]) -> None:
        """Start reading these partitions of the alert topics now (at assignment)."""
        for partition in partitions:
            self._load_task(partition)

    def record(self, alert_id: str) -> None:
        self._sent.add(alert_id)

    async def already_sent(self, alert_id: str, partition: int) -> bool:
        while True:
            task = self._load_task(partition)
            try:
                # Shielded: a cancelled finding must not cancel the read others wait for.
                await asyncio.shield(task)
                return alert_id in self._sent
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # it is this call that is being cancelled
                # The read was cancelled by a rebalance; read again for this finding.
            except Exception as exc:
                # A failed read is not "nothing was sent": never alert on a guess; retry.
                log.warning("alert ledger: reading partition %d failed (%s); retrying", partition, exc)
                await asyncio.sleep(0.5)
            if self._loads.get(partition) is task:
                del self._loads[partition]

    def _load_task(self, partition: int) -> asyncio.Task[None]:
        task = self._loads.get(partition)
        if task is None:
            task = asyncio.ensure_future(self._load(partition))
            self._loads[partition] = task
        return task

    async def _load(self, partition: int) -> None:
        started = time.perf_counter()
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **aiokafka_kwargs(self._kafka))
        await consumer.start()
        try:
            # The alert topics are co-partitioned with the findings (radtriage creates them all
            # with one partition count), so the finding's partition exists on each.
            parts = [TopicPartition(t, partition) for t in self._topics]
            if parts:
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                ends = await consumer.end_offsets(parts)
                remaining = {tp for tp in parts if ends[tp] > 0}
                while remaining:
                    batch = await consumer.getmany(*remaining, timeout_ms=1000)
                    for records in batch.values():
                        for record in records:
                            self._add(record.value)
                    for tp in list(remaining):
                        if await consumer.position(tp) >= ends[tp]:
                            remaining.discard(tp)
        finally:
            await consumer.stop()
        elapsed = (time.perf_counter() - started) * 1000.0
        self.load_ms.append(elapsed)
        log.info(
            "alert ledger: partition %d read in %.0f ms (%d alert ids known)",
            partition,
            elapsed,
            len(self._sent),
        )

    def _add(self, value: bytes | None) -> None:
        try:
            self._sent.add(Alert.from_bytes(value).alert_id)
        except EventDecodeError:
            # Not ours to judge here: whatever else is on an alert topic is not an alert we sent.
            pass
