"""Write a chest radiograph as one single-frame DX (or CR) Image Storage object.

The radiograph counterpart of `models.dicom_writer.write_ct_series`: a real Part 10
file with patient/study/series identity and the attributes a projection radiograph
carries instead of a CT's geometry — no ImagePositionPatient or orientation matrix, but
PatientOrientation (row and column directions: "L\\F" for a PA chest displayed the
conventional way), ImagerPixelSpacing (at the detector; DX Type 1) and PixelSpacing, the
view (ViewPosition PA plus its CID 4010 code) and the anatomy (CID 4009 Chest).

DX: Digital X-Ray Image Storage - For Presentation, DX Series / Anatomy Imaged / Image /
Detector / Positioning modules (PresentationIntentType FOR PRESENTATION, 12 of 16 bits
stored, PixelIntensityRelationship LOG, PresentationLUTShape IDENTITY or INVERSE).
CR: Computed Radiography Image Storage (CR Series and CR Image modules). MONOCHROME2
by default; `photometric="MONOCHROME1"` stores the inverted values, as many CR readers
do, so that a loader's handling of it is exercised.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.cxr_triage.phantoms import BITS_STORED, MAX_VALUE


def _code(code: object) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value  # type: ignore[attr-defined]
    item.CodingSchemeDesignator = code.scheme_designator  # type: ignore[attr-defined]
    item.CodeMeaning = code.meaning  # type: ignore[attr-defined]
    return item


def write_radiograph(
    pixels: np.ndarray,
    pixel_mm: Sequence[float],
    out_dir: Path,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    mirrored: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "",
    patient_id: str = "",
    patient_name: str = "",
    patient_birth_date: str = "",
    series_description: str = "CHEST PA",
    study_description: str | None = None,
    institution: str = "radtriage synthetic",
) -> Path:
    """Write `pixels` ((rows, cols), 12-bit values, brighter = more attenuation, patient's
    left on the right) as one Part 10 file in `out_dir`; returns its path.

    `mirrored` stores the image flipped left-right with PatientOrientation "R\\F" (what a
    detector read from the other side produces): the pixels differ, the patient does
    not, and a loader must undo it.
    """
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be (rows, cols), got shape {pixels.shape}")
    if len(pixel_mm) != 2 or min(float(s) for s in pixel_mm) <= 0:
        raise ValueError(f"pixel_mm must be two positive mm values, got {pixel_mm}")
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if pixels.min() < 0 or pixels.max() > MAX_VALUE:
        raise ValueError(f"pixels must be {BITS_STORED}-bit values 0..{MAX_VALUE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(pixels, dtype=np.uint16)
    if mirrored:
        stored = stored[:, ::-1]
    if photometric == "MONOCHROME1":
        stored = (MAX_VALUE - stored).astype(np.uint16)
    sop_class = (
        DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    )
    sop_uid = generate_uid()
    now = datetime.now(UTC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path = out_dir / f"{modality}0001.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Manufacturer = "radtriage"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.InstitutionName = institution
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = ""
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession[-16:] if accession else "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.StudyDescription = study_description or series_description
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["R" if mirrored else "L", "F"]
    ds.ImageLaterality = "U"  # unpaired structure
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AnatomicRegionSequence = [_code(codes.CID4009.Chest)]
    ds.ViewCodeSequence = [_code(codes.CID4010.PosteroAnterior)]
    ds.KVP = "120"
    ds.DistanceSourceToDetector = "1800"
    ds.ImagerPixelSpacing = [f"{float(pixel_mm[0]):.6f}", f"{float(pixel_mm[1]):.6f}"]
    # Calibrated at the patient would differ by the magnification; the phantom has none.
    ds.PixelSpacing = list(ds.ImagerPixelSpacing)
    ds.EstimatedRadiographicMagnificationFactor = "1.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = str(MAX_VALUE // 2), str(MAX_VALUE)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
