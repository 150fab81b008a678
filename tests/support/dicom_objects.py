"""Small DICOM objects built by hand for the listener's tests (C-STORE, STOW-RS and the pure
checks): a new instance's identity, its Part 10 file meta, a header that claims a CT image
before bytes that do not decode, and the patient values that must never leak."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# A patient's name and birth date put in test objects: neither may reach an event, a log or
# a reply.
SECRET_NAME = "Secret^Patient"
SECRET_BIRTH_DATE = "19450817"

# A sequence of undefined length that ends mid-item: pydicom cannot decode it (0xC210).
TRUNCATED_SEQUENCE = (
    b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115) SQ, undefined length
    b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # an item of undefined length...
    b"\x08\x00\x50\x00SH\x04\x00ABCD"  # ...one element, then the stream ends
)

# Test objects malformed on purpose: pydicom warns while writing or decoding them.
MALFORMED_OBJECT_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning"),
]


def instance(sop_class: str, modality: str | None = None) -> Dataset:
    """A new instance of `sop_class` in a new study and series (of `modality` when given):
    the identity every stored object has, and nothing else."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if modality is not None:
        ds.Modality = modality
    return ds


def with_meta(ds: Dataset) -> Dataset:
    """`ds` with the Part 10 file meta of its own class and instance (explicit VR little endian)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def part10(ds: Dataset) -> bytes:
    """`ds` as the bytes of a Part 10 file (it must have its file meta)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def header_only(garbage: bytes) -> bytes:
    """A valid Part 10 header claiming a CT image (its class and instance only), followed by
    `garbage` as the dataset."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    return part10(with_meta(ds)) + garbage
