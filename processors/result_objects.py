"""A finding's result objects for the PACS, built: the TID 1500 SR (processors/dicom_results.py),
for a positive finding the key image and its KOS (processors/key_images.py), and the SEG of
what a model localises (processors/dicom_seg.py).

Its own module so that only a worker with a PACS destination imports highdicom (~0.2 s,
with pydicom's SR code dictionaries): streams/stages/pacs_export.py imports it when the
stage registers, never at the worker's start (docs/ARCHITECTURE.md, "Results to the PACS").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from processors.dicom_results import ResultError, build_sr, read_headers
from processors.dicom_seg import SegError, build_seg, nothing_to_segment
from processors.key_images import build_key_image, build_kos, key_slice
from processors.localisation_map import StoredMap, from_bytes
from radtriage import metrics
from radtriage.settings import RESULT_OBJECTS, ResultObject
from schemas.findings import Finding

log = logging.getLogger(__name__)

__all__ = ["ResultError", "build_results"]


def build_results(
    finding: Finding,
    wanted: set[ResultObject],
    series: Sequence[Path],
    read_map: Callable[[str], bytes] | None,
    software_version: str,
) -> dict[ResultObject, Dataset]:
    """The objects wanted by some destination, in sending order (file reads and highdicom's
    work: call it off the event loop). `read_map` reads the finding's localisation map by its
    URI; None when the map is known not to be there (the SEG then goes without it)."""
    sources = read_headers(series)
    objects: dict[ResultObject, Dataset] = {}
    if "sr" in wanted:
        objects["sr"] = build_sr(finding, sources, software_version=software_version)
    if finding.positive and wanted & {"key_image", "kos"}:
        # Only a positive finding has something to show. A slice that cannot be drawn
        # (a multi-frame or colour source) costs the key image, never the SR.
        try:
            source = pydicom.dcmread(key_slice(finding, sources).filename)
            objects["key_image"] = build_key_image(finding, source)
        except (ValueError, OSError) as exc:
            log.warning("no key image for %s: %s", finding.study_uid, exc)
        else:
            if "kos" in wanted:
                objects["kos"] = build_kos(finding, [objects["key_image"]])
    if "seg" in wanted:
        seg = _seg(finding, sources, read_map, software_version)
        if seg is not None:
            objects["seg"] = seg
    return {what: objects[what] for what in RESULT_OBJECTS if what in objects}


def _seg(
    finding: Finding,
    sources: list[Dataset],
    read_map: Callable[[str], bytes] | None,
    software_version: str,
) -> Dataset | None:
    """What a model localises (its localisation map, nodules) as a SEG; None when there is
    nothing to segment or it cannot be built (a SEG costs the SEG, never the other objects)."""
    cell_map: StoredMap | None = None
    try:
        if finding.positive and finding.localisation_map_uri and read_map is not None:
            cell_map = from_bytes(read_map(finding.localisation_map_uri))
    except (ValueError, OSError) as exc:  # BlobStoreError, MapError: ValueErrors
        metrics.RESULTS_NOT_BUILT.labels("seg", "map_unreadable").inc()
        log.warning("no SEG for %s: localisation map unreadable: %s", finding.study_uid, exc)
    why_not = nothing_to_segment(finding, cell_map)
    if why_not is not None:
        log.debug("no SEG for %s (%s): %s", finding.study_uid, finding.finding, why_not)
        return None
    try:
        return build_seg(finding, sources, cell_map, software_version=software_version)
    except SegError as exc:
        metrics.RESULTS_NOT_BUILT.labels("seg", "no_geometry").inc()
        log.warning("no SEG for %s: %s", finding.study_uid, exc)
        return None
