"""What the notify-ops stage has gathered, read back from Kafka when it takes partitions
over, so a worker kill inside a digest period does not lose that period's digest.

The notify stage keeps its escalations this way (streams/notify_state.py): the record is
the topics themselves, read again on takeover with the published ledgers' reader
(streams/published_ledger.py). Here:
- the stage's inputs (`triage.deadletter`, the watched lanes' requests, `triage.findings`)
  of each assigned partition are read again over `lookback_s`, into the digests and the
  stuck watch, as the stream would have read them;
- before them, `triage.audit` (every partition: a digest's record is keyed by one of its
  examples' studies, not by the partition its items came from) for the digests already
  told: each `ops_delivered` / `ops_undeliverable` record carries what it covered (per cause
  and input partition, the last offset), and those items are not gathered again.
A record the stream then reads again (between the committed offset and the end read
back) is skipped by its offset. What the kill interrupted is told in the first digest
after the restart, once. A kill between a digest reaching the operators and its record
reaching Kafka tells those items again, under another key (the period differs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from aiokafka import ConsumerRecord, TopicPartition

from radtriage.settings import KafkaSettings
from schemas.base import EventDecodeError
from streams.published_ledger import PublishedLedger

# The pseudo-partition of the audit topic's read (all its partitions at once).
AUDIT = -1

# topic, partition, offset, value
Fold = Callable[[str, int, int, bytes | None], None]


def _nothing(value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> str | None:
    return None


class OpsReadBack(PublishedLedger):
    def __init__(
        self, kafka: KafkaSettings, inputs: Sequence[str], audit_topic: str, fold: Fold, *, lookback_s: float
    ) -> None:
        super().__init__("notify-ops", kafka, inputs, _nothing, lookback_s=lookback_s)
        self.audit_topic = audit_topic
        # radtriage creates every topic with this count (streams/app.py).
        self.audit_partitions = kafka.partitions
        self.fold = fold

    def preload(self, partitions: Iterable[int]) -> None:
        super().preload([AUDIT, *sorted(partitions)])

    async def ready(self, partition: int) -> None:
        """Wait until the partition (and the digests told) are read back."""
        await self.already_sent("", partition)

    def _parts(self, partition: int) -> list[TopicPartition]:
        if partition == AUDIT:
            return [TopicPartition(self.audit_topic, p) for p in range(self.audit_partitions)]
        return super()._parts(partition)

    async def _load(self, partition: int) -> None:
        if partition != AUDIT:
            # What was told first: an item read back before it would be gathered again.
            told = self._load_task(AUDIT)
            try:
                await asyncio.shield(told)
            except Exception:
                if self._loads.get(AUDIT) is told:
                    del self._loads[AUDIT]  # read again on the retry (already_sent retries)
                raise
        await super()._load(partition)

    def _add_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            self.fold(record.topic, record.partition, record.offset, record.value)
        except EventDecodeError:
            pass  # the stream dead-letters it (or did) when it reads it
