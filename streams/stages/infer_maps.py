"""The infer stage's localisation maps: named by the finding, written after it.

A finding of a localising model names the map its DICOM SEG is painted from
(streams/stages/pacs_export.py) by the URI the map will have; the map is written only
after the finding is published, so no thread hop or fsync sits on the alert's path. A
worker killed between the two leaves a finding whose map is owed: the request comes back
(its offset was not committed) and the stage runs the model again for the map alone
(docs/ARCHITECTURE.md, "Results to the PACS"). Only when a destination wants a SEG.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from models import registry
from processors.localisation_map import map_key, stored_map, to_bytes
from processors.triton_client import Inference
from radtriage import metrics
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import Settings
from schemas.findings import Finding
from schemas.requests import TriageRequest

log = logging.getLogger("streams.agents")


@dataclass(frozen=True)
class PendingMap:
    """A finding's localisation map, to be written once the finding naming it is out."""

    study_uid: str
    key: str
    data: bytes


def map_key_of(req: TriageRequest) -> str:
    """The blob key of a request's localisation map: a replay and an upgraded copy of the
    request name (and write) the same map."""
    return map_key(req.request_id or req.series_uid)


def localises(model_name: str) -> bool:
    """Whether the model's findings can name a localisation map (its slice range extra)."""
    try:
        return "slice_range" in registry.get(model_name).extras
    except KeyError:
        return False


@dataclass
class LocalisationMaps:
    """One worker's maps: which are being written, and the plan/write/owed steps."""

    settings: Settings
    blobs: LocalBlobStore
    # Request ids whose map is being written (after their finding went out): a copy of the
    # request seeing the finding already out must not take the map as lost.
    writing: set[str] = field(default_factory=set)

    def plan(
        self, req: TriageRequest, finding: Finding, result: Inference, geometry: object
    ) -> tuple[Finding, PendingMap | None]:
        """The finding naming its map by the URI the map will have, and the map to write once
        the finding is out. The finding as it is when no destination wants a SEG, or there
        is no map, or it cannot be kept (a SEG is worth less than the finding: logged,
        counted)."""
        if finding.slice_range is None or not self.settings.dispatch.wants_object("seg"):
            return finding, None
        try:
            kept = stored_map(result.maps, geometry, finding.positive, req.localisation_threshold)
            if kept is None:
                return finding, None
            pending = PendingMap(req.study_uid, map_key_of(req), to_bytes(kept))
            uri = self.blobs.localisation_map_uri(pending.study_uid, pending.key)
        except ValueError as exc:  # BlobStoreError and MapError are ValueErrors
            metrics.LOCALISATION_MAPS.labels("failed").inc()
            log.warning("localisation map of %s not kept: %s: %s", req.study_uid, type(exc).__name__, exc)
            return finding, None
        return finding.model_copy(update={"localisation_map_uri": uri}), pending

    async def write(self, req: TriageRequest, pending: PendingMap) -> None:
        """Write the map the published finding names; a failure costs the SEG (the export
        waits `dispatch.map_wait_s` for it, then sends the rest: audited), never the finding."""
        try:
            await asyncio.to_thread(
                self.blobs.put_localisation_map, pending.study_uid, pending.key, pending.data
            )
        except (OSError, ValueError) as exc:
            metrics.LOCALISATION_MAPS.labels("failed").inc()
            log.warning("localisation map of %s not kept: %s: %s", req.study_uid, type(exc).__name__, exc)
            return
        metrics.LOCALISATION_MAPS.labels("stored").inc()

    def owed(self, req: TriageRequest) -> bool:
        """A finding already out may name a map that was never written: the worker was killed
        between publishing it and writing the map (the request came back, uncommitted)."""
        if not self.settings.dispatch.wants_object("seg") or not localises(req.model_name):
            return False
        if req.request_id and req.request_id in self.writing:
            return False  # this worker's other copy is writing it now
        try:
            uri = self.blobs.localisation_map_uri(req.study_uid, map_key_of(req))
            return not self.blobs.path_of(uri).is_file()
        except ValueError:
            return False
