"""What an intake (the C-STORE listener, STOW-RS) publishes of one study, checked the same
way whichever received it: one event per instance and one release marker after them on the
study's partition, and a blob per instance that is the file that was sent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from radtriage.blobstore import LocalBlobStore
from tests.support.kafka import Record


def one_study(records: list[Record], study_uid: str, count: int) -> tuple[list[Record], Record]:
    """The instance events and the release marker of a study's records: exactly `count`
    instances and one marker counting them, keyed by the study (one partition, the marker
    after every instance), all of one association."""
    instances = [r for r in records if r.value["kind"] == "instance"]
    markers = [r for r in records if r.value["kind"] == "transfer_complete"]
    assert len(instances) == count and len(markers) == 1 and len(records) == count + 1
    (marker,) = markers
    assert marker.value["study_uid"] == study_uid and marker.value["instance_count"] == count
    assert {r.partition for r in records} == {marker.partition}
    assert marker.offset == max(r.offset for r in records)
    assert {r.value["association_id"] for r in records} == {marker.value["association_id"]}
    return instances, marker


def stored_as_sent(blob_dir: Path, instances: Iterable[Record], originals: Mapping[str, Dataset]) -> Dataset:
    """Checks that each instance event's blob is the complete Part 10 file that was sent (its
    transfer syntax and pixels; `originals` by SOP Instance UID) and that nothing else was
    stored; the last blob read, for checks of its own."""
    store = LocalBlobStore(blob_dir)
    stored = Dataset()
    for r in instances:
        stored = dcmread(store.path_of(r.value["blob_uri"]))
        original = originals[str(stored.SOPInstanceUID)]
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData
    assert len(list(blob_dir.rglob("*.dcm"))) == len(originals)
    return stored
