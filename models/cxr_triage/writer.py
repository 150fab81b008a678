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
from typing import Unpack

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from models.cxr_triage.phantoms import BITS_STORED, MAX_VALUE
from models.dicom_writer import Identity, part10
from models.radiograph_writer import check_photometric, code_item, set_radiograph_pixels, stored_pixels


def write_radiograph(
    pixels: np.ndarray,
    pixel_mm: Sequence[float],
    out_dir: Path,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    mirrored: bool = False,
    **identity: Unpack[Identity],
) -> Path:
    """Write `pixels` ((rows, cols), 12-bit values, brighter = more attenuation, patient's
    left on the right) as one Part 10 file in `out_dir`; returns its path. Series
    description by default "CHEST PA".

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
    check_photometric(photometric)
    if pixels.min() < 0 or pixels.max() > MAX_VALUE:
        raise ValueError(f"pixels must be {BITS_STORED}-bit values 0..{MAX_VALUE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = stored_pixels(pixels, photometric, MAX_VALUE, mirrored=mirrored)
    sop_class = (
        DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    )
    now = datetime.now(UTC)
    path = out_dir / f"{modality}0001.dcm"
    ds = part10(path, sop_class, modality, identity, series_description="CHEST PA", now=now)
    ds.AcquisitionDate, ds.AcquisitionTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["R" if mirrored else "L", "F"]
    ds.ImageLaterality = "U"  # unpaired structure
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AnatomicRegionSequence = [code_item(codes.CID4009.Chest)]
    ds.ViewCodeSequence = [code_item(codes.CID4010.PosteroAnterior)]
    ds.KVP = "120"
    ds.DistanceSourceToDetector = "1800"
    set_radiograph_pixels(ds, stored, pixel_mm, photometric, BITS_STORED)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.save_as(path, enforce_file_format=True)
    return path
