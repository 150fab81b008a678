"""Pure checks of what the DICOM listener accepts, and the claim-check blob store."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    RawDataStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from connectors.dicom import validation as v
from connectors.dicom.part10 import part10_header
from radtriage.blobstore import BlobStoreError, LocalBlobStore, valid_uid
from tests.support.dicom_objects import instance, part10, with_meta

# Some datasets here are deliberately invalid; pydicom warns when they are built.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")


def ct() -> Dataset:
    ds = instance(CTImageStorage, "CT")
    ds.BodyPartExamined = "HEAD"
    ds.SeriesDescription = "CT HEAD WO"
    ds.StudyDescription = "CT BRAIN"
    ds.AccessionNumber = "ACC1"
    ds.PatientID = "MRN1"
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 8
    return ds


def non_image(sop_class: str) -> Dataset:
    """An SR / PDF / presentation state: identity and modality, no pixel data."""
    modalities = {str(BasicTextSRStorage): "SR", str(EncapsulatedPDFStorage): "DOC"}
    return instance(sop_class, modalities.get(sop_class, "PR"))


def test_a_ct_image_is_accepted_and_carries_only_routing_metadata() -> None:
    ds = ct()
    ds.Modality = "ct"  # senders are not always careful with case
    ds.BodyPartExamined = "head "
    assert v.check_instance(ds) is None
    assert v.fully_decode(ds) is None
    event = v.instance_event(ds, blob_uri="file:///b/x.dcm", calling_ae="CT1", association_id="a")
    assert (
        event.kind,
        event.study_uid,
        event.series_uid,
        event.sop_instance_uid,
        event.sop_class_uid,
    ) == ("instance", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, CTImageStorage)
    assert (event.modality, event.body_part, event.series_description, event.study_description) == (
        "CT",
        "HEAD",
        "CT HEAD WO",
        "CT BRAIN",
    )
    assert (event.accession_number, event.patient_id, event.calling_ae, event.source) == (
        "ACC1",
        "MRN1",
        "CT1",
        "dicom",
    )
    dumped = event.model_dump_json()
    # The whole birth date: "1970" alone turns up in a random UID about once in a hundred runs.
    assert "Doe" not in dumped and "19700101" not in dumped


@pytest.mark.parametrize(
    "sop_class", [MRImageStorage, DigitalMammographyXRayImageStorageForPresentation], ids=["MR", "MG"]
)
def test_other_triaged_image_classes_are_accepted(sop_class: str) -> None:
    ds = ct()
    ds.SOPClassUID = sop_class
    ds.Modality = "MR" if sop_class == MRImageStorage else "MG"
    assert v.check_instance(ds, request_sop_class=sop_class, request_sop_instance=ds.SOPInstanceUID) is None


@pytest.mark.parametrize(
    "sop_class",
    [
        BasicTextSRStorage,
        XRayRadiationDoseSRStorage,
        KeyObjectSelectionDocumentStorage,
        EncapsulatedPDFStorage,
        GrayscaleSoftcopyPresentationStateStorage,
        RawDataStorage,
    ],
    ids=["SR", "dose-SR", "KOS", "PDF", "GSPS", "raw"],
)
def test_non_image_storage_objects_are_accepted_without_pixels(sop_class: str) -> None:
    # A study comes with its SRs, KOS, PDFs and presentation states; refusing one makes the
    # sender stop the rest of the study. Stored and published, flagged as pixel-less.
    ds = non_image(sop_class)
    assert v.check_instance(ds, request_sop_class=sop_class, request_sop_instance=ds.SOPInstanceUID) is None
    event = v.instance_event(ds, blob_uri="", calling_ae="CT1", association_id="a")
    assert (event.has_pixels, event.rows, event.columns, event.frames, event.bits_allocated) == (
        False,
        0,
        0,
        0,
        0,
    )
    assert event.sop_class_uid == sop_class


def test_a_non_image_object_still_needs_its_identity() -> None:
    ds = non_image(KeyObjectSelectionDocumentStorage)
    del ds.SeriesInstanceUID
    refusal = v.check_instance(ds)
    assert refusal is not None and refusal.status == v.MISSING_IDENTITY


def test_an_image_class_other_than_the_triaged_ones_needs_pixels() -> None:
    # Secondary capture is an image IOD: stored when whole, refused without pixel data.
    ds = ct()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    assert v.check_instance(ds) is None
    del ds.PixelData
    refusal = v.check_instance(ds)
    assert refusal is not None and refusal.status == v.NOT_AN_IMAGE


def test_header_facts_of_an_image_reach_the_event() -> None:
    ds = ct()
    ds.ImageType = ["original", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = ["Hr40f", "3"]
    ds.SliceThickness = "2.5"
    ds.SeriesNumber = "3"
    ds.InstanceNumber = 17
    ds.Rows, ds.Columns, ds.BitsAllocated = 512, 256, 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    event = v.instance_event(ds, blob_uri="", calling_ae="", association_id="")
    assert event.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert event.convolution_kernel == "Hr40f\\3"
    assert (event.slice_thickness_mm, event.series_number, event.instance_number) == (2.5, 3, 17)
    assert (event.rows, event.columns, event.frames, event.bits_allocated) == (512, 256, 1, 16)
    assert event.has_pixels and event.transfer_syntax_uid == ExplicitVRLittleEndian
    # The negotiated syntax, when given, is what the event says.
    given = v.instance_event(ds, blob_uri="", calling_ae="", association_id="", transfer_syntax=RLELossless)
    assert given.transfer_syntax_uid == RLELossless
    ds.NumberOfFrames = 40
    assert v.instance_event(ds, blob_uri="", calling_ae="", association_id="").frames == 40


def test_empty_or_odd_optional_numbers_do_not_refuse_the_instance() -> None:
    # (A value that does not convert at all, "thick" in a DS, fails fully_decode first.)
    ds = ct()
    ds.SliceThickness = ""
    ds.SeriesNumber = None
    ds.InstanceNumber = ""
    assert v.check_instance(ds) is None
    event = v.instance_event(ds, blob_uri="", calling_ae="", association_id="")
    assert (event.slice_thickness_mm, event.series_number, event.instance_number) == (None, None, None)
    ds.SliceThickness = "-1"
    assert v.instance_event(ds, blob_uri="", calling_ae="", association_id="").slice_thickness_mm is None


Mutation = Callable[[Dataset], object]


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda d: delattr(d, "StudyInstanceUID"), v.MISSING_IDENTITY, "missing StudyInstanceUID"),
        (lambda d: delattr(d, "SeriesInstanceUID"), v.MISSING_IDENTITY, "missing SeriesInstanceUID"),
        (lambda d: delattr(d, "SOPInstanceUID"), v.MISSING_IDENTITY, "missing SOPInstanceUID"),
        (lambda d: delattr(d, "SOPClassUID"), v.MISSING_IDENTITY, "missing SOPClassUID"),
        (
            lambda d: setattr(d, "SeriesInstanceUID", "1.2.03"),
            v.MISSING_IDENTITY,
            "invalid SeriesInstanceUID",
        ),
        # A UID that would walk out of the blob store is not a UID.
        (
            lambda d: setattr(d, "StudyInstanceUID", "../../etc"),
            v.MISSING_IDENTITY,
            "invalid StudyInstanceUID",
        ),
        (lambda d: delattr(d, "PixelData"), v.NOT_AN_IMAGE, "no pixel data"),
        (lambda d: delattr(d, "Rows"), v.NOT_AN_IMAGE, "Rows"),
        (lambda d: delattr(d, "Modality"), v.NOT_AN_IMAGE, "Modality"),
    ],
    ids=[
        "no-study",
        "no-series",
        "no-sop",
        "no-class",
        "bad-series",
        "traversal",
        "no-pixels",
        "no-rows",
        "no-modality",
    ],
)
def test_refusals_name_the_problem(mutate: Mutation, status: int, reason: str) -> None:
    ds = ct()
    mutate(ds)
    refusal = v.check_instance(ds)
    assert refusal is not None and refusal.status == status and reason in refusal.reason
    assert len(refusal.comment) <= v.MAX_COMMENT
    # Reasons are ours: never a value from the dataset (no PHI, no garbage bytes).
    assert "Doe" not in refusal.reason and "etc" not in refusal.reason


def test_statuses_are_in_the_standard_ranges() -> None:
    assert v.OUT_OF_RESOURCES_KAFKA >> 8 == v.OUT_OF_RESOURCES_STORAGE >> 8 == 0xA7
    assert v.NOT_AN_IMAGE >> 8 == v.DATASET_MISMATCH >> 8 == 0xA9
    assert v.CANNOT_DECODE >> 12 == v.MISSING_IDENTITY >> 12 == 0xC


def test_a_dataset_that_disagrees_with_its_c_store_request_is_refused() -> None:
    ds = ct()
    wrong_class = v.check_instance(ds, request_sop_class=MRImageStorage)
    assert wrong_class is not None and wrong_class.status == v.DATASET_MISMATCH
    assert "SOPClassUID" in wrong_class.reason
    wrong_instance = v.check_instance(
        ds, request_sop_class=CTImageStorage, request_sop_instance=generate_uid()
    )
    assert wrong_instance is not None and wrong_instance.status == v.DATASET_MISMATCH
    assert "SOPInstanceUID" in wrong_instance.reason


def _decode(raw: bytes) -> Dataset:
    """What pynetdicom does with a received byte stream (explicit VR little endian)."""
    return read_dataset(BytesIO(raw), is_implicit_VR=False, is_little_endian=True)


def test_a_corrupt_element_is_caught_even_if_validation_would_never_read_it() -> None:
    # A good SOP Instance UID, then an element with an unknown VR: pydicom defers its
    # conversion, so only the full decode finds it.
    uid = b"1.2.3.4\x00"
    raw = b"\x08\x00\x18\x00UI" + len(uid).to_bytes(2, "little") + uid + b"\x09\x00\x10\x00ZZ\x04\x00abcd"
    ds = _decode(raw)
    refusal = v.fully_decode(ds)
    assert refusal is not None and refusal.status == v.CANNOT_DECODE
    assert "cannot be decoded" in refusal.reason


def test_an_undecodable_stream_maps_to_cannot_understand_without_quoting_it() -> None:
    # A sequence of undefined length that ends mid-item: pydicom raises while decoding.
    raw = (
        b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115) SQ, undefined length
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # an item of undefined length...
        b"\x08\x00\x50\x00SH\x04\x00ABCD"  # ...one element, then the stream ends
    )
    with pytest.raises(Exception) as caught:  # pydicom's error type varies by version
        _decode(raw)
    refusal = v.undecodable(caught.value)
    assert refusal.status == v.CANNOT_DECODE and "ABCD" not in refusal.reason


def test_uid_grammar() -> None:
    assert valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert valid_uid("0.0")
    for bad in ("", "1..2", "1.02", ".1", "1.", "1.2.a", "../x", "1" * 65, "1.2 "):
        assert not valid_uid(bad), bad


def test_blob_store_is_atomic_idempotent_and_confined(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    uri = store.put_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"first")
    assert uri.startswith("file://") and uri.endswith("/1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert store.put_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"second") == uri
    assert store.path_of(uri).read_bytes() == b"second"
    assert not list(tmp_path.rglob(".incoming-*"))
    with pytest.raises(BlobStoreError, match="not a valid DICOM UID"):
        store.put_instance("../../etc", "1.2", "1.3", b"x")
    with pytest.raises(BlobStoreError, match="not a valid DICOM UID"):
        store.put_instance("1.2", "1.3", "", b"x")
    with pytest.raises(BlobStoreError, match="outside the store"):
        store.path_of("file:///etc/passwd")
    with pytest.raises(BlobStoreError, match="outside the store"):
        store.path_of(uri.replace("/1.2.3/1.2.3.4/", "/../../../etc/"))
    with pytest.raises(BlobStoreError, match="remote host"):
        store.path_of("file://elsewhere" + store.path_of(uri).as_posix())
    with pytest.raises(BlobStoreError, match="scheme"):
        store.path_of("s3://bucket/key")


def test_a_stored_part10_file_reads_back(tmp_path: Path) -> None:
    ds = with_meta(ct())
    store = LocalBlobStore(tmp_path)
    uri = store.put_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, part10(ds))
    assert dcmread(store.path_of(uri)).SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, "1.2.840.10008.1.2.4.201"])
def test_the_part10_header_is_what_pynetdicom_would_write(syntax: str) -> None:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import encode_file_meta

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"  # odd length: padded
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    header = part10_header(
        CTImageStorage,
        "1.2.826.0.1.3680043.8.498.123",
        syntax,
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    assert header == expected
    ds = dcmread(BytesIO(header + b"\x08\x00\x18\x00UI\x04\x001.2\0"))
    assert ds.file_meta.TransferSyntaxUID == syntax and ds.SOPInstanceUID == "1.2"
