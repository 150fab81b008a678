"""A finding's result objects built in the pool process (processors/result_objects.BuildPool):
the same objects as in the worker, what could not be built coming back as values, the
"nothing to reference" error crossing the process, and a dead process replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from processors.dicom_results import read_headers
from processors.localisation_map import map_key, to_bytes
from processors.result_objects import BuildPool, NotBuilt, ResultError, ThreadBuilder, builder
from radtriage.blobstore import LocalBlobStore
from schemas.findings import Finding
from tests.unit.test_dicom_seg import SERIES, STUDY, _bleed_map, _ich, write_series

ALL = {"sr", "key_image", "kos", "seg"}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> LocalBlobStore:
    """The CT of tests/unit/test_dicom_seg.py, stored as the DICOM listener stores it."""
    store = LocalBlobStore(tmp_path_factory.mktemp("blobs"))
    files = write_series(tmp_path_factory.mktemp("ct"))
    for path in files:
        ds = read_headers([path])[0]
        store.put_instance(STUDY, SERIES, str(ds.SOPInstanceUID), path.read_bytes())
    return store


@pytest.fixture(scope="module")
def pool(blobs: LocalBlobStore) -> Iterator[BuildPool]:
    built = BuildPool(blobs, "radtriage test")
    asyncio.run(built.warm())
    yield built
    built.shutdown()


def _finding_with_map(blobs: LocalBlobStore, data: bytes | None = None) -> Finding:
    finding, kept = _ich(read_headers(blobs.series_paths(STUDY, SERIES)), _bleed_map())
    stored = to_bytes(kept) if data is None else data
    uri = blobs.put_localisation_map(STUDY, map_key(finding.request_id + str(len(stored))), stored)
    return finding.model_copy(update={"localisation_map_uri": uri})


def test_a_positive_finding_gets_all_four_objects_from_the_process(
    blobs: LocalBlobStore, pool: BuildPool
) -> None:
    built = asyncio.run(pool.build(_finding_with_map(blobs), ALL, with_map=True))
    assert built.not_built == []
    assert list(built.objects) == ["sr", "key_image", "kos", "seg"]  # the sending order
    classes = {what: str(ds.SOPClassUID) for what, ds in built.objects.items()}
    assert classes == {
        "sr": Comprehensive3DSRStorage,
        "key_image": SecondaryCaptureImageStorage,
        "kos": KeyObjectSelectionDocumentStorage,
        "seg": SegmentationStorage,
    }
    assert all(ds.StudyInstanceUID == STUDY for ds in built.objects.values())


def test_an_unreadable_map_costs_the_seg_and_comes_back_as_a_value(
    blobs: LocalBlobStore, pool: BuildPool
) -> None:
    built = asyncio.run(pool.build(_finding_with_map(blobs, b"not a map"), ALL, with_map=True))
    assert "seg" not in built.objects and {"sr", "key_image", "kos"} <= set(built.objects)
    (missed,) = built.not_built
    assert (missed.object, missed.reason) == ("seg", "map_unreadable")
    assert isinstance(missed, NotBuilt) and "localisation map unreadable" in missed.message


def test_a_series_not_in_the_blob_store_raises_the_stage_s_error(
    blobs: LocalBlobStore, pool: BuildPool
) -> None:
    finding = _finding_with_map(blobs).model_copy(update={"series_uid": SERIES + ".404"})
    with pytest.raises(ResultError):
        asyncio.run(pool.build(finding, {"sr"}, with_map=False))


def test_a_killed_build_process_is_replaced_and_the_finding_built(
    blobs: LocalBlobStore, tmp_path: Path
) -> None:
    own = BuildPool(blobs, "radtriage test")
    try:
        asyncio.run(own.warm())
        assert own._pool is not None
        (pid,) = own._pool._processes  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        built = asyncio.run(own.build(_finding_with_map(blobs), {"sr"}, with_map=False))
        assert list(built.objects) == ["sr"]
    finally:
        own.shutdown()


def test_the_build_process_runs_at_the_configured_nice_value(blobs: LocalBlobStore) -> None:
    own = BuildPool(blobs, "radtriage test", niceness=7)
    try:
        asyncio.run(own.warm())
        assert own._pool is not None
        (pid,) = own._pool._processes  # type: ignore[attr-defined]
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + 7)
    finally:
        own.shutdown()


def test_the_thread_builder_builds_the_same_objects_in_the_worker(blobs: LocalBlobStore) -> None:
    built = asyncio.run(
        ThreadBuilder(blobs, "radtriage test").build(_finding_with_map(blobs), ALL, with_map=True)
    )
    assert built.not_built == [] and list(built.objects) == ["sr", "key_image", "kos", "seg"]
    assert isinstance(builder(blobs, "v", "thread", 10), ThreadBuilder)
    assert isinstance(builder(blobs, "v", "process", 10), BuildPool)
