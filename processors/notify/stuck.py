"""Stuck studies: a request routed on a lane with no finding past the lane's limit (pure;
streams/stages/notify_ops.py feeds it `triage.requests.<lane>` and `triage.findings`).

The same picture as the operator page's "waiting" list (radtriage/operator/view.py), with a
limit per lane (`notify.operators.stuck_after_s`): a request is watched from when it was
first routed (an upgrade by a late order keeps the clock and takes the faster lane's
limit), until its finding or its dead letter is read; past the limit it is reported once
and no longer watched. Bounded: the oldest watched request goes when `cap` are watched,
counted in `dropped`; finished request ids are remembered (as many) so a request copy
read after its finding does not start the clock again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from processors.notify.digest import Item


@dataclass(frozen=True)
class Watched:
    request_id: str
    study_uid: str
    accession_number: str
    lane: str
    finding: str
    routed_at: datetime
    # Where the request was read (see digest.Item: what a told digest covered).
    topic: str = ""
    partition: int = -1
    offset: int = -1


def _rank(lane: str) -> int:
    return {"stat": 0, "urgent": 1, "routine": 2}.get(lane, 3)


@dataclass
class StuckWatch:
    after_s: Mapping[str, float]
    cap: int
    watched: OrderedDict[str, Watched] = field(default_factory=OrderedDict)
    finished: OrderedDict[str, None] = field(default_factory=OrderedDict)
    dropped: int = 0

    def routed(self, w: Watched) -> None:
        if w.request_id in self.finished:
            return
        current = self.watched.get(w.request_id)
        if current is not None:
            lane = w.lane if _rank(w.lane) < _rank(current.lane) else current.lane
            w = replace(current, lane=lane, routed_at=min(current.routed_at, w.routed_at))
        if w.lane not in self.after_s:
            self.watched.pop(w.request_id, None)
            return
        self.watched[w.request_id] = w
        while len(self.watched) > self.cap:
            self.watched.popitem(last=False)
            self.dropped += 1

    def done(self, request_id: str, study_uid: str = "") -> None:
        """A finding (or dead letter) for the request; without a request id (findings made
        before they carried one), every request of the study."""
        ids = [request_id] if request_id else [k for k, v in self.watched.items() if v.study_uid == study_uid]
        for key in ids:
            self.watched.pop(key, None)
            self.finished[key] = None
            while len(self.finished) > self.cap:
                self.finished.popitem(last=False)

    def stuck(self, now: datetime) -> list[Watched]:
        """Requests past their lane's limit, taken out of the watch: each reported once."""
        late = [
            w for w in self.watched.values() if now >= w.routed_at + timedelta(seconds=self.after_s[w.lane])
        ]
        for w in late:
            del self.watched[w.request_id]
        return late

    def forget(self) -> None:
        """Partitions moved: what is watched is the next owner's to read."""
        self.watched.clear()


def stuck_item(w: Watched, limit_s: float, now: datetime) -> Item:
    waited = int((now - w.routed_at).total_seconds())
    return Item(
        kind="stuck",
        cause=f"{w.lane} lane: no finding within {limit_s:g} s",
        study_uid=w.study_uid,
        accession_number=w.accession_number,
        detail=f"{w.finding} on {w.lane}, routed {w.routed_at.isoformat(timespec='seconds')}, "
        f"waiting {waited} s (request {w.request_id})",
        at=now,
        topic=w.topic,
        partition=w.partition,
        offset=w.offset,
    )
