"""Write a mammography study as Digital Mammography X-Ray Image Storage - For Presentation.

The mammography counterpart of `models.cxr_triage.writer.write_radiograph`: real Part 10 files,
one series of four single-frame MG objects (MG0001.dcm .. MG0004.dcm in VIEWS order:
RCC, RMLO, LCC, LMLO) with the attributes a screening mammogram carries — ImageLaterality
(the MG attribute; Laterality is left unset), ViewPosition with its CID 4014 view code,
the breast (CID 4013) as the anatomic region, the DX/Mammography image modules
(PresentationIntentType FOR PRESENTATION, 12 of 16 bits stored, PixelIntensityRelationship
LOG, PresentationLUTShape IDENTITY or INVERSE, ImagerPixelSpacing, positioner, organ,
compression, kVp).

Orientation is stored the way real systems store it, not the phantom's normalised
convention: a right breast is mirrored (chest wall at the right edge, nipple pointing
left), so PatientOrientation's row direction is "P" for R views and "A" for L views
(PS3.3 C.8.11.7.1.1: CC R "P\\L", L "A\\R"; MLO R "P\\FL", L "A\\FR"). A loader must
undo the mirroring (processors/mammogram.py). `photometric="MONOCHROME1"` stores the
inverted values, so that a loader's handling of it is exercised.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.mammo_birads.phantoms import BITS_STORED, MAX_VALUE, VIEWS, MammoStudy, MammoView

# PatientOrientation (row direction, column direction) of the stored image, by view key.
ORIENTATION: dict[str, tuple[str, str]] = {
    "RCC": ("P", "L"),
    "LCC": ("A", "R"),
    "RMLO": ("P", "FL"),
    "LMLO": ("A", "FR"),
}
VIEW_CODES = {"CC": codes.CID4014.CranioCaudal, "MLO": codes.CID4014.MedioLateralObliqueProjection}


def _code(code: object) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value  # type: ignore[attr-defined]
    item.CodingSchemeDesignator = code.scheme_designator  # type: ignore[attr-defined]
    item.CodeMeaning = code.meaning  # type: ignore[attr-defined]
    return item


def _check_view(view: MammoView) -> None:
    if view.laterality not in ("L", "R"):
        raise ValueError(f"laterality must be L or R, got {view.laterality!r}")
    if view.view not in ("CC", "MLO"):
        raise ValueError(f"view must be CC or MLO, got {view.view!r}")
    pixels = view.pixels
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"pixels must be a (rows, cols) array, got {getattr(pixels, 'shape', None)}")
    if pixels.dtype.kind not in "ui" or pixels.min() < 0 or pixels.max() > MAX_VALUE:
        raise ValueError(f"pixels must be {BITS_STORED}-bit integer values 0..{MAX_VALUE}")
    if len(view.pixel_mm) != 2 or not all(np.isfinite(s) and float(s) > 0 for s in view.pixel_mm):
        raise ValueError(f"pixel_mm must be two positive mm values, got {view.pixel_mm}")


def write_mammogram_view(
    view: MammoView,
    out_dir: Path,
    *,
    instance_number: int,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "",
    patient_id: str = "",
    patient_name: str = "",
    patient_birth_date: str = "",
    series_description: str = "MAMMO SCREENING BILATERAL",
    study_description: str | None = None,
    photometric: str = "MONOCHROME2",
    institution: str = "radtriage synthetic",
) -> Path:
    """Write one view as `MG{instance_number:04d}.dcm` in `out_dir`; returns its path."""
    _check_view(view)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f"instance_number must be a positive integer, got {instance_number!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = view.laterality + view.view
    stored = np.asarray(view.pixels, dtype=np.uint16)
    if view.laterality == "R":
        stored = stored[:, ::-1]  # as stored by real systems: the nipple points left
    if photometric == "MONOCHROME1":
        stored = (MAX_VALUE - stored).astype(np.uint16)
    sop_class = DigitalMammographyXRayImageStorageForPresentation
    sop_uid = generate_uid()
    now = datetime.now(UTC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path = out_dir / f"MG{instance_number:04d}.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "MG"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Manufacturer = "radtriage"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.InstitutionName = institution
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = "F"
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession[-16:] if accession else "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.StudyDescription = study_description or series_description
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = view.laterality  # the MG attribute; series Laterality stays unset
    ds.ViewPosition = view.view
    ds.PatientOrientation = list(ORIENTATION[key])
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AnatomicRegionSequence = [_code(codes.CID4013.Breast)]
    view_code = _code(VIEW_CODES[view.view])
    view_code.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_code]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.KVP = "28"
    ds.DistanceSourceToDetector = "660"
    ds.DistanceSourceToPatient = "615"
    ds.BodyPartThickness = "55"
    ds.CompressionForce = "110"
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = ["RHODIUM"]
    ds.ImagerPixelSpacing = [f"{float(view.pixel_mm[0]):.6f}", f"{float(view.pixel_mm[1]):.6f}"]
    # At the breast the magnification would differ; the phantom has none.
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
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mammogram_study(
    study: MammoStudy,
    out_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "",
    patient_id: str = "",
    patient_name: str = "",
    patient_birth_date: str = "",
    series_description: str = "MAMMO SCREENING BILATERAL",
    study_description: str | None = None,
    photometric: str = "MONOCHROME2",
    institution: str = "radtriage synthetic",
) -> list[Path]:
    """Write the study's four views as one series (MG0001..MG0004.dcm, VIEWS order)."""
    keys = [v.laterality + v.view for v in study.views]
    if keys != list(VIEWS):
        raise ValueError(f"a study holds the views {list(VIEWS)} in that order, got {keys}")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [
        write_mammogram_view(
            view,
            out_dir,
            instance_number=k,
            study_uid=study_uid,
            series_uid=series_uid,
            accession=accession,
            patient_id=patient_id,
            patient_name=patient_name,
            patient_birth_date=patient_birth_date,
            series_description=series_description,
            study_description=study_description,
            photometric=photometric,
            institution=institution,
        )
        for k, view in enumerate(study.views, start=1)
    ]
