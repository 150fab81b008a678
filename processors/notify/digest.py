"""Operator notifications in digests: a flood of dead letters or stuck studies becomes a
bounded number of messages (pure; streams/stages/notify_ops.py feeds and sends it).

Each item (one dead letter, one stuck request) has a kind and a cause; items are gathered
per (kind, cause) over a period of `period_s` (by the time they were read), and each
gathered bucket becomes one message when its period ends: the count, the first and last
time, and the first `examples` items. Causes beyond `max_causes` in one period share one
bucket ("other causes"), so one period yields at most `max_causes + 1` messages per kind
whatever arrives.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from schemas.deadletter import DeadLetter

Kind = Literal["deadletter", "stuck"]
OTHER_CAUSES = "other causes"
_CAUSE_LEN = 100
# Long runs of digits and dots (UIDs, offsets, ports, times) say which record, not why.
_NUMBERS = re.compile(r"\d[\d.:-]{3,}")


@dataclass(frozen=True)
class Item:
    kind: Kind
    cause: str
    study_uid: str
    accession_number: str
    # One line for the operator: what happened to this one.
    detail: str
    at: datetime
    # Where it was read (topic, partition, offset; "" / -1: unknown). A digest told records
    # the last offset it covered per cause and partition, so a worker that reads the same
    # partitions again after a kill gathers only what was not told (streams/notify_ops_state.py).
    topic: str = ""
    partition: int = -1
    offset: int = -1


# What a told digest covered: (the items' own cause, topic, partition) -> the last offset.
Covered = dict[tuple[str, str, int], int]


@dataclass
class Bucket:
    kind: Kind
    cause: str
    # Index of the period (seconds since the epoch // period_s): the digest's identity.
    period: int
    period_s: float
    count: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    examples: list[Item] = field(default_factory=list)
    covered: Covered = field(default_factory=dict)

    @property
    def starts(self) -> datetime:
        return datetime.fromtimestamp(self.period * self.period_s, UTC)

    @property
    def ends(self) -> datetime:
        return datetime.fromtimestamp((self.period + 1) * self.period_s, UTC)

    def key(self, scope: str) -> str:
        """The digest's idempotency key: the same kind, cause, period and scope (the
        partitions the worker read them from) is the same message, however often sent."""
        text = f"ops\x00{self.kind}\x00{self.cause}\x00{self.period}\x00{scope}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def deadletter_cause(letter: DeadLetter) -> str:
    """What a dead letter is grouped by: its stage and the error up to the first colon (an
    exception's type, or the stage's own reason), without the record's numbers."""
    head = (letter.error.strip().splitlines() or [""])[0].split(": ", 1)[0].strip() or "no reason given"
    head = _NUMBERS.sub("#", head)
    return f"{letter.stage or 'unknown stage'}: {head}"[:_CAUSE_LEN]


def deadletter_item(
    letter: DeadLetter, read_at: datetime, where_read: tuple[str, int, int] = ("", -1, -1)
) -> Item:
    where = f"{letter.source_topic}" + (
        f"[{letter.partition}]@{letter.offset}" if letter.partition is not None else ""
    )
    return Item(
        kind="deadletter",
        cause=deadletter_cause(letter),
        study_uid=letter.study_uid,
        accession_number="",
        detail=f"{where}: {letter.error.strip()[:300]}",
        at=read_at,
        topic=where_read[0],
        partition=where_read[1],
        offset=where_read[2],
    )


@dataclass
class Digests:
    period_s: float
    examples: int
    max_causes: int
    buckets: dict[tuple[Kind, str, int], Bucket] = field(default_factory=dict)
    # Per (kind, cause, topic, partition): the last offset a told digest covered.
    told: dict[tuple[Kind, str, str, int], int] = field(default_factory=dict)

    def period_of(self, at: datetime) -> int:
        return math.floor(at.timestamp() / self.period_s)

    def was_told(self, item: Item) -> bool:
        if item.offset < 0:
            return False
        return item.offset <= self.told.get((item.kind, item.cause, item.topic, item.partition), -1)

    def add(self, item: Item) -> Bucket | None:
        """Gather the item into its bucket; None when a digest told already covered it."""
        if self.was_told(item):
            return None
        period = self.period_of(item.at)
        cause = item.cause
        if (item.kind, cause, period) not in self.buckets:
            causes = sum(1 for k, _, p in self.buckets if k == item.kind and p == period)
            if causes >= self.max_causes:
                cause = OTHER_CAUSES
        bucket = self.buckets.get((item.kind, cause, period))
        if bucket is None:
            bucket = Bucket(item.kind, cause, period, self.period_s)
            self.buckets[(item.kind, cause, period)] = bucket
        bucket.count += 1
        if item.offset >= 0:
            where = (item.cause, item.topic, item.partition)
            bucket.covered[where] = max(bucket.covered.get(where, -1), item.offset)
        bucket.first_at = item.at if bucket.first_at is None else min(bucket.first_at, item.at)
        bucket.last_at = item.at if bucket.last_at is None else max(bucket.last_at, item.at)
        if len(bucket.examples) < self.examples:
            bucket.examples.append(item)
        return bucket

    def due(self, now: datetime) -> list[Bucket]:
        """The buckets whose period is over, taken out (oldest first): each one message."""
        current = self.period_of(now)
        ready = sorted((k for k in self.buckets if k[2] < current), key=lambda k: (k[2], k[0], k[1]))
        return [self.buckets.pop(k) for k in ready]

    def mark_told(self, kind: Kind, covered: Covered) -> None:
        """A digest was delivered (or given up on): what it covered is not gathered again."""
        for (cause, topic, partition), offset in covered.items():
            key = (kind, cause, topic, partition)
            self.told[key] = max(self.told.get(key, -1), offset)

    def forget(self) -> None:
        """Partitions moved: what was gathered is read again by whoever owns them next."""
        self.buckets.clear()
        self.told.clear()


def covered_text(covered: Covered) -> str:
    """A bucket's coverage as the audit record carries it (a detail value is a scalar)."""
    return json.dumps(sorted([c, t, p, o] for (c, t, p), o in covered.items()), separators=(",", ":"))


def covered_of(text: object) -> Covered:
    """The coverage from an audit record (anything unreadable: nothing)."""
    if not isinstance(text, str):
        return {}
    try:
        rows = json.loads(text)
        return {(str(c), str(t), int(p)): int(o) for c, t, p, o in rows}
    except (ValueError, TypeError):
        return {}
