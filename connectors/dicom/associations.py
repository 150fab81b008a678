"""The associations open on the DICOM listener, and how each one ends.

pynetdicom runs every association in its own thread, and the C-STOREs of one association
one after another on it. An association's state (its id, the calling AE title, the
studies seen and their receive spans) lives here from its first C-STORE; the registry is
guarded by a lock, and whichever end-of-association path pops the state first (release,
abort, lost connection, listener stop) is the only one that finishes it.

On release, each study the association stored anything of gets one `transfer_complete`
marker after its instances, on the same partition (connectors/dicom/received_study.py);
an aborted or dropped association gets none, and the stream's quiet period finishes its
studies (docs/ARCHITECTURE.md, "Study assembly").
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry.trace import SpanKind

from connectors.dicom.received_study import ReceivedStudy
from connectors.publisher import EventPublisher, PublishError
from schemas.instances import InstanceEvent

log = logging.getLogger(__name__)

# After the connection closes, how long the release/abort handlers get to claim the
# association before it is finished as "lost" (a dropped TCP connection fires neither).
LOST_ASSOCIATION_GRACE_S = 5.0

Ending = Literal["released", "aborted", "lost", "stopped"]


@dataclass
class Association:
    id: str
    calling_ae: str
    studies: dict[str, ReceivedStudy] = field(default_factory=dict)


class Associations:
    def __init__(self, publisher: EventPublisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic  # where the markers go: the instances' topic
        # Keyed by the pynetdicom Association object itself (identity-hashed), not id():
        # an id can be reused by a new association once the old one is collected.
        self._open: dict[Any, Association] = {}
        self.lock = threading.Lock()

    def of(self, event: Any) -> Association:
        """The association of a C-STORE event, registered on its first."""
        with self.lock:
            state = self._open.get(event.assoc)
            if state is None:
                calling = event.assoc.requestor.ae_title
                calling = calling.decode(errors="replace") if isinstance(calling, bytes) else str(calling)
                state = Association(id=uuid.uuid4().hex, calling_ae=calling.strip())
                self._open[event.assoc] = state
            return state

    def _pop(self, assoc: Any) -> Association | None:
        with self.lock:
            return self._open.pop(assoc, None)

    def study(self, assoc: Association, instance: InstanceEvent) -> ReceivedStudy:
        """The study's state in this association; its span starts with its first instance."""
        with self.lock:
            study = assoc.studies.get(instance.study_uid)
            if study is None:
                study = ReceivedStudy.start(
                    "dicom.receive_study",
                    {
                        "radtriage.study_uid": instance.study_uid,
                        "radtriage.association_id": assoc.id,
                        "dicom.calling_ae": assoc.calling_ae,
                        "dicom.modality": instance.modality,
                    },
                    kind=SpanKind.SERVER,
                )
                assoc.studies[instance.study_uid] = study
            return study

    def stored(self, study: ReceivedStudy) -> None:
        with self.lock:
            study.count += 1

    def _finish(self, assoc: Association, ending: Ending) -> None:
        """Announce (on release only) and close the association's studies."""
        # A snapshot: when the listener stops, this runs on another thread than a C-STORE
        # that may still be adding a study.
        with self.lock:
            studies = list(assoc.studies.items())
        for study_uid, study in studies:
            # A study none of whose instances was stored gets no marker: it would complete
            # (empty) a study another association may be sending right now.
            if ending == "released" and study.count > 0:
                marker = study.marker(study_uid, assoc.id, "dicom", calling_ae=assoc.calling_ae)
                try:
                    self.publisher.publish(self.topic, study_uid, marker, study.traceparent())
                except PublishError as exc:
                    # The study still completes after the quiet period; nothing is lost.
                    log.warning("transfer-complete marker for %s not published (%s)", study_uid, exc)
            error = "" if ending == "released" else f"association {ending}"
            study.end(error, **{"dicom.association_end": ending})
        summary = ", ".join(f"{uid} ({s.count} instances)" for uid, s in studies)
        level = logging.INFO if ending == "released" else logging.WARNING
        log.log(
            level,
            "association %s from %s %s: %s%s",
            assoc.id[:8],
            assoc.calling_ae,
            ending,
            summary or "no studies",
            "" if ending == "released" or not summary else "; they complete after the quiet period",
        )

    def released(self, event: Any) -> None:
        # pynetdicom fires this after the A-RELEASE-RP went out: the markers' publishing
        # does not hold up the sender.
        assoc = self._pop(event.assoc)
        if assoc is not None:
            self._finish(assoc, "released")

    def aborted(self, event: Any) -> None:
        assoc = self._pop(event.assoc)
        if assoc is not None:
            self._finish(assoc, "aborted")

    def connection_closed(self, event: Any) -> None:
        # A connection that just drops fires neither EVT_RELEASED nor EVT_ABORTED; and on
        # a normal release this event can race EVT_RELEASED (it fires on the transport
        # thread). So give release/abort a grace period to claim the state first. Usually
        # they already have (or the association stored nothing): then no timer at all.
        with self.lock:
            if event.assoc not in self._open:
                return

        def sweep() -> None:
            assoc = self._pop(event.assoc)
            if assoc is not None:
                self._finish(assoc, "lost")

        timer = threading.Timer(LOST_ASSOCIATION_GRACE_S, sweep)
        timer.daemon = True
        timer.start()

    def finish_all(self) -> None:
        """End every open association's spans (the listener is stopping); no markers."""
        with self.lock:
            states, self._open = list(self._open.values()), {}
        for assoc in states:
            self._finish(assoc, "stopped")
