"""Alerts first: a finding that alerts is told to the on-call team before its other deliveries
are built (docs/ARCHITECTURE.md, "Alerts first").

One positive finding leaves a worker five ways at once: the alert (escalate, then the notify
stage's webhook and e-mail), the FHIR report, the ORU, and the SR with its key image. All
of them read `triage.findings` at the same moment and share the worker's one event loop and
one GIL. Measured on real-shaped head CTs (bench/RESULTS.md, "Kept SMTP connections, and
where a real-shaped study's webhook waits"): before the notify stage even read the alert,
the loop ran the report's FHIR Bundle (32 ms straight) and the ORU (34 ms), and during the
webhook's POST the SR build's thread held the GIL for 130-250 ms: alert -> webhook p50
62-96 ms, p99 157-353 ms, where the notify stage's own work is 1-4 ms.

And the alert itself goes first: when the escalate stage writes it to a partition this
worker's notify stage owns, it is handed to that stage as it is sent (`sending`), not after
its round trip through Kafka into the same worker's stream (the produce's acknowledgement,
the fetch, the stream's buffer behind the audit records: 43-201 ms in 1-3 alerts of 20 on
real-shaped head CTs, docs/ARCHITECTURE.md "Alerts first"). When the producer cannot say
the partition before sending (no metadata for the topic yet), it is handed over once Kafka
acknowledged it (`published`). The stream's own read of the record then finds the
escalation open and does nothing more.

So in a worker that runs the notify stage, the report, ORU and result-object builders of
a finding that alerts first wait (`before_delivering`) until the notify stage has told the
alert's first step, or the escalate stage found that another worker notifies it (the
alert's partition of its topic is not this worker's), or it was a duplicate; never longer
than `notify.alert_first_s`. They lose at most that much; the people on call gain the
loop. A worker with nothing to notify never waits.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Literal

from models import registry
from radtriage import metrics
from schemas.alerts import Alert, alert_id
from schemas.findings import Finding

# Gates kept at most (each a few hundred bytes): far more than the findings a worker has
# in flight at once; the oldest is opened and dropped when a new one would exceed it.
MAX_GATES = 4096

Waited = Literal["none", "told", "bound"]


def alert_channel(finding: Finding, rule_alerts: bool) -> str | None:
    """The channel a finding is alerted on, or None: a negative finding, a finding whose
    model's rule does not alert, or of a model whose spec names no channel."""
    if not finding.positive or not rule_alerts:
        return None
    return registry.get(finding.model_name).alert


class AlertFirst:
    """The gates of one worker: one per alert id, opened once its alert was told."""

    def __init__(self, rule_alerts: Mapping[str, bool]) -> None:
        self.rule_alerts = dict(rule_alerts)
        self.wait_s = 0.0  # off until the notify stage turns it on
        self._owns: Callable[[int], bool] = lambda partition: False
        self._hand_over: Callable[[Alert, int], None] | None = None
        self._gates: OrderedDict[str, asyncio.Event] = OrderedDict()

    def enable(
        self,
        wait_s: float,
        owns: Callable[[int], bool],
        hand_over: Callable[[Alert, int], None] | None = None,
    ) -> None:
        """Turned on by the notify stage: `owns(p)`, whether partition p of the alert topics
        is this worker's (then this worker's notify stage tells the alert); `hand_over`, the
        stage's door for an alert written to such a partition."""
        self.wait_s = wait_s
        self._owns = owns
        self._hand_over = hand_over

    def channel(self, finding: Finding) -> str | None:
        """The channel the finding is alerted on under the routing rules, or None."""
        return alert_channel(finding, self.rule_alerts.get(finding.model_name, False))

    def key(self, finding: Finding) -> str | None:
        """The finding's alert id if it alerts, else None."""
        if self.channel(finding) is None:
            return None
        return alert_id(finding.study_uid, finding.finding)

    def _gate(self, key: str) -> asyncio.Event:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = asyncio.Event()
            while len(self._gates) > MAX_GATES:
                _, oldest = self._gates.popitem(last=False)
                oldest.set()  # whoever still waits on it goes on
        return gate

    def release(self, key: str) -> None:
        """The alert was told (or will not be told here): its finding's deliveries go on."""
        if self.wait_s > 0:
            self._gate(key).set()

    def sending(self, alert: Alert, partition: int | None) -> bool:
        """The escalate stage is about to write `alert` to `partition`: if this worker's
        notify stage owns it, hand the alert over now. True if it was handed over."""
        if partition is None or self._hand_over is None or not self._owns(partition):
            return False
        self._hand_over(alert, partition)
        return True

    def published(self, alert: Alert, partition: int | None, *, handed: bool = False) -> None:
        """The escalate stage wrote `alert` to `partition` and Kafka acknowledged it: this
        worker's notify stage has it (now, unless `handed` before), or (another worker's
        partition) nobody here waits."""
        if partition is None or not self._owns(partition):
            self.release(alert.alert_id)
        elif self._hand_over is not None and not handed:
            self._hand_over(alert, partition)

    async def before_delivering(self, finding: Finding) -> Waited:
        """Wait, if the finding alerts and this worker tells it, until it was told."""
        key = self.key(finding) if self.wait_s > 0 else None
        if key is None:
            return "none"
        gate = self._gate(key)
        started = time.monotonic()
        try:
            await asyncio.wait_for(gate.wait(), self.wait_s)
            waited: Waited = "told"
        except TimeoutError:
            waited = "bound"
        metrics.ALERT_FIRST_WAIT.labels(waited).observe(time.monotonic() - started)
        return waited
