from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from connectors.blobstore import BlobStoreError, LocalBlobStore
from connectors.dicom import validation as v


def ct() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "ct"
    ds.BodyPartExamined = "head "
    ds.SeriesDescription = "CT HEAD WO"
    ds.AccessionNumber = "ACC1"
    ds.PatientID = "MRN1"
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    ds.Rows = ds.Columns = 2
    ds.PixelData = b"\0" * 8
    return ds


def test_a_ct_image_is_accepted_and_carries_only_routing_metadata() -> None:
    ds = ct()
    assert v.check_instance(ds) is None
    event = v.instance_event(ds, blob_uri="file:///b/x.dcm", calling_ae="CT1", association_id="a")
    assert (event.modality, event.body_part, event.accession_number, event.patient_id) == (
        "CT",
        "HEAD",
        "ACC1",
        "MRN1",
    )
    dumped = event.model_dump_json()
    assert "Doe" not in dumped and "1970" not in dumped


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda d: delattr(d, "StudyInstanceUID"), v.MISSING_IDENTITY, "StudyInstanceUID"),
        (
            lambda d: setattr(d, "SeriesInstanceUID", "1.2.03"),
            v.MISSING_IDENTITY,
            "invalid SeriesInstanceUID",
        ),
        (lambda d: delattr(d, "PixelData"), v.NOT_AN_IMAGE, "no pixel data"),
        (lambda d: delattr(d, "Rows"), v.NOT_AN_IMAGE, "Rows"),
        (lambda d: delattr(d, "Modality"), v.MISSING_IDENTITY, "Modality"),
    ],
)
def test_refusals_name_the_problem(mutate: object, status: int, reason: str) -> None:
    ds = ct()
    mutate(ds)  # type: ignore[operator]
    refusal = v.check_instance(ds)
    assert refusal is not None and refusal.status == status and reason in refusal.reason
    assert len(refusal.comment) <= v.MAX_COMMENT


def test_blob_store_is_atomic_idempotent_and_confined(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    uri = store.put_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"first")
    assert store.put_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"second") == uri
    assert store.path_of(uri).read_bytes() == b"second"
    assert not list(tmp_path.rglob(".incoming-*"))
    with pytest.raises(BlobStoreError, match="not a valid DICOM UID"):
        store.put_instance("../../etc", "1.2", "1.3", b"x")
    with pytest.raises(BlobStoreError, match="outside the store"):
        store.path_of("file:///etc/passwd")
    with pytest.raises(BlobStoreError, match="scheme"):
        store.path_of("s3://bucket/key")
