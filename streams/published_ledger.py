"""Published ledgers: what is already on an output topic, read back from that topic itself.

Processing is at-least-once: a worker killed after producing an output but before its
input offset was committed leaves the input to the next worker, which would produce
the output again. A dedup table written *after* the output leaves that window open (the
fault test killing the worker right after an alert saw 2 alerts with that design), and
written *before* it the output could be lost. So the record of what was sent is the
output topic itself: an output counts as sent once Kafka acknowledged it (acks=all),
and a worker that takes over a partition first reads the same partition of the output
topics, so an input replayed after a crash finds its output already there.

This works because every topic involved is co-partitioned: the lane topics,
`triage.findings`, `triage.results.fhir` and `triage.alerts.*` are all keyed by the
StudyInstanceUID and created with one partition count, so the input's partition number
is the partition its output went to. Three ledgers use it (streams/agents.py):

- findings, by request id: a request replayed after a kill (or its copy on a faster
  lane after a late STAT order) is not run and published twice;
- reports, by request id: one FHIR result per finding;
- alerts, by alert id (study + finding): exactly one alert per study and finding.

Faust's own `processing_guarantee="exactly_once"` (Kafka transactions) was the other
choice; faust-streaming's issue tracker reports duplicates with it after a kill (#517)
and crashes on rebalance (#323), and every consumer of the outputs would need
`isolation_level=read_committed`, so it was not adopted.

The cost is one read per ledger of each assigned partition at assignment (started then,
so the first message does not wait for it). Alerts are rare and small and are read
whole. Findings and reports are read back only `lookback_s` (hours): what a crash
replays was produced moments before the crash, and a FHIR result is several KB, so a
week of them is not re-read at every rebalance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from radtriage.kafka_clients import aiokafka_kwargs
from radtriage.settings import KafkaSettings
from schemas.alerts import Alert
from schemas.base import EventDecodeError
from schemas.findings import Finding
from schemas.results import read_result_meta

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]
# A record's id from its value and headers (the results topic keeps its ids in headers).
IdOf = Callable[[bytes | None, Headers], str | None]


def alert_key(value: bytes | None, headers: Headers = ()) -> str | None:
    return Alert.from_bytes(value).alert_id


def finding_key(value: bytes | None, headers: Headers = ()) -> str | None:
    return Finding.from_bytes(value).request_id or None


def report_key(value: bytes | None, headers: Headers = ()) -> str | None:
    # Either format: the id from the headers (the Bundle is not parsed), or from an envelope
    # written before the upgrade.
    return read_result_meta(value, headers).request_id or None


class PublishedLedger:
    def __init__(
        self,
        name: str,
        kafka: KafkaSettings,
        topics: Iterable[str],
        id_of: IdOf,
        *,
        lookback_s: float | None = None,
    ) -> None:
        self.name = name
        # The connection, security included (radtriage/kafka_clients.py).
        self._client_kwargs = aiokafka_kwargs(kafka)
        self._topics = tuple(topics)
        self._id_of = id_of
        self._lookback_s = lookback_s
        self._sent: set[str] = set()
        # Per partition, the read of the topics (started at assignment, awaited by the first
        # message that needs it, so a stat request does not pay for the consumer's start).
        self._loads: dict[int, asyncio.Task[None]] = {}
        # For the cost figure (docs/OPERATIONS.md): milliseconds spent per partition load.
        self.load_ms: list[float] = []

    def forget_assignment(self) -> None:
        """A rebalance started: partitions may move, so every partition is re-read on next use."""
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()

    def preload(self, partitions: Iterable[int]) -> None:
        """Start reading these partitions now (at assignment)."""
        for partition in partitions:
            self._load_task(partition)

    def record(self, key: str) -> None:
        self._sent.add(key)

    async def already_sent(self, key: str, partition: int) -> bool:
        while True:
            task = self._load_task(partition)
            try:
                # Shielded: a cancelled message must not cancel the read others wait for.
                await asyncio.shield(task)
                return key in self._sent
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # it is this call that is being cancelled
                # The read was cancelled by a rebalance; read again for this message.
            except Exception as exc:
                # A failed read is not "nothing was sent": never publish on a guess; retry.
                log.warning(
                    "%s ledger: reading partition %d failed (%s); retrying", self.name, partition, exc
                )
                await asyncio.sleep(0.5)
            if self._loads.get(partition) is task:
                del self._loads[partition]

    def _load_task(self, partition: int) -> asyncio.Task[None]:
        task = self._loads.get(partition)
        if task is None:
            task = asyncio.ensure_future(self._load(partition))
            self._loads[partition] = task
        return task

    async def _start_offsets(self, consumer: AIOKafkaConsumer, parts: list[TopicPartition]) -> None:
        if self._lookback_s is None:
            await consumer.seek_to_beginning(*parts)
            return
        since_ms = int((time.time() - self._lookback_s) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in parts})
        late = [tp for tp, at in found.items() if at is None]
        if late:
            # Nothing that recent on these partitions: nothing to read.
            await consumer.seek_to_end(*late)
        for tp, at in found.items():
            if at is not None:
                consumer.seek(tp, at.offset)

    async def _load(self, partition: int) -> None:
        started = time.perf_counter()
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **self._client_kwargs)
        await consumer.start()
        read = 0
        try:
            # Co-partitioned with the inputs (radtriage creates them all with one partition
            # count), so the input's partition exists on each.
            parts = self._parts(partition)
            if parts:
                consumer.assign(parts)
                # Seek first, then ask for the end: asked right after `assign`, the end
                # offsets once came back 0 for a partition holding an alert (the survivor
                # of test_no_second_alert_... read nothing and alerted again).
                await self._start_offsets(consumer, parts)
                ends = await consumer.end_offsets(parts)
                remaining = {tp for tp in parts if await consumer.position(tp) < ends[tp]}
                while remaining:
                    batch = await consumer.getmany(*remaining, timeout_ms=1000)
                    for records in batch.values():
                        for record in records:
                            read += 1
                            self._add_record(record)
                    for tp in list(remaining):
                        if await consumer.position(tp) >= ends[tp]:
                            remaining.discard(tp)
        finally:
            await consumer.stop()
        elapsed = (time.perf_counter() - started) * 1000.0
        self.load_ms.append(elapsed)
        log.info(
            "%s ledger: partition %d read in %.0f ms (%d records, %d ids known)",
            self.name,
            partition,
            elapsed,
            read,
            len(self._sent),
        )

    def _parts(self, partition: int) -> list[TopicPartition]:
        """What one partition's read covers (streams/notify_ops_state.py reads more)."""
        return [TopicPartition(t, partition) for t in self._topics]

    def _add_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        self._add(record.value, record.headers or ())

    def _add(self, value: bytes | None, headers: Headers = ()) -> None:
        try:
            key = self._id_of(value, headers)
        except EventDecodeError:
            # Not ours to judge here: whatever else is on the topic is not something we sent.
            return
        if key:
            self._sent.add(key)
