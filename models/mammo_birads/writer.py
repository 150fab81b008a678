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
from typing import Unpack

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation

from models.dicom_writer import Identity, one_series, part10
from models.mammo_birads.phantoms import BITS_STORED, MAX_VALUE, VIEWS, MammoStudy, MammoView
from models.radiograph_writer import check_photometric, code_item, set_radiograph_pixels, stored_pixels

SERIES_DESCRIPTION = "MAMMO SCREENING BILATERAL"
# PatientOrientation (row direction, column direction) of the stored image, by view key.
ORIENTATION: dict[str, tuple[str, str]] = {
    "RCC": ("P", "L"),
    "LCC": ("A", "R"),
    "RMLO": ("P", "FL"),
    "LMLO": ("A", "FR"),
}
VIEW_CODES = {"CC": codes.CID4014.CranioCaudal, "MLO": codes.CID4014.MedioLateralObliqueProjection}


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
    photometric: str = "MONOCHROME2",
    **identity: Unpack[Identity],
) -> Path:
    """Write one view as `MG{instance_number:04d}.dcm` in `out_dir`; returns its path. Series
    description by default SERIES_DESCRIPTION."""
    _check_view(view)
    check_photometric(photometric)
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f"instance_number must be a positive integer, got {instance_number!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = view.laterality + view.view
    # As stored by real systems: a right breast's nipple points left.
    stored = stored_pixels(view.pixels, photometric, MAX_VALUE, mirrored=view.laterality == "R")
    now = datetime.now(UTC)
    path = out_dir / f"MG{instance_number:04d}.dcm"
    ds = part10(
        path,
        DigitalMammographyXRayImageStorageForPresentation,
        "MG",
        identity,
        series_description=SERIES_DESCRIPTION,
        now=now,
    )
    ds.AcquisitionDate, ds.AcquisitionTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.PatientSex = "F"
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = view.laterality  # the MG attribute; series Laterality stays unset
    ds.ViewPosition = view.view
    ds.PatientOrientation = list(ORIENTATION[key])
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AnatomicRegionSequence = [code_item(codes.CID4013.Breast)]
    view_code = code_item(VIEW_CODES[view.view])
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
    set_radiograph_pixels(ds, stored, view.pixel_mm, photometric, BITS_STORED)
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mammogram_study(
    study: MammoStudy,
    out_dir: Path,
    *,
    photometric: str = "MONOCHROME2",
    **identity: Unpack[Identity],
) -> list[Path]:
    """Write the study's four views as one series (MG0001..MG0004.dcm, VIEWS order)."""
    keys = [v.laterality + v.view for v in study.views]
    if keys != list(VIEWS):
        raise ValueError(f"a study holds the views {list(VIEWS)} in that order, got {keys}")
    series = one_series(identity)
    return [
        write_mammogram_view(view, out_dir, instance_number=k, photometric=photometric, **series)
        for k, view in enumerate(study.views, start=1)
    ]
