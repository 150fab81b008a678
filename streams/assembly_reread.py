"""Read an association's instances back from the log when the assembly lost some of them.

The assemble stage folds instance events into a changelogged Faust table. A release marker
says how many instances its association stored (the connector answered success for each
only once Kafka had it), and `assembly.shortfall` compares that with what the state holds.
Fewer means the table lost instance events it had already folded and committed: the
3-broker fault test saw a study emitted one slice short after a worker was SIGKILLed in the
middle of its transfer, which the loader then refused ("slice gap ...: slices are missing").
The log still holds every acknowledged instance, so the stage reads the marker's partition
back from the association's start up to the marker and folds in what the state lacks,
before the study is emitted. Bounded in records and time; logged and counted
(`radtriage_assembly_rereads_total`) whatever it finds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition

from radtriage import metrics
from radtriage.kafka_clients import aiokafka_kwargs
from radtriage.settings import KafkaSettings, StreamSettings
from schemas.base import EventDecodeError
from schemas.instances import InstanceEvent
from streams import assembly

log = logging.getLogger("streams.assembly")

# Records fetched per poll while reading back.
_BATCH = 500


@dataclass(frozen=True)
class Reread:
    """What reading back found: the association's instance events, how many records were
    read, and whether the read reached the marker (not cut short by the limits)."""

    events: list[InstanceEvent]
    scanned: int
    reached_marker: bool


@dataclass(frozen=True)
class LogRange:
    """Where to read: `topic`[`partition`] from the first record stamped at or after `since`,
    up to (not including) `until_offset`, the marker's own offset."""

    topic: str
    partition: int
    since: datetime
    until_offset: int


async def reread_association(
    kafka: KafkaSettings, where: LogRange, study_uid: str, association_id: str, *, max_records: int
) -> Reread:
    """The instance events of one association of one study between `where.since` and the marker."""
    tp = TopicPartition(where.topic, where.partition)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, **aiokafka_kwargs(kafka))
    await consumer.start()
    try:
        consumer.assign([tp])
        found = await consumer.offsets_for_times({tp: int(where.since.timestamp() * 1000)})
        start = found[tp].offset if found.get(tp) is not None else where.until_offset
        consumer.seek(tp, start)
        events: list[InstanceEvent] = []
        scanned = 0
        key = study_uid.encode()
        while start < where.until_offset and scanned < max_records:
            batch = await consumer.getmany(
                tp, timeout_ms=1000, max_records=min(_BATCH, max_records - scanned)
            )
            for record in batch.get(tp, []):
                if record.offset >= where.until_offset:
                    return Reread(events, scanned, reached_marker=True)
                scanned += 1
                # Keyed by StudyInstanceUID: other studies' records are skipped unparsed.
                if record.key is not None and key not in record.key:
                    continue
                try:
                    event = InstanceEvent.from_bytes(record.value or b"")
                except EventDecodeError:
                    continue  # dead-lettered by the stage when it read it the first time
                if (
                    event.kind == "instance"
                    and event.study_uid == study_uid
                    and event.association_id == association_id
                ):
                    events.append(event)
            if await consumer.position(tp) >= where.until_offset:
                break
        reached = start >= where.until_offset or await consumer.position(tp) >= where.until_offset
        return Reread(events, scanned, reached_marker=reached)
    finally:
        await consumer.stop()


async def fill_from_log(
    kafka: KafkaSettings,
    streams: StreamSettings,
    where: LogRange,
    marker: InstanceEvent,
    state: assembly.AssemblyState | None,
) -> assembly.AssemblyState | None:
    """`state` with the instances of `marker`'s association it lacked, read back from the log."""
    short = assembly.shortfall(state, marker)
    held = marker.instance_count - short
    try:
        found = await asyncio.wait_for(
            reread_association(
                kafka,
                where,
                marker.study_uid,
                marker.association_id,
                max_records=streams.assembly_reread_max_records,
            ),
            timeout=streams.assembly_reread_timeout_s,
        )
    except Exception as exc:  # the study still goes out as held; the loader says what is missing
        metrics.ASSEMBLY_REREADS.labels("failed").inc()
        log.error(
            "study %s: association %s stored %d instances, the assembly holds %d,"
            " and the log could not be read back (%s: %s)",
            marker.study_uid,
            marker.association_id[:8],
            marker.instance_count,
            held,
            type(exc).__name__,
            exc,
        )
        return state
    missing = assembly.missing_instances(state, found.events)
    for event in missing:
        state = assembly.add_instance(state, event, "")
    in_log = len({event.sop_instance_uid for event in found.events})
    outcome = (
        "restored" if missing else ("nothing_missing" if in_log >= marker.instance_count else "not_in_log")
    )
    metrics.ASSEMBLY_REREADS.labels(outcome).inc()
    metrics.ASSEMBLY_REREAD_INSTANCES.inc(len(missing))
    said = {
        "restored": f"{len(missing)} were missing: read back and folded in",
        "nothing_missing": "none was missing (an instance re-sent later counts for the first association)",
        "not_in_log": f"the log holds {in_log} of them: the study goes out short",
    }[outcome]
    log.log(
        logging.INFO if outcome == "nothing_missing" else logging.WARNING,
        "study %s: association %s stored %d instances, the assembly held %d; read %d records of %s[%d]"
        " back %s the marker: %s",
        marker.study_uid,
        marker.association_id[:8],
        marker.instance_count,
        held,
        found.scanned,
        where.topic,
        where.partition,
        "up to" if found.reached_marker else "short of",
        said,
    )
    return state


def log_range_for(
    marker: InstanceEvent,
    state: assembly.AssemblyState | None,
    topic: str,
    partition: int,
    offset: int,
    margin_s: float,
) -> LogRange:
    """Where the association's instances lie: from its start (the marker's, else the
    earliest instance the state holds, else the marker's own time) less `margin_s`."""
    start = marker.association_started_at or (state.received_at if state is not None else marker.received_at)
    return LogRange(topic, partition, start - timedelta(seconds=margin_s), offset)
