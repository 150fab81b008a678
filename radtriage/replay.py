"""`radtriage replay`: put dead-lettered messages back on the topic they came from.

A dead letter (schemas/deadletter.py) keeps the original message's text, key, topic,
partition and offset. After the cause is fixed (Triton back, a bad rule corrected), an
operator chooses letters by stage, time and study and republishes each original
payload, byte for byte, to its source topic with its original key — so it lands on the
same partition and the stream handles it exactly like the first time.

Idempotence: every replayed letter's coordinates (dead-letter topic:partition:offset)
are appended, fsync'ed, to `$RADTRIAGE_HOME/replay/replayed.jsonl` right after Kafka
acknowledged the replay, and a later run skips them. A file, not a Kafka marker: the
audit topic's schema has no replay stage, and a dedicated topic would change the
external topic contract; the file is read in a blink, where a marker would mean
scanning a topic. An exclusive lock on the file serialises concurrent runs on a host;
run replay from one place (the stack's home). The crash window between Kafka's ack and
the record's fsync can replay one letter twice; the stream absorbs that (one finding
per request id, one alert per study and finding, instances keyed by SOP UID). Each
replayed message also carries the header `radtriage-replay-of: <topic>:<p>:<offset>`,
so the history stays visible in Kafka itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from rich.table import Table

from radtriage.kafka_clients import as_kafka_settings, kafka_python_kwargs, kafka_python_producer_kwargs
from radtriage.settings import LANES, KafkaSettings, Settings
from schemas.base import EventDecodeError
from schemas.deadletter import DeadLetter
from streams.app import DEADLETTER_PAYLOAD_LIMIT

REPLAY_HEADER = "radtriage-replay-of"

Action = Literal["replay", "already_replayed", "not_a_topic", "truncated", "not_utf8"]


@dataclass(frozen=True, order=True)
class Coordinates:
    """Where a dead letter sits in Kafka: its identity for "replayed already?"."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


@dataclass(frozen=True)
class StoredLetter:
    coords: Coordinates
    letter: DeadLetter
    # The trace the dead letter belonged to: the replayed message continues it.
    traceparent: bytes | None = None


@dataclass(frozen=True)
class Criteria:
    stage_prefix: str = ""
    since: datetime | None = None
    study_uid: str = ""
    limit: int | None = None


@dataclass(frozen=True)
class Decision:
    stored: StoredLetter
    action: Action
    reason: str = ""


@dataclass
class Report:
    decisions: list[Decision]
    # Records on the dead-letter topic that are not DeadLetter events at all.
    unreadable: int = 0
    # Decisions actually carried out (not in a dry run): coordinates the replay landed at.
    replayed_to: dict[Coordinates, Coordinates] = field(default_factory=dict)
    failure: str = ""


# -- pure selection -------------------------------------------------------------------------


def consumed_topics(settings: Settings) -> frozenset[str]:
    """The Kafka topics radtriage's stream reads: the only places a replay can go.

    Output-only topics (reports, alerts, audit, the dead-letter topic itself) never
    produce dead letters, and the HL7 listener's `hl7.mllp` is no topic at all (its
    originals are quarantined files).
    """
    t = settings.topics
    # The reports are read only by the ehr-fhir stage, when a FHIR server is configured.
    reports = [t.results_fhir] if settings.ehr.fhir is not None else []
    return frozenset(
        [t.instances, t.studies, t.orders, t.encounters, t.findings]
        + [t.lane_topic(lane) for lane in LANES]
        + settings.streams.internal_topics()
        + reports
    )


def stage_matches(stage: str, prefix: str) -> bool:
    """Prefix by dotted segment: `infer` and `infer.stat` match `infer.stat.triton`;
    `infer.st` does not (a stage name is a path, not a string to autocomplete)."""
    return not prefix or stage == prefix or stage.startswith(prefix.rstrip(".") + ".")


def parse_since(text: str) -> datetime:
    """ISO 8601; a time without a zone is UTC (dead letters are stamped in UTC)."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def matches(letter: DeadLetter, criteria: Criteria) -> bool:
    if not stage_matches(letter.stage, criteria.stage_prefix):
        return False
    if criteria.since is not None and letter.at < criteria.since:
        return False
    return not criteria.study_uid or criteria.study_uid in (letter.study_uid, letter.key)


def lane_rank(source_topic: str, settings: Settings) -> int:
    """Stat-lane letters are replayed first, then urgent, routine, everything else."""
    for rank, lane in enumerate(LANES):
        if source_topic == settings.topics.lane_topic(lane):
            return rank
    return len(LANES)


def classify(letter: DeadLetter, consumed: frozenset[str], already: bool) -> tuple[Action, str]:
    if already:
        return "already_replayed", "recorded in replay/replayed.jsonl"
    if letter.source_topic not in consumed:
        # e.g. `hl7.mllp`: a refused HL7 message was never on Kafka; the letter's payload
        # names the quarantined file that holds it.
        return "not_a_topic", f"{letter.source_topic} is not a Kafka topic radtriage consumes"
    if len(letter.payload) >= DEADLETTER_PAYLOAD_LIMIT:
        return "truncated", f"payload cut at {DEADLETTER_PAYLOAD_LIMIT} characters; the original is lost"
    if "\ufffd" in letter.payload:
        return "not_utf8", "the original bytes were not UTF-8 and cannot be restored"
    return "replay", ""


def plan(
    letters: Iterable[StoredLetter],
    criteria: Criteria,
    consumed: frozenset[str],
    replayed: set[Coordinates],
    settings: Settings,
) -> list[Decision]:
    """Which of the chosen letters to replay, and why the others are not.

    Letters to replay come stat lane first, then in dead-letter order; `limit` caps how
    many are replayed (the skipped ones are listed regardless, so the operator sees them).
    """
    chosen = [s for s in letters if matches(s.letter, criteria)]
    chosen.sort(key=lambda s: (lane_rank(s.letter.source_topic, settings), s.letter.at, s.coords))
    decisions: list[Decision] = []
    to_replay = 0
    for stored in chosen:
        action, reason = classify(stored.letter, consumed, stored.coords in replayed)
        if action == "replay":
            if criteria.limit is not None and to_replay >= criteria.limit:
                continue
            to_replay += 1
        decisions.append(Decision(stored, action, reason))
    return decisions


def record_line(coords: Coordinates, letter: DeadLetter, landed: Coordinates) -> str:
    return json.dumps(
        {
            "deadletter": str(coords),
            "stage": letter.stage,
            "source_topic": letter.source_topic,
            "key": letter.key,
            "replayed_to": str(landed),
            "at": datetime.now(UTC).isoformat(),
        }
    )


def parse_record(line: str) -> Coordinates | None:
    """One line of replayed.jsonl; a torn last line (crash mid-write) is ignored."""
    try:
        topic, partition, offset = str(json.loads(line)["deadletter"]).rsplit(":", 2)
        return Coordinates(topic, int(partition), int(offset))
    except (ValueError, KeyError, TypeError):
        return None


# -- Kafka and the record file --------------------------------------------------------------


def replay_record(settings: Settings) -> Path:
    return settings.home / "replay" / "replayed.jsonl"


@contextmanager
def locked_record(path: Path) -> Iterator[IO[str]]:
    """The record file, opened for append under an exclusive lock (one replay at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_record(fh: IO[str]) -> set[Coordinates]:
    fh.seek(0)
    return {c for c in (parse_record(line) for line in fh if line.strip()) if c is not None}


def append_record(fh: IO[str], line: str) -> None:
    fh.seek(0, os.SEEK_END)
    fh.write(line + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> bytes | None:
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return None


def replay_headers(
    letter: DeadLetter, coords: Coordinates, traceparent: bytes | None
) -> list[tuple[str, bytes]]:
    """A replay's headers: the failed record's own (the results topic keeps its metadata
    there), then the replay's mark and the trace context the dead letter was written in."""
    own = [
        (k, v.encode("latin-1"))
        for k, v in letter.headers.items()
        if k.lower() not in (REPLAY_HEADER, "traceparent", "tracestate")
    ]
    mark = [(REPLAY_HEADER, str(coords).encode())]
    return own + mark + ([("traceparent", traceparent)] if traceparent else [])


def send_replay(
    producer: KafkaProducer, letter: DeadLetter, headers: list[tuple[str, bytes]], timeout_s: float
) -> Coordinates:
    """Publish a dead letter's payload to its source topic again, under its own key, and
    wait for the acknowledgement: where it landed. Any KafkaError is the caller's to handle
    (the command stops, the operator page answers 503); only an acknowledged replay is recorded."""
    meta = producer.send(
        letter.source_topic,
        key=letter.key.encode() if letter.key else None,
        value=letter.payload.encode("utf-8"),
        headers=headers,
    ).get(timeout=timeout_s)
    return Coordinates(meta.topic, meta.partition, meta.offset)


def read_dead_letters(
    kafka: KafkaSettings | str, topic: str, timeout_s: float = 60.0
) -> tuple[list[StoredLetter], int]:
    """Everything on the dead-letter topic up to its end as of now; and the unreadable count."""
    consumer = KafkaConsumer(
        group_id=None, enable_auto_commit=False, **kafka_python_kwargs(as_kafka_settings(kafka))
    )
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            return [], 0
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        letters: list[StoredLetter] = []
        unreadable = 0
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s:g}s")
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    if r.offset >= ends[TopicPartition(r.topic, r.partition)]:
                        continue  # arrived after we started: the next run sees it
                    try:
                        letter = DeadLetter.from_bytes(r.value)
                    except EventDecodeError:
                        unreadable += 1
                        continue
                    coords = Coordinates(r.topic, r.partition, r.offset)
                    letters.append(StoredLetter(coords, letter, _header(r.headers, "traceparent")))
        return letters, unreadable
    finally:
        consumer.close()


def run_replay(settings: Settings, criteria: Criteria, *, dry_run: bool) -> Report:
    """Read the dead letters, plan, and (unless `dry_run`) replay and record each one."""
    path = replay_record(settings)
    with locked_record(path) as record:
        # Read the record under the lock, so a concurrent run's replays are seen.
        replayed = read_record(record)
        letters, unreadable = read_dead_letters(settings.kafka, settings.topics.deadletter)
        decisions = plan(letters, criteria, consumed_topics(settings), replayed, settings)
        report = Report(decisions=decisions, unreadable=unreadable)
        todo = [d for d in decisions if d.action == "replay"]
        if dry_run or not todo:
            return report
        # acks=all + idempotence: replayed only once every in-sync replica has it.
        producer = KafkaProducer(linger_ms=1, **kafka_python_producer_kwargs(settings.kafka))
        try:
            for decision in todo:
                stored, letter = decision.stored, decision.stored.letter
                headers = replay_headers(letter, stored.coords, stored.traceparent)
                try:
                    landed = send_replay(producer, letter, headers, settings.kafka.produce_timeout_s)
                except Exception as exc:  # every KafkaError: stop, nothing after this is half-done
                    report.failure = f"{stored.coords} not acknowledged: {type(exc).__name__}: {exc}"
                    break
                append_record(record, record_line(stored.coords, letter, landed))
                report.replayed_to[stored.coords] = landed
        finally:
            producer.close(timeout=settings.kafka.produce_timeout_s)
        return report


# -- rendering ------------------------------------------------------------------------------

_OUTCOME = {
    "replay": "replayed",
    "already_replayed": "skipped: already replayed",
    "not_a_topic": "skipped: not a topic",
    "truncated": "skipped: truncated",
    "not_utf8": "skipped: not UTF-8",
}


def letters_table(report: Report, *, dry_run: bool) -> Table:
    title = "dead letters chosen (dry run: nothing replayed)" if dry_run else "dead letters chosen"
    table = Table(title=title)
    for column in ("at", "stage", "source topic", "study", "error", "would" if dry_run else "outcome"):
        table.add_column(column, overflow="fold")
    for d in report.decisions:
        letter = d.stored.letter
        if d.action == "replay":
            landed = report.replayed_to.get(d.stored.coords)
            outcome = "replay" if dry_run else (f"replayed → {landed}" if landed else "not replayed")
        else:
            outcome = f"{_OUTCOME[d.action]} ({d.reason})"
        table.add_row(
            letter.at.isoformat(timespec="seconds"),
            letter.stage,
            letter.source_topic,
            letter.study_uid or letter.key,
            letter.error,
            outcome,
        )
    return table


def summary_table(report: Report, *, dry_run: bool) -> Table:
    table = Table(title="replay summary")
    table.add_column("outcome")
    table.add_column("letters", justify="right")
    counts: dict[str, int] = {}
    for d in report.decisions:
        if d.action == "replay":
            done = d.stored.coords in report.replayed_to
            label = "would replay" if dry_run else ("replayed" if done else "not replayed (stopped)")
        else:
            label = _OUTCOME[d.action]
        counts[label] = counts.get(label, 0) + 1
    if report.unreadable:
        counts["unreadable records on the dead-letter topic"] = report.unreadable
    for label, n in counts.items():
        table.add_row(label, str(n))
    if not counts:
        table.add_row("no dead letter matches", "0")
    return table
