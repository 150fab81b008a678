"""Write a volume in Hounsfield units as a standards-conformant CT Image Storage series.

Used by the demo, the tests and anyone who wants to feed the pipeline a study:
real Part 10 files with patient/study/series identity, geometry (position,
orientation, spacing) and rescale, so the whole pipeline — DICOM transfer, volume
assembly by position, HU conversion — is exercised, not only the network.

`Identity` and `part10` are what every synthetic object shares (this CT series, the
radiographs of models/radiograph_writer.py): the Part 10 file and its patient, study,
series and equipment attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


class Identity(TypedDict, total=False):
    """Whose and which study and series a written object is; every key may be left out (a
    new UID, an empty name, the writer's own series description)."""

    study_uid: str | None
    series_uid: str | None
    accession: str
    patient_id: str
    patient_name: str
    # Set by the PHI tests, so that a birth date leaking anywhere would be caught.
    patient_birth_date: str
    series_description: str
    study_description: str | None
    institution: str


def one_series(identity: Identity) -> Identity:
    """`identity` with its study and series UIDs drawn where it has none: for the objects
    of one series."""
    return {
        **identity,
        "study_uid": identity.get("study_uid") or generate_uid(),
        "series_uid": identity.get("series_uid") or generate_uid(),
    }


def part10(
    path: Path,
    sop_class: UID,
    modality: str,
    identity: Identity,
    *,
    series_description: str,
    now: datetime,
) -> FileDataset:
    """A Part 10 dataset (Explicit VR Little Endian) of `sop_class` to be saved at `path`,
    with the patient, study, series and equipment attributes every synthetic object carries
    (`series_description`: the writer's default, where `identity` names none)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = identity.get("study_uid") or generate_uid()
    ds.SeriesInstanceUID = identity.get("series_uid") or generate_uid()
    ds.Modality = modality
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Manufacturer = "radtriage"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.InstitutionName = identity.get("institution", "radtriage synthetic")
    ds.PatientName = identity.get("patient_name", "")
    ds.PatientID = identity.get("patient_id", "")
    ds.PatientBirthDate = identity.get("patient_birth_date", "")
    ds.PatientSex = ""
    accession = identity.get("accession", "")
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession[-16:] if accession else "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    series_description = identity.get("series_description", series_description)
    ds.StudyDescription = identity.get("study_description") or series_description
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 1
    return ds


def write_ct_series(
    volume_hu: np.ndarray,
    spacing_zyx: Sequence[float],
    out_dir: Path,
    *,
    body_part: str = "HEAD",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    shuffle_files: bool = False,
    rng: np.random.Generator | None = None,
    **identity: Unpack[Identity],
) -> list[Path]:
    """Write one Part 10 file per slice (Explicit VR Little Endian); returns the paths in
    InstanceNumber order.

    Slice k of `volume_hu` lies at z = origin + k * spacing along the slice normal (+z,
    towards the head). Stored pixel = round((HU - intercept) / slope), signed only if some
    value needs it. With `shuffle_files`, InstanceNumbers (and so file names) are assigned
    in a random order relative to position — senders do that, and a loader must sort by
    ImagePositionPatient; `rng` makes that order reproducible. Series description by
    default "CT HEAD WO CONTRAST".
    """
    if volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must be (slices, rows, cols), got shape {volume_hu.shape}")
    if len(spacing_zyx) != 3 or min(float(s) for s in spacing_zyx) <= 0:
        raise ValueError(f"spacing_zyx must be three positive mm values, got {spacing_zyx}")
    if rescale_slope <= 0:
        raise ValueError("rescale_slope must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    series = one_series(identity)  # every slice in one study and series
    now = datetime.now(UTC)
    dz, dy, dx = (float(s) for s in spacing_zyx)
    n, rows, cols = volume_hu.shape
    stored = np.round((volume_hu - rescale_intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(stored, info.min, info.max).astype(dtype)
    # One frame of reference for the whole series: positions are only comparable within it.
    frame_uid = generate_uid()
    order = np.arange(n)
    if shuffle_files:
        order = (rng or np.random.default_rng()).permutation(n)
    # Patient coordinates: x to the patient's left, y posterior, z towards the head (LPS).
    origin = (-(cols - 1) * dx / 2.0, -(rows - 1) * dy / 2.0, -(n - 1) * dz / 2.0)
    paths: list[Path] = []
    for instance_number, k in enumerate(order, start=1):
        path = out_dir / f"CT{instance_number:04d}.dcm"
        ds = part10(path, CTImageStorage, "CT", series, series_description="CT HEAD WO CONTRAST", now=now)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = body_part
        ds.PatientPosition = "HFS"  # head first supine: what makes LPS +z point to the head
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + int(k) * dz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.SliceThickness = f"{dz:.4f}"
        ds.SliceLocation = f"{origin[2] + int(k) * dz:.4f}"
        ds.KVP = "120"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "80"
        ds.PixelData = stored[int(k)].tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
