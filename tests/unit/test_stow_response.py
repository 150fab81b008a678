"""STOW-RS: the response rules and the per-part decode/validation (pure functions)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from connectors.dicom import validation as v
from connectors.dicomweb.parts import TRANSFER_SYNTAX_NOT_SUPPORTED, read_part
from connectors.dicomweb.response import Failed, Stored, http_status, stow_response
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning"),
    pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning"),
]

STORED = Stored("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")
BAD = Failed("1.2.840.10008.5.1.4.1.1.88.11", "1.2.3.4.6", v.SOP_CLASS_NOT_SUPPORTED, "SR not supported")
KAFKA = Failed("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.7", v.OUT_OF_RESOURCES_KAFKA, "event log unavailable")
DISK = Failed("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.8", v.OUT_OF_RESOURCES_STORAGE, "storage unavailable")


@pytest.mark.parametrize(
    ("stored", "failed", "status"),
    [
        ([STORED], [], 200),
        ([STORED], [BAD], 202),
        ([STORED], [KAFKA], 202),
        ([], [BAD], 409),
        ([], [BAD, KAFKA], 409),
        ([], [KAFKA, DISK], 503),
    ],
)
def test_http_status(stored: list[Stored], failed: list[Failed], status: int) -> None:
    assert http_status(stored, failed) == status


def test_response_is_dicom_json_with_urls_and_reasons() -> None:
    body = stow_response([STORED], [BAD, Failed("", "", v.CANNOT_DECODE, "x" * 100)], base_url="https://h")
    ds = Dataset.from_json(body)
    assert ds.RetrieveURL == "https://h/dicomweb/studies/1.2.3"
    (ref,) = ds.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == "1.2.3.4.5"
    assert ref.RetrieveURL == "https://h/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
    sr, undecodable = ds.FailedSOPSequence
    assert (sr.FailureReason, sr.ErrorComment) == (0x0122, "SR not supported")
    assert undecodable.FailureReason == 0xC210 and len(undecodable.ErrorComment) == 64
    assert not undecodable.ReferencedSOPInstanceUID


def test_study_retrieve_url_only_when_unambiguous() -> None:
    other = Stored("9.8.7", "9.8.7.6", STORED.sop_class_uid, "9.8.7.6.5")
    assert "00081190" not in stow_response([STORED, other], [], base_url="h")
    assert stow_response([STORED, other], [], base_url="h", target_study="1.2.3")["00081190"]["Value"] == [
        "h/dicomweb/studies/1.2.3"
    ]
    assert "00081190" not in stow_response([], [BAD], base_url="h", target_study="1.2.3")
    assert set(stow_response([STORED], [], base_url="h")) == {"00081190", "00081199"}


# -- read_part ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    ph = head_ct_phantom(np.random.default_rng(3), bleed=False, shape=(1, 32, 32))
    (path,) = write_ct_series(
        ph.hu, ph.spacing_zyx, tmp_path_factory.mktemp("ct"), accession="A", patient_id="M"
    )
    return path.read_bytes()


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_good_part_is_taken_as_sent(ct_file: bytes) -> None:
    part = read_part(ct_file)
    assert part.refusal is None and part.dataset is not None and part.part10 == ct_file
    assert part.identity.sop_instance_uid == str(part.dataset.SOPInstanceUID)


def test_a_part_without_preamble_is_stored_as_a_complete_file(ct_file: bytes) -> None:
    part = read_part(ct_file[132:])
    assert part.refusal is None
    assert part.part10 == ct_file[:128] + b"DICM" + ct_file[132:] == b"\0" * 128 + b"DICM" + ct_file[132:]
    assert dcmread(BytesIO(part.part10)).SOPInstanceUID == part.identity.sop_instance_uid


def _patch_meta(data: bytes, old: bytes, new: bytes) -> bytes:
    """Change a value in the file meta header only (its first occurrence), same length."""
    assert len(old) == len(new) and old in data
    return data.replace(old, new, 1)


def test_a_compressed_transfer_syntax_is_0xc122(ct_file: bytes) -> None:
    # The SCP negotiates uncompressed syntaxes only, and the pixel loader reads those.
    rle = _patch_meta(ct_file, b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0")
    part = read_part(rle)
    assert part.refusal is not None and part.refusal.status == TRANSFER_SYNTAX_NOT_SUPPORTED == 0xC122
    assert "RLE" in part.refusal.reason


def test_meta_header_must_name_the_same_instance(ct_file: bytes) -> None:
    sop = dcmread(BytesIO(ct_file)).SOPInstanceUID.encode()
    other = sop[:-1] + (b"1" if sop[-1:] != b"1" else b"2")
    part = read_part(_patch_meta(ct_file, sop, other))
    assert part.refusal is not None and part.refusal.status == v.DATASET_MISMATCH
    assert part.refusal.reason == "SOPInstanceUID differs from the file meta header"


@pytest.mark.parametrize(
    ("keyword", "value", "status"),
    [("PixelData", None, v.NOT_AN_IMAGE), ("StudyInstanceUID", "not.a.uid", v.MISSING_IDENTITY)],
)
def test_bad_images_get_the_c_store_refusals(
    ct_file: bytes, keyword: str, value: str | None, status: int
) -> None:
    ds = dcmread(BytesIO(ct_file))
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    part = read_part(_encode(ds))
    assert part.refusal is not None and part.refusal.status == status, part.refusal
    assert part.dataset is None


def test_non_images_are_taken_and_garbage_is_refused(ct_file: bytes) -> None:
    """A structured report is stored like any object (issue 16: every storage SOP class is
    accepted, the router ignores what has no pixels); what does not decode is refused."""
    sr = Dataset()
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = sr.SeriesInstanceUID = generate_uid()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    taken = read_part(_encode(sr))
    assert taken.refusal is None and taken.dataset is not None, taken.refusal
    assert taken.identity.sop_instance_uid == sr.SOPInstanceUID
    for garbage in (b"", b"hello", b"\0" * 128 + b"DICM" + b"\xff" * 50, ct_file[:400]):
        part = read_part(garbage)
        assert part.refusal is not None and part.refusal.status in (v.CANNOT_DECODE, v.MISSING_IDENTITY), (
            garbage[:20]
        )
