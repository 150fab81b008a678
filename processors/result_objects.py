"""A finding's result objects for the PACS, built: the TID 1500 SR (processors/dicom_results.py),
for a positive finding the key image and its KOS (processors/key_images.py), and the SEG of
what a model localises (processors/dicom_seg.py).

Built where `dispatch.build_in` says: a thread of the worker (`ThreadBuilder`, the default)
or a process of their own (`BuildPool`). In a thread, reading a series' headers with pydicom
and highdicom's work hold the worker's GIL for 130-250 ms per finding, across the notify
stage's POST of the same alert; in a process they do not, but on the 2-core bench box the
process's build took the core the alert's deliveries needed and the webhook came later,
not sooner (bench/RESULTS.md, "Result objects in a process"). Either way, what could not be
built comes back as values (`NotBuilt`) that the stage logs and counts: a child's counters
would never reach /metrics.

Its own module so that only a worker with a PACS destination imports highdicom (~0.2 s,
with pydicom's SR code dictionaries): streams/stages/pacs_export.py imports it when the
stage registers, never at the worker's start (docs/ARCHITECTURE.md, "Results to the PACS").
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from processors.child_process import exit_with_parent
from processors.dicom_results import ResultError, build_sr, encode, read_headers
from processors.dicom_seg import SegError, build_seg, nothing_to_segment
from processors.key_images import build_key_image, build_kos, key_slice
from processors.localisation_map import StoredMap, from_bytes
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import RESULT_OBJECTS, ResultObject
from schemas.findings import Finding

log = logging.getLogger(__name__)

__all__ = ["BuildPool", "Built", "NotBuilt", "ResultError", "ThreadBuilder", "build_results", "builder"]


@dataclass(frozen=True)
class NotBuilt:
    """A wanted object that could not be built: `reason` is the metric label, `message` the cause."""

    object: ResultObject
    reason: str
    message: str


@dataclass
class Built:
    objects: dict[ResultObject, Dataset] = field(default_factory=dict)  # in sending order
    not_built: list[NotBuilt] = field(default_factory=list)


def build_results(
    finding: Finding,
    wanted: set[ResultObject],
    series: Sequence[Path],
    read_map: Callable[[str], bytes] | None,
    software_version: str,
) -> Built:
    """The objects wanted by some destination, in sending order, and what could not be built
    (file reads and highdicom's work: run it in `BuildPool`). `read_map` reads the finding's
    localisation map by its URI; None when the map is known not to be there (the SEG then
    goes without it)."""
    sources = read_headers(series)
    objects: dict[ResultObject, Dataset] = {}
    not_built: list[NotBuilt] = []
    if "sr" in wanted:
        objects["sr"] = build_sr(finding, sources, software_version=software_version)
    if finding.positive and wanted & {"key_image", "kos"}:
        # Only a positive finding has something to show. A slice that cannot be drawn
        # (a multi-frame or colour source) costs the key image, never the SR.
        try:
            source = pydicom.dcmread(key_slice(finding, sources).filename)
            objects["key_image"] = build_key_image(finding, source)
        except (ValueError, OSError) as exc:
            not_built.append(NotBuilt("key_image", "slice_unreadable", str(exc)))
        else:
            if "kos" in wanted:
                objects["kos"] = build_kos(finding, [objects["key_image"]])
    if "seg" in wanted:
        seg = _seg(finding, sources, read_map, software_version, not_built)
        if seg is not None:
            objects["seg"] = seg
    return Built({what: objects[what] for what in RESULT_OBJECTS if what in objects}, not_built)


def _seg(
    finding: Finding,
    sources: list[Dataset],
    read_map: Callable[[str], bytes] | None,
    software_version: str,
    not_built: list[NotBuilt],
) -> Dataset | None:
    """What a model localises (its localisation map, nodules) as a SEG; None when there is
    nothing to segment or it cannot be built (a SEG costs the SEG, never the other objects)."""
    cell_map: StoredMap | None = None
    try:
        if finding.positive and finding.localisation_map_uri and read_map is not None:
            cell_map = from_bytes(read_map(finding.localisation_map_uri))
    except (ValueError, OSError) as exc:  # BlobStoreError, MapError: ValueErrors
        not_built.append(NotBuilt("seg", "map_unreadable", f"localisation map unreadable: {exc}"))
    why_not = nothing_to_segment(finding, cell_map)
    if why_not is not None:
        log.debug("no SEG for %s (%s): %s", finding.study_uid, finding.finding, why_not)
        return None
    try:
        return build_seg(finding, sources, cell_map, software_version=software_version)
    except SegError as exc:
        not_built.append(NotBuilt("seg", "no_geometry", str(exc)))
        return None


# -- where they are built: a thread of the worker, or a process of their own ----------------------


class ThreadBuilder:
    """`build_results` in a thread of the worker (the default, `dispatch.build_in: thread`)."""

    def __init__(self, blobs: LocalBlobStore, software_version: str) -> None:
        self.blobs, self.software_version = blobs, software_version

    async def warm(self) -> None:
        return None

    async def build(self, finding: Finding, wanted: set[ResultObject], with_map: bool) -> Built:
        series = self.blobs.series_paths(finding.study_uid, finding.series_uid)
        read_map = self.blobs.read if with_map else None
        return await asyncio.to_thread(
            build_results, finding, wanted, series, read_map, self.software_version
        )

    def shutdown(self) -> None:
        return None


def _init_process(niceness: int) -> None:
    exit_with_parent()
    if niceness:
        os.nice(niceness)
    import highdicom  # noqa: F401  # before the first finding, not during it


def _ready() -> bool:
    return True


def _build_encoded(
    finding: bytes, wanted: set[ResultObject], blobs: LocalBlobStore, with_map: bool, software_version: str
) -> tuple[dict[ResultObject, bytes], list[NotBuilt]]:
    """`build_results` in the pool process: the finding as its event bytes, the objects back
    as Part 10 bytes (a highdicom object does not pickle; its encoding is what is sent)."""
    event = Finding.from_bytes(finding)
    series = blobs.series_paths(event.study_uid, event.series_uid)
    built = build_results(event, wanted, series, blobs.read if with_map else None, software_version)
    return {what: encode(ds) for what, ds in built.objects.items()}, built.not_built


class BuildPool:
    """One process building result objects (`dispatch.build_in: process`), started on first
    use (or `warm`), replaced if it dies."""

    def __init__(self, blobs: LocalBlobStore, software_version: str, niceness: int = 0) -> None:
        self.blobs, self.software_version, self.niceness = blobs, software_version, niceness
        self._pool: ProcessPoolExecutor | None = None
        # "spawn": forking a process that runs an event loop, Kafka clients and threads is unsafe.
        self._context = multiprocessing.get_context("spawn")

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=self._context, initializer=_init_process, initargs=(self.niceness,)
            )
        return self._pool

    async def warm(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor(), _ready)
        log.info("result objects' build process is ready")

    async def build(self, finding: Finding, wanted: set[ResultObject], with_map: bool) -> Built:
        """`build_results` for `finding` in the pool process; ResultError as there."""
        loop = asyncio.get_running_loop()
        args = (finding.to_bytes(), wanted, self.blobs, with_map, self.software_version)
        try:
            encoded, not_built = await loop.run_in_executor(self._executor(), _build_encoded, *args)
        except BrokenProcessPool:
            # The process died (OOM, a kill): a fresh one, and this finding tried once more.
            log.warning("result objects' build process broke; starting a new one")
            self._pool = None
            encoded, not_built = await loop.run_in_executor(self._executor(), _build_encoded, *args)
        objects: dict[ResultObject, Dataset] = {
            what: pydicom.dcmread(io.BytesIO(data)) for what, data in encoded.items()
        }
        return Built(objects, not_built)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def builder(
    blobs: LocalBlobStore, software_version: str, build_in: str, niceness: int
) -> ThreadBuilder | BuildPool:
    """Where the stage builds its objects (`dispatch.build_in`; ARCHITECTURE "Results to the PACS")."""
    if build_in == "process":
        return BuildPool(blobs, software_version, niceness)
    return ThreadBuilder(blobs, software_version)
